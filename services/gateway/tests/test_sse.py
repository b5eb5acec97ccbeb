"""EventStreamResponse's end: the `on_close` callback runs however the stream ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from marie_gateway.http.sse import EventStreamResponse


class Events:
    """An event source that records whether it was ever started."""

    def __init__(self) -> None:
        self.started = False

    async def __call__(self) -> AsyncIterator[bytes]:
        self.started = True
        yield b"data: one\n\n"


async def test_on_close_runs_when_the_client_left_before_the_stream_started() -> None:
    events, closed = Events(), []

    async def send(message: dict[str, Any]) -> None:
        raise OSError("the client is gone")

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    response = EventStreamResponse(events(), on_close=lambda: closed.append(True))
    with pytest.raises(OSError):
        await response({"type": "http"}, receive, send)
    # The generator never ran, so its own `finally` could not close the call.
    assert not events.started
    assert closed == [True]


async def test_on_close_runs_once_after_a_whole_stream() -> None:
    events, closed, sent = Events(), [], []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client stays
        return {}

    response = EventStreamResponse(events(), on_close=lambda: closed.append(True))
    await response({"type": "http"}, receive, send)
    assert [m.get("body") for m in sent[1:]] == [b"data: one\n\n", b""]
    assert closed == [True]
