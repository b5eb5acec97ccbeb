"""The OpenAI-compatible surface: `/v1/chat/completions`, `/v1/models`,
`/v1/embeddings`. Routes stay thin: authorize, parse, call, translate."""

from __future__ import annotations

import array
import base64
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import grpc
from marie.providers.v1 import provider_service_pb2 as pb
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from marie_gateway.access import SCOPE_CHAT, SCOPE_EMBEDDINGS, SCOPE_MODELS
from marie_gateway.chat_call import C, GenerationCall, open_chat
from marie_gateway.core import Gateway
from marie_gateway.errors import ApiError, from_rpc_error
from marie_gateway.mapping import (
    FINISH_REASONS,
    CompletionAggregate,
    chat_request_to_proto,
    chunk_delta,
    chunk_payload,
    usage_payload,
)
from marie_gateway.memory_api import enrich_chat
from marie_gateway.protocol import ChatCompletionRequest, EmbeddingsRequest
from marie_gateway.sse import DONE, EventStreamResponse, event
from marie_gateway.web import JSONResponse, current_request_id, parse_body


class OpenAIRoutes:
    """Handlers of the `/v1` routes over the providers service."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            # The original design's developer API path: the same handler.
            Route("/api/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.get_model, methods=["GET"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
        ]

    async def chat_completions(self, request: Request) -> Response | EventStreamResponse:
        gw = self.gw
        principal = await gw.authorize(request, SCOPE_CHAT)
        tally = await gw.admit(request, principal, "chat")
        body = parse_body(ChatCompletionRequest, await gw.read_body(request))
        tally.requested = body.model
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        chat = chat_request_to_proto(
            body, completion_id, model=body.model, aggregate=not body.stream
        )
        if body.logprobs:
            chat.logprobs = True
            chat.top_logprobs = body.top_logprobs or 0
        await enrich_chat(gw, principal, body.user, chat)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        call = open_chat(gw, request, principal, chat, tally)
        return await relay(call, ChatDialect(), stream=body.stream, include_usage=include_usage)

    async def list_models(self, request: Request) -> Response:
        gw = self.gw
        principal = await gw.enter(request, SCOPE_MODELS)
        try:
            reply = await gw.backends().providers.ListModels(
                pb.ListModelsRequest(),
                timeout=gw.settings.control_timeout_seconds,
                metadata=principal.call_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, current_request_id()) from None
        return JSONResponse({"object": "list", "data": [_model_object(m) for m in reply.models]})

    async def get_model(self, request: Request) -> Response:
        gw = self.gw
        principal = await gw.enter(request, SCOPE_MODELS)
        model_id = request.path_params["model_id"]
        try:
            reply = await gw.backends().providers.GetModel(
                pb.GetModelRequest(model=model_id),
                timeout=gw.settings.control_timeout_seconds,
                metadata=principal.call_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, current_request_id()) from None
        return JSONResponse(_model_object(reply.model))

    async def embeddings(self, request: Request) -> Response:
        gw = self.gw
        principal = await gw.authorize(request, SCOPE_EMBEDDINGS)
        tally = await gw.admit(request, principal, "embeddings")
        body = parse_body(EmbeddingsRequest, await gw.read_body(request))
        tally.requested = body.model
        embed = pb.CreateEmbeddingsRequest(
            model=body.model, dimensions=body.dimensions or 0, user=body.user or ""
        )
        given = [body.input] if isinstance(body.input, str) else body.input
        if given and isinstance(given[0], int):
            embed.token_inputs.add(ids=given)  # one input as token ids
        elif given and isinstance(given[0], list):
            for ids in given:
                embed.token_inputs.add(ids=ids)
        else:
            embed.inputs.extend(given)  # type: ignore[arg-type]  # texts, by elimination
        try:
            reply = await gw.backends().providers.CreateEmbeddings(
                embed,
                timeout=gw.settings.request_timeout_seconds,
                metadata=principal.call_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc, current_request_id())
            if error.param == "token_inputs":
                # The client sent `input`; the contract's name for token ids means nothing to it.
                error.param = "input"
            raise error from None
        tally.add(reply.model, reply.usage.prompt_tokens, 0)
        as_base64 = body.encoding_format == "base64"
        data = [
            {
                "object": "embedding",
                "index": e.index,
                "embedding": (
                    base64.b64encode(array.array("f", e.values).tobytes()).decode()
                    if as_base64
                    else list(e.values)
                ),
            }
            for e in reply.embeddings
        ]
        usage = {
            "prompt_tokens": reply.usage.prompt_tokens,
            "total_tokens": reply.usage.total_tokens,
        }
        return JSONResponse({"object": "list", "data": data, "model": reply.model, "usage": usage})


class Dialect(Protocol[C]):
    """How one OpenAI endpoint shows the providers' chunks (chat, legacy text)."""

    #: The providers message the call streams.
    chunk_type: type[C]
    #: `object` of the endpoint's streamed events.
    chunk_object: str

    def event(self, head: dict[str, Any], chunk: C) -> dict[str, Any] | None:
        """The SSE event for one chunk; None when it carries nothing to send."""

    def add(self, chunk: C) -> None:
        """Fold one chunk into the whole (non-streaming) answer."""

    def whole(self, completion_id: str, created: int, model: str) -> dict[str, Any]:
        """The whole answer of the chunks added."""


class ChatDialect:
    """`chat.completion` and `chat.completion.chunk`."""

    chunk_type = pb.StreamChatCompletionResponse
    chunk_object = "chat.completion.chunk"

    def __init__(self) -> None:
        self._aggregate = CompletionAggregate()

    def event(
        self, head: dict[str, Any], chunk: pb.StreamChatCompletionResponse
    ) -> dict[str, Any] | None:
        delta = chunk_delta(chunk)
        finish = FINISH_REASONS.get(chunk.finish_reason)
        if not (delta or finish or chunk.logprobs):
            return None
        return chunk_payload(head, chunk.model, delta, finish, chunk.logprobs)

    def add(self, chunk: pb.StreamChatCompletionResponse) -> None:
        self._aggregate.add(chunk)

    def whole(self, completion_id: str, created: int, model: str) -> dict[str, Any]:
        return self._aggregate.response(completion_id, created, model)


async def relay(
    call: GenerationCall[C], dialect: Dialect[C], *, stream: bool, include_usage: bool
) -> Response | EventStreamResponse:
    """Answer a request from a providers stream: as SSE events (`stream`) or as one
    JSON answer; the call brings the usage, metrics, shutdown and disconnect
    handling every generating route shares."""
    async with call.answering():
        first = await call.first()
        created = first.created or int(time.time())
        if stream:
            call.streaming()
            return EventStreamResponse(
                _sse_events(call, dialect, first, created, include_usage),
                [(b"x-request-id", call.request_id.encode())],
                on_close=call.close,
                keep_alive_seconds=call.gw.settings.sse_keep_alive_seconds,
            )
        dialect.add(first)
        async for chunk in call.chunks():
            dialect.add(chunk)
        return JSONResponse(dialect.whole(first.id, created, first.model))


async def _sse_events(
    call: GenerationCall[C], dialect: Dialect[C], first: C, created: int, include_usage: bool
) -> AsyncIterator[bytes]:
    head = {"id": first.id, "object": dialect.chunk_object, "created": created}
    try:
        chunk = first
        rest = call.chunks()
        while True:
            if (payload := dialect.event(head, chunk)) is not None:
                yield event(payload)
            try:
                chunk = await anext(rest)
            except StopAsyncIteration:
                break
            except ApiError as exc:
                # After the first byte the status is committed: the error
                # travels as an event, then the stream ends normally.
                yield event(exc.envelope())
                yield DONE
                return
        if include_usage and call.usage is not None:
            yield event(usage_payload(head, first.model, call.usage))
        yield DONE
    finally:
        # Reached on normal end, on error, and when the client disconnects.
        call.close()


def _model_object(model: pb.ModelInfo) -> dict[str, Any]:
    created = model.modified_time.seconds if model.HasField("modified_time") else 0
    if model.HasField("route"):
        # An alias or split of the providers' configuration: what it routes to.
        targets = [t.model for t in model.route.targets]
        return {
            "id": model.id,
            "object": "model",
            "created": 0,
            "owned_by": "marie",
            "routes_to": targets,
        }
    return {"id": model.id, "object": "model", "created": created, "owned_by": model.provider}
