"""A transparent gRPC hop for tests: forwards every call to a real service and
records the method and metadata it received, so a test can assert what an
upstream was sent (e.g. which headers Envoy let through).

Runs on its own threads (a plain `grpc.server`), never on a test's event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool

# Transport-level names a gRPC client sets itself; everything else is forwarded
# (the rich error details in grpc-status-details-bin included).
_NOT_FORWARDED = frozenset({"user-agent", "te", "content-type"})
_FORWARDED_GRPC = frozenset({"grpc-status-details-bin"})
# time_remaining() of a call without a deadline is (nearly) infinite.
_NO_DEADLINE = 365 * 24 * 3600.0


@dataclass(frozen=True)
class RecordedCall:
    method: str
    metadata: tuple[tuple[str, str | bytes], ...]

    def header(self, name: str) -> str | bytes | None:
        return next((v for k, v in self.metadata if k == name), None)

    @property
    def names(self) -> set[str]:
        return {k for k, _ in self.metadata}


def _server_streaming(method: str) -> bool:
    """Whether `/package.Service/Method` streams its answer (from the compiled contracts)."""
    full_name = method.strip("/").replace("/", ".")
    try:
        found = descriptor_pool.Default().FindMethodByName(full_name)
    except KeyError:
        return False
    return bool(found.server_streaming)


Metadata = tuple[tuple[str, str | bytes], ...]


def _forwardable(metadata: Sequence[tuple[str, Any]]) -> Metadata:
    return tuple(
        (k, v)
        for k, v in metadata
        if k in _FORWARDED_GRPC or (not k.startswith((":", "grpc-")) and k not in _NOT_FORWARDED)
    )


class RecordingProxy(grpc.GenericRpcHandler):
    """Listens on 127.0.0.1:`port`, forwards to `target`, keeps `calls`."""

    def __init__(self, target: str) -> None:
        self._lock = threading.Lock()
        self._calls: list[RecordedCall] = []
        self._channel = grpc.insecure_channel(target)
        self._server = grpc.server(ThreadPoolExecutor(max_workers=16), handlers=[self])
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def __enter__(self) -> RecordingProxy:
        self._server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop(0).wait()
        self._channel.close()

    def all_calls(self) -> list[RecordedCall]:
        with self._lock:
            return list(self._calls)

    def calls(self, request_id: str) -> list[RecordedCall]:
        """The calls that carried `x-request-id: request_id`."""
        with self._lock:
            return [c for c in self._calls if c.header("x-request-id") == request_id]

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method: str = handler_call_details.method
        if _server_streaming(method):
            return grpc.unary_stream_rpc_method_handler(self._stream_behavior(method))
        return grpc.unary_unary_rpc_method_handler(self._unary_behavior(method))

    def _record(self, method: str, context: grpc.ServicerContext) -> Metadata:
        metadata = tuple(context.invocation_metadata())
        with self._lock:
            self._calls.append(RecordedCall(method, metadata))
        return _forwardable(metadata)

    def _unary_behavior(self, method: str) -> Any:
        def behavior(request: bytes, context: grpc.ServicerContext) -> bytes:
            metadata = self._record(method, context)
            try:
                forward: Any = self._channel.unary_unary(method)
                response, call = forward.with_call(
                    request, metadata=metadata, timeout=_deadline(context)
                )
            except grpc.RpcError as exc:
                _relay_error(exc, context)
            context.send_initial_metadata(_forwardable(call.initial_metadata()))
            context.set_trailing_metadata(_forwardable(call.trailing_metadata()))
            reply: bytes = response
            return reply

        return behavior

    def _stream_behavior(self, method: str) -> Any:
        def behavior(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            metadata = self._record(method, context)
            forward: Any = self._channel.unary_stream(method)
            call = forward(request, metadata=metadata, timeout=_deadline(context))
            context.add_callback(call.cancel)
            try:
                context.send_initial_metadata(_forwardable(call.initial_metadata()))
                yield from call
                context.set_trailing_metadata(_forwardable(call.trailing_metadata()))
            except grpc.RpcError as exc:
                _relay_error(exc, context)

        return behavior


def _deadline(context: grpc.ServicerContext) -> float | None:
    """The caller's remaining time, or None when it set no deadline."""
    remaining = context.time_remaining()
    return remaining if remaining < _NO_DEADLINE else None


def _relay_error(exc: grpc.RpcError, context: grpc.ServicerContext) -> None:
    """End the call as the upstream ended it."""
    if not isinstance(exc, grpc.Call):
        # Not the upstream's answer: this call itself ended (cancelled by the
        # caller, e.g. Envoy's idle timeout), so there is nobody to tell.
        return
    context.set_trailing_metadata(_forwardable(exc.trailing_metadata() or ()))
    context.abort(exc.code(), exc.details() or "")
