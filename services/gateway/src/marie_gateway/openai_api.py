"""The OpenAI-compatible surface: `/v1/chat/completions`, `/v1/models`,
`/v1/embeddings`. Routes stay thin: authorize, parse, call, translate."""

from __future__ import annotations

import array
import asyncio
import base64
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from marie.providers.v1 import provider_service_pb2 as pb
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from marie_gateway.access import SCOPE_CHAT, SCOPE_EMBEDDINGS, SCOPE_MODELS
from marie_gateway.core import Gateway
from marie_gateway.errors import ApiError, client_closed, from_rpc_error, service_unavailable
from marie_gateway.mapping import (
    FINISH_REASONS,
    CompletionAggregate,
    chat_request_to_proto,
    chunk_delta,
    chunk_payload,
    usage_payload,
)
from marie_gateway.memory_api import enrich_chat
from marie_gateway.metrics import STREAMS_IN_FLIGHT, provider_of, time_to_first_token, tokens
from marie_gateway.protocol import ChatCompletionRequest, EmbeddingsRequest
from marie_gateway.sse import DONE, DisconnectWatch, EventStreamResponse, event
from marie_gateway.usage import Tally
from marie_gateway.web import JSONResponse, current_request_id, parse_body

ChatCall = grpc.aio.UnaryStreamCall[pb.StreamChatCompletionRequest, pb.StreamChatCompletionResponse]

SHUTDOWN_MESSAGE = "The server is shutting down; retry the request."


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
        rid = current_request_id()
        principal = await gw.authorize(request, SCOPE_CHAT)
        tally = await gw.admit(request, principal, "chat")
        body = parse_body(ChatCompletionRequest, await gw.read_body(request))
        tally.requested = body.model
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        started = time.perf_counter()
        chat = chat_request_to_proto(
            body, completion_id, model=body.model, aggregate=not body.stream
        )
        await enrich_chat(gw, principal, body.user, chat)
        # The key's allowed models travel with the call: providers checks the
        # model it resolves before any upstream call.
        call: ChatCall = gw.backends().providers.StreamChatCompletion(
            chat,
            timeout=gw.settings.request_timeout_seconds,
            metadata=principal.call_metadata(),
        )
        gw.track(call)
        # Until the response starts, a client that leaves must still stop the
        # call (a model loading for 30 s generates for nobody otherwise).
        watch = DisconnectWatch(request.receive, call)
        streaming = False
        try:
            # Nothing is sent before the first chunk: until then every failure
            # is a plain HTTP error with the right status.
            first = await call.read()
            if not isinstance(first, pb.StreamChatCompletionResponse):  # grpc.aio.EOF
                raise ApiError(
                    502, "The provider ended the stream without a reply.", "server_error"
                )
            time_to_first_token(*provider_of(first.model)).observe(time.perf_counter() - started)
            created = first.created or int(time.time())
            if body.stream:
                # The event stream watches for the disconnect itself from here on.
                await watch.stop()
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                events = self._sse_events(call, first, created, include_usage, rid, tally=tally)
                streaming = True
                return EventStreamResponse(
                    events,
                    [(b"x-request-id", rid.encode())],
                    keep_alive_seconds=gw.settings.sse_keep_alive_seconds,
                )
            aggregate = CompletionAggregate()
            aggregate.add(first)
            while isinstance(chunk := await call.read(), pb.StreamChatCompletionResponse):
                aggregate.add(chunk)
            if aggregate.usage is not None:
                count_tokens(first.model, aggregate.usage)
                tally.add(
                    first.model, aggregate.usage.prompt_tokens, aggregate.usage.completion_tokens
                )
            return JSONResponse(aggregate.response(first.id, created, first.model))
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, rid) from None
        except asyncio.CancelledError:
            if watch.fired:
                # Nobody is left to answer; 499 shows in the access log only.
                raise client_closed() from None
            if gw.cut_by_shutdown():
                raise service_unavailable(SHUTDOWN_MESSAGE) from None
            raise
        finally:
            await watch.stop()
            if not streaming:
                gw.untrack(call)

    async def _sse_events(
        self,
        call: ChatCall,
        first: pb.StreamChatCompletionResponse,
        created: int,
        include_usage: bool,
        rid: str,
        *,
        tally: Tally,
    ) -> AsyncIterator[bytes]:
        head = {"id": first.id, "object": "chat.completion.chunk", "created": created}
        model = first.model
        usage: pb.Usage | None = None
        STREAMS_IN_FLIGHT.inc()
        try:
            chunk = first
            while True:
                delta = chunk_delta(chunk)
                finish = FINISH_REASONS.get(chunk.finish_reason)
                if chunk.HasField("usage"):
                    usage = chunk.usage
                if delta or finish:
                    yield event(chunk_payload(head, model, delta, finish))
                try:
                    read = await call.read()
                except grpc.aio.AioRpcError as exc:
                    # After the first byte the status is committed: the error
                    # travels as an event, then the stream ends normally.
                    tally.failed = True
                    yield event(from_rpc_error(exc, rid).envelope())
                    yield DONE
                    return
                except asyncio.CancelledError:
                    if not self.gw.cut_by_shutdown():
                        raise
                    # The grace period is over: say so, and end the stream
                    # properly rather than cutting it mid-air.
                    tally.failed = True
                    yield event(service_unavailable(SHUTDOWN_MESSAGE).envelope())
                    yield DONE
                    return
                if not isinstance(read, pb.StreamChatCompletionResponse):  # grpc.aio.EOF
                    break
                chunk = read
            if include_usage and usage is not None:
                yield event(usage_payload(head, model, usage))
            yield DONE
        finally:
            # Reached on normal end, on error, and when the client disconnects.
            call.cancel()
            self.gw.untrack(call)
            STREAMS_IN_FLIGHT.dec()
            if usage is not None:
                count_tokens(model, usage)
                tally.add(model, usage.prompt_tokens, usage.completion_tokens)

    async def list_models(self, request: Request) -> Response:
        gw = self.gw
        principal = await gw.authorize(request, SCOPE_MODELS)
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
        principal = await gw.authorize(request, SCOPE_MODELS)
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
        inputs = [body.input] if isinstance(body.input, str) else body.input
        try:
            reply = await gw.backends().providers.CreateEmbeddings(
                pb.CreateEmbeddingsRequest(
                    model=body.model,
                    inputs=inputs,
                    dimensions=body.dimensions or 0,
                    user=body.user or "",
                ),
                timeout=gw.settings.request_timeout_seconds,
                metadata=principal.call_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, current_request_id()) from None
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


def count_tokens(model: str, usage: pb.Usage) -> None:
    provider, model_id = provider_of(model)
    tokens(provider, model_id, "in").inc(usage.prompt_tokens)
    tokens(provider, model_id, "out").inc(usage.completion_tokens)


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
