"""An OTLP trace receiver for the tests: what a collector's `otlp` receiver
does for `POST /v1/traces` (protobuf bodies, gzip or not) and for the gRPC
`TraceService/Export` (what the real collector's `otlp` exporter sends,
tests/otel_collector.py), keeping every span it is sent, decoded with
`opentelemetry-proto`, to be asserted on."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

SERVER = 2
CLIENT = 3
TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind is None:
        return None
    return getattr(value, kind)


@dataclass
class Event:
    name: str
    attributes: dict[str, Any]


@dataclass
class Span:
    """One received span, flattened: hex ids, plain attribute values."""

    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    events: list[Event]
    links: list[tuple[str, str]]
    status_code: int
    start: int
    end: int


@dataclass
class OtlpReceiver:
    server: ThreadingHTTPServer
    grpc_server: grpc.Server
    grpc_port: int
    spans: list[Span] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        """For OTEL_EXPORTER_OTLP_ENDPOINT (the exporter appends /v1/traces)."""
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def grpc_target(self) -> str:
        """For a gRPC OTLP exporter's `endpoint`."""
        return f"127.0.0.1:{self.grpc_port}"

    def received(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        out = []
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    out.append(
                        Span(
                            service=service,
                            name=s.name,
                            kind=s.kind,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            events=[
                                Event(e.name, {a.key: _value(a.value) for a in e.attributes})
                                for e in s.events
                            ],
                            links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                            status_code=s.status.code,
                            start=s.start_time_unix_nano,
                            end=s.end_time_unix_nano,
                        )
                    )
        with self.lock:
            self.raw.append(body)
            self.spans.extend(out)

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, check: Callable[[list[Span]], bool], timeout: float = 15.0) -> list[Span]:
        """Every span received, once `check` holds for them; AssertionError if never."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                spans = list(self.spans)
            if check(spans):
                return spans
            if time.monotonic() > deadline:
                names = sorted({(s.service, s.name) for s in spans})
                raise AssertionError(f"spans never matched in {timeout}s; received {names}")
            time.sleep(0.05)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.grpc_server.stop(grace=None)


def start_receiver() -> OtlpReceiver:
    receiver: OtlpReceiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                body = self._chunked()  # Envoy's exporter sends no length
            else:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
            if self.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces":
                self.send_response(404)
                self.end_headers()
                return
            receiver.received(body)
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def _chunked(self) -> bytes:
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    grpc_server = grpc.server(ThreadPoolExecutor(max_workers=4))
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    receiver = OtlpReceiver(server, grpc_server, grpc_port)

    def export(body: bytes, context: grpc.ServicerContext) -> ExportTraceServiceResponse:
        receiver.received(body)  # the request as sent, undecoded
        return ExportTraceServiceResponse()

    export_handler: grpc.RpcMethodHandler[bytes, ExportTraceServiceResponse]
    export_handler = grpc.unary_unary_rpc_method_handler(
        export, response_serializer=ExportTraceServiceResponse.SerializeToString
    )
    grpc_server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(TRACE_SERVICE, {"Export": export_handler})]
    )
    grpc_server.start()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return receiver
