"""The OpenSearch stores beyond the shared suite: the request bodies (as
OpenSearch's query DSL documents them), and optimistic concurrency holding
when two replicas lease from one key's counters at once (on osmem-server, or
OPENSEARCH_URL when set)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from marie_auth.leases import LeaseAsk
from marie_auth.opensearch_store import (
    OpenSearchLeaseStore,
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
