"""Per-key limits on the hot path, and the slow-down of clients that keep
presenting invalid keys.

A key carries four limits (zero means none): requests per minute, tokens per
minute, tokens per UTC day, and requests running at once. `Limiter` is the
interface the routes use; `LocalLimiter` keeps the counters in this process
(the default: one gateway, nothing else to run). A limiter whose state is
shared between gateways implements the same three calls.

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
#: The headers every answer of a limited route carries (for the key's limits).
RATE_LIMIT_HEADERS = tuple(
    f"x-ratelimit-{what}-{name}"
    for name in ("requests", "tokens")
    for what in ("limit", "remaining", "reset")
)


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
    """What the routes need of a limiter. `acquire` may be asynchronous so that
    a shared implementation can fetch capacity, but it must not wait on the
    network for a key well under its limits."""

    async def acquire(self, key_id: str, limits: Limits) -> Grant:
        """Admit one request of `key_id` or raise `RateLimited`."""
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
    """`Limiter` with the counters in this process: exact for one gateway.

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

    async def acquire(self, key_id: str, limits: Limits) -> Grant:
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
        if c.tokens is not None and c.tokens.level < 1:
            raise refuse(
                "tokens",
                f"Rate limit reached for tokens per minute: limit {limits.tokens_per_minute}.",
                c.tokens.seconds_until(1),
            )
        if limits.tokens_per_day and c.day_tokens >= limits.tokens_per_day:
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


def duration_text(seconds: float) -> str:
    """A duration as OpenAI writes `x-ratelimit-reset-*`: "0s", "12ms", "1.5s", "6m0s"."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    if seconds < SECONDS_PER_MINUTE:
        return f"{round(seconds, 3):g}s"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


def quota_headers(requests: Quota | None, tokens: Quota | None) -> list[tuple[bytes, bytes]]:
    """The `x-ratelimit-*` headers for the limits a key has (none for unlimited ones)."""
    out: list[tuple[bytes, bytes]] = []
    for name, quota in ((b"requests", requests), (b"tokens", tokens)):
        if quota is not None:
            out.append((b"x-ratelimit-limit-" + name, str(quota.limit).encode()))
            out.append((b"x-ratelimit-remaining-" + name, str(quota.remaining).encode()))
            out.append((b"x-ratelimit-reset-" + name, duration_text(quota.reset_seconds).encode()))
    return out


class InvalidKeyThrottle:
    """Slows down client addresses that keep presenting invalid keys.

    Each address has a bucket of `threshold` failures refilled over `window`
    seconds; while it is empty the address is refused (429) for keys not
    already known to be valid, without asking auth. Bounded memory: when
    `max_addresses` are tracked, the ones whose bucket refilled are dropped
    (and, if none has, all are)."""

    def __init__(
        self,
        threshold: int,
        window: float,
        *,
        max_addresses: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self._rate = threshold / window if threshold else 0.0
        self._max = max_addresses
        self._clock = clock
        # address -> (failure allowance left, when it was computed)
        self._addresses: dict[str, tuple[float, float]] = {}

    def _level(self, address: str, now: float) -> float:
        entry = self._addresses.get(address)
        if entry is None:
            return float(self.threshold)
        level, at = entry
        return min(float(self.threshold), level + (now - at) * self._rate)

    def retry_after(self, address: str) -> float:
        """Seconds until `address` may try an unknown key again; 0 when it may now."""
        if not self.threshold or address not in self._addresses:
            return 0.0
        level = self._level(address, self._clock())
        return 0.0 if level >= 1 else (1 - level) / self._rate

    def failed(self, address: str) -> None:
        if not self.threshold:
            return
        now = self._clock()
        if address not in self._addresses and len(self._addresses) >= self._max:
            self._sweep(now)
        self._addresses[address] = (max(0.0, self._level(address, now) - 1), now)

    def _sweep(self, now: float) -> None:
        for address in list(self._addresses):
            if self._level(address, now) >= self.threshold:
                del self._addresses[address]
        if len(self._addresses) >= self._max:
            self._addresses.clear()
