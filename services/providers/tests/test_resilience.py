"""The circuit breaker and the concurrency limit, on a clock the tests move."""

from __future__ import annotations

import asyncio

from marie_providers.routing.resilience import Circuit, CircuitBreaker, ConcurrencyLimit


def state(breaker: CircuitBreaker) -> Circuit:
    # A call, not the property: mypy would narrow the property across statements.
    return breaker.state


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_the_threshold_and_admits_one_probe_later() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=3, open_seconds=10, clock=clock)

    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert state(breaker) is Circuit.CLOSED
    breaker.failure()
    assert state(breaker) is Circuit.OPEN
    assert not breaker.allow()
    assert breaker.retry_at == 110.0

    clock.now = 110.0
    assert state(breaker) is Circuit.HALF_OPEN
    assert breaker.allow()
    # One probe at a time.
    assert not breaker.allow()
    breaker.success()
    assert state(breaker) is Circuit.CLOSED
    assert breaker.failures == 0


def test_a_failed_probe_reopens_for_a_full_period() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, open_seconds=5, clock=clock)
    breaker.failure()
    clock.now += 5
    assert breaker.allow()

    breaker.failure()

    assert state(breaker) is Circuit.OPEN
    assert breaker.retry_at == clock.now + 5


def test_an_abandoned_probe_lets_the_next_request_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, open_seconds=5, clock=clock)
    breaker.failure()
    clock.now += 5
    assert breaker.allow()

    breaker.abandon()

    assert breaker.allow()


def test_a_success_resets_the_count_of_failures_in_a_row() -> None:
    breaker = CircuitBreaker(threshold=2, open_seconds=5, clock=Clock())
    breaker.failure()
    breaker.success()
    breaker.failure()

    assert state(breaker) is Circuit.CLOSED


async def test_the_limit_waits_briefly_then_gives_up() -> None:
    limit = ConcurrencyLimit(1)
    assert await limit.acquire(0)

    assert not await limit.acquire(0.05)
    waiter = asyncio.ensure_future(limit.acquire(1))
    await asyncio.sleep(0.01)
    limit.release()

    assert await waiter
    assert limit.in_flight == 1


async def test_no_limit_never_waits() -> None:
    limit = ConcurrencyLimit(0)

    assert all([await limit.acquire(0) for _ in range(100)])
    assert limit.in_flight == 100
