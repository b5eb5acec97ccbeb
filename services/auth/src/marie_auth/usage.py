"""The usage ledger: what every finished request used, stored by auth.

`UsageLedger` is the core (checks, totals), free of gRPC; `SqliteUsageStore`
keeps the records in a table of the auth SQLite file, on its own connection
and worker thread (WAL lets it write beside the key store). A batch is one
transaction with `synchronous = FULL`: once `record` returns, the batch
survives a crash or a power cut. Record ids make a re-sent batch harmless.

Each row carries its cost in picodollars (10⁻¹² USD, an integer), computed
by the recorder from the price table (`marie_kit.prices`); totals add those
integers, so a total is exactly the sum of its rows.
"""

from __future__ import annotations

import asyncio
import functools
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

from marie_kit.prices import MAX_PICODOLLARS
from marie_kit.sqlite import open_on_thread, write_transaction

from marie_auth.errors import invalid_argument

MAX_BATCH = 1000
MAX_TEXT = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_records (
    id                TEXT PRIMARY KEY,
    key_id            TEXT NOT NULL,
    owner             TEXT NOT NULL,
    provider          TEXT NOT NULL,
    model             TEXT NOT NULL,
    operation         TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_ms        REAL NOT NULL,
    status            INTEGER NOT NULL,
    time              REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_time ON usage_records (time);
CREATE INDEX IF NOT EXISTS usage_key_time ON usage_records (key_id, time);
CREATE INDEX IF NOT EXISTS usage_owner_time ON usage_records (owner, time);
"""
#: Columns added after the table's first version; added by name when missing
#: (the file's PRAGMA user_version belongs to the key store).
_ADDED_COLUMNS = (
    # Answered from the response cache (no upstream call, no tokens).
    ("cached", "INTEGER NOT NULL DEFAULT 0"),
    ("cached_prompt_tokens", "INTEGER NOT NULL DEFAULT 0"),
    ("cost_picodollars", "INTEGER NOT NULL DEFAULT 0"),
    # Rows from before prices existed were not priced.
    ("priced", "INTEGER NOT NULL DEFAULT 0"),
)
_INSERT = (
    "INSERT OR IGNORE INTO usage_records (id, key_id, owner, provider, model, operation, "
    "prompt_tokens, completion_tokens, latency_ms, status, time, cached, cached_prompt_tokens, "
    "cost_picodollars, priced) VALUES "
    "(:id, :key_id, :owner, :provider, :model, :operation, :prompt_tokens, "
    ":completion_tokens, :latency_ms, :status, :time, :cached, :cached_prompt_tokens, "
    ":cost_picodollars, :priced)"
)


# The group expression is chosen from this table, never from input.
_GROUP_SQL = {
    "": "''",
    "day": "strftime('%Y-%m-%d', time, 'unixepoch')",
    "model": "model",
    "key": "key_id",
    "owner": "owner",
}

T = TypeVar("T")


class GroupBy(StrEnum):
    NONE = ""
    DAY = "day"
    MODEL = "model"
    KEY = "key"
    OWNER = "owner"


@dataclass(frozen=True)
class UsageRecord:
    """One finished request (one model of a comparison). Times are unix seconds."""

    id: str
    key_id: str
    owner: str
    provider: str
    model: str
    operation: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    status: int
    time: float
    #: Answered from the response cache (no upstream call; no tokens).
    cached: bool = False
    cached_prompt_tokens: int = 0
    cost_picodollars: int = 0
    priced: bool = False


class Row(NamedTuple):
    """What totals need of one selected record."""

    group: str
    prompt_tokens: int
    completion_tokens: int
    status: int
    latency_ms: float
    cached: bool
    cached_prompt_tokens: int
    cost_picodollars: int
    priced: bool


@dataclass
class Totals:
    group: str = ""
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    cached_requests: int = 0
    cached_prompt_tokens: int = 0
    #: Picodollars (10⁻¹² USD), exact.
    cost_picodollars: int = 0
    unpriced_requests: int = 0


@dataclass
class UsageReport:
    total: Totals
    groups: list[Totals] = field(default_factory=list)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of ascending values; 0 for none."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _check(records: Sequence[UsageRecord]) -> None:
    if not 1 <= len(records) <= MAX_BATCH:
        raise invalid_argument("records", f"a batch holds 1 to {MAX_BATCH} records")
    for i, r in enumerate(records):
        where = f"records[{i}]"
        for name in ("id", "key_id"):
            if not getattr(r, name):
                raise invalid_argument(f"{where}.{name}", f"{name} is required")
        for name in ("id", "key_id", "owner", "provider", "model", "operation"):
            if len(getattr(r, name)) > MAX_TEXT:
                raise invalid_argument(f"{where}.{name}", f"{name} is at most {MAX_TEXT} chars")
        for name in ("prompt_tokens", "completion_tokens", "latency_ms", "cached_prompt_tokens"):
            value = getattr(r, name)
            if value < 0 or not math.isfinite(value):
                raise invalid_argument(f"{where}.{name}", f"{name} must not be negative")
        if r.cached_prompt_tokens > r.prompt_tokens:
            raise invalid_argument(
                f"{where}.cached_prompt_tokens",
                "cached_prompt_tokens must not exceed prompt_tokens",
            )
        if not 0 <= r.cost_picodollars <= MAX_PICODOLLARS:
            raise invalid_argument(
                f"{where}.cost_picodollars",
                f"cost_picodollars must be between 0 and {MAX_PICODOLLARS}",
            )
        if not 100 <= r.status <= 599:
            raise invalid_argument(f"{where}.status", "status must be an HTTP status")
        if r.time <= 0:
            raise invalid_argument(f"{where}.time", "time is required")


class SqliteUsageStore:
    """The usage table, on its own connection and thread. Open with `await open(path)`."""

    def __init__(self, connection: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self._db = connection
        self._executor = executor
        self._closed = False

    @classmethod
    async def open(cls, path: Path, *, max_bytes: int = 0) -> SqliteUsageStore:
        connection, executor = await open_on_thread(
            path, _SCHEMA, thread_name="marie-auth-usage", max_bytes=max_bytes
        )
        store = cls(connection, executor)
        try:
            await store._run(_add_columns, connection)
        except BaseException:
            await store.close()
            raise
        return store

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError("usage store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def _insert(self, rows: list[dict[str, Any]]) -> int:
        before = self._db.total_changes
        with write_transaction(self._db):
            self._db.executemany(_INSERT, rows)
        return self._db.total_changes - before

    async def insert(self, records: Sequence[UsageRecord]) -> int:
        rows = [vars(r) for r in records]
        return await self._run(self._insert, rows)

    def _select(
        self, start: float, end: float, key_id: str, owner: str, group_by: GroupBy
    ) -> list[Row]:
        clauses = ["time >= :start", "time < :end"]
        params: dict[str, Any] = {"start": start, "end": end}
        if key_id:
            clauses.append("key_id = :key_id")
            params["key_id"] = key_id
        if owner:
            clauses.append("owner = :owner")
            params["owner"] = owner
        # Only fixed fragments are joined: the group expression comes from
        # _GROUP_SQL, the clauses are literals; values are bound parameters.
        sql = (
            f"SELECT {_GROUP_SQL[group_by.value]} AS grp, prompt_tokens, completion_tokens, "  # noqa: S608
            f"status, latency_ms, cached, cached_prompt_tokens, cost_picodollars, priced "
            f"FROM usage_records WHERE {' AND '.join(clauses)}"
        )
        return [
            Row(str(r[0]), r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], bool(r[8]))
            for r in self._db.execute(sql, params)
        ]

    async def select(
        self, start: float, end: float, key_id: str, owner: str, group_by: GroupBy
    ) -> list[Row]:
        return await self._run(self._select, start, end, key_id, owner, group_by)

    async def close(self) -> None:
        if self._closed:
            return
        await self._run(self._db.close)
        self._closed = True
        self._executor.shutdown(wait=False)


def _add_columns(db: sqlite3.Connection) -> None:
    """Migration: the columns added after the table's first version, added to a
    ledger made before them (idempotent; 0 in the rows already there)."""
    have = {str(row[1]) for row in db.execute("PRAGMA table_info(usage_records)")}
    with write_transaction(db):
        for name, spec in _ADDED_COLUMNS:
            if name not in have:
                db.execute(f"ALTER TABLE usage_records ADD COLUMN {name} {spec}")


def _totals(group: str, rows: list[Row]) -> Totals:
    latencies = sorted(row.latency_ms for row in rows)
    return Totals(
        group=group,
        requests=len(rows),
        prompt_tokens=sum(row.prompt_tokens for row in rows),
        completion_tokens=sum(row.completion_tokens for row in rows),
        errors=sum(1 for row in rows if row.status >= 400),
        latency_p50_ms=percentile(latencies, 50),
        latency_p95_ms=percentile(latencies, 95),
        cached_requests=sum(1 for row in rows if row.cached),
        cached_prompt_tokens=sum(row.cached_prompt_tokens for row in rows),
        cost_picodollars=sum(row.cost_picodollars for row in rows),
        unpriced_requests=sum(1 for row in rows if not row.priced),
    )


class UsageStore(Protocol):
    """Where the ledger's records live (SQLite or OpenSearch)."""

    async def insert(self, records: Sequence[UsageRecord]) -> int:
        """Store the records (one durable write); how many were not stored before."""

    async def select(
        self, start: float, end: float, key_id: str, owner: str, group_by: GroupBy
    ) -> list[Row]:
        """What totals need of each selected record."""

    async def close(self) -> None: ...


class UsageLedger:
    """Checks and stores batches of usage records; totals them."""

    def __init__(self, store: UsageStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    async def record(self, records: Sequence[UsageRecord]) -> int:
        """Store the batch durably; the number of records not stored before."""
        _check(records)
        return await self._store.insert(records)

    async def query(
        self,
        start: float,
        end: float,
        *,
        key_id: str = "",
        owner: str = "",
        group_by: GroupBy = GroupBy.NONE,
    ) -> UsageReport:
        """Totals of the records in [start, end), overall and per group.

        Percentiles are computed from the selected records' latencies (the
        query reads each selected row once; fine for a team's ledger, a
        rollup table would be the next step for very large ones)."""
        if start <= 0:
            raise invalid_argument("start_time", "start_time is required")
        if end <= start:
            raise invalid_argument("end_time", "end_time must be after start_time")
        rows = await self._store.select(start, end, key_id, owner, group_by)
        report = UsageReport(_totals("", rows))
        if group_by is not GroupBy.NONE:
            by_group: dict[str, list[Row]] = {}
            for row in rows:
                by_group.setdefault(row.group, []).append(row)
            report.groups = [_totals(g, by_group[g]) for g in sorted(by_group)]
        return report

    async def close(self) -> None:
        await self._store.close()
