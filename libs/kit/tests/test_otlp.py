"""The kit's OTLP encoder writes exactly the message the SDK's encoder builds,
for every kind of attribute value, events, links, statuses, remote parents,
trace state, and spans of several resources and instrumentation scopes."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from marie_kit import otlp
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)


class _Kept(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def _finished_spans() -> list[ReadableSpan]:
    kept = _Kept()
    spans: list[ReadableSpan] = []
    resources = [
        Resource.create({"service.name": "one", "n": 3}),
        Resource({"service.name": "two"}, schema_url="https://opentelemetry.io/schemas/1.21.0"),
    ]
    for resource in resources:
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(SimpleSpanProcessor(kept))
        plain = provider.get_tracer("marie")
        versioned = provider.get_tracer(
            "other", "1.2.3", schema_url="https://example.test/schema", attributes={"lib": "x"}
        )
        remote = SpanContext(
            trace_id=0x0AF7651916CD43DD8448EB211C80319C,
            span_id=0xB7AD6B7169203331,
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
            trace_state=TraceState([("vendor", "value"), ("other", "1")]),
        )
        with plain.start_as_current_span(
            "server",
            context=set_span_in_context(NonRecordingSpan(remote)),
            kind=SpanKind.SERVER,
            attributes={
                "text": "héllo",
                "long": "x" * 300,
                "int": 7,
                "negative": -5,
                "big": 2**62,
                "float": 0.5,
                "true": True,
                "false": False,
                "strings": ["a", "b"],
                "ints": [1, -2, 3],
                "floats": [1.5, -0.25],
                "bools": [True, False],
            },
        ) as server:
            server.add_event("first", {"ms": 1.5, "n": 2})
            server.add_event("bare")
            with versioned.start_as_current_span(
                "client", kind=SpanKind.CLIENT, links=[Link(remote, {"why": "queued"})]
            ) as client:
                client.set_status(Status(StatusCode.ERROR, "boom"))
            with plain.start_as_current_span("", kind=SpanKind.PRODUCER) as unnamed:
                unnamed.set_status(Status(StatusCode.OK))
        with plain.start_as_current_span(
            "root", kind=SpanKind.CONSUMER, links=[Link(server.get_span_context())]
        ):
            pass
    spans.extend(kept.spans)
    return spans


def test_the_encoding_is_the_message_the_sdk_builds() -> None:
    spans = _finished_spans()
    assert len(spans) == 8
    ours = ExportTraceServiceRequest.FromString(otlp.spans(spans))
    assert ours == encode_spans(spans)
    assert len(ours.resource_spans) == 2
    assert [len(r.scope_spans) for r in ours.resource_spans] == [2, 2]


def test_each_span_alone_is_encoded_as_the_sdk_does() -> None:
    for span in _finished_spans():
        assert ExportTraceServiceRequest.FromString(otlp.spans([span])) == encode_spans([span])


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31, 2**63 - 1, -1, -(2**63)])
def test_varints_decode_to_their_value(value: int) -> None:
    # An AnyValue's int_value (field 3) read back by protobuf.
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue  # noqa: PLC0415

    assert AnyValue.FromString(b"\x18" + otlp.varint(value)).int_value == value


def test_the_grpc_exporter_sends_the_same_request() -> None:
    spans = _finished_spans()
    exporter = otlp.grpc_exporter()
    try:
        assert exporter._translate_data(spans) == encode_spans(spans)
    finally:
        exporter.shutdown()


def test_a_cached_attribute_is_never_taken_for_an_equal_value_of_another_type() -> None:
    # True == 1 and hash alike: the encoding cache must still tell them apart.
    from opentelemetry.proto.common.v1.common_pb2 import KeyValue  # noqa: PLC0415

    for value in (True, 1, "1", 1, True):
        (field,) = [otlp._attributes(b"\x0a", {"k": value})]
        decoded = KeyValue.FromString(field[2:])
        assert (
            decoded.value.WhichOneof("value")
            == {
                bool: "bool_value",
                int: "int_value",
                str: "string_value",
            }[type(value)]
        )
