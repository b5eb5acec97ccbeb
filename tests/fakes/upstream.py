"""What the fake cloud upstreams (OpenAI-compatible, Hugging Face router, Anthropic) share:
a real HTTP server in a background thread, recorded requests, disconnect
counting, and failures on cue.

A *cue* scripts how the next chat (or embeddings) request fails, in order:

    fake.fail_next(Cue.status(429, retry_after="1"), Cue.status(500))

- ``Cue.status(code, retry_after=None, message=...)``: answer with that status
  and the upstream's error envelope (``Retry-After`` header when given);
- ``Cue.hang()``: accept the request and send nothing until the client leaves;
- ``Cue.slow_first(seconds)``: wait that long before the first byte, then answer;
- ``Cue.slow_first_chunk(seconds)``: send the response's headers at once, then
  wait that long before the first event (a real server reading a long prompt);
- ``Cue.die_after(n)``: send ``n`` content events, then drop the connection.

"Refuse connections" is a closed port (``closed_port_url`` in the tests) or a
stopped fake. Cues are consumed by chat and embeddings requests only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

JSONObject = dict[str, Any]


@dataclass(frozen=True)
class Cue:
    """How one upcoming request misbehaves."""

    kind: str
    status: int = 0
    retry_after: str | None = None
    message: str = ""
    seconds: float = 0.0
    events: int = 0
    param: str | None = None

    @classmethod
    def status_error(
        cls,
        status: int,
        *,
        retry_after: str | None = None,
        message: str = "",
        param: str | None = None,
    ) -> Cue:
        return cls("status", status=status, retry_after=retry_after, message=message, param=param)

    @classmethod
    def hang(cls) -> Cue:
        return cls("hang")

    @classmethod
    def slow_first(cls, seconds: float) -> Cue:
        return cls("slow_first", seconds=seconds)

    @classmethod
    def slow_first_chunk(cls, seconds: float) -> Cue:
        return cls("slow_first_chunk", seconds=seconds)

    @classmethod
    def die_after(cls, events: int) -> Cue:
        return cls("die_after", events=events)

    @classmethod
    def die_after_head(cls) -> Cue:
        """The stream's status and headers, then the connection dies."""
        return cls("die_after_head")


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float


class _Disconnect(Exception):
    """The client went away (or the server is stopping)."""


class EventWriter:
    """Writes one streamed HTTP response and notices the client leaving."""

    def __init__(self, receive: Receive, send: Send, stop: threading.Event) -> None:
        self._receive = receive
        self._send = send
        self._stop = stop
        self.disconnected = asyncio.Event()
        self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected.set()
                return

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def write(self, data: bytes) -> None:
        if self.disconnected.is_set() or self._stop.is_set():
            raise _Disconnect
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake (raising _Disconnect) as soon as the client leaves."""
        deadline = time.monotonic() + seconds
        while True:
            if self.disconnected.is_set() or self._stop.is_set():
                raise _Disconnect
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.disconnected.wait(), min(left, 0.05))

    async def end(self) -> None:
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def close(self) -> None:
        self._watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watcher


class StreamedResponse(Response):
    """A response written by `produce(writer)`; counts disconnects on the fake."""

    def __init__(
        self,
        fake: FakeUpstream,
        produce: Callable[[EventWriter], Any],
    ) -> None:
        super().__init__()
        self._fake = fake
        self._produce = produce

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        writer = EventWriter(receive, send, self._fake.stopping)
        self._fake.stream_opened()
        gone = False
        try:
            await self._produce(writer)
            await writer.end()
        except _Disconnect:
            gone = writer.disconnected.is_set()
        except _Abort:
            # Drop the connection mid-response: no final chunk of the chunked body.
            raise
        finally:
            await writer.close()
            self._fake.stream_closed(disconnected=gone)


class _Abort(Exception):
    """Raised to make uvicorn drop the connection mid-body."""


class FakeUpstream:
    """A threaded HTTP server; subclasses supply `routes()`."""

    def __init__(self, *, api_key: str = "test-key") -> None:
        self.api_key = api_key
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._requests: list[RecordedRequest] = []
        self._cues: list[Cue] = []
        self._disconnects = 0
        self._active = 0
        self.stopping = threading.Event()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._port: int | None = None

    # -- lifecycle -----------------------------------------------------------

    def routes(self) -> list[Route]:
        raise NotImplementedError

    def start(self) -> FakeUpstream:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self._socket = sock
        self._port = sock.getsockname()[1]
        app = Starlette(routes=self.routes())
        config = uvicorn.Config(
            app,
            http="httptools",
            ws="none",
            lifespan="off",
            log_config=None,
            log_level=None,
            server_header=False,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        server = self._server
        self.stopping.clear()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"{type(self).__name__} did not start")
            time.sleep(0.001)
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self.stopping.set()
        self._server.should_exit = True
        self._thread.join(10)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(10)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """Root URL of the server (providers add their API prefix, e.g. "/v1")."""
        if self._port is None:
            raise RuntimeError("not started")
        return f"http://127.0.0.1:{self._port}"

    # -- scripting and inspection -----------------------------------------------

    def fail_next(self, *cues: Cue) -> None:
        with self._lock:
            self._cues.extend(cues)

    def next_cue(self) -> Cue | None:
        with self._lock:
            return self._cues.pop(0) if self._cues else None

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._cues.clear()
            self._disconnects = 0

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    @property
    def disconnects(self) -> int:
        with self._lock:
            return self._disconnects

    def wait_for_disconnect(self, count: int = 1, timeout: float = 5.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._disconnects >= count, timeout)

    def stream_opened(self) -> None:
        with self._changed:
            self._active += 1
            self._changed.notify_all()

    def stream_closed(self, *, disconnected: bool) -> None:
        with self._changed:
            self._active -= 1
            if disconnected:
                self._disconnects += 1
            self._changed.notify_all()

    async def record(self, request: Request) -> Any:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError:
            body = raw
        with self._lock:
            self._requests.append(
                RecordedRequest(
                    request.method,
                    request.url.path,
                    {k.lower(): v for k, v in request.headers.items()},
                    body,
                    time.monotonic(),
                )
            )
        return body


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status, headers=headers, media_type="application/json")


SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]


async def hang(writer: EventWriter) -> None:
    """Send nothing at all until the client leaves (or the server stops)."""
    await writer.pause(3600)


def abort() -> None:
    """Drop the connection mid-response (uvicorn closes it on an app exception)."""
    raise _Abort


def words(text: str) -> list[str]:
    """`text` split into pieces that keep their spaces, as token streams do."""
    pieces = []
    for index, word in enumerate(text.split(" ")):
        pieces.append(word if index == 0 else " " + word)
    return [p for p in pieces if p]


def piece_logprob(position: int) -> float:
    """The log probability fakes report for the piece (one token) at `position`."""
    return round(-0.1 * (position + 1), 6)


def cut_reply(text: str, stops: Any, limit: Any) -> tuple[str, bool, int | None]:
    """`text` cut as a real model's run cuts it: before the first stop sequence
    found (the second value says whether one was), and the token limit to apply
    to the pieces afterwards (None: none)."""
    cut = False
    for stop in stops if isinstance(stops, list) else [stops]:
        at = text.find(stop) if isinstance(stop, str) and stop else -1
        if at >= 0:
            text, cut = text[:at], True
    return text, cut, limit if isinstance(limit, int) and limit > 0 else None
