"""OpenTelemetry tracing, set up once per process by every service's entry point.

Configured by the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) turns it on, `OTEL_SDK_DISABLED=true`
keeps it off, `OTEL_SERVICE_NAME` names the service (default `marie-<name>`),
`OTEL_EXPORTER_OTLP_PROTOCOL` picks `http/protobuf` (default) or `grpc`,
`OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG` sample (default: parent-based,
always on). Marie's own: `MARIE_TRACE_CONTENT=true` records prompts and
completions on model-call spans (off: they may hold personal data),
`MARIE_TRACE_STORE_CALLS=true` adds a span per store call (debug level).

Off, nothing is installed: the SDK is not even imported, the gRPC servers and
channels get no interceptor, and `span()` hands back one shared no-op context
manager, so an untraced request pays one attribute read per span site.

W3C `traceparent`/`tracestate` travel in HTTP headers and gRPC metadata,
written and read by the SDK's default propagator. The spans of gRPC calls
are opened by the kit's own server interceptor and a channel wrapper
(`traced_channel`, below), not by opentelemetry-instrumentation-grpc: measured
with `make bench`, the latter's aio interceptors cost about 0.1 ms of CPU per
call and side even unsampled, more than the whole budget of a traced request,
and so did a client interceptor of our own. Spans are recorded by the kit's
own tracer behind the OpenTelemetry API (`marie_kit.tracer`, which says why
not the SDK's, with figures) and sent in batches by the SDK's OTLP exporters'
transport with the kit's own encoder (`marie_kit.otlp`): the SDK's builds a
protobuf object per attribute, which cost more CPU than the spans themselves.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

    from marie_kit.tracer import TracerProvider

log = logging.getLogger("marie.tracing")

#: Prefix of Marie's own span attributes.
REQUEST_ID_ATTRIBUTE = "marie.request_id"

_TRUE = frozenset({"1", "true", "yes", "on"})


class _State:
    """What `setup_tracing` installed; all empty while tracing is off."""

    enabled = False
    content = False
    store_calls = False
    #: The sampler follows a remote parent's decision (parentbased_*, the default).
    follows_parent = False
    provider: TracerProvider | None = None
    tracer: Tracer | None = None


STATE = _State()
_NOOP = contextlib.nullcontext()


class _Otel:
    """The OpenTelemetry names the span helpers use, imported once by
    `setup_tracing` (not at each call: an import statement in a function
    costs a lookup and a call every time it runs)."""

    trace: Any = None
    context: Any = None
    #: (carrier) -> the context it carries (`propagate.extract`, faster).
    extract: Any = None
    #: (carrier, context or None): writes the context's trace headers.
    inject: Any = None
    #: () -> the current span (`trace.get_current_span()`, faster).
    current_span: Any = None
    SpanKind: Any = None
    Status: Any = None
    StatusCode: Any = None


_otel = _Otel()


def _load_api(env: Mapping[str, str]) -> None:
    from opentelemetry import context, trace  # noqa: PLC0415

    from marie_kit.tracer import current_span_reader, extractor, injector  # noqa: PLC0415

    _otel.trace = trace
    _otel.context = context
    _otel.extract = extractor(env)
    _otel.inject = injector(env)
    _otel.current_span = current_span_reader()
    _otel.SpanKind = trace.SpanKind
    _otel.Status = trace.Status
    _otel.StatusCode = trace.StatusCode


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in _TRUE


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for traces: an OTLP endpoint is set and
    the SDK is not disabled."""
    env = os.environ if environ is None else environ
    if _flag(env, "OTEL_SDK_DISABLED"):
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )


def enabled() -> bool:
    return STATE.enabled


def content_enabled() -> bool:
    """Whether prompts and completions may be recorded (MARIE_TRACE_CONTENT)."""
    return STATE.content


def setup_tracing(service: str, environ: Mapping[str, str] | None = None) -> bool:
    """Install the tracer provider and exporter when the environment asks for
    traces; True when it did. Idempotent."""
    env = os.environ if environ is None else environ
    if STATE.enabled or not wanted(env):
        return STATE.enabled
    # Imported here: a process without an endpoint never loads the SDK.
    import atexit  # noqa: PLC0415

    from opentelemetry import trace  # noqa: PLC0415
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource  # noqa: PLC0415

    from marie_kit.tracer import TracerProvider  # noqa: PLC0415

    name = env.get("OTEL_SERVICE_NAME", "").strip() or f"marie-{service}"
    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES; the sampler, limits and
    # batching come from OTEL_TRACES_SAMPLER(_ARG), OTEL_*_LIMIT, OTEL_BSP_*.
    provider = TracerProvider.from_env(Resource.create({SERVICE_NAME: name}), _exporter(env), env)
    trace.set_tracer_provider(provider)
    # As the SDK's provider does: what is queued is exported at exit.
    atexit.register(provider.shutdown)
    _load_api(env)
    STATE.provider = provider
    STATE.tracer = provider.get_tracer("marie")
    STATE.content = _flag(env, "MARIE_TRACE_CONTENT")
    STATE.store_calls = _flag(env, "MARIE_TRACE_STORE_CALLS")
    STATE.follows_parent = provider.sampler.follows_parent
    STATE.enabled = True
    log.info("tracing on", extra={"otel_service_name": name})
    return True


def _exporter(env: Mapping[str, str]) -> Any:
    from marie_kit import otlp  # noqa: PLC0415 - imports the SDK's exporters

    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
        or "http/protobuf"
    ).strip()
    return otlp.grpc_exporter() if protocol == "grpc" else otlp.http_exporter()


def shutdown() -> None:
    """Export what is buffered and stop; for the end of the process."""
    if STATE.provider is not None:
        STATE.provider.shutdown()


#: gRPC codes that make a server span an error (the rest are the caller's).
_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
_HEALTH = "/grpc.health.v1.Health/"


def _rpc_attributes(method: str) -> dict[str, Any]:
    service, _, name = method.lstrip("/").rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def server_span(
    method: str, metadata: Sequence[tuple[str, Any]]
) -> contextlib.AbstractContextManager[Span | None]:
    """The SERVER span of one gRPC call, continuing the caller's trace from its
    `traceparent`/`tracestate` metadata, current while the handler runs; the
    kit's ServerInterceptor opens it around each call. No-op when off, and
    for health checks (probes every few seconds would each make a trace)."""
    if STATE.tracer is None or method.startswith(_HEALTH):
        return _NOOP

    carrier = {k: v for k, v in metadata if k in ("traceparent", "tracestate")}
    return _server_span(method, carrier, _rpc_attributes(method))


def http_server_span(
    method: str, path: str, headers: Sequence[tuple[bytes, bytes]]
) -> contextlib.AbstractContextManager[Span | None]:
    """The SERVER span of one HTTP request, continuing the caller's trace from
    its `traceparent`/`tracestate` headers, current while it is served; the
    server names it by its route once known. No-op when off."""
    if STATE.tracer is None:
        return _NOOP

    carrier = {
        k.decode("latin-1"): v.decode("latin-1")
        for k, v in headers
        if k in (b"traceparent", b"tracestate")
    }
    return _server_span(method, carrier, {"http.request.method": method, "url.path": path})


def _server_span(
    name: str, carrier: Mapping[str, str], attributes: Mapping[str, Any]
) -> contextlib.AbstractContextManager[Span | None]:
    """A SERVER span continuing the trace `carrier` names, current while the
    block runs. A caller that did not sample its trace gets no span at all
    when the sampler follows it (the default), only its context made current
    (so that calls made from here carry the decision on): no sampler, no
    ids, no span object."""
    assert STATE.tracer is not None
    context = _otel.extract(carrier) if carrier else None
    if context is not None and STATE.follows_parent:
        parent = _otel.trace.get_current_span(context).get_span_context()
        if parent.is_valid and not parent.trace_flags.sampled:
            return _attached(context)
    return STATE.tracer.start_as_current_span(
        name,
        context=context,
        kind=_otel.SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    )


@contextlib.contextmanager
def _attached(context: Context) -> Iterator[None]:
    token = _otel.context.attach(context)
    try:
        yield None
    finally:
        _otel.context.detach(token)


def http_answered_server(current: Span, status: int) -> None:
    """Record an HTTP answer's status on a server span (an error from 500 on)."""

    current.set_attribute("http.response.status_code", status)
    if status >= 500:
        current.set_attribute("error.type", str(status))
        current.set_status(_otel.Status(_otel.StatusCode.ERROR))


def rpc_ended(current: Span | None, code: str, value: int) -> None:
    """Record a call's status code on its span (an error on a server fault)."""
    if current is None:
        return

    current.set_attribute("rpc.grpc.status_code", value)
    if code in _SERVER_ERRORS:
        current.set_status(_otel.Status(_otel.StatusCode.ERROR, code))


def span(
    name: str, attributes: Mapping[str, Any] | None = None, *, kind: str = "internal"
) -> contextlib.AbstractContextManager[Span | None]:
    """A child span of the current one, current while the block runs; a
    shared no-op (yielding None) when tracing is off or the current trace is
    not sampled (its children would not be either)."""
    if STATE.tracer is None or not recording():
        return _NOOP
    return _span(name, attributes, kind)


def recording() -> bool:
    """Whether a span started now would be recorded: tracing is on, and the
    current trace (if any) is sampled. A new root is left to the sampler."""
    if STATE.tracer is None:
        return False

    current = _otel.current_span()
    return current.is_recording() or not current.get_span_context().is_valid


def store_span(
    name: str, attributes: Mapping[str, Any] | None = None
) -> contextlib.AbstractContextManager[Span | None]:
    """A span for one store call, only when MARIE_TRACE_STORE_CALLS is on."""
    if not STATE.store_calls or not recording():
        return _NOOP
    return _span(name, attributes, "client")


class Step:
    """A step of a request that is a span only if it calls out (`step`)."""

    __slots__ = ("attributes", "ended", "name", "opened", "parent", "started")

    def __init__(self, name: str, attributes: Mapping[str, Any] | None) -> None:
        self.name = name
        self.attributes = dict(attributes or ())
        self.parent = _otel.context.get_current()
        self.started = time.time_ns()
        self.opened: Span | None = None
        self.ended = False

    def set_attribute(self, key: str, value: Any) -> None:
        """Set on the span, or on the event that stands for it."""
        self.attributes[key] = value

    def context(self) -> Context:
        """The context of the step's span, opened now (back-dated to the
        step's start) if it was not yet: an outgoing call is its child."""
        if self.opened is None:
            assert STATE.tracer is not None
            self.opened = STATE.tracer.start_span(
                self.name, context=self.parent, start_time=self.started
            )
        found: Context = _otel.trace.set_span_in_context(self.opened)
        return found

    def end(self, error: BaseException | None) -> None:
        self.ended = True
        if error is not None:
            self.attributes["error.type"] = type(error).__name__
        if self.opened is not None:
            self.opened.set_attributes(self.attributes)
            if error is not None:
                self.opened.set_status(_otel.Status(_otel.StatusCode.ERROR, type(error).__name__))
            self.opened.end()
            return
        self.attributes["marie.duration_ms"] = (time.time_ns() - self.started) / 1e6
        _otel.trace.get_current_span(self.parent).add_event(
            self.name, self.attributes, timestamp=self.started
        )


#: The step being run in this context, whose span outgoing calls open.
_STEP: contextvars.ContextVar[Step | None] = contextvars.ContextVar("marie_step", default=None)


def step(
    name: str, attributes: Mapping[str, Any] | None = None
) -> contextlib.AbstractContextManager[Step | None]:
    """A step of the current span that becomes a span of its own only when it
    calls out (a gRPC call on a traced channel, or an upstream HTTP call,
    which are then its children); otherwise it is an event on the current
    span, at the step's start, with its duration (`marie.duration_ms`) and,
    if it failed, `error.type`. A span costs tens of µs of CPU to record and
    export; a key check answered from the cache or limits counted in-process
    take less than that. The shared no-op (yielding None) when not recording."""
    if STATE.tracer is None or not recording():
        return _NOOP
    return _step(name, attributes)


@contextlib.contextmanager
def _step(name: str, attributes: Mapping[str, Any] | None) -> Iterator[Step]:
    current = Step(name, attributes)
    token = _STEP.set(current)
    try:
        yield current
    except BaseException as exc:
        current.end(exc)
        raise
    else:
        current.end(None)
    finally:
        _STEP.reset(token)


def _call_context() -> Context | None:
    """The parent of an outgoing call's span: the running step's span if a
    step is running (opened now if needed), else the current span."""
    running = _STEP.get()
    # A task started inside the step may call out after it has ended.
    return None if running is None or running.ended else running.context()


@contextlib.contextmanager
def _span(name: str, attributes: Mapping[str, Any] | None, kind: str) -> Iterator[Span]:

    assert STATE.tracer is not None
    with STATE.tracer.start_as_current_span(
        name, kind=_otel.SpanKind[kind.upper()], attributes=attributes
    ) as current:
        yield current


def start_client_span(name: str, attributes: Mapping[str, Any]) -> tuple[Span, dict[str, str]]:
    """A CLIENT span for an outgoing call, child of the current span but not
    made current (the caller ends it), and the headers that carry its context
    to the peer (`traceparent`, `tracestate`). Tracing must be on."""

    assert STATE.tracer is not None, "tracing is off"
    started = STATE.tracer.start_span(
        name, context=_call_context(), kind=_otel.SpanKind.CLIENT, attributes=attributes
    )
    headers: dict[str, str] = {}
    _otel.inject(headers, _otel.trace.set_span_in_context(started))
    return started, headers


def start_http_call(attributes: Mapping[str, Any]) -> tuple[Span, dict[str, str], bool]:
    """The span of an outgoing HTTP request, the headers carrying its context,
    and whether the caller ends it. A request made while a CLIENT span is
    current (a model call's) is that call's transport: its HTTP attributes go
    on that span, which the upstream sees as its parent (one span, not two,
    per model call); otherwise a new CLIENT span named by the method."""
    current = _otel.current_span()
    if getattr(current, "kind", None) is _otel.SpanKind.CLIENT and current.is_recording():
        current.set_attributes(attributes)
        headers: dict[str, str] = {}
        _otel.inject(headers, None)
        return current, headers, False
    span, headers = start_client_span(attributes["http.request.method"], attributes)
    return span, headers, True


def http_answered(current: Span, status: int) -> None:
    """Record an HTTP answer's status on a client span (an error from 400 on)."""

    current.set_attribute("http.response.status_code", status)
    if status >= 400:
        current.set_attribute("error.type", str(status))
        current.set_status(_otel.Status(_otel.StatusCode.ERROR))


def record_failure(current: Span, exc: BaseException) -> None:
    """Mark a span failed by `exc` (its type only: messages may quote input)."""

    if isinstance(exc, GeneratorExit):
        return
    current.set_attribute("error.type", type(exc).__name__)
    current.set_status(_otel.Status(_otel.StatusCode.ERROR, type(exc).__name__))


def current_span() -> Span | None:
    """The span being recorded now, or None (tracing off, or no span)."""
    if not STATE.enabled:
        return None

    current = _otel.current_span()
    return current if current.is_recording() else None


def current_ids() -> tuple[str, str] | None:
    """The current trace id and span id as hex, for log lines; None outside a span."""
    if not STATE.enabled:
        return None

    ctx = _otel.current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def inject(carrier: MutableMapping[str, str]) -> None:
    """Write the current trace context (`traceparent`, `tracestate`) into `carrier`."""
    if not STATE.enabled:
        return

    _otel.inject(carrier, None)


def extract(carrier: Mapping[str, str]) -> Context | None:
    """The trace context a carrier (headers, a job's payload) holds, or None."""
    if not STATE.enabled or not carrier:
        return None

    found: Context = _otel.extract(carrier)
    return found


@contextlib.contextmanager
def linked_root_span(
    name: str, carrier: Mapping[str, str], attributes: Mapping[str, Any] | None = None
) -> Iterator[Span | None]:
    """A new trace for background work, linked to the span whose context
    `carrier` holds (the request that queued the work); no-op when off."""
    if STATE.tracer is None:
        yield None
        return

    links = []
    if carrier:
        parent = _otel.trace.get_current_span(extract(carrier))
        if parent.get_span_context().is_valid:
            links.append(_otel.trace.Link(parent.get_span_context()))
    # A root of its own: the job may run long after the request has ended.
    with STATE.tracer.start_as_current_span(
        name, context=_otel.context.Context(), links=links, attributes=attributes
    ) as current:
        yield current


# --- the gRPC client side -------------------------------------------------


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


def _ended(span: Span) -> Callable[[Any], None]:
    def done(call: Any) -> None:
        code = _code_now(call)
        if code is not None:
            rpc_ended(span, code.name, code.value[0])
        span.end()

    return done


Metadata = grpc.aio.Metadata | Sequence[tuple[str, str | bytes]] | None


def _start_call(method: str, metadata: Metadata) -> tuple[Span | None, Metadata]:
    """A call's CLIENT span (none for health checks or in an unsampled
    trace) and its metadata with the trace context added."""

    tracer = STATE.tracer
    if tracer is None or method.startswith(_HEALTH):
        return None, metadata
    carrier: dict[str, str] = {}
    span = None
    if recording():
        kind = _otel.SpanKind.CLIENT
        span = tracer.start_span(
            method, context=_call_context(), kind=kind, attributes=_rpc_attributes(method)
        )
        _otel.inject(carrier, _otel.trace.set_span_in_context(span))
    else:
        # An unsampled trace: no span, but the callee learns the decision.
        _otel.inject(carrier, None)
        if not carrier:
            return None, metadata
    return span, (*(metadata or ()), *carrier.items())


class _TracedCall:
    """A unary-request multi-callable (unary or server-streaming response)
    whose calls each get a CLIENT span and carry the trace context."""

    __slots__ = ("_call", "_method")

    def __init__(self, call: Any, method: str) -> None:
        self._call = call
        self._method = method

    def __call__(self, request: Any, *, metadata: Metadata = None, **options: Any) -> Any:
        span, metadata = _start_call(self._method, metadata)
        call = self._call(request, metadata=metadata, **options)
        if span is not None:
            call.add_done_callback(_ended(span))
        return call


class TracedChannel(grpc.aio.Channel):
    """A channel whose unary-request calls each get a CLIENT span (when the
    current trace is sampled) and carry the trace context in their metadata.

    A thin wrapper of the multi-callables rather than gRPC's client
    interceptors: an intercepted aio call runs through an extra task and
    wrapper call object, which cost about 0.1 ms of CPU per call here even
    unsampled (measured with bench/tracing.py); this adds one Python call.
    Streaming-request methods (none in Marie's contracts) pass untraced."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        # The same, untyped: the stubs' signatures lack `_registered_method`,
        # which the generated stubs pass.
        self._inner: Any = channel

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _TracedCall(self._inner.unary_unary(method, *args, **kwargs), method)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _TracedCall(self._inner.unary_stream(method, *args, **kwargs), method)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._inner.stream_unary(method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._inner.stream_stream(method, *args, **kwargs)

    async def __aenter__(self) -> TracedChannel:
        await self._channel.__aenter__()
        return self

    async def __aexit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        await self._channel.__aexit__(exc_type, exc_val, exc_tb)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()


def traced_channel(channel: grpc.aio.Channel) -> grpc.aio.Channel:
    """`channel` wrapped so its calls are traced; itself when tracing is off."""
    return TracedChannel(channel) if STATE.enabled else channel
