"""Leases of a key's limits to gateways: the counters every gateway replica
shares, kept by auth in its store.

A key's counters are a requests-per-minute bucket, a tokens-per-minute bucket
and the tokens of the current UTC day (the same meaning as the gateway's
`LocalLimiter`), plus the concurrency slots each holder (gateway) holds.
A gateway takes a *lease* — a few requests, a few tokens, some slots — out of
these counters, admits requests from it without asking again, and comes back
(in the background) before it runs out, settling what it did with the last
lease: unused requests given back, its token balance (unused tokens given
back, or tokens used beyond the lease taken now).

Every lease is one `BEGIN IMMEDIATE` transaction on the shared SQLite file:
several auth replicas on the same file serialise on it and agree, without
consistent hashing or another server. Bucket times are wall-clock seconds,
the one clock the replicas share.

`apply_lease` is the arithmetic (pure, tested alone); `SqliteLeaseStore` keeps
the rows; `LeaseBook` is the core the servicer calls.
"""

from __future__ import annotations

import asyncio
import functools
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from marie_kit.sqlite import open_on_thread, write_transaction

from marie_auth.errors import invalid_argument
from marie_auth.store import KeyLimits

SECONDS_PER_MINUTE = 60.0
SECONDS_PER_DAY = 86_400
#: Slots lapse this long after the holder last asked (it asks every third of it).
SLOT_TTL_SECONDS = 10.0
#: Most a holder may ask for at once: keeps a bad caller from draining a key.
MAX_ASK = 1_000_000_000
MAX_HOLDER = 128

_SCHEMA = """
CREATE TABLE IF NOT EXISTS key_counters (
    key_id      TEXT PRIMARY KEY,
    req_level   REAL,     -- NULL: no requests-per-minute limit when last seen
    req_at      REAL NOT NULL,
    tok_level   REAL,     -- NULL: no tokens-per-minute limit when last seen
    tok_at      REAL NOT NULL,
    day         INTEGER NOT NULL,
    day_tokens  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS key_slots (
    key_id      TEXT NOT NULL,
    holder      TEXT NOT NULL,
    slots       INTEGER NOT NULL,
    expire_time REAL NOT NULL,
    PRIMARY KEY (key_id, holder)
) WITHOUT ROWID;
"""
_GET_COUNTERS = (
    "SELECT req_level, req_at, tok_level, tok_at, day, day_tokens FROM key_counters "
    "WHERE key_id = ?"
)
_PUT_COUNTERS = (
    "INSERT OR REPLACE INTO key_counters "
    "(key_id, req_level, req_at, tok_level, tok_at, day, day_tokens) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_DROP_LAPSED = "DELETE FROM key_slots WHERE key_id = ? AND expire_time <= ?"
_OTHER_SLOTS = "SELECT COALESCE(SUM(slots), 0) FROM key_slots WHERE key_id = ? AND holder != ?"
_PUT_SLOTS = (
    "INSERT OR REPLACE INTO key_slots (key_id, holder, slots, expire_time) VALUES (?, ?, ?, ?)"
)
_DROP_SLOTS = "DELETE FROM key_slots WHERE key_id = ? AND holder = ?"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LeaseAsk:
    """What a holder asks for, and what it settles of its previous lease."""

    key_id: str
    holder: str
    requests: int = 0
    tokens: int = 0
    returned_requests: int = 0
    token_balance: int = 0
    slots: int = 0


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    requests: int
    tokens: int
    slots: int
    limits: KeyLimits
    requests_remaining: int
    requests_reset_seconds: float
    tokens_remaining: int
    tokens_reset_seconds: float
    retry_after_seconds: float
    slot_ttl_seconds: float


@dataclass(slots=True)
class Counters:
    """One key's shared counters (the `key_counters` row)."""

    req_level: float | None
    req_at: float
    tok_level: float | None
    tok_at: float
    day: int
    day_tokens: int


def _refill(level: float | None, at: float, capacity: int, now: float) -> float | None:
    """A bucket's level at `now` (None when the limit is off). A bucket first
    seen, or whose limit was just set, starts full; a changed limit keeps what
    was used, within the new capacity (the gateway's rule)."""
    if not capacity:
        return None
    if level is None:
        return float(capacity)
    elapsed = max(0.0, now - at)
    return min(float(capacity), level + elapsed * capacity / SECONDS_PER_MINUTE)


def _until(level: float, wanted: float, capacity: int) -> float:
    if level >= wanted:
        return 0.0
    return (wanted - level) * SECONDS_PER_MINUTE / capacity


def _grant_tokens(
    asked: int, tok: float | None, day_tokens: int, limits: KeyLimits, now: float
) -> tuple[int, float | None, int, float]:
    """(tokens granted, minute bucket, day's tokens, retry-after) for `asked` tokens."""
    if asked <= 0:
        return 0, tok, day_tokens, 0.0
    room: float = math.inf if tok is None else tok
    if limits.tokens_per_day:
        room = min(room, limits.tokens_per_day - day_tokens)
    granted = int(min(asked, math.floor(room))) if room >= 1 else 0
    if tok is not None:
        tok -= granted
    day_tokens += granted
    wait = 0.0
    if granted < asked:
        if tok is not None and tok < 1:
            wait = _until(tok, 1, limits.tokens_per_minute)
        if limits.tokens_per_day and day_tokens >= limits.tokens_per_day:
            wait = max(wait, SECONDS_PER_DAY - now % SECONDS_PER_DAY)
    return granted, tok, day_tokens, wait


def _token_quota(
    tok: float | None, day_tokens: int, limits: KeyLimits, now: float
) -> tuple[int, float]:
    """Tokens left and seconds to full: of the minute bucket, else of the day."""
    if tok is not None:
        return max(0, math.floor(tok)), _until(
            tok, limits.tokens_per_minute, limits.tokens_per_minute
        )
    if limits.tokens_per_day:
        reset = (SECONDS_PER_DAY - now % SECONDS_PER_DAY) if day_tokens else 0.0
        return max(0, limits.tokens_per_day - day_tokens), reset
    return 0, 0.0


def apply_lease(
    counters: Counters | None,
    limits: KeyLimits,
    ask: LeaseAsk,
    other_slots: int,
    now: float,
) -> tuple[Counters, LeaseGrant]:
    """Settle `ask`'s previous lease, then grant what the counters allow.

    Requests and tokens come out of the buckets only when at least one is
    there (a request is admitted while one token is left, as in one gateway);
    a grant is never more than the bucket holds. Slots: the holder gets what
    the cap leaves after the other holders' slots.
    """
    day = int(now // SECONDS_PER_DAY)
    if counters is None:
        counters = Counters(None, now, None, now, day, 0)
    req = _refill(counters.req_level, counters.req_at, limits.requests_per_minute, now)
    tok = _refill(counters.tok_level, counters.tok_at, limits.tokens_per_minute, now)
    if counters.day != day:
        counters.day, counters.day_tokens = day, 0
    day_tokens = counters.day_tokens

    # Settle the previous lease.
    if req is not None and ask.returned_requests > 0:
        req = min(float(limits.requests_per_minute), req + ask.returned_requests)
    if tok is not None and ask.token_balance:
        tok = min(float(limits.tokens_per_minute), tok + ask.token_balance)
    if ask.token_balance:
        day_tokens = max(0, day_tokens - ask.token_balance)

    retry = 0.0
    granted_requests = 0
    if ask.requests > 0:
        if req is None:
            granted_requests = ask.requests
        elif req >= 1:
            granted_requests = min(ask.requests, math.floor(req))
            req -= granted_requests
        if granted_requests < ask.requests and req is not None:
            retry = max(retry, _until(req, 1, limits.requests_per_minute))

    granted_tokens, tok, day_tokens, wait = _grant_tokens(ask.tokens, tok, day_tokens, limits, now)
    retry = max(retry, wait)

    cap = limits.max_concurrent_requests
    slots = max(0, ask.slots)
    if cap:
        slots = min(slots, max(0, cap - other_slots))
        if slots < ask.slots:
            retry = max(retry, 1.0)

    counters = Counters(req, now, tok, now, day, day_tokens)
    tokens_remaining, tokens_reset = _token_quota(tok, day_tokens, limits, now)
    grant = LeaseGrant(
        requests=granted_requests,
        tokens=granted_tokens,
        slots=slots,
        limits=limits,
        requests_remaining=max(0, math.floor(req)) if req is not None else 0,
        requests_reset_seconds=(
            _until(req, limits.requests_per_minute, limits.requests_per_minute)
            if req is not None
            else 0.0
        ),
        tokens_remaining=tokens_remaining,
        tokens_reset_seconds=tokens_reset,
        retry_after_seconds=retry,
        slot_ttl_seconds=SLOT_TTL_SECONDS,
    )
    return counters, grant


def check_ask(ask: LeaseAsk) -> None:
    """INVALID_ARGUMENT naming the first bad field of `ask`."""
    if not ask.key_id:
        raise invalid_argument("key_id", "key_id is required")
    if not ask.holder or len(ask.holder) > MAX_HOLDER:
        raise invalid_argument("holder", f"holder is required, at most {MAX_HOLDER} characters")
    for name in ("requests", "tokens", "returned_requests", "slots"):
        value = getattr(ask, name)
        if not 0 <= value <= MAX_ASK:
            raise invalid_argument(name, f"{name} must be between 0 and {MAX_ASK}")
    if abs(ask.token_balance) > MAX_ASK:
        raise invalid_argument("token_balance", f"token_balance must be within ±{MAX_ASK}")


class SqliteLeaseStore:
    """The counters in the auth SQLite file, on a connection and thread of their own.

    `synchronous = NORMAL` here: a power cut may lose the last leases (the
    buckets then look fuller by at most those leases), never corrupt the file;
    a lease is not worth an fsync."""

    def __init__(self, connection: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self._db = connection
        self._executor = executor

    @classmethod
    async def open(cls, path: Path, *, max_bytes: int = 0) -> SqliteLeaseStore:
        connection, executor = await open_on_thread(
            path, _SCHEMA, thread_name="marie-auth-leases", max_bytes=max_bytes
        )
        connection.execute("PRAGMA synchronous = NORMAL")
        return cls(connection, executor)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def lease(self, limits: KeyLimits, ask: LeaseAsk, now: float) -> LeaseGrant:
        return await self._run(functools.partial(self._lease, limits, ask, now))

    def _lease(self, limits: KeyLimits, ask: LeaseAsk, now: float) -> LeaseGrant:
        db = self._db
        with write_transaction(db):
            row = db.execute(_GET_COUNTERS, (ask.key_id,)).fetchone()
            counters = Counters(*row) if row is not None else None
            db.execute(_DROP_LAPSED, (ask.key_id, now))
            other = int(db.execute(_OTHER_SLOTS, (ask.key_id, ask.holder)).fetchone()[0])
            counters, grant = apply_lease(counters, limits, ask, other, now)
            db.execute(
                _PUT_COUNTERS,
                (
                    ask.key_id,
                    counters.req_level,
                    counters.req_at,
                    counters.tok_level,
                    counters.tok_at,
                    counters.day,
                    counters.day_tokens,
                ),
            )
            if grant.slots:
                db.execute(
                    _PUT_SLOTS, (ask.key_id, ask.holder, grant.slots, now + grant.slot_ttl_seconds)
                )
            else:
                db.execute(_DROP_SLOTS, (ask.key_id, ask.holder))
        return grant

    async def close(self) -> None:
        await self._run(self._db.close)
        self._executor.shutdown(wait=True)


class LeaseStore(Protocol):
    """Where the counters live (SQLite or OpenSearch); `lease` is atomic per key."""

    async def lease(self, limits: KeyLimits, ask: LeaseAsk, now: float) -> LeaseGrant: ...

    async def close(self) -> None: ...


class LeaseBook:
    """The leases core: checks an ask, reads the key's limits, leases."""

    def __init__(
        self,
        store: LeaseStore,
        limits_of: Callable[[str], Awaitable[KeyLimits]],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._limits_of = limits_of
        self._clock = clock

    async def lease(self, ask: LeaseAsk) -> LeaseGrant:
        check_ask(ask)
        limits = await self._limits_of(ask.key_id)
        return await self._store.lease(limits, ask, self._clock())

    async def close(self) -> None:
        await self._store.close()
