"""The lane a model call travels in: a user's request, or background work.

Background calls (memory extraction, message embeddings) go through the same
providers routing as users' requests, but in their own lane: they never take
a circuit breaker's half-open probe, never hold a user's concurrency slot, and
an open circuit makes them wait rather than fail for good. The caller marks
them with `LANE_HEADER: BACKGROUND` in the call's metadata; a call without it
is a user's. Envoy strips client-sent `x-marie-*` headers, so only Marie's own
services can put a call in the background lane.
"""

from __future__ import annotations

from collections.abc import Iterable

LANE_HEADER = "x-marie-lane"
BACKGROUND = "background"
#: The metadata entry that puts a call in the background lane.
BACKGROUND_METADATA: tuple[str, str] = (LANE_HEADER, BACKGROUND)


def is_background(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """Whether a call's metadata puts it in the background lane."""
    return any(name == LANE_HEADER and value == BACKGROUND for name, value in metadata or ())
