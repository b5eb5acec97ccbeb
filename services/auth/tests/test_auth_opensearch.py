"""The OpenSearch stores beyond the shared suite: the request bodies (as
OpenSearch's query DSL documents them), and optimistic concurrency holding
when replicas lease from one key's counters or budget at once (on
osmem-server, or OPENSEARCH_URL when set)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from marie_auth.budgets import (
    KEY,
    OWNER,
    Budget,
    BudgetAsk,
    BudgetLimits,
    SpendCounters,
    day_of,
    month_of,
)
from marie_auth.leases import LeaseAsk
from marie_auth.opensearch_store import (
    OpenSearchBudgetStore,
    OpenSearchLeaseStore,
    budget_list_query,
    index_prefix,
    list_query,
    usage_query,
)
from marie_auth.sqlite_store import encode_page_token
from marie_auth.store import KeyLimits


def test_a_page_of_keys_is_a_filtered_keyset_search() -> None:
    token = encode_page_token(1700000000.5, "key_B")
    body = list_query("acme", False, 50, token, now=1800000000.0)
    assert body["size"] == 51  # one more says whether a next page exists
    assert body["sort"] == [{"create_time": "desc"}, {"id": "desc"}]
    assert body["search_after"] == [1700000000.5, "key_B"]
    filters = body["query"]["bool"]["filter"]
    assert {"term": {"owner": "acme"}} in filters
    assert {"term": {"state": "active"}} in filters
    # Unexpired: no expiry at all, or one still ahead.
    (expiry,) = [f for f in filters if "bool" in f]
    assert expiry["bool"]["minimum_should_match"] == 1
    assert {"range": {"expire_time": {"gt": 1800000000.0}}} in expiry["bool"]["should"]
    everything = list_query(None, True, 10, "", now=0.0)
    assert everything["query"]["bool"]["filter"] == []
    assert "search_after" not in everything


def test_the_usage_selection_filters_in_filter_context() -> None:
    body: dict[str, Any] = usage_query(10.0, 20.0, "key_A", "acme")
    assert body["query"]["bool"]["filter"] == [
        {"range": {"time": {"gte": 10.0, "lt": 20.0}}},
        {"term": {"key_id": "key_A"}},
        {"term": {"owner": "acme"}},
    ]
    # A stable total order for search_after paging past 10 000 records.
    assert body["sort"] == [{"time": "asc"}, {"id": "asc"}]


def test_a_page_of_budgets_is_a_keyset_search_in_subject_order() -> None:
    body = budget_list_query(("key", "key_B"), 3)
    assert body["sort"] == [{"kind": "asc"}, {"subject": "asc"}]
    assert body["search_after"] == ["key", "key_B"]
    assert body["size"] == 3
    assert "search_after" not in budget_list_query(None, 3)


async def test_two_replicas_leasing_at_once_never_grant_more_than_the_bucket(
    osmem_clone: Any, tmp_path: Path
) -> None:
    url = os.environ.get("OPENSEARCH_URL") or osmem_clone.url
    prefix = index_prefix(str(tmp_path))
    stores = [await OpenSearchLeaseStore.open(url, prefix=prefix) for _ in range(2)]
    limits = KeyLimits(requests_per_minute=30, max_concurrent_requests=4)
    now = time.time()
    try:
        grants = await asyncio.gather(
            *(
                stores[i % 2].lease(
                    limits, LeaseAsk("key_X", f"gw-{i % 2}", requests=4, slots=2), now
                )
                for i in range(16)
            )
        )
    finally:
        for store in stores:
            await store.close()
    # Conflicting writes were retried, not lost: exactly the bucket was handed out.
    assert sum(g.requests for g in grants) == 30
    # Each holder's latest ask sets its slots; together never above the cap.
    assert max(g.slots for g in grants) <= 4


USD = 10**12


async def _budget_stores(url: str, prefix: str, n: int) -> list[OpenSearchBudgetStore]:
    return [await OpenSearchBudgetStore.open(url, prefix=prefix) for _ in range(n)]


async def test_holders_leasing_one_key_budget_at_once_never_get_more_than_its_room(
    osmem_clone: Any, tmp_path: Path
) -> None:
    url = os.environ.get("OPENSEARCH_URL") or osmem_clone.url
    stores = await _budget_stores(url, index_prefix(str(tmp_path)), 3)
    now = time.time()
    seed = SpendCounters(day_of(now), USD // 4, month_of(now), USD // 4)  # spent already
    try:
        await stores[0].put(Budget(KEY, "key_X", BudgetLimits(daily=USD)), seed, now)
        grants = await asyncio.gather(
            *(
                stores[i % 3].lease("", BudgetAsk("key_X", f"gw-{i % 3}", spend=USD // 10), now)
                for i in range(12)
            )
        )
        # Conflicting writes were retried, not lost: exactly the room was handed out.
        assert sum(g.spend for g in grants) == USD - USD // 4
        assert min(g.remaining for g in grants) == 0
        refused = await stores[1].lease("", BudgetAsk("key_X", "gw-9", spend=1), now)
        assert (refused.budgeted, refused.spend) == (True, 0)
    finally:
        for store in stores:
            await store.close()


async def test_keys_of_one_owner_leasing_at_once_hold_both_budgets(
    osmem_clone: Any, tmp_path: Path
) -> None:
    """A lease under a key budget and its owner's writes two documents; the
    owner's room is what every key's grants add up to, no more, and what a
    key could not take goes back to the owner."""
    url = os.environ.get("OPENSEARCH_URL") or osmem_clone.url
    stores = await _budget_stores(url, index_prefix(str(tmp_path)), 3)
    now = time.time()
    empty = SpendCounters(day_of(now), 0, month_of(now), 0)
    keys = [f"key_{i}" for i in range(4)]
    try:
        # Four keys of half a dollar each and an owner of a dollar and a half:
        # each binds in turn (0.75 asked of each key, 3 of the owner).
        await stores[0].put(Budget(OWNER, "team", BudgetLimits(monthly=3 * USD // 2)), empty, now)
        for key in keys:
            await stores[0].put(Budget(KEY, key, BudgetLimits(daily=USD // 2)), empty, now)
        asks = [(key, USD // 4 + i) for i in range(3) for key in keys]
        grants = await asyncio.gather(
            *(
                stores[i % 3].lease("team", BudgetAsk(key, f"gw-{i % 3}", spend=spend), now)
                for i, (key, spend) in enumerate(asks)
            )
        )
        per_key = {
            key: sum(g.spend for (k, _), g in zip(asks, grants, strict=True) if k == key)
            for key in keys
        }
        assert all(spent <= USD // 2 for spent in per_key.values())
        total = sum(per_key.values())
        assert USD <= total <= 3 * USD // 2
        # The owner's counters hold exactly what was granted: nothing leaked.
        found = await stores[2]._get(OWNER, "team")
        assert found is not None
        assert found["_source"]["counters"]["month_spend"] == total
        for key in keys:
            doc = await stores[2]._get(KEY, key)
            assert doc is not None
            assert doc["_source"]["counters"]["day_spend"] == per_key[key]
    finally:
        for store in stores:
            await store.close()
