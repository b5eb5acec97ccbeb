"""Whether the work running in this task is background work, and the metadata
that tells providers so.

The extraction queue and the embedder run their tasks in the background lane
(`marie_kit.lanes`): providers never lets their calls take a circuit
breaker's half-open probe nor a user's concurrency slot. Work done for a
caller waiting on the answer (a synchronous AddMemories, a search's query
embedding) stays in the user's lane.
"""

from __future__ import annotations

from contextvars import ContextVar

from marie_kit.context import outgoing_metadata
from marie_kit.lanes import BACKGROUND_METADATA

_BACKGROUND: ContextVar[bool] = ContextVar("marie_memory_background", default=False)


def enter_background() -> None:
    """Marks the current task (and the tasks it starts) as background work."""
    _BACKGROUND.set(True)


def in_background() -> bool:
    return _BACKGROUND.get()


def call_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata of a call to providers: the request id, and the lane when in background."""
    lane = (BACKGROUND_METADATA,) if _BACKGROUND.get() else ()
    return outgoing_metadata() + lane
