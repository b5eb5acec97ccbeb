"""The OpenSearch stores of auth (`MARIE_AUTH_STORE=opensearch`): keys, their
change log, the usage ledger and the limit counters, on opensearch-py's
async client (as the memory service's store).

Indices (`<prefix>_auth_…`): `keys` (one document per key, id = key id),
`key_events` (the change log, id = its sequence number), `meta` (the
change log's sequence counter), `usage` (one document per record, id =
record id), `key_counters` (one document per key: buckets, day tokens,
slots per holder) and `budgets` (one document per key or owner with a
budget: limits and spend counters).

OpenSearch has no multi-document transactions; what must not race uses
optimistic concurrency instead (`if_seq_no` / `if_primary_term`, retried on
conflict): the event counter, revocations, updates, the counters of a
lease, budgets and their counters. A rotation writes the new key (`op_type=create`) then the retired
one, and removes the new key again if the second write fails. Writes that
are read back by search use `refresh=wait_for`.

Event sequence numbers come from the counter, and two writers may index
their events out of order: `events_after` returns events only up to the
first gap, unless the gap is older than `EVENT_GAP_SECONDS` (a writer that
died between taking a number and indexing its event).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from marie_kit.settings import opensearch_hosts
from opensearchpy import AsyncOpenSearch, ConflictError, NotFoundError, RequestError

from marie_auth.budgets import (
    KEY,
    OWNER,
    Budget,
    BudgetAsk,
    BudgetGrant,
    BudgetLimits,
    SpendCounters,
    apply_budget_lease,
)
from marie_auth.leases import (
    SLOT_TTL_SECONDS,
    Counters,
    LeaseAsk,
    LeaseGrant,
    apply_lease,
)
from marie_auth.sqlite_store import decode_page_token, encode_page_token
from marie_auth.store import KeyLimits, KeyPage, KeyRecord, KeySpec, KeyState
from marie_auth.usage import GroupBy, Row, UsageRecord

WAIT = "wait_for"
MAX_RESULTS = 10_000
#: A gap in the change log older than this is skipped (its writer died).
EVENT_GAP_SECONDS = 5.0
#: Attempts of an optimistic write before giving up.
CONFLICT_ATTEMPTS = 50
_KEYWORD = {"type": "keyword"}
_DOUBLE = {"type": "double"}
_DISABLED = {"type": "object", "enabled": False}

MAPPINGS: dict[str, dict[str, Any]] = {
    "keys": {
        "id": _KEYWORD,
        "name": _KEYWORD,
        "owner": _KEYWORD,
        "digest": _KEYWORD,
        "display": _KEYWORD,
        "scopes": _KEYWORD,
        "allowed_models": _KEYWORD,
        "limits": _DISABLED,
        "labels": _DISABLED,
        "state": _KEYWORD,
        "create_time": _DOUBLE,
        "update_time": _DOUBLE,
        "expire_time": _DOUBLE,
        "revoke_time": _DOUBLE,
        "last_used_time": _DOUBLE,
    },
    "key_events": {"seq": {"type": "long"}, "type": _KEYWORD, "key_id": _KEYWORD, "time": _DOUBLE},
    "meta": {"n": {"type": "long"}},
    "usage": {
        "id": _KEYWORD,
        "key_id": _KEYWORD,
        "owner": _KEYWORD,
        "provider": _KEYWORD,
        "model": _KEYWORD,
        "operation": _KEYWORD,
        "prompt_tokens": {"type": "long"},
        "completion_tokens": {"type": "long"},
        "latency_ms": _DOUBLE,
        "status": {"type": "integer"},
        "time": _DOUBLE,
        "cached": {"type": "boolean"},
        "cached_prompt_tokens": {"type": "long"},
        "cost_picodollars": {"type": "long"},
        "priced": {"type": "boolean"},
    },
    "key_counters": {"slots": _DISABLED},
    "budgets": {
        "kind": _KEYWORD,
        "subject": _KEYWORD,
        "daily": {"type": "long"},
        "monthly": {"type": "long"},
        "update_time": _DOUBLE,
        "counters": _DISABLED,
    },
}


def index_prefix(text: str) -> str:
    """A valid index prefix from any text (tests use one per test)."""
    return "t" + hashlib.sha256(text.encode()).hexdigest()[:12]


class _Indices:
    """One client and the index names under a prefix."""

    def __init__(self, client: AsyncOpenSearch, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def index(self, name: str) -> str:
        return f"{self.prefix}_auth_{name}"

    async def create(self, *names: str) -> None:
        for name in names:
            index = self.index(name)
            if await self.client.indices.exists(index=index):
                continue
            try:
                await self.client.indices.create(
                    index=index, body={"mappings": {"properties": MAPPINGS[name]}}
                )
            except RequestError as exc:  # another replica made it meanwhile
                if "already_exists" not in str(exc.error):
                    raise

    async def get(self, name: str, doc_id: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = await self.client.get(index=self.index(name), id=doc_id)
        except NotFoundError:
            return None
        return found

    async def search(self, name: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            answer = await self.client.search(index=self.index(name), body=body)
        except NotFoundError:
            return []
        hits: list[dict[str, Any]] = answer["hits"]["hits"]
        return hits

    async def close(self) -> None:
        await self.client.close()


async def _open(url: str, prefix: str, *names: str) -> _Indices:
    indices = _Indices(AsyncOpenSearch(hosts=opensearch_hosts(url), timeout=30), prefix)
    try:
        await indices.create(*names)
    except BaseException:
        await indices.close()
        raise
    return indices


# -- keys -----------------------------------------------------------------------


def key_document(record: KeyRecord) -> dict[str, Any]:
    spec, limits = record.spec, record.spec.limits
    return {
        "id": record.id,
        "name": spec.name,
        "owner": spec.owner,
        "digest": record.digest,
        "display": record.display,
        "scopes": list(spec.scopes),
        "allowed_models": list(spec.allowed_models),
        "limits": {
            "requests_per_minute": limits.requests_per_minute,
            "tokens_per_minute": limits.tokens_per_minute,
            "tokens_per_day": limits.tokens_per_day,
            "max_concurrent_requests": limits.max_concurrent_requests,
        },
        "labels": dict(spec.labels),
        "state": record.state.value,
        "create_time": record.create_time,
        "update_time": record.update_time,
        "expire_time": spec.expire_time,
        "revoke_time": record.revoke_time,
        "last_used_time": record.last_used_time,
    }


def key_from_document(doc: dict[str, Any]) -> KeyRecord:
    limits = doc.get("limits") or {}
    return KeyRecord(
        id=doc["id"],
        digest=doc["digest"],
        display=doc["display"],
        spec=KeySpec(
            name=doc["name"],
            owner=doc["owner"],
            scopes=tuple(doc["scopes"]),
            allowed_models=tuple(doc["allowed_models"]),
            limits=KeyLimits(
                requests_per_minute=int(limits.get("requests_per_minute", 0)),
                tokens_per_minute=int(limits.get("tokens_per_minute", 0)),
                tokens_per_day=int(limits.get("tokens_per_day", 0)),
                max_concurrent_requests=int(limits.get("max_concurrent_requests", 0)),
            ),
            expire_time=doc.get("expire_time"),
            labels=dict(doc.get("labels") or {}),
        ),
        state=KeyState(doc["state"]),
        create_time=doc["create_time"],
        update_time=doc["update_time"],
        revoke_time=doc.get("revoke_time"),
        last_used_time=doc.get("last_used_time"),
    )


def list_query(
    owner: str | None, include_inactive: bool, page_size: int, page_token: str, now: float
) -> dict[str, Any]:
    """The search body of one page of keys, newest first (keyset paging)."""
    filters: list[dict[str, Any]] = []
    if owner is not None:
        filters.append({"term": {"owner": owner}})
    if not include_inactive:
        filters.append({"term": {"state": "active"}})
        filters.append(
            {
                "bool": {
                    "should": [
                        {"bool": {"must_not": {"exists": {"field": "expire_time"}}}},
                        {"range": {"expire_time": {"gt": now}}},
                    ],
                    "minimum_should_match": 1,
                }
            }
        )
    body: dict[str, Any] = {
        "query": {"bool": {"filter": filters}},
        "sort": [{"create_time": "desc"}, {"id": "desc"}],
        "size": page_size + 1,
    }
    if page_token:
        after_time, after_id = decode_page_token(page_token)
        body["search_after"] = [after_time, after_id]
    return body


class OpenSearchKeyStore:
    """`KeyStore` on OpenSearch. Open with `await OpenSearchKeyStore.open(url, prefix=…)`."""

    def __init__(self, indices: _Indices, clock: Callable[[], float]) -> None:
        self._ix = indices
        self._clock = clock

    @classmethod
    async def open(
        cls, url: str, *, prefix: str = "marie", clock: Callable[[], float] | None = None
    ) -> OpenSearchKeyStore:
        indices = await _open(url, prefix, "keys", "key_events", "meta")
        return cls(indices, clock or time.time)

    async def get(self, key_id: str) -> KeyRecord | None:
        found = await self._ix.get("keys", key_id)
        return key_from_document(found["_source"]) if found else None

    async def get_by_digest(self, digest: str) -> KeyRecord | None:
        hits = await self._ix.search("keys", {"query": {"term": {"digest": digest}}, "size": 1})
        return key_from_document(hits[0]["_source"]) if hits else None

    async def list_page(
        self,
        *,
        owner: str | None,
        include_inactive: bool,
        page_size: int,
        page_token: str,
        now: float,
    ) -> KeyPage:
        if page_size < 1:
            raise ValueError("page_size must be positive")
        body = list_query(owner, include_inactive, page_size, page_token, now)
        hits = await self._ix.search("keys", body)
        records = [key_from_document(h["_source"]) for h in hits[:page_size]]
        more = len(hits) > page_size
        token = encode_page_token(records[-1].create_time, records[-1].id) if more else ""
        return KeyPage(records, token)

    async def ids_expiring(self, after: float, until: float) -> list[str]:
        body = {
            "query": {
                "bool": {
                    "filter": [
                        {"term": {"state": "active"}},
                        {"range": {"expire_time": {"gt": after, "lte": until}}},
                    ]
                }
            },
            "sort": [{"expire_time": "asc"}],
            "size": MAX_RESULTS,
            "_source": ["id"],
        }
        return [str(h["_source"]["id"]) for h in await self._ix.search("keys", body)]

    async def create(self, record: KeyRecord) -> None:
        await self._ix.client.index(
            index=self._ix.index("keys"),
            id=record.id,
            body=key_document(record),
            op_type="create",
            refresh=WAIT,
        )

    async def _change(
        self, key_id: str, change: Callable[[KeyRecord], KeyRecord | None]
    ) -> KeyRecord | None:
        """Read, change and write back one key under optimistic concurrency.
        `change` returns None to leave the key as it is."""
        for _ in range(CONFLICT_ATTEMPTS):
            found = await self._ix.get("keys", key_id)
            if found is None:
                return None
            record = key_from_document(found["_source"])
            changed = change(record)
            if changed is None:
                return record
            try:
                await self._ix.client.index(
                    index=self._ix.index("keys"),
                    id=key_id,
                    body=key_document(changed),
                    if_seq_no=found["_seq_no"],
                    if_primary_term=found["_primary_term"],
                    refresh=WAIT,
                )
            except ConflictError:
                continue
            return changed
        raise RuntimeError(f"key {key_id} kept changing under this write")

    async def update(self, key_id: str, spec: KeySpec, update_time: float) -> KeyRecord | None:
        def change(record: KeyRecord) -> KeyRecord:
            return _replace(record, spec=spec, update_time=update_time)

        return await self._change(key_id, change)

    async def revoke(self, key_id: str, revoke_time: float) -> KeyRecord | None:
        def change(record: KeyRecord) -> KeyRecord | None:
            if record.state is KeyState.REVOKED:
                return None  # the first revoke time stays
            return _replace(
                record, state=KeyState.REVOKED, revoke_time=revoke_time, update_time=revoke_time
            )

        return await self._change(key_id, change)

    async def rotate(self, new: KeyRecord, retired: KeyRecord) -> None:
        await self.create(new)
        try:
            await self._ix.client.index(
                index=self._ix.index("keys"),
                id=retired.id,
                body=key_document(retired),
                refresh=WAIT,
            )
        except BaseException:
            # No half rotation: the new key goes again (best effort).
            await asyncio.shield(self._delete_quietly(new.id))
            raise

    async def _delete_quietly(self, key_id: str) -> None:
        # Best effort; the original error is what the caller sees.
        with contextlib.suppress(Exception):
            await self._ix.client.delete(index=self._ix.index("keys"), id=key_id, refresh=WAIT)

    async def touch_last_used(self, key_id: str, used_time: float) -> None:
        def change(record: KeyRecord) -> KeyRecord | None:
            if record.last_used_time is not None and record.last_used_time >= used_time:
                return None  # never backwards
            return _replace(record, last_used_time=used_time)

        await self._change(key_id, change)

    # -- the change log ----------------------------------------------------------

    async def _next_seq(self) -> int:
        index = self._ix.index("meta")
        for _ in range(CONFLICT_ATTEMPTS):
            found = await self._ix.get("meta", "event_seq")
            try:
                if found is None:
                    await self._ix.client.index(
                        index=index, id="event_seq", body={"n": 1}, op_type="create"
                    )
                    return 1
                n = int(found["_source"]["n"]) + 1
                await self._ix.client.index(
                    index=index,
                    id="event_seq",
                    body={"n": n},
                    if_seq_no=found["_seq_no"],
                    if_primary_term=found["_primary_term"],
                )
            except ConflictError:
                continue
            return n
        raise RuntimeError("the event counter kept changing under this write")

    async def append_event(self, event_type: str, key_id: str, at: float) -> int:
        seq = await self._next_seq()
        await self._ix.client.index(
            index=self._ix.index("key_events"),
            id=str(seq),
            body={"seq": seq, "type": event_type, "key_id": key_id, "time": at},
            refresh=WAIT,
        )
        return seq

    async def last_event_seq(self) -> int:
        found = await self._ix.get("meta", "event_seq")
        return int(found["_source"]["n"]) if found else 0

    async def events_after(self, seq: int, limit: int = 1000) -> list[tuple[int, str, str, float]]:
        body = {
            "query": {"range": {"seq": {"gt": seq}}},
            "sort": [{"seq": "asc"}],
            "size": limit,
        }
        hits = await self._ix.search("key_events", body)
        events: list[tuple[int, str, str, float]] = []
        expected = seq + 1
        for hit in hits:
            e = hit["_source"]
            if e["seq"] != expected and self._clock() - float(e["time"]) < EVENT_GAP_SECONDS:
                break  # an earlier number is still being written: wait for it
            events.append((int(e["seq"]), str(e["type"]), str(e["key_id"]), float(e["time"])))
            expected = int(e["seq"]) + 1
        return events

    async def prune_events(self, before: float) -> None:
        await self._ix.client.delete_by_query(
            index=self._ix.index("key_events"), body={"query": {"range": {"time": {"lt": before}}}}
        )

    async def probe_write(self) -> None:
        # Refused (cluster_block_exception) while the index is read-only for
        # lack of disk; a delete is allowed even then.
        index = self._ix.index("meta")
        await self._ix.client.index(index=index, id="storage_probe", body={"n": 0})
        await self._ix.client.delete(index=index, id="storage_probe", ignore=404)

    async def close(self) -> None:
        await self._ix.close()


def _replace(record: KeyRecord, **changes: Any) -> KeyRecord:
    return dataclasses.replace(record, **changes)


# -- usage ----------------------------------------------------------------------

_GROUP_FIELD = {GroupBy.MODEL: "model", GroupBy.KEY: "key_id", GroupBy.OWNER: "owner"}


def usage_query(start: float, end: float, key_id: str, owner: str) -> dict[str, Any]:
    """The search body selecting the ledger records to total (paged by search_after)."""
    filters: list[dict[str, Any]] = [{"range": {"time": {"gte": start, "lt": end}}}]
    if key_id:
        filters.append({"term": {"key_id": key_id}})
    if owner:
        filters.append({"term": {"owner": owner}})
    return {
        "query": {"bool": {"filter": filters}},
        "sort": [{"time": "asc"}, {"id": "asc"}],
        "size": MAX_RESULTS,
        "_source": [
            "time",
            "model",
            "key_id",
            "owner",
            "prompt_tokens",
            "completion_tokens",
            "status",
            "latency_ms",
            "cached",
            "cached_prompt_tokens",
            "cost_picodollars",
            "priced",
        ],
    }


class OpenSearchUsageStore:
    """The usage ledger on OpenSearch: the same rows as `SqliteUsageStore`."""

    def __init__(self, indices: _Indices) -> None:
        self._ix = indices

    @classmethod
    async def open(cls, url: str, *, prefix: str = "marie") -> OpenSearchUsageStore:
        indices = await _open(url, prefix, "usage")
        try:
            # Migration: an index made before `cached` gets its mapping (adding
            # a field to a mapping is allowed and idempotent).
            await indices.client.indices.put_mapping(
                index=indices.index("usage"), body={"properties": {"cached": {"type": "boolean"}}}
            )
        except BaseException:
            await indices.close()
            raise
        return cls(indices)

    async def insert(self, records: Sequence[UsageRecord]) -> int:
        """One bulk request of `create`s: ids already stored conflict and are not
        counted; acknowledged means written to the translog (durable)."""
        body: list[dict[str, Any]] = []
        for r in records:
            body.append({"create": {"_index": self._ix.index("usage"), "_id": r.id}})
            body.append(dataclasses.asdict(r))
        answer = await self._ix.client.bulk(body=body, refresh=WAIT)
        created = 0
        for item in answer["items"]:
            status = item["create"]["status"]
            if status == 201:
                created += 1
            elif status != 409:
                raise RuntimeError(f"usage record not stored: {item['create'].get('error')}")
        return created

    async def select(
        self, start: float, end: float, key_id: str, owner: str, group_by: GroupBy
    ) -> list[Row]:
        body = usage_query(start, end, key_id, owner)
        rows: list[Row] = []
        while True:
            hits = await self._ix.search("usage", body)
            for hit in hits:
                s = hit["_source"]
                if group_by is GroupBy.DAY:
                    group = dt.datetime.fromtimestamp(s["time"], dt.UTC).strftime("%Y-%m-%d")
                elif group_by is GroupBy.NONE:
                    group = ""
                else:
                    group = str(s[_GROUP_FIELD[group_by]])
                rows.append(
                    Row(
                        group,
                        int(s["prompt_tokens"]),
                        int(s["completion_tokens"]),
                        int(s["status"]),
                        float(s["latency_ms"]),
                        # Records stored before the field have none: not cached.
                        bool(s.get("cached", False)),
                        # Documents from before the spend fields lack them.
                        int(s.get("cached_prompt_tokens", 0)),
                        int(s.get("cost_picodollars", 0)),
                        bool(s.get("priced", False)),
                    )
                )
            if len(hits) < MAX_RESULTS:
                return rows
            body["search_after"] = hits[-1]["sort"]

    async def close(self) -> None:
        await self._ix.close()


# -- lease counters ---------------------------------------------------------------


class OpenSearchLeaseStore:
    """The limit counters on OpenSearch: one document per key, changed under
    optimistic concurrency (so replicas agree, as with SQLite's transactions)."""

    def __init__(self, indices: _Indices) -> None:
        self._ix = indices

    @classmethod
    async def open(cls, url: str, *, prefix: str = "marie") -> OpenSearchLeaseStore:
        return cls(await _open(url, prefix, "key_counters"))

    async def lease(self, limits: KeyLimits, ask: LeaseAsk, now: float) -> LeaseGrant:
        index = self._ix.index("key_counters")
        for _ in range(CONFLICT_ATTEMPTS):
            found = await self._ix.get("key_counters", ask.key_id)
            doc = found["_source"] if found else None
            counters = Counters(**doc["counters"]) if doc else None
            slots: dict[str, list[float]] = {
                holder: held
                for holder, held in (doc["slots"] if doc else {}).items()
                if held[1] > now and holder != ask.holder
            }
            other = int(sum(held[0] for held in slots.values()))
            counters, grant = apply_lease(counters, limits, ask, other, now)
            if grant.slots:
                slots[ask.holder] = [grant.slots, now + SLOT_TTL_SECONDS]
            body = {"counters": dataclasses.asdict(counters), "slots": slots}
            try:
                if found is None:
                    await self._ix.client.index(
                        index=index, id=ask.key_id, body=body, op_type="create"
                    )
                else:
                    await self._ix.client.index(
                        index=index,
                        id=ask.key_id,
                        body=body,
                        if_seq_no=found["_seq_no"],
                        if_primary_term=found["_primary_term"],
                    )
            except ConflictError:
                continue
            return grant
        raise RuntimeError(f"the counters of {ask.key_id} kept changing under this lease")

    async def close(self) -> None:
        await self._ix.close()


# -- budgets -----------------------------------------------------------------------


def budget_id(kind: str, subject: str) -> str:
    """A budget's document id: a digest, as a subject (up to 256 characters of
    any script) may be longer than OpenSearch's 512-byte id."""
    return hashlib.sha256(f"{kind}\0{subject}".encode()).hexdigest()


def budget_list_query(after: tuple[str, str] | None, limit: int) -> dict[str, Any]:
    """One page of budgets in (kind, subject) order, as SQLite lists them
    (keyword fields sort by UTF-8 bytes, as SQLite's BINARY collation)."""
    body: dict[str, Any] = {
        "query": {"match_all": {}},
        "sort": [{"kind": "asc"}, {"subject": "asc"}],
        "size": limit,
        "_source": ["kind", "subject", "daily", "monthly", "update_time"],
    }
    if after is not None:
        body["search_after"] = list(after)
    return body


def _budget_from(doc: dict[str, Any]) -> Budget:
    return Budget(
        str(doc["kind"]),
        str(doc["subject"]),
        BudgetLimits(int(doc["daily"]), int(doc["monthly"])),
        float(doc["update_time"]),
    )


def _counters_from(doc: dict[str, Any]) -> SpendCounters | None:
    c = doc.get("counters")
    return SpendCounters(**{k: int(v) for k, v in c.items()}) if c else None


class OpenSearchBudgetStore:
    """`BudgetStore` on OpenSearch: one document per subject (a key or an
    owner) holding its limits and its counters, so a budget and what was
    leased from it change together; every change is a read and a write under
    optimistic concurrency, retried on conflict, and counters exist only
    while their document does (a lease never creates one).

    A lease under one budget is one such write, exactly as SQLite's
    transaction. Under a key budget and its owner's there is no transaction
    across the two documents: the owner's counters are charged first (at most
    its room), then the key's (at most the key's room and what the owner
    granted), and any excess goes back to the owner. No limit is ever granted
    past; in between, the owner's room may look smaller than it is for one
    round trip. An auth process that dies between the writes (cancellation
    does not stop them) leaves up to one lease charged to the owner for the
    rest of the day and month."""

    def __init__(self, indices: _Indices) -> None:
        self._ix = indices

    @classmethod
    async def open(cls, url: str, *, prefix: str = "marie") -> OpenSearchBudgetStore:
        return cls(await _open(url, prefix, "budgets"))

    async def _get(self, kind: str, subject: str) -> dict[str, Any] | None:
        return await self._ix.get("budgets", budget_id(kind, subject))

    async def _write(self, found: dict[str, Any], body: dict[str, Any], **kwargs: Any) -> None:
        await self._ix.client.index(
            index=self._ix.index("budgets"),
            id=found["_id"],
            body=body,
            if_seq_no=found["_seq_no"],
            if_primary_term=found["_primary_term"],
            **kwargs,
        )

    async def _charge(
        self,
        kind: str,
        subject: str,
        ask: BudgetAsk,
        now: float,
        found: dict[str, Any] | None,
    ) -> BudgetGrant:
        """Settle and lease on one subject's counters alone; `found` is its
        document as just read (one round trip saved), None to read it."""
        first = True
        for _ in range(CONFLICT_ATTEMPTS):
            if not first or found is None:
                found = await self._get(kind, subject)
            first = False
            if found is None:
                return BudgetGrant(budgeted=False)  # removed meanwhile
            doc = found["_source"]
            limits, counters = _budget_from(doc).limits, _counters_from(doc)
            if kind == KEY:
                new, _, grant = apply_budget_lease(
                    limits, counters, BudgetLimits(), None, ask=ask, now=now
                )
            else:
                _, new, grant = apply_budget_lease(
                    BudgetLimits(), None, limits, counters, ask=ask, now=now
                )
            if new is None:
                return grant  # no limit (a document is never stored without one)
            try:
                await self._write(found, {**doc, "counters": dataclasses.asdict(new)})
            except (ConflictError, NotFoundError):
                continue
            return grant
        raise RuntimeError(f"the budget of {kind} {subject} kept changing under this lease")

    async def lease(self, owner: str, ask: BudgetAsk, now: float) -> BudgetGrant:
        # Shielded: a cancelled call still finishes its writes (see the class).
        return await asyncio.shield(self._lease(owner, ask, now))

    async def _lease(self, owner: str, ask: BudgetAsk, now: float) -> BudgetGrant:
        key_doc, owner_doc = await asyncio.gather(
            self._get(KEY, ask.key_id),
            self._get(OWNER, owner) if owner else asyncio.sleep(0, None),
        )
        if key_doc is None and owner_doc is None:
            return BudgetGrant(budgeted=False)  # read-only: nothing to lease
        if owner_doc is None:
            return await self._charge(KEY, ask.key_id, ask, now, key_doc)
        if key_doc is None:
            return await self._charge(OWNER, owner, ask, now, owner_doc)
        # Both: what to ask for comes from both as read (the tightest limit's share).
        key_src, owner_src = key_doc["_source"], owner_doc["_source"]
        _, _, planned = apply_budget_lease(
            _budget_from(key_src).limits,
            _counters_from(key_src),
            _budget_from(owner_src).limits,
            _counters_from(owner_src),
            ask=ask,
            now=now,
        )
        wanted = ask.spend or planned.lease_size
        on_owner = await self._charge(
            OWNER, owner, _asking(ask, wanted, ask.spend_balance), now, owner_doc
        )
        on_key = await self._charge(
            KEY,
            ask.key_id,
            _asking(ask, on_owner.spend if on_owner.budgeted else wanted, ask.spend_balance),
            now,
            key_doc,
        )
        if not on_key.budgeted:
            return on_owner
        if not on_owner.budgeted:
            return on_key
        granted = on_key.spend
        if on_owner.spend > granted:
            # The key had less room: the owner gets the difference back.
            await self._charge(OWNER, owner, _asking(ask, 0, on_owner.spend - granted), now, None)
        # The tightest of both as each was charged (ties: the key's, as SQLite).
        key_room = on_key.remaining + on_key.spend
        owner_room = on_owner.remaining + on_owner.spend
        tight = on_key if key_room <= owner_room else on_owner
        room = min(key_room, owner_room)
        return dataclasses.replace(tight, spend=granted, remaining=max(0, room - granted))

    async def get(self, kind: str, subject: str) -> Budget | None:
        found = await self._get(kind, subject)
        return _budget_from(found["_source"]) if found else None

    async def put(self, budget: Budget, seed: SpendCounters, now: float) -> None:
        """Store the limits (none: delete the document and its counters);
        counters are seeded with `seed` when the subject had none."""
        kind, subject, limits = budget.kind, budget.subject, budget.limits
        doc_id = budget_id(kind, subject)
        for _ in range(CONFLICT_ATTEMPTS):
            found = await self._get(kind, subject)
            try:
                if not limits.any:
                    if found is not None:
                        await self._ix.client.delete(
                            index=self._ix.index("budgets"),
                            id=doc_id,
                            if_seq_no=found["_seq_no"],
                            if_primary_term=found["_primary_term"],
                            refresh=WAIT,
                        )
                    return
                counters = (_counters_from(found["_source"]) if found else None) or seed
                body = {
                    "kind": kind,
                    "subject": subject,
                    "daily": limits.daily,
                    "monthly": limits.monthly,
                    "update_time": now,
                    "counters": dataclasses.asdict(counters),
                }
                if found is None:
                    await self._ix.client.index(
                        index=self._ix.index("budgets"),
                        id=doc_id,
                        body=body,
                        op_type="create",
                        refresh=WAIT,
                    )
                else:
                    await self._write(found, body, refresh=WAIT)
            except (ConflictError, NotFoundError):
                continue
            return
        raise RuntimeError(f"the budget of {kind} {subject} kept changing under this write")

    async def list_page(self, after: tuple[str, str] | None, limit: int) -> list[Budget]:
        hits = await self._ix.search("budgets", budget_list_query(after, limit))
        return [_budget_from(h["_source"]) for h in hits]

    async def close(self) -> None:
        await self._ix.close()


def _asking(ask: BudgetAsk, spend: int, balance: int) -> BudgetAsk:
    """`ask` for one subject: settle `balance`, then lease `spend` (0: nothing)."""
    return BudgetAsk(
        ask.key_id, ask.holder, spend=spend, spend_balance=balance, release=ask.release or not spend
    )
