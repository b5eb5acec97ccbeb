"""The gRPC client side of tracing (`marie_kit.tracing`, only when it is on):
one CLIENT span per call, from the call's start to its end (a stream's last
message), whose context the callee receives in `traceparent`/`tracestate`
metadata, written by the SDK's propagator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.trace import SpanKind

from marie_kit import tracing

_HEALTH = "/grpc.health.v1.Health/"


def _code_now(call: Any) -> grpc.StatusCode | None:
    """The status code of a finished aio call. `code()` is a coroutine, but
    one that returns at once when the call is done (as in its done callback):
    it is run to its end here, without an event-loop round."""
    pending = call.code()
    try:
        pending.send(None)
    except StopIteration as done:
        code: grpc.StatusCode = done.value
        return code
    except Exception:  # a status we cannot read is not recorded
        return None
    pending.close()
    return None


def _ended(span: trace.Span) -> Callable[[Any], None]:
    def done(call: Any) -> None:
        code = _code_now(call)
        if code is not None:
            tracing.rpc_ended(span, code.name, code.value[0])
        span.end()

    return done


def _start(
    details: grpc.aio.ClientCallDetails,
) -> tuple[trace.Span | None, grpc.aio.ClientCallDetails]:
    raw = details.method
    method = raw.decode() if isinstance(raw, bytes) else str(raw)
    tracer = tracing.STATE.tracer
    if tracer is None or method.startswith(_HEALTH):
        return None, details
    if not tracing.recording():
        # An unsampled trace: no span, but the callee learns the decision.
        unsampled: dict[str, str] = {}
        inject(unsampled)
        if not unsampled:
            return None, details
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *unsampled.items())
        return None, grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
    span = tracer.start_span(
        method, kind=SpanKind.CLIENT, attributes=tracing._rpc_attributes(method)
    )
    carrier: dict[str, str] = {}
    inject(carrier, context=trace.set_span_in_context(span))
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *carrier.items())
    return span, grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


# One object per kind of call: a channel files each interceptor under the
# first kind it is an instance of, and only there.
class UnaryTracing(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        span, details = _start(client_call_details)
        call = await continuation(details, request)
        if span is not None:
            call.add_done_callback(_ended(span))
        return call


class StreamTracing(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        span, details = _start(client_call_details)
        call = await continuation(details, request)
        if span is not None:
            call.add_done_callback(_ended(span))
        return call
