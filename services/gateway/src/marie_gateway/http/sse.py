"""Server-sent events: the framing of OpenAI streams, and an ASGI response that
stops the stream (and so the upstream call) the moment the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

log = logging.getLogger("marie.gateway.sse")

DONE = b"data: [DONE]\n\n"
# A comment line: clients ignore it; proxies and clients with read timeouts
# see the stream is alive while a slow model thinks.
KEEP_ALIVE = b": keep-alive\n\n"
KEEP_ALIVE_SECONDS = 15.0
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # Proxies (nginx) must not buffer the stream.
    (b"x-accel-buffering", b"no"),
]


def event(payload: Any) -> bytes:
    """One `data:` event carrying `payload` as JSON."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def typed_event(payload: dict[str, Any]) -> bytes:
    """One event named by its payload's `type` (the Responses API's framing:
    `event: response.created` then the `data:` line)."""
    kind: str = payload["type"]
    return b"event: " + kind.encode() + b"\n" + event(payload)


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
        self,
        events: AsyncIterator[bytes],
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        keep_alive_seconds: float = KEEP_ALIVE_SECONDS,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.events = events
        # Called once the response is over, however it ends: also when the
        # client left before `events` ever started (its `finally` never runs).
        self.on_close = on_close
        self.headers = HEADERS + (headers or [])
        self.keep_alive_seconds = keep_alive_seconds
        # Loop time of the last write; the keep-alive task writes only after
        # a quiet `keep_alive_seconds`.
        self._last_write = 0.0
        self._finished = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            await self._stream(receive, send)
        finally:
            if self.on_close is not None:
                self.on_close()

    async def _stream(self, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        self._last_write = loop.time()
        sender = asyncio.create_task(self._send_all(send, loop))
        watcher = asyncio.create_task(self._wait_disconnect(receive))
        ticker = asyncio.create_task(self._keep_alive(send, loop))
        try:
            await asyncio.wait((sender, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, watcher, ticker):
                task.cancel()
            results = await asyncio.gather(sender, watcher, ticker, return_exceptions=True)
            for result in results:
                if isinstance(result, Exception):
                    # A failing event source must not end a stream unseen.
                    log.error("event stream failed", exc_info=result)
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _send_all(self, send: Send, loop: asyncio.AbstractEventLoop) -> None:
        try:
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
                self._last_write = loop.time()
            self._finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            # The client went away while we wrote; nothing more to send.
            return

    async def _keep_alive(self, send: Send, loop: asyncio.AbstractEventLoop) -> None:
        """A comment after every quiet `keep_alive_seconds` (one timer per
        stream, none per event)."""
        while True:
            quiet = loop.time() - self._last_write
            if quiet < self.keep_alive_seconds:
                await asyncio.sleep(self.keep_alive_seconds - quiet)
                continue
            if self._finished:
                return
            self._last_write = loop.time()
            try:
                await send({"type": "http.response.body", "body": KEEP_ALIVE, "more_body": True})
            except OSError:
                return

    @staticmethod
    async def _wait_disconnect(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
