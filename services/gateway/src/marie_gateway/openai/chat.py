"""`POST /v1/chat/completions` (and the original design's `/api/v1/…` path):
OpenAI's chat, over the providers service's chat stream. The route stays thin:
authorize, parse, add the user's memories, call, relay."""

from __future__ import annotations

import secrets
from typing import Any

from marie.providers.v1 import provider_service_pb2 as pb
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from marie_gateway.access.keys import SCOPE_CHAT
from marie_gateway.core import Gateway
from marie_gateway.http import caching
from marie_gateway.http.bodies import parse_body
from marie_gateway.http.sse import EventStreamResponse
from marie_gateway.openai.enrichment import enrich_chat
from marie_gateway.openai.generation import open_chat, relay
from marie_gateway.openai.mapping import (
    FINISH_REASONS,
    CompletionAggregate,
    chat_request_to_proto,
    chunk_delta,
    chunk_payload,
)
from marie_gateway.openai.schemas import ChatCompletionRequest


class ChatRoutes:
    """Handler of the chat completions routes."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            # The original design's developer API path: the same handler.
            Route("/api/v1/chat/completions", self.chat_completions, methods=["POST"]),
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
        if (policy := caching.request_policy(request.headers, body.metadata)) is not None:
            chat.cache.CopyFrom(policy)
        await enrich_chat(gw, principal, body.user, chat)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        call = open_chat(gw, request, principal, chat, tally)
        return await relay(call, ChatDialect(), stream=body.stream, include_usage=include_usage)


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
