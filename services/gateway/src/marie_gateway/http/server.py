"""The HTTP server: uvicorn on httptools and uvloop, with what it lacks for a
public front.

- A time limit on request headers (slowloris): uvicorn times idle keep-alive
  connections but not a client trickling its headers a byte at a time. The
  body has its own limit in `Gateway.read_body`.
- Errors uvicorn answers itself (bad framing, duplicate `Content-Length`,
  unknown methods) in the OpenAI envelope, not plain text; an unknown method
  is a 501, as HTTP says.
- HTTP/1.0 clients know no chunked encoding: a response of unknown length is
  sent as is and ends when the connection closes.
- At shutdown, calls still running shortly before the grace period ends are
  ended by the gateway with a proper answer (see `Gateway.cut_calls`), rather
  than cut mid-air by uvicorn when it runs out.

Subclassing uvicorn's protocol keeps its C parser, which profiles showed to be
the cheapest part of a request; the hooks used are few and pinned by tests.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Protocol

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

log = logging.getLogger("marie.gateway.http")

# The share of the grace period after which running calls are ended with an
# answer, leaving the rest for that answer to reach the client.
CUT_AT_SHARE_OF_GRACE = 0.8


def _envelope(status: int, message: str, code: str) -> bytes:
    body = orjson.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error" if status < 500 else "server_error",
                "param": None,
                "code": code,
            }
        }
    )
    return b"".join(
        [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
    )


BAD_REQUEST = _envelope(400, "The request is not valid HTTP.", "bad_http_request")
NOT_IMPLEMENTED = _envelope(501, "The request method is not supported.", "unsupported_method")
HEADER_TIMEOUT = _envelope(408, "The request headers did not arrive in time.", "request_timeout")


class Http10Cycle(RequestResponseCycle):
    """A request-response cycle for an HTTP/1.0 client: a body of unknown
    length is written as it comes, and ends when the connection closes."""

    until_close = False

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            names = {name.lower() for name, _ in message.get("headers", ())}
            if (
                b"content-length" not in names
                and self.scope["method"] != "HEAD"
                and message["status"] not in (204, 304)
            ):
                self.until_close = True
                self.keep_alive = False
                # Neither chunked nor a length: uvicorn adds neither header.
                self.chunked_encoding = False
        elif message["type"] == "http.response.body" and self.until_close:
            await self._send_until_close(message)
            return
        await super().send(message)

    async def _send_until_close(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected or self.response_complete:
            return
        body = message.get("body", b"")
        if body:
            self.transport.write(body)
        if not message.get("more_body", False):
            self.response_complete = True
            self.message_event.set()
            self.transport.close()
            self.on_response()


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header time limit, enveloped errors
    and HTTP/1.0 streaming. `header_timeout` is set by `protocol_class`."""

    header_timeout: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserInvalidMethodError:
            self._refuse(NOT_IMPLEMENTED, "unsupported HTTP method")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            self._refuse(BAD_REQUEST, "invalid HTTP request")

    def send_400_response(self, msg: str) -> None:
        self._refuse(BAD_REQUEST, msg)

    def _refuse(self, response: bytes, why: str) -> None:
        self._cancel_header_timer()
        log.info("refused connection", extra={"why": why, "client": self.client})
        if not self.transport.is_closing():
            if self.cycle is None or not self.cycle.response_started:
                self.transport.write(response)
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # A new request on a kept-alive connection: its headers are timed
        # from its first byte (the first request's from the connection).
        if self._header_timer is None:
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()
        if self.scope.get("http_version") == "1.0" and self.cycle is not None:
            self.cycle.__class__ = Http10Cycle

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being served: its headers are all in
        if self.transport.is_closing():
            return
        # Nothing (or half a request) in header_timeout: a slow or idle
        # client holding a connection. Say so, and close it.
        self._refuse(HEADER_TIMEOUT, "request headers too slow")


def protocol_class(header_timeout: float) -> type[GatewayHttpProtocol]:
    """The protocol with this header time limit (uvicorn takes a class)."""
    return type("GatewayHttpProtocol", (GatewayHttpProtocol,), {"header_timeout": header_timeout})


class Drainable(Protocol):
    """What shutdown tells the gateway (`core.Gateway`): readiness turns 503
    (`draining`), then its running calls are ended with an answer (`cut_calls`)."""

    draining: bool

    def cut_calls(self) -> None: ...


class GatewayServer(uvicorn.Server):
    """uvicorn's server: on shutdown, /readyz says 503 while requests are still
    taken for `drain_delay` seconds (Envoy's health checks stop sending them
    meanwhile), then the port closes and the running calls are ended with an
    answer before the grace period runs out."""

    def __init__(
        self, config: uvicorn.Config, gateway: Drainable, drain_delay: float = 0.0
    ) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.drain_delay = drain_delay

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.gateway.draining = True
        if self.drain_delay > 0:
            log.info("draining", extra={"drain_delay_seconds": self.drain_delay})
            await asyncio.sleep(self.drain_delay)
        grace = self.config.timeout_graceful_shutdown or 0
        cut = asyncio.get_running_loop().call_later(
            grace * CUT_AT_SHARE_OF_GRACE, self.gateway.cut_calls
        )
        try:
            await super().shutdown(sockets)
        finally:
            cut.cancel()
