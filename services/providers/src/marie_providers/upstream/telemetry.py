"""Spans of model calls, with the OpenTelemetry GenAI semantic conventions.

One CLIENT span per call of one deployment (a retry or a fallback is a span
of its own), named "{operation} {model}", with `gen_ai.operation.name`,
`gen_ai.provider.name` (the upstream's kind), `gen_ai.request.model`,
`gen_ai.request.max_tokens`/`temperature`, and from the answer
`gen_ai.response.model`, `gen_ai.response.id`, `gen_ai.response.finish_reasons`
and `gen_ai.usage.input_tokens`/`output_tokens`. The first chunk is a span
event (`gen_ai.first_token`, with the time to it). Prompts and completions
are recorded (`gen_ai.input.messages`/`gen_ai.output.messages`) only with
MARIE_TRACE_CONTENT; a key or a header never is.

Used only when tracing is on (`marie_kit.tracing`): the router calls
`traced_stream`/`traced_embed` only then.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import orjson
from marie.providers.v1 import provider_service_pb2 as pb
from marie_kit import tracing
from marie_kit.errors import ServiceError
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from marie_providers.upstream.provider import Provider

_FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
    pb.FINISH_REASON_CONTENT_FILTER: "content_filter",
    pb.FINISH_REASON_PAUSE_TURN: "pause_turn",
}
_ROLES = {
    pb.ROLE_SYSTEM: "system",
    pb.ROLE_USER: "user",
    pb.ROLE_ASSISTANT: "assistant",
    pb.ROLE_TOOL: "tool",
}

Request = pb.StreamChatCompletionRequest | pb.StreamCompletionRequest


def _request_attributes(
    operation: str, provider: Provider, model: str, sampling: pb.SamplingParameters | None
) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": provider.kind,
        "gen_ai.request.model": model,
        "marie.provider": provider.name,
    }
    if sampling is not None:
        if sampling.HasField("max_tokens"):
            attributes["gen_ai.request.max_tokens"] = sampling.max_tokens
        if sampling.HasField("temperature"):
            attributes["gen_ai.request.temperature"] = round(sampling.temperature, 6)
        if sampling.HasField("top_p"):
            attributes["gen_ai.request.top_p"] = round(sampling.top_p, 6)
    return attributes


def _input_messages(request: Request) -> str:
    if isinstance(request, pb.StreamCompletionRequest):
        messages = [{"role": "user", "parts": [{"type": "text", "content": request.prompt}]}]
    else:
        messages = [
            {
                "role": _ROLES.get(m.role, "user"),
                "parts": [{"type": "text", "content": m.content}],
            }
            for m in request.messages
        ]
    return orjson.dumps(messages).decode()


def _start(name: str, attributes: dict[str, Any]) -> trace.Span:
    tracer = tracing.STATE.tracer
    assert tracer is not None, "tracing is off"
    return tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)


def _failed(span: trace.Span, exc: BaseException) -> None:
    reason = exc.reason if isinstance(exc, ServiceError) else type(exc).__name__
    span.set_attribute("error.type", reason)
    span.set_status(Status(StatusCode.ERROR, reason))


async def traced_stream(
    provider: Provider,
    model: str,
    request: Request,
    chunks: AsyncGenerator[pb.StreamChatCompletionResponse, None],
) -> AsyncGenerator[pb.StreamChatCompletionResponse, None]:
    """`chunks` (one deployment's stream) inside a model-call span. The span is
    current only while the upstream is being read, never across a yield, so
    the caller's spans keep their own parents."""
    operation = "text_completion" if isinstance(request, pb.StreamCompletionRequest) else "chat"
    span = _start(
        f"{operation} {model}", _request_attributes(operation, provider, model, request.sampling)
    )
    content = tracing.content_enabled()
    if content:
        span.set_attribute("gen_ai.input.messages", _input_messages(request))
    started = time.perf_counter()
    first = True
    finishes: list[str] = []
    parts: list[str] = []
    try:
        while True:
            try:
                if first:
                    # Current while the upstream call starts (its HTTP span is
                    # a child); later chunks only read the open response.
                    with trace.use_span(span, end_on_exit=False, record_exception=False):
                        chunk = await anext(chunks)
                else:
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            if first:
                first = False
                span.add_event(
                    "gen_ai.first_token",
                    {"marie.time_to_first_token_ms": (time.perf_counter() - started) * 1000},
                )
                span.set_attribute("gen_ai.response.id", chunk.id)
                span.set_attribute("gen_ai.response.model", chunk.model.partition("/")[2] or model)
            if chunk.finish_reason:
                finishes.append(_FINISH.get(chunk.finish_reason, "stop"))
            if chunk.HasField("usage"):
                span.set_attribute("gen_ai.usage.input_tokens", chunk.usage.prompt_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", chunk.usage.completion_tokens)
            if content and chunk.content:
                parts.append(chunk.content)
            yield chunk
    except GeneratorExit:
        raise  # the caller stopped reading: not the model's failure
    except BaseException as exc:
        _failed(span, exc)
        raise
    finally:
        if finishes:
            span.set_attribute("gen_ai.response.finish_reasons", finishes)
        if content:
            output = [{"role": "assistant", "parts": [{"type": "text", "content": "".join(parts)}]}]
            span.set_attribute("gen_ai.output.messages", orjson.dumps(output).decode())
        await chunks.aclose()
        span.end()


async def traced_embed(
    provider: Provider,
    model: str,
    call: Callable[[], Awaitable[pb.CreateEmbeddingsResponse]],
) -> pb.CreateEmbeddingsResponse:
    """One deployment's embeddings call inside a model-call span."""
    span = _start(f"embeddings {model}", _request_attributes("embeddings", provider, model, None))
    try:
        with trace.use_span(span, end_on_exit=False, record_exception=False):
            response = await call()
    except BaseException as exc:
        _failed(span, exc)
        span.end()
        raise
    span.set_attribute("gen_ai.response.model", response.model.partition("/")[2] or model)
    span.set_attribute("gen_ai.usage.input_tokens", response.usage.prompt_tokens)
    span.end()
    return response
