"""Per-deployment protection: a circuit breaker and a concurrency limit.

Plain Python on the event loop (no locks needed); the clock is injectable so
tests drive time instead of sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from enum import Enum

Clock = Callable[[], float]


class Circuit(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after `threshold` failures in a row; after `open_seconds` lets one probe
    through (half-open); the probe's success closes it, its failure reopens it."""

    __slots__ = ("_clock", "_opened_at", "_probing", "failures", "open_seconds", "threshold")

    def __init__(self, threshold: int, open_seconds: float, clock: Clock = time.monotonic) -> None:
        self.threshold = threshold
        self.open_seconds = open_seconds
        self._clock = clock
        self.failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> Circuit:
        if self._opened_at is None:
            return Circuit.CLOSED
        if self._probing or self._clock() >= self._opened_at + self.open_seconds:
            return Circuit.HALF_OPEN
        return Circuit.OPEN

    @property
    def retry_at(self) -> float | None:
        """Clock time at which an open circuit lets a probe through; None unless open."""
        return None if self._opened_at is None else self._opened_at + self.open_seconds

    def allow(self) -> bool:
        """Whether a request may go to the deployment now; a half-open circuit admits one."""
        state = self.state
        if state is Circuit.CLOSED:
            return True
        if state is Circuit.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self._opened_at = None
        self._probing = False

    def failure(self) -> None:
        self.failures += 1
        if self._probing or self.failures >= self.threshold:
            self._opened_at = self._clock()
        self._probing = False

    def abandon(self) -> None:
        """The admitted request ended without telling anything about the deployment."""
        self._probing = False


class ConcurrencyLimit:
    """At most `limit` requests at once (0: no limit); others wait their turn, briefly."""

    __slots__ = ("_semaphore", "in_flight", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._semaphore = asyncio.Semaphore(limit) if limit > 0 else None

    async def acquire(self, timeout: float) -> bool:
        """Take a slot, waiting at most `timeout` seconds; False when none came free."""
        if self._semaphore is not None:
            if self._semaphore.locked() and timeout <= 0:
                return False
            try:
                async with asyncio.timeout(timeout):
                    await self._semaphore.acquire()
            except TimeoutError:
                return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1
        if self._semaphore is not None:
            self._semaphore.release()
