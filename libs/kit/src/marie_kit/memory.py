"""Handing memory back to the system after large requests.

glibc keeps freed heap for reuse, so one burst of large request bodies leaves
a process hundreds of MB larger for good. `LargeRequests` counts the large
requests in flight and trims (`malloc_trim(0)`) shortly after the last one
ends: a few milliseconds after a rare large request, nothing for ordinary ones.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable

#: A request whose body is at least this large is worth a trim when it ends.
LARGE_REQUEST_BYTES = 1024 * 1024
# The request's own objects are freed only after its handler returns: trim a
# moment later, so that they are part of what goes back.
TRIM_DELAY_SECONDS = 0.2


def _find_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    trim: Callable[[int], int] | None = getattr(ctypes.CDLL(name), "malloc_trim", None)
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def malloc_trim() -> None:
    """Return freed heap to the system (glibc only; elsewhere nothing)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class _Trimmer:
    """One pending trim at most, however often one is asked for meanwhile."""

    def __init__(self) -> None:
        self._pending: asyncio.TimerHandle | None = None

    def schedule(self) -> None:
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(TRIM_DELAY_SECONDS, self._run)

    def _run(self) -> None:
        self._pending = None
        malloc_trim()


#: `malloc_trim` a moment from now (after the request's objects are freed).
schedule_trim = _Trimmer().schedule


class LargeRequests:
    """Counts large requests in flight; trims once none is left."""

    def __init__(self, threshold: int = LARGE_REQUEST_BYTES) -> None:
        self.threshold = threshold
        self.in_flight = 0

    def started(self, size: int) -> bool:
        """Note a request of `size` bytes; True when it counts as large."""
        if size < self.threshold:
            return False
        self.in_flight += 1
        return True

    def ended(self) -> None:
        """A large request ended (call only when `started` said True)."""
        self.in_flight -= 1
        if self.in_flight == 0:
            schedule_trim()
