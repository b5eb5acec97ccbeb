#!/usr/bin/env python3
"""The jaeger stand-in: OTLP/gRPC TraceService/Export on :4317, one JSON line
per span received on stdout ({"trace_id", "service", "name"}). Not Jaeger."""

import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


def export(request: ExportTraceServiceRequest, context: grpc.ServicerContext) -> object:
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
            for span in scope_spans.spans:
                line = {"trace_id": span.trace_id.hex(), "service": service, "name": span.name}
                print(json.dumps(line), flush=True)
    return ExportTraceServiceResponse()


def main() -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_unary_rpc_method_handler(
        export,
        request_deserializer=ExportTraceServiceRequest.FromString,
        response_serializer=ExportTraceServiceResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, {"Export": handler})]
    )
    server.add_insecure_port("0.0.0.0:4317")
    server.start()
    print("jaeger stand-in: OTLP/gRPC on :4317", file=sys.stderr, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
