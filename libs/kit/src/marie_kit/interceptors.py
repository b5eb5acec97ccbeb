"""Server interceptor doing the cross-cutting work of every RPC.

- request id: taken from `x-request-id` metadata (or created), bound to a
  context variable for logs and downstream calls, echoed in initial metadata;
- access log: one line per call with method, status code and latency, and
  the same as Prometheus metrics (`marie_kit.metrics`);
- errors: `ServiceError` becomes its rich status; a write refused for lack
  of space becomes STORAGE_FULL and is reported to the service's storage
  watches (`marie_kit.storage`); anything else becomes INTERNAL with
  ErrorInfo and no stack trace for the client (it is logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import grpc

from marie_kit import tracing
from marie_kit.context import REQUEST_ID_HEADER, clean_request_id, request_id_var
from marie_kit.errors import ServiceError
from marie_kit.metrics import rpc_calls, rpc_duration, rpc_streams_in_flight
from marie_kit.storage import StorageWatch, is_storage_full, storage_full

log = logging.getLogger("marie.access")

# Generic only in the type stubs, so the alias exists for the type checker alone.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
#: Makes a new behaviour of a handler's behaviour (same request and answers).
Wrap = Callable[[Any], Any]


def rewrap(handler: Handler, unary: Wrap, stream: Wrap) -> Handler | None:
    """A handler of `handler`'s kind and (de)serializers whose behaviour is
    `unary(its behaviour)` (unary-unary) or `stream(its behaviour)`
    (unary-stream); None for client- and bidi-streaming handlers, which are
    not part of Marie's contracts."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            stream(handler.unary_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return None


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Request id, access log and error mapping for unary and server-streaming RPCs."""

    def __init__(self, domain: str, watches: Sequence[StorageWatch] = ()) -> None:
        self.domain = domain
        self.watches = tuple(watches)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        metadata = handler_call_details.invocation_metadata or ()
        incoming = next((v for k, v in metadata if k == REQUEST_ID_HEADER), None)
        # With tracing on, the trace context the call's SERVER span continues.
        traced = metadata if tracing.STATE.enabled else None
        wrapped = rewrap(
            handler,
            lambda behavior: self._wrap_unary(behavior, method, incoming, traced),
            lambda behavior: self._wrap_stream(behavior, method, incoming, traced),
        )
        # Client- and bidi-streaming RPCs are not part of Marie's contracts.
        return wrapped or handler

    def _begin(self, context: grpc.aio.ServicerContext[Any, Any], incoming: Any) -> str:
        rid = clean_request_id(incoming if isinstance(incoming, str) else None)
        request_id_var.set(rid)
        if tracing.STATE.enabled and (span := tracing.current_span()) is not None:
            # Whoever has the request id of a log line or an answer finds its trace.
            span.set_attribute(tracing.REQUEST_ID_ATTRIBUTE, rid)
        return rid

    async def _fail(
        self, context: grpc.aio.ServicerContext[Any, Any], exc: BaseException, method: str
    ) -> grpc.StatusCode:
        if is_storage_full(exc):
            for watch in self.watches:
                watch.report()
            error = exc if isinstance(exc, ServiceError) else storage_full(self.domain)
        elif isinstance(exc, ServiceError):
            error = exc
        else:
            log.error("unhandled error in %s", method, exc_info=exc)
            error = ServiceError(
                grpc.StatusCode.INTERNAL,
                "INTERNAL",
                f"internal error (request id {request_id_var.get()})",
                domain=self.domain,
            )
        status = error.to_status()
        context.set_code(status.code)
        context.set_details(status.details)
        context.set_trailing_metadata(status.trailing_metadata)
        return error.code

    def _log(self, method: str, code: grpc.StatusCode, started: float) -> None:
        elapsed = time.perf_counter() - started
        rpc_calls(method, code.name).inc()
        rpc_duration(method).observe(elapsed)
        log.info(
            "rpc",
            extra={"method": method, "code": code.name, "latency_ms": round(elapsed * 1000, 3)},
        )

    def _wrap_unary(self, behavior: Any, method: str, incoming: Any, traced: Any) -> Any:
        # `context` is the call's, or it wrapped to record its status on the span.
        async def unary(request: Any, context: Any) -> Any:
            with _span(method, traced) as span:
                if span is not None:
                    context = _Recording(context, span)
                started = time.perf_counter()
                self._begin(context, incoming)
                code = grpc.StatusCode.OK
                try:
                    return await behavior(request, context)
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except Exception as exc:
                    code = await self._fail(context, exc, method)
                    return None
                finally:
                    self._log(method, code, started)

        return unary

    def _wrap_stream(self, behavior: Any, method: str, incoming: Any, traced: Any) -> Any:
        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            with _span(method, traced) as span:
                if span is not None:
                    context = _Recording(context, span)
                started = time.perf_counter()
                self._begin(context, incoming)
                code = grpc.StatusCode.OK
                in_flight = rpc_streams_in_flight(method)
                in_flight.inc()
                try:
                    responses = behavior(request, context)
                    if inspect.isawaitable(responses):
                        # A handler that sends with `context.write` and returns
                        # nothing: grpc_health's Watch, which client-side health
                        # checking calls (it failed INTERNAL here before).
                        await responses
                        return
                    # aclosing: a cancelled call closes the handler's generator
                    # now (and with it any upstream request), not at garbage
                    # collection.
                    async with contextlib.aclosing(responses):
                        async for response in responses:
                            yield response
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except GeneratorExit:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except Exception as exc:
                    code = await self._fail(context, exc, method)
                finally:
                    in_flight.dec()
                    self._log(method, code, started)

        return stream


_UNTRACED: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


def _span(method: str, traced: Any) -> contextlib.AbstractContextManager[Any]:
    """The call's SERVER span, current while its handler and its access log
    run (in the same coroutine or generator as they: a wrapper of its own
    would cost a frame per call and per streamed message); `traced` is the
    call's metadata, None when tracing is off."""
    return _UNTRACED if traced is None else tracing.server_span(method, traced)


class _Recording:
    """A servicer context that also records the status set on it on the
    call's span (`set_code` is how the kit's interceptor answers errors)."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], span: Any) -> None:
        self._context = context
        self._span = span
        if span is not None:
            tracing.rpc_ended(span, "OK", 0)

    def set_code(self, code: grpc.StatusCode) -> None:
        tracing.rpc_ended(self._span, code.name, code.value[0])
        self._context.set_code(code)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)
