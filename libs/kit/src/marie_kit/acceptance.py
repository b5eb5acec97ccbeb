"""A generation stream's head: providers says in the stream's initial metadata
that an upstream accepted the request, before the model's first token, so the
gateway can start its own answer (status and headers) while the model works
rather than on the first token's path.

Accepted means past everything that answers with a status of its own: the
request checks, routing, the response cache, and the upstream's HTTP status
(below 400). What fails after it ends the stream with a status all the same;
the gateway then reports it in the event stream it has started.
"""

from __future__ import annotations

from collections.abc import Iterable

#: The initial-metadata entry of an accepted StreamChatCompletion or
#: StreamCompletion; its value is the answer's CacheResult, as a number.
ACCEPTED_KEY = "x-marie-accepted"


def accepted_metadata(cache_result: int) -> tuple[tuple[str, str]]:
    """The initial metadata that says an upstream accepted the request; the
    answer's CacheResult travels with it (it is not known from a chunk yet)."""
    return ((ACCEPTED_KEY, str(cache_result)),)


def accepted_cache_result(metadata: Iterable[tuple[str, str | bytes]] | None) -> int | None:
    """The CacheResult of an accepted stream's initial metadata; None when it
    does not say the request was accepted (the first chunk comes with it, or
    the call failed before)."""
    for name, value in metadata or ():
        if name == ACCEPTED_KEY:
            return int(value)
    return None
