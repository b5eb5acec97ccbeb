"""Server-sent events parsed incrementally, whatever the read boundaries."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from marie_providers.errors import UpstreamProtocolError
from marie_providers.upstream.sse import Event, iter_sse_batches

BODY = (
    b": keep-alive\r\n\r\n"
    b'event: message_start\r\ndata: {"a":1}\r\n\r\n'
    b"data: line one\ndata: line two\n\n"
    b"id: 7\nretry: 10\ndata:no-space\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    Event("message_start", '{"a":1}'),
    Event("message", "line one\nline two"),
    Event("message", "no-space"),
    Event("message", "[DONE]"),
]


async def pieces(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def events(body: bytes, size: int, **kwargs: int) -> list[list[Event]]:
    return [batch async for batch in iter_sse_batches(pieces(body, size), **kwargs)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
async def test_events_are_the_same_whatever_the_read_size(size: int) -> None:
    batches = await events(BODY, size)

    assert [e for batch in batches for e in batch] == EXPECTED


async def test_events_completed_by_one_read_come_together() -> None:
    assert await events(BODY, 1000) == [EXPECTED]


async def test_a_last_event_without_its_blank_line_still_counts() -> None:
    assert await events(b"data: tail", 3) == [[Event("message", "tail")]]


async def test_an_endless_line_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamProtocolError):
        await events(b"data: " + b"x" * 100, 10, max_event_bytes=50)
