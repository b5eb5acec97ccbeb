"""The kit's thin tracer (marie_kit.tracer): the sampler decides as the SDK's
does, spans keep within their limits, the export queue drops and counts what
overflows it and flushes the rest, spans read back from their OTLP encoding,
and the OpenTelemetry API sees its spans as the current ones."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from marie_kit import otlp
from marie_kit.tracer import (
    BatchSettings,
    Limits,
    Sampler,
    Span,
    SpanQueue,
    TracerProvider,
    current_span_reader,
    extractor,
    injector,
)
from opentelemetry import baggage, context, propagate, trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import sampling
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from tests.otlp_receiver import _value

REMOTE = SpanContext(
    trace_id=0x0AF7651916CD43DD8448EB211C80319C,
    span_id=0xB7AD6B7169203331,
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
    trace_state=TraceState([("vendor", "value")]),
)
UNSAMPLED_REMOTE = SpanContext(
    trace_id=REMOTE.trace_id, span_id=REMOTE.span_id, is_remote=True, trace_flags=TraceFlags(0)
)


class Kept:
    """An exporter keeping what it is sent; `gate` holds each export until set."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.closed = False

    def export(self, spans: Sequence[Any]) -> None:
        self.entered.set()
        self.gate.wait(30)
        self.batches.append(list(spans))

    def shutdown(self) -> None:
        self.closed = True

    @property
    def spans(self) -> list[Any]:
        return [span for batch in self.batches for span in batch]


def _provider(
    kept: Kept,
    sampler: Sampler | None = None,
    limits: Limits | None = None,
    settings: BatchSettings | None = None,
) -> TracerProvider:
    return TracerProvider(
        Resource.create({"service.name": "probe"}),
        kept,
        sampler or Sampler(follows_parent=True, bound=1 << 64),
        limits or Limits(),
        settings or BatchSettings(schedule_delay=60),
    )


@pytest.fixture
def kept() -> Kept:
    return Kept()


@pytest.fixture
def provider(kept: Kept) -> Iterator[TracerProvider]:
    made = _provider(kept)
    yield made
    made.shutdown()


# --- the sampler ----------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "follows_parent", "bound"),
    [
        ({}, True, 1 << 64),
        ({"OTEL_TRACES_SAMPLER": "always_on"}, False, 1 << 64),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, False, 0),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, True, 0),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"},
            False,
            1 << 62,
        ),
        (
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
            True,
            1 << 63,
        ),
        # As the SDK: an unknown sampler is the default, a bad ratio is 1.
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, True, 1 << 64),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, False, 1 << 64),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"}, False, 1 << 64),
    ],
)
def test_the_sampler_is_read_from_the_standard_variables(
    env: dict[str, str], follows_parent: bool, bound: int
) -> None:
    assert Sampler.from_env(env) == Sampler(follows_parent, bound)


def test_a_ratio_sampler_decides_every_trace_as_the_sdks_does() -> None:
    ours = Sampler(follows_parent=False, bound=round(0.1 * (1 << 64)))
    sdks = sampling.TraceIdRatioBased(0.1)
    ids = [random.getrandbits(128) for _ in range(5000)]
    decisions = [ours.sampled(None, t) for t in ids]
    expected = [
        sdks.should_sample(None, t, "x").decision is sampling.Decision.RECORD_AND_SAMPLE
        for t in ids
    ]
    assert decisions == expected
    assert 300 < sum(decisions) < 700


def test_a_parent_based_sampler_follows_the_parent_and_samples_roots_by_ratio() -> None:
    never_roots = Sampler(follows_parent=True, bound=0)
    assert never_roots.sampled(REMOTE, REMOTE.trace_id)
    assert not never_roots.sampled(UNSAMPLED_REMOTE, REMOTE.trace_id)
    assert not never_roots.sampled(None, REMOTE.trace_id)
    # Not parent-based: the parent's decision does not count.
    assert not Sampler(follows_parent=False, bound=0).sampled(REMOTE, REMOTE.trace_id)


def test_an_unsampled_span_is_not_recorded_but_carries_the_trace_on(
    kept: Kept,
) -> None:
    provider = _provider(kept, Sampler(follows_parent=True, bound=0))
    tracer = provider.get_tracer("t")
    root = tracer.start_span("root")
    assert isinstance(root, NonRecordingSpan) and not root.is_recording()
    assert root.get_span_context().is_valid
    assert not root.get_span_context().trace_flags.sampled
    child = tracer.start_span("child", context=trace.set_span_in_context(root))
    assert child.get_span_context().trace_id == root.get_span_context().trace_id
    assert not child.is_recording()
    followed = tracer.start_span("server", trace.set_span_in_context(NonRecordingSpan(REMOTE)))
    assert followed.is_recording()
    provider.shutdown()
    assert [s.name for s in kept.spans] == []


# --- spans and their limits -------------------------------------------------


def test_a_span_continues_its_parents_trace_and_state(provider: TracerProvider) -> None:
    span = provider.get_tracer("t").start_span(
        "server", trace.set_span_in_context(NonRecordingSpan(REMOTE)), kind=SpanKind.SERVER
    )
    assert isinstance(span, Span)
    ids = span.get_span_context()
    assert ids.trace_id == REMOTE.trace_id and ids.span_id != REMOTE.span_id
    assert ids.trace_state == REMOTE.trace_state and not ids.is_remote
    assert span.parent == REMOTE


def test_attributes_over_the_limit_are_dropped_and_counted(kept: Kept) -> None:
    limits = Limits(attributes=2, events=1, event_attributes=1, value_length=3)
    provider = _provider(kept, limits=limits)
    span = provider.get_tracer("t").start_span("s", attributes={"a": "abcdef", "b": 1, "c": 2})
    span.set_attribute("b", 5)  # an existing key is replaced, not dropped
    span.set_attribute("d", 4)
    span.set_attributes({"e": 5, "a": ["wxyz", 1]})
    span.add_event("first", {"x": 1, "y": 2})
    span.add_event("second")
    span.end()
    provider.shutdown()
    (done,) = kept.spans
    assert done.attributes == {"a": ["wxy", 1], "b": 5}
    assert done.dropped_attributes == 3
    assert [(e.name, e.attributes, e.dropped_attributes) for e in done.events] == [
        ("first", {"x": 1}, 1)
    ]
    assert done.dropped_events == 1


def test_limits_are_read_from_the_standard_variables() -> None:
    limits = Limits.from_env(
        {
            "OTEL_ATTRIBUTE_COUNT_LIMIT": "10",
            "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "20",
            "OTEL_SPAN_EVENT_COUNT_LIMIT": "5",
            "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "100",
            "OTEL_SPAN_LINK_COUNT_LIMIT": "nope",
        }
    )
    assert limits == Limits(
        attributes=20,
        events=5,
        links=128,
        event_attributes=10,
        link_attributes=10,
        value_length=100,
    )
    assert Limits.from_env({}) == Limits()


def test_the_status_follows_the_sdks_rules(provider: TracerProvider) -> None:
    span = provider.get_tracer("t").start_span("s")
    assert isinstance(span, Span)
    statuses = []
    for status in (Status(StatusCode.UNSET), StatusCode.ERROR, Status(StatusCode.OK)):
        span.set_status(status, "boom")
        statuses.append((span.status.status_code, span.status.description))
    span.set_status(Status(StatusCode.ERROR))  # OK is final
    statuses.append((span.status.status_code, span.status.description))
    assert statuses == [
        (StatusCode.UNSET, None),
        (StatusCode.ERROR, "boom"),
        (StatusCode.OK, None),
        (StatusCode.OK, None),
    ]


def test_a_span_ended_twice_is_exported_once(kept: Kept, provider: TracerProvider) -> None:
    span = provider.get_tracer("t").start_span("s")
    span.end()
    span.end()
    assert not span.is_recording()
    provider.force_flush()
    assert [s.name for s in kept.spans] == ["s"]


# --- the OpenTelemetry API sees them ---------------------------------------------


def test_the_api_sees_the_current_span_and_propagates_it(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("outer") as outer:
        assert trace.get_current_span() is outer
        with trace.use_span(tracer.start_span("inner"), end_on_exit=True) as inner:
            assert trace.get_current_span() is inner
            assert isinstance(inner, Span) and inner.parent == outer.get_span_context()
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
        assert trace.get_current_span() is outer
    assert not trace.get_current_span().get_span_context().is_valid
    ids = inner.get_span_context()
    assert carrier["traceparent"] == f"00-{ids.trace_id:032x}-{ids.span_id:016x}-01"
    assert not inner.is_recording() and not outer.is_recording()


def test_an_exception_in_a_current_span_is_recorded_unless_told_not(
    kept: Kept, provider: TracerProvider
) -> None:
    tracer = provider.get_tracer("t")
    with pytest.raises(ValueError), tracer.start_as_current_span("recorded"):
        raise ValueError("boom")
    with (
        pytest.raises(ValueError),
        tracer.start_as_current_span(
            "quiet", record_exception=False, set_status_on_exception=False
        ),
    ):
        raise ValueError("boom")
    provider.force_flush()
    recorded, quiet = kept.spans
    assert recorded.status.status_code is StatusCode.ERROR
    assert [e.name for e in recorded.events] == ["exception"]
    assert recorded.events[0].attributes["exception.type"] == "ValueError"
    assert (quiet.status.status_code, quiet.events) == (StatusCode.UNSET, [])
    assert context.get_current() == {}


# --- the export queue -------------------------------------------------------


def test_a_full_queue_drops_and_counts_without_waiting() -> None:
    kept = Kept()
    kept.gate.clear()  # the exporter is stuck on its first batch
    queue = SpanQueue(kept.export, BatchSettings(schedule_delay=60, max_queue=4, max_batch=2))
    queue.start()
    queue.put("a")
    queue.put("b")  # a full batch: the thread wakes and takes both
    assert kept.entered.wait(10)
    for name in "cdefgh":
        queue.put(name)
    assert queue.dropped == 2
    kept.gate.set()
    assert queue.flush(10)
    queue.shutdown()
    assert kept.spans == ["a", "b", "c", "d", "e", "f"]
    assert [len(b) for b in kept.batches] == [2, 2, 2]


def test_shutdown_exports_what_is_queued_and_closes_the_exporter(kept: Kept) -> None:
    provider = _provider(kept)
    tracer = provider.get_tracer("t")
    for n in range(5):
        tracer.start_span(f"s{n}").end()
    assert kept.spans == []  # not a full batch, long before the schedule
    provider.shutdown()
    assert [s.name for s in kept.spans] == [f"s{n}" for n in range(5)]
    assert kept.closed


def test_a_failing_exporter_does_not_stop_the_export_thread() -> None:
    sent: list[list[str]] = []

    def export(batch: list[str]) -> None:
        if batch == ["bad"]:
            raise RuntimeError("collector down")
        sent.append(batch)

    queue = SpanQueue(export, BatchSettings(schedule_delay=60))
    queue.start()
    queue.put("bad")
    assert queue.flush(10)
    queue.put("good")
    assert queue.flush(10)
    queue.shutdown()
    assert sent == [["good"]]


def test_batch_settings_are_read_from_the_standard_variables() -> None:
    settings = BatchSettings.from_env(
        {
            "OTEL_BSP_SCHEDULE_DELAY": "250",
            "OTEL_BSP_MAX_QUEUE_SIZE": "100",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "500",
            "OTEL_BSP_EXPORT_TIMEOUT": "x",
        }
    )
    # A batch is never larger than the queue.
    assert settings == BatchSettings(
        schedule_delay=0.25, max_queue=100, max_batch=100, export_timeout=30.0
    )


# --- the OTLP encoding ------------------------------------------------------


def test_spans_read_back_from_their_otlp_encoding(kept: Kept) -> None:
    provider = _provider(kept)
    tracer = provider.get_tracer("marie")
    server = tracer.start_span(
        "POST /v1/chat/completions",
        trace.set_span_in_context(NonRecordingSpan(REMOTE)),
        kind=SpanKind.SERVER,
        attributes={"http.request.method": "POST", "n": 3, "ok": True, "ratio": 0.5},
    )
    server.add_event("gateway.limits", {"marie.duration_ms": 0.25}, timestamp=123)
    server.set_attribute("finish", ["stop", "length"])
    odd: Any = Kept()
    server.set_attribute("odd", odd)  # any value: sent as its text
    server.set_status(StatusCode.ERROR, "boom")
    job = tracer.start_span("job", context.Context(), links=[Link(REMOTE, {"why": "queued"})])
    job.end()
    server.end()
    provider.shutdown()

    request = ExportTraceServiceRequest.FromString(otlp.spans(kept.spans))
    (resource_spans,) = request.resource_spans
    resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "probe"
    (scope_spans,) = resource_spans.scope_spans
    assert scope_spans.scope.name == "marie"
    decoded_job, decoded = scope_spans.spans
    ids = server.get_span_context()
    assert decoded.trace_id == ids.trace_id.to_bytes(16, "big")
    assert decoded.span_id == ids.span_id.to_bytes(8, "big")
    assert decoded.parent_span_id == REMOTE.span_id.to_bytes(8, "big")
    assert decoded.trace_state == "vendor=value"
    assert (decoded.name, decoded.kind) == ("POST /v1/chat/completions", 2)
    assert 0 < decoded.start_time_unix_nano <= decoded.end_time_unix_nano
    attributes = {a.key: _value(a.value) for a in decoded.attributes}
    assert attributes == {
        "http.request.method": "POST",
        "n": 3,
        "ok": True,
        "ratio": 0.5,
        "finish": ["stop", "length"],
        "odd": attributes["odd"],
    }
    assert attributes["odd"].startswith("<")
    (event,) = decoded.events
    assert (event.name, event.time_unix_nano) == ("gateway.limits", 123)
    assert {a.key: _value(a.value) for a in event.attributes} == {"marie.duration_ms": 0.25}
    assert (decoded.status.code, decoded.status.message) == (2, "boom")
    assert decoded.flags == 0x300  # the parent is remote
    assert decoded_job.parent_span_id == b""
    (link,) = decoded_job.links
    assert link.span_id == REMOTE.span_id.to_bytes(8, "big")
    assert {a.key: _value(a.value) for a in link.attributes} == {"why": "queued"}


# --- the current span and propagation, as the API's ---------------------------


def test_the_current_span_reader_answers_as_the_api(provider: TracerProvider) -> None:
    read = current_span_reader()
    assert read() is trace.get_current_span() is trace.INVALID_SPAN
    with provider.get_tracer("t").start_as_current_span("s") as span:
        assert read() is trace.get_current_span() is span
    token = context.attach(context.set_value("other", 1))
    try:
        assert read() is trace.get_current_span() is trace.INVALID_SPAN
    finally:
        context.detach(token)


def _both(ctx: context.Context | None) -> tuple[dict[str, str], dict[str, str]]:
    ours: dict[str, str] = {}
    injector({})(ours, ctx)
    apis: dict[str, str] = {}
    propagate.inject(apis, ctx)
    return ours, apis


@pytest.mark.parametrize(
    "span_context",
    [
        REMOTE,
        UNSAMPLED_REMOTE,
        SpanContext(0x1, 0x2, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)),
    ],
)
def test_the_injector_writes_the_headers_the_api_writes(span_context: SpanContext) -> None:
    ctx = trace.set_span_in_context(NonRecordingSpan(span_context))
    ours, apis = _both(ctx)
    assert ours == apis and "traceparent" in ours
    with_baggage = baggage.set_baggage("user", "u1", ctx)
    ours, apis = _both(with_baggage)
    assert ours == apis and "baggage" in ours
    token = context.attach(ctx)
    try:
        assert _both(None) == _both(ctx)
    finally:
        context.detach(token)
    assert _both(context.Context()) == ({}, {})


def test_other_propagators_are_left_to_the_api() -> None:
    assert injector({"OTEL_PROPAGATORS": "b3"}) is propagate.inject


@pytest.mark.parametrize(
    "carrier",
    [
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"},
        {"traceparent": "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01"},
        {"traceparent": "00-00000000000000000000000000000000-b7ad6b7169203331-01"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01"},
        {"traceparent": "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        {"traceparent": "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-later"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x"},
        {"traceparent": " 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        {"traceparent": "garbage"},
        {
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "vendor=value,other=1",
        },
        {
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "baggage": "user=u1",
        },
        {},
    ],
)
def test_the_extractor_reads_the_context_the_api_reads(carrier: dict[str, str]) -> None:
    ours, apis = extractor({})(carrier), propagate.extract(carrier)
    assert trace.get_current_span(ours).get_span_context() == (
        trace.get_current_span(apis).get_span_context()
    )
    assert baggage.get_all(ours) == baggage.get_all(apis)


def test_other_propagators_extract_through_the_api() -> None:
    assert extractor({"OTEL_PROPAGATORS": "tracecontext,baggage,b3"}) is propagate.extract
