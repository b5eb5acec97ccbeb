"""The kit's own tracer behind the OpenTelemetry API: a TracerProvider, Tracer
and Span of a few slots each, a parent-based ratio sampler, span limits, and
one exporter thread fed by a bounded queue.

Why not the SDK's: measured, it does not fit a budget of 0.3 ms of CPU per
request. Its span validates and copies every attribute into a locked
BoundedAttributes, copies itself into a ReadableSpan when it ends, and goes
through a chain of processors; `bench/tracing_ops.py` (both tracers in one
process, interleaved, load 10-20) puts one chat's tracing calls at 102-107 µs
of CPU in the gateway and 119-124 µs in providers with the SDK's tracer,
33-38 and 38-40 µs with this one (a gRPC call's CLIENT span 27-29 against
8-9 µs), and in the suite (`bench/tracing.py`, README "Traces") a sampled
chat cost +0.75 to +1.02 ms with the SDK's against +0.26 to +0.44 ms. Here a
span stores its attributes as given in a dict (the OTLP encoder,
`marie_kit.otlp`, is their only reader, and sends any other type as its
text) and is queued itself when it ends.

Everything API-level keeps working: the spans are `opentelemetry.trace.Span`s
kept in the API's context (`get_current_span`, `use_span`, propagation), the
provider is installed with `trace.set_tracer_provider`. The SDK is still used
where it fits, off the request path: `Resource.create` (OTEL_RESOURCE_ATTRIBUTES,
OTEL_SERVICE_NAME) once at start, and its OTLP exporters' transport
(endpoints, headers, compression, TLS, retries) for each batch.

Configured by the SDK's variables: OTEL_TRACES_SAMPLER(_ARG), the span limits
(OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT, OTEL_SPAN_EVENT_COUNT_LIMIT,
OTEL_SPAN_LINK_COUNT_LIMIT, OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT,
OTEL_LINK_ATTRIBUTE_COUNT_LIMIT, OTEL_ATTRIBUTE_COUNT_LIMIT,
OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT) and the batch processor's
(OTEL_BSP_SCHEDULE_DELAY, OTEL_BSP_MAX_QUEUE_SIZE,
OTEL_BSP_MAX_EXPORT_BATCH_SIZE, OTEL_BSP_EXPORT_TIMEOUT).
"""

from __future__ import annotations

import collections
import logging
import random
import re
import threading
import time
import traceback
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

log = logging.getLogger("marie.tracing")

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_UNSET = Status(StatusCode.UNSET)
_ID_BITS = 64
_RATIO_MASK = (1 << _ID_BITS) - 1

# --- sampling -------------------------------------------------------------

_DEFAULT_SAMPLER = "parentbased_always_on"
_SAMPLERS = frozenset(
    {
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    }
)


@dataclass(frozen=True, slots=True)
class Sampler:
    """Whether a new span is recorded: a parent-based sampler follows its
    parent's decision (remote or local); a root, or any span when it is not
    parent-based, is sampled when its trace id's low 64 bits fall below
    `bound` (the SDK's TraceIdRatioBased rule, so that every service of a
    trace decides alike): 0 samples nothing, 2**64 everything."""

    follows_parent: bool
    bound: int

    def sampled(self, parent: SpanContext | None, trace_id: int) -> bool:
        if self.follows_parent and parent is not None:
            return bool(parent.trace_flags & TraceFlags.SAMPLED)
        return (trace_id & _RATIO_MASK) < self.bound

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Sampler:
        """OTEL_TRACES_SAMPLER(_ARG), as the SDK reads them: an unknown
        sampler is the default (parent-based, always on), a ratio that is not
        a number in [0, 1] is 1."""
        name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or _DEFAULT_SAMPLER
        if name not in _SAMPLERS:
            log.warning("unknown OTEL_TRACES_SAMPLER %r: using %s", name, _DEFAULT_SAMPLER)
            name = _DEFAULT_SAMPLER
        root = name.removeprefix("parentbased_")
        if root == "always_on":
            ratio = 1.0
        elif root == "always_off":
            ratio = 0.0
        else:
            ratio = _ratio(env.get("OTEL_TRACES_SAMPLER_ARG", ""))
        return cls(follows_parent=name.startswith("parentbased_"), bound=round(ratio * (1 << 64)))


def _ratio(text: str) -> float:
    try:
        ratio = float(text)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        log.warning("OTEL_TRACES_SAMPLER_ARG %r is not a ratio in [0, 1]: using 1", text)
        return 1.0
    return ratio


# --- limits ---------------------------------------------------------------

_DEFAULT_LIMIT = 128


def _limit(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        log.warning("%s=%r is not an integer: ignored", name, text)
        return default
    return value if value >= 0 else default


@dataclass(frozen=True, slots=True)
class Limits:
    """How much one span keeps; what is over a limit is dropped and counted
    (the counts travel in the OTLP message)."""

    attributes: int = _DEFAULT_LIMIT
    events: int = _DEFAULT_LIMIT
    links: int = _DEFAULT_LIMIT
    event_attributes: int = _DEFAULT_LIMIT
    link_attributes: int = _DEFAULT_LIMIT
    #: Longest string value kept (longer ones are cut); None: no limit.
    value_length: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Limits:
        general = _limit(env, "OTEL_ATTRIBUTE_COUNT_LIMIT", _DEFAULT_LIMIT) or 0

        def count(name: str) -> int:
            found = _limit(env, name, general)
            return general if found is None else found

        def plain(name: str) -> int:
            found = _limit(env, name, _DEFAULT_LIMIT)
            return _DEFAULT_LIMIT if found is None else found

        return cls(
            attributes=count("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT"),
            events=plain("OTEL_SPAN_EVENT_COUNT_LIMIT"),
            links=plain("OTEL_SPAN_LINK_COUNT_LIMIT"),
            event_attributes=count("OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT"),
            link_attributes=count("OTEL_LINK_ATTRIBUTE_COUNT_LIMIT"),
            value_length=_limit(env, "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", None),
        )


def _cut(value: Any, length: int) -> Any:
    """`value` with its strings cut to `length` characters."""
    if isinstance(value, str):
        return value[:length]
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        return [_cut(v, length) for v in value]
    return value


def _bounded(
    attributes: Mapping[str, Any] | None, limit: int, length: int | None
) -> tuple[dict[str, Any], int]:
    """A copy of `attributes` within the limits, and how many were dropped."""
    if not attributes:
        return {}, 0
    kept = dict(attributes)
    dropped = 0
    if len(kept) > limit:
        dropped = len(kept) - limit
        kept = dict(list(kept.items())[:limit])
    if length is not None:
        kept = {k: _cut(v, length) for k, v in kept.items()}
    return kept, dropped


# --- spans ----------------------------------------------------------------


class Event:
    """A span event, as the OTLP encoder reads it."""

    __slots__ = ("attributes", "dropped_attributes", "name", "timestamp")

    def __init__(
        self, name: str, attributes: dict[str, Any], timestamp: int, dropped_attributes: int
    ) -> None:
        self.name = name
        self.attributes = attributes
        self.timestamp = timestamp
        self.dropped_attributes = dropped_attributes


class Link:
    """A span link, as the OTLP encoder reads it."""

    __slots__ = ("attributes", "context", "dropped_attributes")

    def __init__(
        self, context: SpanContext, attributes: dict[str, Any], dropped_attributes: int
    ) -> None:
        self.context = context
        self.attributes = attributes
        self.dropped_attributes = dropped_attributes


class Span(trace.Span):
    """A recorded span: what OTLP carries, nothing more. Not thread-safe for
    concurrent writers (a span is written by the task that runs it)."""

    __slots__ = (
        "_context",
        "_tracer",
        "attributes",
        "dropped_attributes",
        "dropped_events",
        "dropped_links",
        "end_time",
        "events",
        "kind",
        "links",
        "name",
        "parent",
        "start_time",
        "status",
    )

    def __init__(  # noqa: PLR0917 - made in one place, Tracer.start_span
        self,
        tracer: Tracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Mapping[str, Any] | None,
        links: Sequence[trace.Link] | None,
        start_time: int | None,
    ) -> None:
        self._tracer = tracer
        self._context = context
        self.name = name
        self.parent = parent
        self.kind = kind
        self.status = _UNSET
        self.end_time: int | None = None
        self.events: list[Event] = []
        self.dropped_events = 0
        limits = tracer.limits
        if attributes:
            self.attributes, self.dropped_attributes = _bounded(
                attributes, limits.attributes, limits.value_length
            )
        else:
            self.attributes, self.dropped_attributes = {}, 0
        self.links: list[Link] = []
        self.dropped_links = 0
        for link in links or ():
            self.add_link(link.context, link.attributes)
        self.start_time = time.time_ns() if start_time is None else start_time

    # What the OTLP encoder reads besides the slots.
    @property
    def resource(self) -> Any:
        return self._tracer.resource

    @property
    def instrumentation_scope(self) -> Any:
        return self._tracer.scope

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self.end_time is None

    def set_attribute(self, key: str, value: Any) -> None:
        attributes = self.attributes
        limits = self._tracer.limits
        if key not in attributes and len(attributes) >= limits.attributes:
            self.dropped_attributes += 1
            return
        attributes[key] = value if limits.value_length is None else _cut(value, limits.value_length)

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self,
        name: str,
        attributes: Mapping[str, Any] | None = None,
        timestamp: int | None = None,
    ) -> None:
        limits = self._tracer.limits
        if len(self.events) >= limits.events:
            self.dropped_events += 1
            return
        kept, dropped = _bounded(attributes, limits.event_attributes, limits.value_length)
        self.events.append(
            Event(name, kept, time.time_ns() if timestamp is None else timestamp, dropped)
        )

    def add_link(self, context: SpanContext, attributes: Mapping[str, Any] | None = None) -> None:
        limits = self._tracer.limits
        if not context.is_valid:
            return
        if len(self.links) >= limits.links:
            self.dropped_links += 1
            return
        kept, dropped = _bounded(attributes, limits.link_attributes, limits.value_length)
        self.links.append(Link(context, kept, dropped))

    def update_name(self, name: str) -> None:
        self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """As the SDK: OK is final, UNSET changes nothing, a description is
        kept for an error only."""
        if self.status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self.status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: Mapping[str, Any] | None = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """An `exception` event as the conventions name it (the SDK's)."""
        recorded: dict[str, Any] = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        recorded.update(attributes or {})
        self.add_event("exception", recorded, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_time is not None:
            return  # ended twice: the SDK warns; nothing to export again
        self.end_time = time.time_ns() if end_time is None else end_time
        self._tracer.queue.put(self)

    def __repr__(self) -> str:
        return f"Span({self.name!r}, {self._context!r})"


class _CurrentSpan:
    """`start_as_current_span`'s context manager, without a generator: the
    span current while the block runs, ended after it (API semantics for an
    exception: recorded as an event and an ERROR status, if asked)."""

    __slots__ = ("_end", "_record", "_set_status", "_span", "_token")

    def __init__(self, span: trace.Span, record: bool, set_status: bool, end: bool) -> None:
        self._span = span
        self._record = record
        self._set_status = set_status
        self._end = end

    def __enter__(self) -> trace.Span:
        self._token = context_api.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        context_api.detach(self._token)
        span = self._span
        if isinstance(exc, Exception) and span.is_recording():
            if self._record:
                span.record_exception(exc)
            if self._set_status:
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        if self._end:
            span.end()


class Tracer(trace.Tracer):
    """Starts spans: their ids, the sampler's decision, parent and trace state."""

    def __init__(
        self,
        sampler: Sampler,
        limits: Limits,
        queue: SpanQueue,
        resource: Any,
        scope: Any,
    ) -> None:
        self.sampler = sampler
        self.limits = limits
        self.queue = queue
        self.resource = resource
        self.scope = scope
        self._current = current_span_reader()

    def start_span(  # noqa: PLR0917 - the API's signature
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[trace.Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        found = (
            self._current() if context is None else trace.get_current_span(context)
        ).get_span_context()
        parent: SpanContext | None = found if found.is_valid else None
        if parent is not None:
            trace_id = parent.trace_id
            trace_state = parent.trace_state
            sampled = self.sampler.sampled(parent, trace_id)
        else:
            trace_id = _new_id(128)
            trace_state = DEFAULT_TRACE_STATE
            sampled = self.sampler.sampled(None, trace_id)
        span_context = SpanContext(
            trace_id,
            _new_id(_ID_BITS),
            is_remote=False,
            trace_flags=_SAMPLED if sampled else _NOT_SAMPLED,
            trace_state=trace_state,
        )
        if not sampled:
            return NonRecordingSpan(span_context)
        return Span(self, name, span_context, parent, kind, attributes, links, start_time)

    def start_as_current_span(  # type: ignore[override]  # noqa: PLR0917 - the API's
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[trace.Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> _CurrentSpan:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        return _CurrentSpan(span, record_exception, set_status_on_exception, end_on_exit)


def _new_id(bits: int) -> int:
    """A random trace or span id, never the invalid 0."""
    while True:
        found = random.getrandbits(bits)
        if found:
            return found


# --- the current span and its propagation ---------------------------------

CurrentSpan = Callable[[], trace.Span]
Inject = Callable[[MutableMapping[str, str], "context_api.Context | None"], None]


def current_span_reader() -> CurrentSpan:
    """A reader of the current span equal to `trace.get_current_span()` but
    one dict lookup where the API makes four calls (a request asks it about
    ten times): it reads the API's own context variable, when the runtime
    context is the default (contextvars) one; else it is the API's."""
    from opentelemetry.context import _RUNTIME_CONTEXT  # noqa: PLC0415
    from opentelemetry.context.contextvars_context import (  # noqa: PLC0415
        ContextVarsRuntimeContext,
    )
    from opentelemetry.trace.propagation import _SPAN_KEY  # noqa: PLC0415

    if not isinstance(_RUNTIME_CONTEXT, ContextVarsRuntimeContext):
        return trace.get_current_span
    current = _RUNTIME_CONTEXT._current_context
    invalid = trace.INVALID_SPAN

    def read() -> trace.Span:
        found = current.get().get(_SPAN_KEY, invalid)
        return found if isinstance(found, trace.Span) else invalid

    return read


def injector(environ: Mapping[str, str]) -> Inject:
    """`propagate.inject` (the headers carrying a context's trace), or, when
    the propagators are the default ones (W3C trace context and baggage, no
    OTEL_PROPAGATORS of another choice), a direct writer of the same
    `traceparent`/`tracestate` headers; a context with baggage still goes
    through the API's propagators."""
    from opentelemetry import propagate  # noqa: PLC0415
    from opentelemetry.baggage import _BAGGAGE_KEY  # noqa: PLC0415
    from opentelemetry.trace.propagation import _SPAN_KEY  # noqa: PLC0415

    if not _default_propagators(environ):
        return propagate.inject

    def inject(carrier: MutableMapping[str, str], context: context_api.Context | None) -> None:
        found = context if context is not None else context_api.get_current()
        if found.get(_BAGGAGE_KEY):
            propagate.inject(carrier, context)
            return
        span = found.get(_SPAN_KEY)
        if not isinstance(span, trace.Span):
            return
        ids = span.get_span_context()
        if not ids.is_valid:
            return
        carrier["traceparent"] = f"00-{ids.trace_id:032x}-{ids.span_id:016x}-{ids.trace_flags:02x}"
        if ids.trace_state:
            carrier["tracestate"] = ids.trace_state.to_header()

    return inject


#: A version-00 `traceparent` in its one plain form (anything else, and any
#: `tracestate`, is left to the API's propagator).
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
Extract = Callable[[Mapping[str, str]], "context_api.Context"]


def extractor(environ: Mapping[str, str]) -> Extract:
    """`propagate.extract`, or, when the propagators are the default ones, a
    direct reader of a carrier holding only a plain `traceparent` (one regular
    expression where the API runs two propagators, a getter and a search);
    the same context either way."""
    from opentelemetry import propagate  # noqa: PLC0415

    if not _default_propagators(environ):
        return propagate.extract

    def extract(carrier: Mapping[str, str]) -> context_api.Context:
        header = carrier.get("traceparent")
        if header is None or len(carrier) != 1:  # tracestate, baggage, …
            return propagate.extract(carrier)
        found = _TRACEPARENT.fullmatch(header)
        if found is None:
            return propagate.extract(carrier)
        trace_id, span_id = int(found[1], 16), int(found[2], 16)
        if not trace_id or not span_id:
            return context_api.Context()
        remote = SpanContext(
            trace_id,
            span_id,
            is_remote=True,
            trace_flags=TraceFlags(int(found[3], 16)),
            trace_state=DEFAULT_TRACE_STATE,
        )
        return trace.set_span_in_context(NonRecordingSpan(remote), context_api.Context())

    return extract


def _default_propagators(environ: Mapping[str, str]) -> bool:
    """Whether OTEL_PROPAGATORS leaves the default: W3C trace context and baggage."""
    chosen = environ.get("OTEL_PROPAGATORS", "").replace(" ", "").lower()
    return chosen in {"", "tracecontext,baggage"}


# --- export ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """The SDK batch processor's settings, from the same variables."""

    schedule_delay: float = 5.0
    max_queue: int = 2048
    max_batch: int = 512
    export_timeout: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BatchSettings:
        default = cls()

        def number(name: str, fallback: int) -> int:
            found = _limit(env, name, fallback)
            return found or fallback

        max_queue = number("OTEL_BSP_MAX_QUEUE_SIZE", default.max_queue)
        return cls(
            schedule_delay=number("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000,
            max_queue=max_queue,
            max_batch=min(number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", default.max_batch), max_queue),
            export_timeout=number("OTEL_BSP_EXPORT_TIMEOUT", 30000) / 1000,
        )


class SpanQueue:
    """Ended spans on their way to the exporter: a bounded deque (appends and
    pops are atomic in CPython, no lock on the request's side) drained in
    batches by one thread, woken when a batch is full, every
    `schedule_delay` otherwise, and on flush. A span that finds the queue
    full is dropped and counted (`dropped`), never waited for."""

    def __init__(self, export: Callable[[list[Any]], object], settings: BatchSettings) -> None:
        self._export = export
        self.settings = settings
        self._spans: collections.deque[Any] = collections.deque()
        self._wake = threading.Event()
        self._flushed = threading.Condition()
        self._flush_asked = 0
        self._flush_done = 0
        self._stopping = False
        self.dropped = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="marie-span-export", daemon=True)
        self._thread.start()

    def put(self, span: Any) -> None:
        spans = self._spans
        if len(spans) >= self.settings.max_queue:
            self.dropped += 1
            return
        spans.append(span)
        if len(spans) == self.settings.max_batch:
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.settings.schedule_delay)
            self._wake.clear()
            with self._flushed:
                asked = self._flush_asked
            stopping = self._stopping
            self._drain()
            with self._flushed:
                self._flush_done = asked
                self._flushed.notify_all()
            if stopping:
                return

    def _drain(self) -> None:
        """Export everything queued, in batches of at most `max_batch`."""
        spans = self._spans
        size = self.settings.max_batch
        while spans:
            batch = [spans.popleft() for _ in range(min(size, len(spans)))]
            try:
                self._export(batch)
            except Exception:  # a broken exporter must not stop the thread
                log.exception("exporting %d spans failed", len(batch))

    def flush(self, timeout: float | None = None) -> bool:
        """Export everything queued now; False if it did not end in `timeout`."""
        if self._thread is None or not self._thread.is_alive():
            self._drain()
            return True
        with self._flushed:
            self._flush_asked += 1
            asked = self._flush_asked
            self._wake.set()
            return self._flushed.wait_for(
                lambda: self._flush_done >= asked or self._thread is None, timeout
            )

    def shutdown(self) -> None:
        """Export what is queued and stop the thread."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.settings.export_timeout)
            self._thread = None


class TracerProvider(trace.TracerProvider):
    """One per process: its tracers share the sampler, limits, resource and
    export queue."""

    def __init__(
        self,
        resource: Any,
        exporter: Any,
        sampler: Sampler,
        limits: Limits,
        settings: BatchSettings,
    ) -> None:
        self.resource = resource
        self.sampler = sampler
        self.limits = limits
        self._exporter = exporter
        self.queue = SpanQueue(exporter.export, settings)
        self.queue.start()
        self._tracers: dict[tuple[str, str | None, str | None], Tracer] = {}
        self._lock = threading.Lock()
        self._shut = False

    @classmethod
    def from_env(cls, resource: Any, exporter: Any, env: Mapping[str, str]) -> TracerProvider:
        return cls(
            resource,
            exporter,
            Sampler.from_env(env),
            Limits.from_env(env),
            BatchSettings.from_env(env),
        )

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> Tracer:
        key = (instrumenting_module_name, instrumenting_library_version, schema_url)
        with self._lock:
            found = self._tracers.get(key)
            if found is None:
                from opentelemetry.sdk.util.instrumentation import (  # noqa: PLC0415
                    InstrumentationScope,
                )

                scope = InstrumentationScope(
                    instrumenting_module_name,
                    instrumenting_library_version,
                    schema_url,
                    dict(attributes) if attributes else None,
                )
                found = self._tracers[key] = Tracer(
                    self.sampler, self.limits, self.queue, self.resource, scope
                )
        return found

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.queue.flush(timeout_millis / 1000)

    def shutdown(self) -> None:
        """Export what is queued, then close the exporter; once."""
        if self._shut:
            return
        self._shut = True
        self.queue.shutdown()
        if self.queue.dropped:
            log.warning("%d spans dropped: the export queue was full", self.queue.dropped)
        self._exporter.shutdown()


__all__ = [
    "BatchSettings",
    "Limits",
    "Sampler",
    "Span",
    "SpanQueue",
    "Tracer",
    "TracerProvider",
]
