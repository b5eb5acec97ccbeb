"""The request context of every HTTP request: its id in and out, one access-log
line, its rate-limit headers, and what it held (body budget, key's account)
given back when it ends."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

from marie_kit import tracing
from marie_kit.context import clean_request_id, new_request_id, request_id_var

from marie_gateway.http.metrics import UNMATCHED, http_duration, http_requests

access_log = logging.getLogger("marie.access")

#: The answer header naming the request's trace (tracing on only).
TRACE_ID_HEADER = b"x-trace-id"

# Where a limited request keeps the `x-ratelimit-*` headers its answer carries.
RATE_HEADERS_KEY = "marie.ratelimit_headers"

ASGIApp = Callable[
    [dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


class RequestHolds(Protocol):
    """What a request holds until it ends (the gateway's `core.Gateway`)."""

    def release(self, scope: dict[str, Any]) -> None:
        """Give back the body budget the request reserved."""

    def finish(self, scope: dict[str, Any], status: int) -> None:
        """Close the request's account with its final status."""


H = TypeVar("H", bound=RequestHolds)


class RequestContext(Generic[H]):
    """Pure ASGI middleware (not BaseHTTPMiddleware): it runs on every request
    and must cost microseconds.

    With tracing on (`marie_kit.tracing`), `traced` wraps it in the request's
    SERVER span, continuing the caller's `traceparent` (Envoy's), current
    while this one runs."""

    def __init__(self, app: ASGIApp, gw: H) -> None:
        self.app = app
        self.gw = gw

    def traced(self) -> ASGIApp:
        """This middleware inside a SERVER span per request (none for probes
        and /metrics), continuing the caller's `traceparent`."""
        return _Traced(self)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        # The id becomes gRPC metadata and a log field: only a safe one is kept.
        rid = clean_request_id(incoming)
        request_id_var.set(rid)
        started = time.perf_counter()
        status = 500
        response_started = False
        rid_header = (b"x-request-id", rid.encode())
        span = tracing.current_span() if tracing.STATE.enabled else None
        trace_headers = _trace_headers(span, rid) if span is not None else ()

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                headers = list(message.get("headers", ()))
                if not any(k == b"x-request-id" for k, _ in headers):
                    headers.append(rid_header)
                if span is not None:
                    headers.extend(trace_headers)
                    _name_span(span, scope, status)
                # A limited route's answer, success or error, says where the key stands.
                headers.extend(scope.get(RATE_HEADERS_KEY, ()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # The ledger row is queued (and spooled) before the answer's
                # last byte leaves: an answered request is never unrecorded.
                self.gw.finish(scope, status)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Starlette re-raises after its 500 handler has logged the error and
            # answered; once answered, there is nothing left to do with it.
            if not response_started:
                raise
        finally:
            self.gw.release(scope)
            self.gw.finish(scope, status)
            elapsed = time.perf_counter() - started
            method = scope["method"]
            route = scope.get("route")
            # The template, never the raw path: a client must not mint labels.
            template = getattr(route, "path", UNMATCHED)
            http_requests(template, method, status).inc()
            http_duration(template, method).observe(elapsed)
            access_log.info(
                "http",
                extra={
                    "method": method,
                    "path": scope["path"],
                    "status": status,
                    "latency_ms": round(elapsed * 1000, 3),
                },
            )


#: Paths never traced: probes and scrapes, every few seconds.
UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class _Traced:
    """`RequestContext` inside the request's span (with tracing on only).

    Not OpenTelemetry's ASGI middleware: measured with `make bench`, it costs
    about 0.05 ms of CPU per request unsampled and more sampled, for
    attributes (headers, URL parts) the conventions no longer ask for."""

    def __init__(self, inner: RequestContext[Any]) -> None:
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACED_PATHS:
            await self.inner(scope, receive, send)
            return
        with tracing.http_server_span(scope["method"], scope["path"], scope["headers"]):
            await self.inner(scope, receive, send)


def _trace_headers(span: Any, rid: str) -> tuple[tuple[bytes, bytes], ...]:
    """Ties the request's span and its id both ways: whoever has the request
    id (a log line, the answer's x-request-id) finds the trace by the span's
    attribute, and the answer names its trace."""
    span.set_attribute(tracing.REQUEST_ID_ATTRIBUTE, rid)
    trace_id = format(span.get_span_context().trace_id, "032x")
    return ((TRACE_ID_HEADER, trace_id.encode()),)


def _name_span(span: Any, scope: dict[str, Any], status: int) -> None:
    """Names the request's span by its route, known once the answer starts,
    and records the answer's status."""
    template = getattr(scope.get("route"), "path", UNMATCHED)
    span.update_name(f"{scope['method']} {template}")
    span.set_attribute("http.route", template)
    tracing.http_answered_server(span, status)


def current_request_id() -> str:
    """The id of the request being served (set by the request-context middleware)."""
    return request_id_var.get() or new_request_id()
