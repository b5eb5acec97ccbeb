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
    through (half-open); the probe's success closes it, its failure reopens it.

    The probe is a user's. A background call passes a circuit that is not closed
    only once the circuit has waited another `open_seconds` for a user's probe in
    vain (so work queued in the background resumes when no user comes), and even
    then it does not hold the probe: a user's request arriving meanwhile probes
    alongside it. `vouch` (the provider answered its health probe) makes an open
    circuit due for its probe at once.
    """

    __slots__ = (
        "_background_probing",
        "_clock",
        "_due_at",
        "_opened_at",
        "_probing",
        "failures",
        "open_seconds",
        "threshold",
    )

    def __init__(self, threshold: int, open_seconds: float, clock: Clock = time.monotonic) -> None:
        self.threshold = threshold
        self.open_seconds = open_seconds
        self._clock = clock
        self.failures = 0
        # When the open circuit lets a probe through; None while closed.
        self._due_at: float | None = None
        self._opened_at = 0.0
        self._probing = False
        self._background_probing = False

    @property
    def state(self) -> Circuit:
        if self._due_at is None:
            return Circuit.CLOSED
        if self._probing or self._background_probing or self._clock() >= self._due_at:
            return Circuit.HALF_OPEN
        return Circuit.OPEN

    @property
    def retry_at(self) -> float | None:
        """Clock time at which an open circuit lets a (user's) probe through; None if closed."""
        return self._due_at

    @property
    def background_retry_at(self) -> float | None:
        """Clock time from which a background call may pass; None if closed."""
        return None if self._due_at is None else self._due_at + self.open_seconds

    def allow(self, *, background: bool = False) -> bool:
        """Whether a request may go to the deployment now; a half-open circuit admits
        one user's probe, and background calls only as the class says."""
        if self._due_at is None:
            return True
        now = self._clock()
        if background:
            if self._background_probing or now < self._due_at + self.open_seconds:
                return False
            self._background_probing = True
            return True
        if self._probing or now < self._due_at:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self.failures = 0
        self._due_at = None
        self._probing = self._background_probing = False

    def failure(self, *, background: bool = False) -> None:
        self.failures += 1
        probing = self._background_probing if background else self._probing
        if probing or self.failures >= self.threshold:
            self._opened_at = self._clock()
            self._due_at = self._opened_at + self.open_seconds
        self.abandon(background=background)

    def abandon(self, *, background: bool = False) -> None:
        """The admitted request ended without telling anything about the deployment."""
        if background:
            self._background_probing = False
        else:
            self._probing = False

    def vouch(self, since: float) -> None:
        """The upstream answered a health probe sent at clock time `since`: a circuit
        opened before then is due for its probe now."""
        if self._due_at is not None and self._opened_at <= since:
            self._due_at = min(self._due_at, self._clock())


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
