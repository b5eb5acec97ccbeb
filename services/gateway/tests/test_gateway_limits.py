"""The in-process limiter and the invalid-key slow-down, on a fake clock:
exact at every boundary."""

from __future__ import annotations

import pytest
from marie_gateway.access.limits import InvalidKeyThrottle, duration_text, quota_headers
from marie_kit.limits import Limits, LocalLimiter, Quota, RateLimited

# 2026-12-02 12:00:00 UTC: twelve hours before the next UTC midnight.
NOON = 1_796_212_800.0


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def wall() -> Clock:
    return Clock(NOON)


@pytest.fixture
def limiter(clock: Clock, wall: Clock) -> LocalLimiter:
    return LocalLimiter(clock=clock, wall_clock=wall)


async def refused(limiter: LocalLimiter, limits: Limits, key: str = "k") -> RateLimited:
    with pytest.raises(RateLimited) as info:
        await limiter.acquire(key, limits)
    return info.value


async def test_requests_per_minute_admits_exactly_the_limit_then_refuses(
    limiter: LocalLimiter, clock: Clock
) -> None:
    limits = Limits(requests_per_minute=3)
    remaining = [(await limiter.acquire("k", limits)).requests for _ in range(3)]
    assert remaining == [
        Quota(3, 2, 20.0),
        Quota(3, 1, 40.0),
        Quota(3, 0, 60.0),
    ]
    refusal = await refused(limiter, limits)
    assert refusal.limit == "requests"
    assert refusal.retry_after == pytest.approx(20.0)
    assert refusal.requests == Quota(3, 0, 60.0)
    # One request refills every 20 s: not a moment before.
    clock.now += 19.999
    await refused(limiter, limits)
    clock.now += 0.001
    grant = await limiter.acquire("k", limits)
    assert grant.requests is not None and grant.requests.remaining == 0
    # Other keys have their own counters.
    await limiter.acquire("other", limits)


async def test_refused_requests_consume_nothing(limiter: LocalLimiter, clock: Clock) -> None:
    limits = Limits(requests_per_minute=1)
    await limiter.acquire("k", limits)
    for _ in range(5):
        await refused(limiter, limits)
    clock.now += 60
    await limiter.acquire("k", limits)


async def test_tokens_are_counted_after_and_refuse_the_next_request(
    limiter: LocalLimiter, clock: Clock
) -> None:
    limits = Limits(tokens_per_minute=100)
    first = await limiter.acquire("k", limits)
    assert first.tokens == Quota(100, 100, 0.0)
    limiter.charge(first, 60)
    second = await limiter.acquire("k", limits)
    assert second.tokens == Quota(100, 40, 36.0)
    # The request that exhausts the window may overshoot it: 120 used of 100.
    limiter.charge(second, 60)
    refusal = await refused(limiter, limits)
    assert refusal.limit == "tokens"
    assert refusal.tokens == Quota(100, 0, 72.0)
    # Back to one whole token: 21 tokens refill in 12.6 s.
    assert refusal.retry_after == pytest.approx(12.6)
    clock.now += 12.59
    await refused(limiter, limits)
    clock.now += 0.01
    await limiter.acquire("k", limits)


async def test_a_request_that_spends_no_tokens_is_held_to_requests_and_concurrency_only(
    limiter: LocalLimiter,
) -> None:
    limits = Limits(
        requests_per_minute=3, tokens_per_minute=50, tokens_per_day=50, max_concurrent_requests=2
    )
    grant = await limiter.acquire("k", limits)
    limiter.charge(grant, 60)  # both token limits spent
    limiter.release(grant)
    assert (await refused(limiter, limits)).limit == "tokens"
    lookup = await limiter.acquire("k", limits, tokens=False)
    assert lookup.requests == Quota(3, 1, 40.0)
    assert lookup.tokens is not None and lookup.tokens.remaining == 0
    # It holds a slot and a request like any other.
    second = await limiter.acquire("k", limits, tokens=False)
    with pytest.raises(RateLimited) as info:
        await limiter.acquire("k", limits, tokens=False)
    assert info.value.limit == "concurrency"
    limiter.release(lookup)
    limiter.release(second)
    with pytest.raises(RateLimited) as info:
        await limiter.acquire("k", limits, tokens=False)
    assert info.value.limit == "requests"


async def test_exactly_the_token_limit_exhausts_the_minute(limiter: LocalLimiter) -> None:
    limits = Limits(tokens_per_minute=50)
    grant = await limiter.acquire("k", limits)
    limiter.charge(grant, 49)
    limiter.charge(await limiter.acquire("k", limits), 1)
    await refused(limiter, limits)


async def test_tokens_per_day_hold_until_utc_midnight(
    limiter: LocalLimiter, clock: Clock, wall: Clock
) -> None:
    limits = Limits(tokens_per_day=1000)
    grant = await limiter.acquire("k", limits)
    assert grant.tokens == Quota(1000, 1000, 0.0)
    limiter.charge(grant, 999)
    grant = await limiter.acquire("k", limits)
    assert grant.tokens == Quota(1000, 1, 43_200.0)
    limiter.charge(grant, 1)
    refusal = await refused(limiter, limits)
    assert refusal.limit == "tokens_per_day"
    assert refusal.retry_after == pytest.approx(43_200.0)
    clock.now += 43_199
    wall.now += 43_199
    await refused(limiter, limits)
    clock.now += 1
    wall.now += 1
    fresh = await limiter.acquire("k", limits)
    assert fresh.tokens == Quota(1000, 1000, 0.0)


async def test_the_concurrency_cap_counts_requests_until_released(limiter: LocalLimiter) -> None:
    limits = Limits(max_concurrent_requests=2)
    a = await limiter.acquire("k", limits)
    b = await limiter.acquire("k", limits)
    refusal = await refused(limiter, limits)
    assert refusal.limit == "concurrency"
    assert refusal.retry_after == 1.0
    limiter.release(a)
    limiter.release(a)  # idempotent: frees one slot, not two
    c = await limiter.acquire("k", limits)
    await refused(limiter, limits)
    limiter.release(b)
    limiter.release(c)
    await limiter.acquire("k", limits)
    await limiter.acquire("k", limits)


async def test_a_refusal_by_one_limit_takes_nothing_from_the_others(
    limiter: LocalLimiter,
) -> None:
    limits = Limits(requests_per_minute=5, max_concurrent_requests=1)
    held = await limiter.acquire("k", limits)
    await refused(limiter, limits)
    await refused(limiter, limits)
    limiter.release(held)
    grant = await limiter.acquire("k", limits)
    assert grant.requests is not None and grant.requests.remaining == 3


async def test_a_lowered_limit_applies_to_what_was_used(limiter: LocalLimiter) -> None:
    await limiter.acquire("k", Limits(requests_per_minute=10))
    await limiter.acquire("k", Limits(requests_per_minute=10))
    # 2 used; the new limit of 3 leaves one.
    grant = await limiter.acquire("k", Limits(requests_per_minute=3))
    assert grant.requests is not None and grant.requests.remaining == 0
    await refused(limiter, Limits(requests_per_minute=3))


async def test_unlimited_keys_hold_no_state(limiter: LocalLimiter) -> None:
    grant = await limiter.acquire("k", Limits())
    assert grant.requests is None and grant.tokens is None and not grant.holds_slot
    limiter.charge(grant, 10**9)
    assert quota_headers(grant.requests, grant.tokens) == []


def test_headers_as_openai_sends_them() -> None:
    headers = dict(quota_headers(Quota(60, 59, 1.0), Quota(1000, 400, 36.0)))
    assert headers == {
        b"x-ratelimit-limit-requests": b"60",
        b"x-ratelimit-remaining-requests": b"59",
        b"x-ratelimit-reset-requests": b"1s",
        b"x-ratelimit-limit-tokens": b"1000",
        b"x-ratelimit-remaining-tokens": b"400",
        b"x-ratelimit-reset-tokens": b"36s",
    }


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.012, "12ms"),
        (0.0001, "1ms"),
        (1.5, "1.5s"),
        (17.2849, "17.285s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (43_200, "12h0m0s"),
    ],
)
def test_durations_are_written_like_openai(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text


def test_invalid_keys_slow_an_address_down_after_the_threshold(clock: Clock) -> None:
    throttle = InvalidKeyThrottle(3, 30.0, clock=clock)
    for _ in range(3):
        assert throttle.retry_after("10.0.0.1") == 0
        throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == pytest.approx(10.0)
    assert throttle.retry_after("10.0.0.2") == 0
    clock.now += 9.99
    assert throttle.retry_after("10.0.0.1") > 0
    clock.now += 0.01
    assert throttle.retry_after("10.0.0.1") == 0


def test_the_throttle_keeps_bounded_memory(clock: Clock) -> None:
    throttle = InvalidKeyThrottle(2, 10.0, max_addresses=3, clock=clock)
    for n in range(10):
        throttle.failed(f"10.0.0.{n}")
    assert len(throttle._addresses) <= 3


def test_a_zero_threshold_disables_the_throttle(clock: Clock) -> None:
    throttle = InvalidKeyThrottle(0, 10.0, clock=clock)
    for _ in range(100):
        throttle.failed("a")
    assert throttle.retry_after("a") == 0
