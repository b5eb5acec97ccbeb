"""Per-key limits shared by several processes: leases of capacity from auth.

Auth keeps each key's counters (`marie_auth.leases`); every auth replica on
the same store agrees on them. Each holder (a gateway replica for its HTTP
API, a providers replica for the gRPC calls that come through Envoy) keeps,
per key it serves, a *lease*: a few requests, a few tokens and some concurrency slots taken out
of those counters. A request is admitted from the lease with no network
call; when the lease runs low, a background call (`LeaseCapacity`) tops it
up and settles the tokens used meanwhile. Only a request that finds its
lease empty (the first of a key, or a key at or near its limits) waits for
auth. Idle leases are given back.

Lease sizes (k): requests max(1, ⌊rpm/20⌋); tokens max(1, ⌊limit/20⌋) of
the smaller token limit; slots the running requests plus max(1, ⌊cap/4⌋).
What this allows beyond one process's exactness is stated in
docs/decisions.md ("Limits across gateway replicas"); in short, over any
window a key gets at most G·k more requests than its limit (G holders),
tokens over-run by G·k plus the answers running when the limit is reached
(at least one per holder), and the concurrency cap is exact.

When auth cannot be reached, requests are admitted by a `LocalLimiter` of
this process (each holder then enforces the whole limit alone), so an auth
outage never refuses a key for want of counters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from marie.auth.v1 import auth_service_pb2 as auth_pb

from marie_kit.lease_holder import IDLE_SECONDS, LEASE_TIMEOUT_SECONDS, LeaseHolder
from marie_kit.limits import Grant, Limits, LocalLimiter, Quota, RateLimited

if TYPE_CHECKING:
    from marie.auth.v1.auth_service_pb2_grpc import AuthServiceAsyncStub

#: Share of a limit one lease takes (1/20 = 5%).
LEASE_FRACTION = 20


def lease_size(limit: int) -> int:
    """k for a limit: 5% of it, at least one."""
    return max(1, limit // LEASE_FRACTION)


def _token_limit(limits: Limits) -> int:
    values = [v for v in (limits.tokens_per_minute, limits.tokens_per_day) if v]
    return min(values) if values else 0


@dataclass(slots=True)
class _Lease:
    limits: Limits
    #: Leased requests not yet spent.
    requests: int = 0
    #: Leased tokens not yet used; negative when answers used more (a debt).
    tokens: int = 0
    #: Concurrency slots held, and this holder's running requests of the key.
    slots: int = 0
    in_flight: int = 0
    #: The key's counters at auth as of the last call (for the headers).
    requests_remaining: int = 0
    requests_reset: float = 0.0
    tokens_remaining: int = 0
    tokens_reset: float = 0.0
    #: After a refusal by auth: until when to refuse without asking, and why.
    refused_until: float = 0.0
    retry_after: float = 0.0
    last_used: float = 0.0
    slots_renewed: float = 0.0
    slot_ttl: float = 10.0
    renewing: asyncio.Task[None] | None = field(default=None)


class LeasedLimiter(LeaseHolder[_Lease]):
    """`Limiter` on leases of auth's shared counters (see the module doc)."""

    UNREACHABLE_MESSAGE = "shared limits unavailable, enforcing them in this process alone"
    log = logging.getLogger("marie.limits")

    def __init__(
        self,
        auth: AuthServiceAsyncStub,
        *,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = LEASE_TIMEOUT_SECONDS,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        super().__init__(auth, clock=clock, timeout=timeout, idle_seconds=idle_seconds)
        self._fallback = LocalLimiter()

    # -- the Limiter interface -------------------------------------------

    async def acquire(self, key_id: str, limits: Limits, *, tokens: bool = True) -> Grant:
        if limits.unlimited:
            return Grant(key_id, limits)
        lease = self._leases.get(key_id)
        if lease is None:
            lease = self._leases[key_id] = _Lease(limits)
        lease.limits = limits
        now = self._clock()
        lease.last_used = now
        if self._short(lease, tokens):
            # A refusal remembered may be for the tokens, whose wait (up to a
            # day) is not one for a request that spends none: that asks auth.
            if tokens and now < lease.refused_until:
                raise self._refusal(lease, lease.refused_until - now)
            if now < self._auth_down_until:
                return await self._fall_back(key_id, limits, tokens)
            try:
                await self._renew(key_id, lease)
            except grpc.aio.AioRpcError as exc:
                self._auth_unreachable(exc)
                return await self._fall_back(key_id, limits, tokens)
            if self._short(lease, tokens):
                wait = max(lease.retry_after, 0.001)
                if not tokens:
                    # Auth's wait may be the tokens'; requests refill within a minute.
                    wait = min(wait, 60.0)
                elif not self._concurrency_short(lease):
                    lease.refused_until = self._clock() + wait
                raise self._refusal(lease, wait)
        if limits.requests_per_minute:
            lease.requests -= 1
        lease.in_flight += 1
        grant = Grant(key_id, limits, holds_slot=True)
        grant.requests, grant.tokens = self._quotas(lease)
        if self._low(lease):
            self._renew_later(key_id, lease)
        return grant

    async def _fall_back(self, key_id: str, limits: Limits, tokens: bool) -> Grant:
        """Admit by this process's own counters: auth cannot be asked."""
        grant = await self._fallback.acquire(key_id, limits, tokens=tokens)
        grant.fallback = True
        return grant

    def charge(self, grant: Grant, tokens: int) -> None:
        if grant.fallback:
            self._fallback.charge(grant, tokens)
            return
        limits = grant.limits
        if tokens <= 0 or not (limits.tokens_per_minute or limits.tokens_per_day):
            return
        lease = self._leases.get(grant.key_id)
        if lease is None:  # given back meanwhile: start a new one, owing the tokens
            lease = self._leases[grant.key_id] = _Lease(limits, last_used=self._clock())
        lease.tokens -= tokens
        if self._low(lease):
            self._renew_later(grant.key_id, lease)

    def release(self, grant: Grant) -> None:
        if grant.fallback:
            self._fallback.release(grant)
            return
        if not grant.holds_slot:
            return
        grant.holds_slot = False
        lease = self._leases.get(grant.key_id)
        if lease is not None and lease.in_flight > 0:
            lease.in_flight -= 1

    # -- leases ------------------------------------------------------------

    @staticmethod
    def _concurrency_short(lease: _Lease) -> bool:
        cap = lease.limits.max_concurrent_requests
        return bool(cap) and lease.in_flight >= lease.slots

    def _short(self, lease: _Lease, tokens: bool = True) -> bool:
        """Whether the lease cannot admit one more request now (one that
        spends no tokens is not held back by the tokens)."""
        limits = lease.limits
        return (
            (bool(limits.requests_per_minute) and lease.requests < 1)
            or (tokens and bool(_token_limit(limits)) and lease.tokens < 1)
            or self._concurrency_short(lease)
        )

    def _low(self, lease: _Lease) -> bool:
        """Whether the lease should be topped up (in the background)."""
        limits = lease.limits
        if limits.requests_per_minute and lease.requests * 2 < lease_size(
            limits.requests_per_minute
        ):
            return True
        token_limit = _token_limit(limits)
        if token_limit and lease.tokens * 2 < lease_size(token_limit):
            return True
        return self._concurrency_short(lease)

    async def _top_up(self, key_id: str, lease: _Lease) -> None:
        await self._ask(key_id, lease)

    async def _renew(self, key_id: str, lease: _Lease) -> None:
        """Top the lease up now (joining a call already under way, then
        asking again if that one left it short)."""
        running = lease.renewing
        if running is not None and not running.done():
            await asyncio.shield(running)
            if not self._short(lease):
                return
        task = asyncio.create_task(self._ask(key_id, lease))
        lease.renewing = task
        await asyncio.shield(task)

    async def _ask(self, key_id: str, lease: _Lease) -> None:
        limits = lease.limits
        want_requests = 0
        if limits.requests_per_minute:
            want_requests = max(0, lease_size(limits.requests_per_minute) - lease.requests)
        want_tokens = 0
        settle = 0
        token_limit = _token_limit(limits)
        if token_limit:
            # A debt is settled now; unused tokens stay for the next requests.
            settle = min(0, lease.tokens)
            lease.tokens -= settle
            want_tokens = max(0, lease_size(token_limit) - lease.tokens)
        slots = 0
        if limits.max_concurrent_requests:
            slots = lease.in_flight + max(1, limits.max_concurrent_requests // 4)
        request = auth_pb.LeaseCapacityRequest(
            key_id=key_id,
            holder=self.holder,
            requests=want_requests,
            tokens=want_tokens,
            token_balance=settle,
            slots=slots,
        )
        try:
            answer = await self._auth.LeaseCapacity(request, timeout=self._timeout)
        except BaseException:
            lease.tokens += settle  # not settled: still owed
            raise
        self._auth_answered()
        lease.requests += answer.requests
        lease.tokens += answer.tokens
        lease.slots = answer.slots
        lease.slot_ttl = answer.slot_ttl_seconds or lease.slot_ttl
        lease.slots_renewed = self._clock()
        lease.requests_remaining = answer.requests_remaining
        lease.requests_reset = answer.requests_reset_seconds
        lease.tokens_remaining = answer.tokens_remaining
        lease.tokens_reset = answer.tokens_reset_seconds
        lease.retry_after = answer.retry_after_seconds

    async def _give_back(self, key_id: str, lease: _Lease) -> None:
        """Return what the lease holds: unused requests, the token balance, every slot."""
        request = auth_pb.LeaseCapacityRequest(
            key_id=key_id,
            holder=self.holder,
            returned_requests=max(0, lease.requests),
            token_balance=lease.tokens,
            slots=0,
        )
        await self._auth.LeaseCapacity(request, timeout=self._timeout)

    async def _sweep(self) -> None:
        now = self._clock()
        for key_id, lease in list(self._leases.items()):
            if self._busy(lease):
                continue
            if lease.in_flight == 0 and now - lease.last_used > self._idle:
                del self._leases[key_id]
                await self._give_back(key_id, lease)
            elif lease.slots and now - lease.slots_renewed > lease.slot_ttl / 3:
                # Running requests keep their slots alive (and spare ones go back).
                await self._ask(key_id, lease)

    # -- answers -----------------------------------------------------------

    def _quotas(self, lease: _Lease) -> tuple[Quota | None, Quota | None]:
        limits = lease.limits
        requests = None
        if limits.requests_per_minute:
            requests = Quota(
                limits.requests_per_minute,
                max(0, lease.requests_remaining + lease.requests),
                lease.requests_reset,
            )
        tokens = None
        token_limit = limits.tokens_per_minute or limits.tokens_per_day
        if token_limit:
            tokens = Quota(
                token_limit,
                max(0, lease.tokens_remaining + lease.tokens),
                lease.tokens_reset,
            )
        return requests, tokens

    def _refusal(self, lease: _Lease, wait: float) -> RateLimited:
        limits = lease.limits
        requests, tokens = self._quotas(lease)
        if self._concurrency_short(lease):
            cap = limits.max_concurrent_requests
            return RateLimited(
                "concurrency",
                f"Too many concurrent requests for this API key: the limit is {cap} at once.",
                max(wait, 1.0),
                requests,
                tokens,
            )
        if limits.requests_per_minute and lease.requests < 1:
            return RateLimited(
                "requests",
                f"Rate limit reached for requests per minute: limit {limits.requests_per_minute}.",
                wait,
                requests,
                tokens,
            )
        # A wait past a minute is the day's limit (the minute's refills sooner).
        if limits.tokens_per_minute and not (limits.tokens_per_day and wait > 60):
            return RateLimited(
                "tokens",
                f"Rate limit reached for tokens per minute: limit {limits.tokens_per_minute}.",
                wait,
                requests,
                tokens,
            )
        return RateLimited(
            "tokens_per_day",
            f"Rate limit reached for tokens per day: limit {limits.tokens_per_day}.",
            wait,
            requests,
            tokens,
        )
