"""Limits shared by two gateways through two auth replicas on one store.

Two real auth servers (ephemeral ports, one SQLite file) and one
`LeasedLimiter` per replica, as two gateways would hold them. A key's
limits hold across both within the bound stated in docs/decisions.md:
at most G·k more requests than the limit over a window (k the lease size),
tokens over by at most one answer per running request plus G·k, the
concurrency cap exact. Two `LocalLimiter`s would admit twice the limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from marie.auth.v1 import auth_service_pb2 as auth_pb
from marie.auth.v1 import auth_service_pb2_grpc as auth_grpc
from marie_auth.service import AuthComponent
from marie_auth.settings import AuthSettings
from marie_kit.channels import insecure_channel
from marie_kit.leased_limits import LeasedLimiter, lease_size
from marie_kit.limits import Grant, Limits, RateLimited
from marie_kit.server import RunningServer, start_server

GATEWAYS = 2


@dataclass
class Shared:
    servers: list[RunningServer]
    stubs: list[auth_grpc.AuthServiceAsyncStub]
    limiters: list[LeasedLimiter]

    async def key(self, **limits: int) -> tuple[str, Limits]:
        created = await self.stubs[0].CreateApiKey(
            auth_pb.CreateApiKeyRequest(name="shared", limits=auth_pb.KeyLimits(**limits))
        )
        return created.api_key.id, Limits(**limits)


@pytest.fixture
async def shared(tmp_path: Path) -> AsyncIterator[Shared]:
    settings = AuthSettings(data_dir=tmp_path / "data", port=0, pepper=None)
    servers = [await start_server([AuthComponent(settings)]) for _ in range(GATEWAYS)]
    channels = [insecure_channel(s.target) for s in servers]
    stubs = [auth_grpc.AuthServiceStub(c) for c in channels]
    limiters = [LeasedLimiter(stub) for stub in stubs]
    for limiter in limiters:
        limiter.start()
    try:
        yield Shared(servers, stubs, limiters)
    finally:
        for limiter in limiters:
            await limiter.close()
        for channel in channels:
            await channel.close()
        for server in servers:
            await server.stop(0.5)


async def try_acquire(limiter: LeasedLimiter, key_id: str, limits: Limits) -> Grant | None:
    try:
        return await limiter.acquire(key_id, limits)
    except RateLimited:
        return None


async def test_requests_per_minute_hold_across_two_gateways(shared: Shared) -> None:
    rpm = 40
    key_id, limits = await shared.key(requests_per_minute=rpm)
    k = lease_size(rpm)
    started = time.monotonic()
    admitted = 0
    for i in range(3 * rpm):
        limiter = shared.limiters[i % GATEWAYS]
        grant = await try_acquire(limiter, key_id, limits)
        if grant is not None:
            admitted += 1
            limiter.release(grant)
        # Let background renewals run, as they would between real requests.
        await asyncio.sleep(0.002)
    refilled = (time.monotonic() - started) * rpm / 60
    assert admitted <= rpm + GATEWAYS * k + refilled + 1
    assert admitted >= rpm - GATEWAYS * k
    # Both gateways served part of it: the counters really are shared.
    assert all(lim._leases for lim in shared.limiters)


async def test_a_refusal_carries_the_shared_counters(shared: Shared) -> None:
    key_id, limits = await shared.key(requests_per_minute=2)
    first = await shared.limiters[0].acquire(key_id, limits)
    await asyncio.sleep(0.05)
    # The first request's gateway topped its lease up in the background: the
    # second request is admitted from it without asking auth.
    second = await shared.limiters[0].acquire(key_id, limits)
    assert first.requests is not None and second.requests is not None
    assert second.requests.remaining == 0
    await asyncio.sleep(0.05)
    # The bucket is empty at auth: a third request is refused by either gateway.
    with pytest.raises(RateLimited) as refused:
        await shared.limiters[0].acquire(key_id, limits)
    assert refused.value.limit == "requests"
    # One request refills every 30 s.
    assert 25 <= refused.value.retry_after <= 30
    assert refused.value.requests is not None
    assert refused.value.requests.remaining == 0
    with pytest.raises(RateLimited):
        await shared.limiters[1].acquire(key_id, limits)


async def test_the_concurrency_cap_is_exact_across_two_gateways(shared: Shared) -> None:
    cap = 3
    key_id, limits = await shared.key(max_concurrent_requests=cap)
    held: list[tuple[LeasedLimiter, Grant]] = []
    for i in range(4 * cap):
        limiter = shared.limiters[i % GATEWAYS]
        grant = await try_acquire(limiter, key_id, limits)
        if grant is not None:
            held.append((limiter, grant))
        await asyncio.sleep(0.01)
    assert len(held) == cap
    # A finished request frees a slot for its own gateway at once.
    limiter, grant = held.pop()
    limiter.release(grant)
    again = await limiter.acquire(key_id, limits)
    limiter.release(again)
    for limiter, grant in held:
        limiter.release(grant)


async def test_tokens_per_minute_hold_across_two_gateways(shared: Shared) -> None:
    tpm, per_answer = 1000, 150
    key_id, limits = await shared.key(tokens_per_minute=tpm)
    used = 0
    for i in range(40):
        limiter = shared.limiters[i % GATEWAYS]
        grant = await try_acquire(limiter, key_id, limits)
        if grant is not None:
            limiter.charge(grant, per_answer)
            limiter.release(grant)
            used += per_answer
        await asyncio.sleep(0.005)
    # One answer may over-run what is left, and each gateway may hold one lease.
    assert (
        tpm - GATEWAYS * lease_size(tpm) <= used <= tpm + GATEWAYS * (per_answer + lease_size(tpm))
    )


async def test_a_key_out_of_tokens_is_still_admitted_for_requests_that_spend_none(
    shared: Shared,
) -> None:
    key_id, limits = await shared.key(requests_per_minute=40, tokens_per_day=100)
    first, second = shared.limiters
    grant = await first.acquire(key_id, limits)
    first.charge(grant, 500)  # the day's tokens, and more
    first.release(grant)
    # The debt is settled with auth on the next lease call: then both refuse.
    for limiter in (first, second):
        for _ in range(lease_size(40) + 1):
            if await try_acquire(limiter, key_id, limits) is None:
                break
        with pytest.raises(RateLimited) as refused:
            await limiter.acquire(key_id, limits)
        assert refused.value.limit == "tokens_per_day"
        # Requests that spend no tokens still pass, counted against the minute...
        lookup = await limiter.acquire(key_id, limits, tokens=False)
        assert lookup.requests is not None and lookup.requests.limit == 40
        limiter.release(lookup)
    # ...until the minute's requests run out, with a wait of seconds, not the day's.
    admitted = 2
    while (await try_acquire_lookup(second, key_id, limits)) is not None:
        admitted += 1
        assert admitted <= 40 + GATEWAYS * lease_size(40)
    with pytest.raises(RateLimited) as refused:
        await second.acquire(key_id, limits, tokens=False)
    assert refused.value.limit == "requests"
    assert refused.value.retry_after <= 60


async def try_acquire_lookup(limiter: LeasedLimiter, key_id: str, limits: Limits) -> Grant | None:
    try:
        grant = await limiter.acquire(key_id, limits, tokens=False)
    except RateLimited:
        return None
    limiter.release(grant)
    return grant


async def test_a_given_back_lease_returns_to_the_other_gateway(shared: Shared) -> None:
    key_id, limits = await shared.key(requests_per_minute=100)
    k = lease_size(100)
    grant = await shared.limiters[0].acquire(key_id, limits)
    shared.limiters[0].release(grant)
    await asyncio.sleep(0.05)
    await shared.limiters[0].close()  # gives its lease back
    answer = await shared.stubs[1].LeaseCapacity(
        auth_pb.LeaseCapacityRequest(key_id=key_id, holder="probe", requests=1)
    )
    # Only the admitted request is gone from the bucket (up to refill rounding).
    assert answer.requests == 1
    assert 100 - 2 <= answer.requests_remaining <= 100 - 2 + 1
    assert k >= 1


async def test_with_auth_unreachable_each_gateway_enforces_the_limits_alone(
    shared: Shared,
) -> None:
    key_id, limits = await shared.key(requests_per_minute=2)
    for server in shared.servers:
        await server.stop(0.1)
    limiter = shared.limiters[0]
    assert (await limiter.acquire(key_id, limits)).fallback
    assert (await limiter.acquire(key_id, limits)).fallback
    with pytest.raises(RateLimited):
        await limiter.acquire(key_id, limits)


async def test_unlimited_keys_never_ask_auth(shared: Shared) -> None:
    for server in shared.servers:
        await server.stop(0.1)
    grant = await shared.limiters[0].acquire("key_x", Limits())
    assert not grant.fallback
    assert not shared.limiters[0]._leases
