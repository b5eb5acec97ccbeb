"""Server-sent events: the framing of OpenAI streams, and an ASGI response that
stops the stream (and so the upstream call) the moment the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # Proxies (nginx) must not buffer the stream.
    (b"x-accel-buffering", b"no"),
]


def event(payload: Any) -> bytes:
    """One `data:` event carrying `payload` as JSON."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


class DisconnectWatch:
    """Cancels `call` when the client disconnects, until stopped.

    For the time before a response starts: the request body has been read, so
    the next ASGI message can only be `http.disconnect`."""

    def __init__(self, receive: Receive, call: Any) -> None:
        self.fired = False
        self._call = call
        self._task: asyncio.Task[None] | None = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.fired = True
        self._call.cancel()

    async def stop(self) -> None:
        """Stop watching (idempotent); afterwards nothing else reads `receive`."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class EventStreamResponse:
    """Sends `events` as a 200 event stream.

    A task watches for `http.disconnect` while the events are sent; when the
    client leaves, the sender is cancelled, which closes `events` (and the gRPC
    call behind it) instead of generating for nobody.
    """

    def __init__(
        self, events: AsyncIterator[bytes], headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        self.events = events
        self.headers = HEADERS + (headers or [])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        sender = asyncio.create_task(self._send_all(send))
        watcher = asyncio.create_task(self._wait_disconnect(receive))
        try:
            await asyncio.wait((sender, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, watcher):
                task.cancel()
            await asyncio.gather(sender, watcher, return_exceptions=True)
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _send_all(self, send: Send) -> None:
        try:
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            # The client went away while we wrote; nothing more to send.
            return

    @staticmethod
    async def _wait_disconnect(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
