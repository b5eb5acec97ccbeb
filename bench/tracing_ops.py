"""What the kit's tracing calls of one chat cost in process, with the
OpenTelemetry SDK's tracer and with the kit's own (`marie_kit.tracer`), side
by side in one process, rounds interleaved: the calls the gateway and
providers make for one sampled chat (a model of them, in the order they make
them), and each kind of call alone. CPU of the calling thread only, per call;
then the export thread's work per span (the OTLP encoding of a batch).

Usage: .venv/bin/python bench/tracing_ops.py [--calls 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from marie_kit import otlp, tracing
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

REMOTE_PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
HTTP_HEADERS = [(b"host", b"marie"), (b"content-type", b"application/json")]
GRPC_METADATA = (("traceparent", REMOTE_PARENT), ("x-request-id", "rid"))
CHAT_RPC = "/marie.providers.v1.ProviderService/StreamChatCompletion"


class Encoding(SpanExporter):
    """Encodes each batch as the kit's exporters do, then drops it."""

    def __init__(self) -> None:
        self.spans = 0
        self.cpu_ns = 0

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        started = time.thread_time_ns()
        otlp.spans(spans)
        self.cpu_ns += time.thread_time_ns() - started
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def gateway_chat() -> None:
    """The gateway's calls for one chat: the request's span, its two steps
    as events, the gRPC call's span, two log lines, the route's name."""
    with tracing.http_server_span("POST", "/v1/chat/completions", HTTP_HEADERS):
        span = tracing.current_span()
        assert span is not None
        span.set_attribute(tracing.REQUEST_ID_ATTRIBUTE, "rid")
        format(span.get_span_context().trace_id, "032x")
        with tracing.step("gateway.check_key") as step:
            assert step is not None
            step.set_attribute("marie.key_id", "k1")
        with tracing.step("gateway.limits", {"marie.operation": "chat"}):
            pass
        call, _ = tracing._start_call(CHAT_RPC, ())
        assert call is not None
        tracing.rpc_ended(call, "OK", 0)
        call.end()
        tracing.current_ids()
        tracing.current_ids()
        span.update_name("POST /v1/chat/completions")
        span.set_attribute("http.route", "/v1/chat/completions")
        tracing.http_answered_server(span, 200)


def providers_chat() -> None:
    """Providers' calls for one chat: the server span, the model call's span
    with its GenAI attributes, the upstream request's attributes on it, the
    first-token event, a log line."""
    with tracing.server_span(CHAT_RPC, GRPC_METADATA) as server:
        tracing.rpc_ended(server, "OK", 0)
        current = tracing.current_span()
        assert current is not None and tracing.STATE.tracer is not None
        current.set_attribute(tracing.REQUEST_ID_ATTRIBUTE, "rid")
        model = tracing.STATE.tracer.start_span(
            "chat llama3.2:latest",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": "ollama",
                "gen_ai.request.model": "llama3.2:latest",
                "marie.provider": "ollama",
                "gen_ai.request.max_tokens": 64,
            },
        )
        with trace.use_span(model, end_on_exit=False, record_exception=False):
            http, _, _ = tracing.start_http_call(
                {
                    "http.request.method": "POST",
                    "server.address": "127.0.0.1",
                    "server.port": 11434,
                    "url.path": "/api/chat",
                }
            )
            tracing.http_answered(http, 200)
        model.add_event("gen_ai.first_token", {"marie.time_to_first_token_ms": 1.5})
        model.set_attribute("gen_ai.response.id", "chatcmpl-1")
        model.set_attribute("gen_ai.response.model", "llama3.2:latest")
        model.set_attribute("gen_ai.usage.input_tokens", 10)
        model.set_attribute("gen_ai.usage.output_tokens", 5)
        model.set_attribute("gen_ai.response.finish_reasons", ["stop"])
        model.end()
        tracing.current_ids()


def client_span() -> None:
    call, _ = tracing._start_call(CHAT_RPC, ())
    assert call is not None
    call.end()


def server_span_remote_parent() -> None:
    with tracing.server_span(CHAT_RPC, GRPC_METADATA):
        pass


def step_event() -> None:
    with (
        tracing.http_server_span("POST", "/", HTTP_HEADERS),
        tracing.step("gateway.limits", {"marie.operation": "chat"}),
    ):
        pass


CASES: dict[str, Callable[[], None]] = {
    "gateway: one chat": gateway_chat,
    "providers: one chat": providers_chat,
    "a gRPC call's CLIENT span": client_span,
    "a SERVER span (remote parent)": server_span_remote_parent,
    "a root span + a step event": step_event,
}


def _cpu_us(case: Callable[[], None], calls: int) -> float:
    started = time.thread_time_ns()
    for _ in range(calls):
        case()
    return (time.thread_time_ns() - started) / calls / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    # The kit's tracer, installed as the services install it; its exporter
    # swapped for one that encodes and drops.
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"
    os.environ["OTEL_TRACES_SAMPLER"] = "parentbased_always_on"
    assert tracing.setup_tracing("bench")
    assert tracing.STATE.provider is not None and tracing.STATE.tracer is not None
    kit_encoding = Encoding()
    tracing.STATE.provider.queue._export = kit_encoding.export
    kit_tracer = tracing.STATE.tracer
    # The SDK's, as the kit set it up before: BatchSpanProcessor, parent-based.
    sdk_encoding = Encoding()
    sdk = SdkTracerProvider(resource=Resource.create({"service.name": "bench"}))
    sdk.add_span_processor(BatchSpanProcessor(sdk_encoding))
    tracers = {"SDK": sdk.get_tracer("marie"), "kit": kit_tracer}

    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, case in CASES.items():
            for which, tracer in tracers.items():
                tracing.STATE.tracer = tracer
                _cpu_us(case, args.calls // 10)  # warm up
                results.setdefault((name, which), []).append(_cpu_us(case, args.calls))
    tracing.STATE.tracer = kit_tracer
    sdk.shutdown()
    tracing.STATE.provider.force_flush()

    print(f"\nCPU of the calling thread per call, median of {args.rounds} interleaved rounds")
    print(f"load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    print(f"{'':<32}{'SDK':>10}{'kit':>10}{'ratio':>8}")
    for name in CASES:
        sdk_us = statistics.median(results[name, "SDK"])
        kit_us = statistics.median(results[name, "kit"])
        print(f"{name:<32}{sdk_us:>8.1f}µs{kit_us:>8.1f}µs{sdk_us / kit_us:>7.1f}x")
    for which, encoding in (("SDK", sdk_encoding), ("kit", kit_encoding)):
        per_span = encoding.cpu_ns / max(encoding.spans, 1) / 1000
        print(f"export thread, OTLP encoding of a {which} span: {per_span:.1f}µs")


if __name__ == "__main__":
    main()
