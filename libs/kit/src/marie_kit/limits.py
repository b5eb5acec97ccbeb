"""Per-key limits on the hot path, shared by every service that admits
requests against them: the gateway (its HTTP API) and the providers service
(gRPC calls that come through Envoy, `marie_kit.metering`).

A key carries four limits (zero means none): requests per minute, tokens per
minute, tokens per UTC day, and requests running at once. `Limiter` is the
interface callers use; `LocalLimiter` keeps the counters in this process
(the default: one process, nothing else to run). `LeasedLimiter`
(`marie_kit.leased_limits`) shares them between processes through auth and
implements the same three calls.

How the counters work (also in the gateway README):
- requests and tokens per minute are token buckets: capacity = the limit,
  refilled continuously at limit/60 per second. A full bucket lets a burst of
  `limit` requests through at once, never more than `limit` in any minute
  plus what refilled meanwhile; `reset` is the time until the bucket is full
  again (OpenAI's meaning of `x-ratelimit-reset-*`);
- tokens are known only when an answer ends, so they are counted then: a
  request is admitted while the key has at least one token left this minute
  (and this day), and the one that exhausts the window may take it below
  zero; the next request is refused until the debt has refilled;
- tokens per day count from 00:00 UTC;
- the concurrency cap counts a request from admission until its answer (or
  its stream) ends.

Refused requests consume nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

SECONDS_PER_MINUTE = 60.0
SECONDS_PER_DAY = 86_400
# Past this many keys, idle counters (full buckets, nothing running, nothing
# used today) are dropped when a new key arrives.
_SWEEP_AT = 50_000


@dataclass(frozen=True, slots=True)
class Limits:
    """A key's limits; zero means no limit."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    tokens_per_day: int = 0
    max_concurrent_requests: int = 0

    @property
    def unlimited(self) -> bool:
        return not (
            self.requests_per_minute
            or self.tokens_per_minute
            or self.tokens_per_day
            or self.max_concurrent_requests
        )


NO_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Quota:
    """Where a key stands on one limit, as the `x-ratelimit-*` headers say it."""

    limit: int
    remaining: int
    #: Seconds until the limit is back to its initial state.
    reset_seconds: float


@dataclass(slots=True)
class Grant:
    """An admitted request: what it holds (a concurrency slot) and what the
    headers of its answer say."""

    key_id: str
    limits: Limits
    requests: Quota | None = None
    tokens: Quota | None = None
    holds_slot: bool = False
    #: Admitted by a stand-in limiter (the shared one's fallback): charge and
    #: release go there.
    fallback: bool = False


class RateLimited(Exception):
    """The request is refused: `limit` names the limit ("requests",
    "tokens", "tokens_per_day", "concurrency")."""

    def __init__(
        self,
        limit: str,
        message: str,
        retry_after: float,
        requests: Quota | None,
        tokens: Quota | None,
    ) -> None:
        super().__init__(message)
        self.limit = limit
        self.message = message
        self.retry_after = retry_after
        self.requests = requests
        self.tokens = tokens


class Limiter(Protocol):
    """What a caller needs of a limiter. `acquire` may be asynchronous so that
    a shared implementation can fetch capacity, but it must not wait on the
    network for a key well under its limits."""

    async def acquire(self, key_id: str, limits: Limits, *, tokens: bool = True) -> Grant:
        """Admit one request of `key_id` or raise `RateLimited`. A request
        that spends no tokens (`tokens=False`: a lookup, a memory or admin
        call) counts against requests and concurrency only: a key out of
        tokens may still list models or read its usage."""
        ...

    def charge(self, grant: Grant, tokens: int) -> None:
        """Count the tokens an admitted request used (known once it ends)."""
        ...

    def release(self, grant: Grant) -> None:
        """The request ended: give back its concurrency slot (idempotent)."""
        ...


@dataclass(slots=True)
class _Bucket:
    capacity: float
    level: float
    at: float

    def refill(self, capacity: int, now: float) -> None:
        if capacity != self.capacity:
            # The limit changed: keep what was used, within the new capacity.
            self.level = min(self.level + capacity - self.capacity, float(capacity))
            self.capacity = capacity
        rate = self.capacity / SECONDS_PER_MINUTE
        self.level = min(self.capacity, self.level + (now - self.at) * rate)
        self.at = now

    def seconds_until(self, level: float) -> float:
        """Time until the bucket holds `level`."""
        if self.level >= level:
            return 0.0
        return (level - self.level) * SECONDS_PER_MINUTE / self.capacity

    def quota(self) -> Quota:
        return Quota(
            int(self.capacity), max(0, math.floor(self.level)), self.seconds_until(self.capacity)
        )


@dataclass(slots=True)
class _KeyCounters:
    requests: _Bucket | None = None
    tokens: _Bucket | None = None
    day: int = -1
    day_tokens: int = 0
    in_flight: int = 0
    last_seen: float = field(default=0.0)


class LocalLimiter:
    """`Limiter` with the counters in this process: exact for one process.

    Every call is synchronous work on the event loop (no lock needed: asyncio
    runs one at a time), a few dictionary and float operations."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall = wall_clock
        self._keys: dict[str, _KeyCounters] = {}

    def _counters(self, key_id: str, now: float) -> _KeyCounters:
        counters = self._keys.get(key_id)
        if counters is None:
            if len(self._keys) >= _SWEEP_AT:
                self._sweep(now)
            counters = self._keys[key_id] = _KeyCounters()
        counters.last_seen = now
        return counters

    def _sweep(self, now: float) -> None:
        today = int(self._wall() // SECONDS_PER_DAY)
        for key_id, c in list(self._keys.items()):
            idle = c.in_flight == 0 and (c.day != today or c.day_tokens == 0)
            if idle and now - c.last_seen > SECONDS_PER_MINUTE:
                del self._keys[key_id]

    @staticmethod
    def _bucket(bucket: _Bucket | None, capacity: int, now: float) -> _Bucket | None:
        if not capacity:
            return None
        if bucket is None:
            return _Bucket(float(capacity), float(capacity), now)
        bucket.refill(capacity, now)
        return bucket

    def _day_quota(self, c: _KeyCounters, limit: int, wall: float) -> Quota:
        used = c.day_tokens
        until_midnight = SECONDS_PER_DAY - wall % SECONDS_PER_DAY
        return Quota(limit, max(0, limit - used), until_midnight if used else 0.0)

    async def acquire(self, key_id: str, limits: Limits, *, tokens: bool = True) -> Grant:
        if limits.unlimited:
            return Grant(key_id, limits)
        now = self._clock()
        wall = self._wall()
        c = self._counters(key_id, now)
        c.requests = self._bucket(c.requests, limits.requests_per_minute, now)
        c.tokens = self._bucket(c.tokens, limits.tokens_per_minute, now)
        today = int(wall // SECONDS_PER_DAY)
        if c.day != today:
            c.day, c.day_tokens = today, 0

        def token_quota() -> Quota | None:
            if c.tokens is not None:
                return c.tokens.quota()
            if limits.tokens_per_day:
                return self._day_quota(c, limits.tokens_per_day, wall)
            return None

        def refuse(limit: str, message: str, retry_after: float) -> RateLimited:
            requests = c.requests.quota() if c.requests is not None else None
            return RateLimited(limit, message, retry_after, requests, token_quota())

        cap = limits.max_concurrent_requests
        if cap and c.in_flight >= cap:
            raise refuse(
                "concurrency",
                f"Too many concurrent requests for this API key: the limit is {cap} at once.",
                1.0,
            )
        if c.requests is not None and c.requests.level < 1:
            raise refuse(
                "requests",
                f"Rate limit reached for requests per minute: limit {limits.requests_per_minute}.",
                c.requests.seconds_until(1),
            )
        if tokens and c.tokens is not None and c.tokens.level < 1:
            raise refuse(
                "tokens",
                f"Rate limit reached for tokens per minute: limit {limits.tokens_per_minute}.",
                c.tokens.seconds_until(1),
            )
        if tokens and limits.tokens_per_day and c.day_tokens >= limits.tokens_per_day:
            raise refuse(
                "tokens_per_day",
                f"Rate limit reached for tokens per day: limit {limits.tokens_per_day}.",
                SECONDS_PER_DAY - wall % SECONDS_PER_DAY,
            )
        if c.requests is not None:
            c.requests.level -= 1
        grant = Grant(key_id, limits)
        if cap:
            c.in_flight += 1
            grant.holds_slot = True
        grant.requests = c.requests.quota() if c.requests is not None else None
        grant.tokens = token_quota()
        return grant

    def charge(self, grant: Grant, tokens: int) -> None:
        limits = grant.limits
        if tokens <= 0 or not (limits.tokens_per_minute or limits.tokens_per_day):
            return
        now = self._clock()
        c = self._counters(grant.key_id, now)
        c.tokens = self._bucket(c.tokens, limits.tokens_per_minute, now)
        if c.tokens is not None:
            c.tokens.level -= tokens
        if limits.tokens_per_day:
            today = int(self._wall() // SECONDS_PER_DAY)
            if c.day != today:
                c.day, c.day_tokens = today, 0
            c.day_tokens += tokens

    def release(self, grant: Grant) -> None:
        if not grant.holds_slot:
            return
        grant.holds_slot = False
        c = self._keys.get(grant.key_id)
        if c is not None and c.in_flight > 0:
            c.in_flight -= 1


# -- the key's limits as call metadata -------------------------------------

#: Added by the gateway's key check (Envoy's ext_authz) to the gRPC calls
#: through Envoy that spend model capacity. Its presence asks the providers
#: service to admit the call against these limits and record it in the usage
#: ledger (`marie_kit.metering`); calls without it (the gateway's own, which
#: it limited and records itself) are not metered again. Trustworthy because
#: Envoy strips every client-sent `x-marie-*` header.
LIMITS_HEADER = "x-marie-limits"
_FIELDS = (
    ("rpm", "requests_per_minute"),
    ("tpm", "tokens_per_minute"),
    ("tpd", "tokens_per_day"),
    ("concurrent", "max_concurrent_requests"),
)
_ATTRIBUTE = dict(_FIELDS)
#: Larger values are no limit anyone meant (and would not fit auth's int64).
MAX_LIMIT = 10**15


def limits_value(limits: Limits) -> str:
    """`limits` as the value of `LIMITS_HEADER`: "rpm=60,tpm=0,tpd=0,concurrent=2"."""
    return ",".join(f"{name}={getattr(limits, attr)}" for name, attr in _FIELDS)


def parse_limits_value(value: str) -> Limits:
    """The limits of a `LIMITS_HEADER` value; ValueError saying what is wrong.

    Names this version does not know are skipped (a newer key check may send
    more), a known one left out is no limit; a repeated name, a value that is
    not a whole number from 0 to `MAX_LIMIT`, or an entry without `=` is an
    error."""
    seen: dict[str, int] = {}
    for part in value.split(","):
        entry = part.strip()
        if not entry:
            continue
        name, eq, number = entry.partition("=")
        name = name.strip()
        if not eq or not name:
            raise ValueError(f"entry {entry!r} is not name=value")
        if name not in _ATTRIBUTE:
            continue
        if name in seen:
            raise ValueError(f"{name!r} is given twice")
        number = number.strip()
        if not number.isascii() or not number.isdigit() or int(number) > MAX_LIMIT:
            raise ValueError(f"{name}={number!r} is not a whole number from 0 to {MAX_LIMIT}")
        seen[name] = int(number)
    return Limits(**{_ATTRIBUTE[name]: n for name, n in seen.items()})
