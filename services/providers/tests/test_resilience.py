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


# ---------------------------------------------------------------------------
# Background calls: users first
# ---------------------------------------------------------------------------


def test_a_background_call_never_takes_the_half_open_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, open_seconds=10, clock=clock)
    breaker.failure()

    assert not breaker.allow(background=True)
    clock.now += 10
    assert state(breaker) is Circuit.HALF_OPEN
    assert not breaker.allow(background=True)
    # The probe is still there for a user.
    assert breaker.allow()
    assert breaker.background_retry_at == 120.0


def test_background_work_passes_once_no_user_came_to_probe_and_blocks_no_user() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, open_seconds=10, clock=clock)
    breaker.failure()
    clock.now += 20

    assert breaker.allow(background=True)
    # One background call at a time, and a user may still probe alongside it.
    assert not breaker.allow(background=True)
    assert breaker.allow()
    breaker.success()
    assert state(breaker) is Circuit.CLOSED


def test_a_failed_background_probe_reopens_the_circuit() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, open_seconds=10, clock=clock)
    breaker.failure()
    clock.now += 20
    assert breaker.allow(background=True)

    breaker.failure(background=True)

    assert state(breaker) is Circuit.OPEN
    assert breaker.retry_at == clock.now + 10


def test_an_abandoned_background_call_does_not_free_the_users_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, open_seconds=10, clock=clock)
    breaker.failure()
    clock.now += 20
    assert breaker.allow()
    assert breaker.allow(background=True)

    breaker.abandon(background=True)

    assert not breaker.allow()
    assert breaker.allow(background=True)


def test_a_health_probe_answered_makes_an_open_circuit_due_at_once() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, open_seconds=30, clock=clock)
    breaker.failure()
    clock.now += 1

    breaker.vouch(since=clock.now)

    assert state(breaker) is Circuit.HALF_OPEN
    assert breaker.allow()


def test_a_health_probe_sent_before_the_circuit_opened_vouches_for_nothing() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, open_seconds=30, clock=clock)
    sent = clock.now
    clock.now += 1
    breaker.failure()

    breaker.vouch(since=sent)

    assert state(breaker) is Circuit.OPEN
