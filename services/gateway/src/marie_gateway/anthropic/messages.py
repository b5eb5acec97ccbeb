"""`POST /v1/messages` and `POST /v1/messages/count_tokens`: Anthropic's
Messages API over the providers service's chat, through the same key checks,
limits, ledger, metrics, memory enrichment and cancellation on disconnect as
`/v1/chat/completions` (`openai/generation.py`'s `GenerationCall`)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import TypeVar

import grpc
import orjson
from marie.providers.v1 import provider_service_pb2 as pb
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from marie_gateway.access.keys import SCOPE_CHAT
from marie_gateway.anthropic.errors import COUNT_HEADER, REQUEST_ID_HEADER, envelope
from marie_gateway.anthropic.limits import add_anthropic_headers
from marie_gateway.anthropic.schemas import (
    CountTokensRequest,
    MessagesRequest,
    _Prompt,
    extra_fields,
    loc_path,
)
from marie_gateway.anthropic.translate import (
    PASSTHROUGH_REFUSED,
    MessageBuilder,
    new_id,
    single_tool_call,
    to_chat,
)
from marie_gateway.core import Gateway
from marie_gateway.http import caching
from marie_gateway.http.bodies import JSONResponse
from marie_gateway.http.errors import ApiError, bad_request, from_rpc_error
from marie_gateway.http.sse import EventStreamResponse, typed_event
from marie_gateway.openai.enrichment import enrich_chat
from marie_gateway.openai.generation import ChatCall, open_chat

P = TypeVar("P", bound=_Prompt)

#: Tokens a token count asks the model to generate: its answer is not used,
#: only the upstream's count of the prompt.
COUNT_MAX_TOKENS = 1
#: Characters per token of the estimate (when the upstream reports no count):
#: the usual figure for English text with BPE vocabularies.
CHARS_PER_TOKEN = 4
#: Tokens a chat template adds around each message, for the estimate.
TOKENS_PER_MESSAGE = 4


def parse(model: type[P], raw: bytes, request: Request) -> P:
    """Validate a body as Anthropic does: a 400 naming the field at fault as
    `messages.0.content.1.text: <what is wrong>`; fields the models do not
    define are refused (`Extra inputs are not permitted`) unless the request
    carries `anthropic-beta`."""
    if not raw:
        raise bad_request("The request body is empty; expected a JSON object.")
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        raise _validation_error(exc, raw) from None
    if "anthropic-beta" not in request.headers:
        extra = extra_fields(body)
        if extra:
            raise bad_request(f"{extra[0]}: Extra inputs are not permitted", extra[0])
    return body


def _validation_error(exc: ValidationError, raw: bytes) -> ApiError:
    errors = exc.errors(include_url=False)
    # The deepest error says most (a union's branch that nearly fit).
    first = max(errors, key=lambda e: (len(e["loc"]), not e["type"].endswith("_type")))
    if first["type"] == "json_invalid":
        return bad_request(f"The request body is not valid JSON: {first['msg']}")
    try:
        sent = orjson.loads(raw)
    except orjson.JSONDecodeError:
        sent = None
    if not isinstance(sent, dict):
        return bad_request("The request body must be a JSON object.")
    path = loc_path(first["loc"], sent)
    return bad_request(f"{path}: {first['msg']}" if path else first["msg"], path or None)


class MessagesRoutes:
    """Handlers of `/v1/messages` and `/v1/messages/count_tokens`."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/messages", self.create, methods=["POST"]),
            Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"]),
        ]

    async def create(self, request: Request) -> Response | EventStreamResponse:
        gw = self.gw
        principal = await gw.authorize(request, SCOPE_CHAT)
        try:
            tally = await gw.admit(request, principal, "messages")
        finally:
            add_anthropic_headers(request.scope)
        raw = await gw.read_body(request)
        body = parse(MessagesRequest, raw, request)
        tally.requested = body.model
        message_id = new_id("msg")
        chat, refusal = to_chat(
            body,
            message_id,
            aggregate=not body.stream,
            raw=raw,
            beta=request.headers.get("anthropic-beta"),
        )
        metadata = {"cache": body.metadata.cache} if body.metadata and body.metadata.cache else None
        if (policy := caching.request_policy(request.headers, metadata)) is not None:
            chat.cache.CopyFrom(policy)
        await enrich_chat(gw, principal, chat.user or None, chat)
        call = open_chat(gw, request, principal, chat, tally)
        single_tool = single_tool_call(body)
        async with call.answering():
            if body.stream:
                with _refused(call, refusal):
                    await call.start()
                call.streaming()
                return EventStreamResponse(
                    _events(call, message_id, single_tool),
                    [
                        (b"x-request-id", call.request_id.encode()),
                        (REQUEST_ID_HEADER.encode(), call.request_id.encode()),
                        *call.cache_headers(),
                    ],
                    on_close=call.close,
                    keep_alive_seconds=gw.settings.sse_keep_alive_seconds,
                )
            with _refused(call, refusal):
                first = await call.first()
            builder = MessageBuilder(message_id, first.model, single_tool=single_tool)
            builder.add(first)
            async for chunk in call.chunks():
                builder.add(chunk)
            headers = {REQUEST_ID_HEADER: call.request_id}
            headers.update((k.decode(), v.decode()) for k, v in call.cache_headers())
            return JSONResponse(builder.message(), headers=headers)

    async def count_tokens(self, request: Request) -> Response:
        """The prompt's size: the upstream's own count of it (from a generation
        of one token, whose answer is dropped), or an estimate when the
        upstream reports none; `x-marie-token-count` says which."""
        gw = self.gw
        principal = await gw.authorize(request, SCOPE_CHAT)
        try:
            tally = await gw.admit(request, principal, "count_tokens")
        finally:
            add_anthropic_headers(request.scope)
        raw = await gw.read_body(request)
        body = parse(CountTokensRequest, raw, request)
        tally.requested = body.model
        chat, refusal = to_chat(
            body,
            new_id("msg"),
            aggregate=True,
            max_tokens=COUNT_MAX_TOKENS,
            raw=raw,
            beta=request.headers.get("anthropic-beta"),
        )
        call = open_chat(gw, request, principal, chat, tally)
        async with call.answering():
            with _refused(call, refusal):
                await call.first()
            async for _ in call.chunks():
                pass
        counted = call.usage.prompt_tokens if call.usage is not None else 0
        how = "upstream" if counted else "estimate"
        tokens = counted or estimate_tokens(chat)
        return JSONResponse(
            {"input_tokens": tokens},
            headers={COUNT_HEADER: how, REQUEST_ID_HEADER: call.request_id},
        )


@contextmanager
def _refused(call: ChatCall, refusal: ApiError | None) -> Iterator[None]:
    """Waiting for the answer to start: where the request carries what only an
    Anthropic upstream takes and its route is not Anthropic's, the 400 naming
    the first such field."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        if refusal is None:
            raise
        error = from_rpc_error(exc, call.request_id)
        raise (refusal if error.reason == PASSTHROUGH_REFUSED else error) from None


def estimate_tokens(chat: pb.StreamChatCompletionRequest) -> int:
    """About how many tokens the prompt is: its characters over four, plus the
    template's few per message. Only for upstreams that report no count."""
    chars = 0
    for message in chat.messages:
        chars += len(message.content) + sum(len(p.text) for p in message.parts)
        for call in message.tool_calls:
            chars += len(call.function.name) + len(call.function.arguments)
    for tool in chat.tools:
        fn = tool.function
        chars += len(fn.name) + len(fn.description) + len(fn.parameters_json)
    return math.ceil(chars / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(chat.messages)


async def _events(call: ChatCall, message_id: str, single_tool: bool) -> AsyncIterator[bytes]:
    builder: MessageBuilder | None = None
    try:
        try:
            async for chunk in call.chunks():
                if builder is None:
                    # `message_start` names the model that answers.
                    builder = MessageBuilder(message_id, chunk.model, single_tool=single_tool)
                    payloads = builder.start() + builder.add(chunk)
                else:
                    payloads = builder.add(chunk)
                for payload in payloads:
                    yield typed_event(payload)
        except ApiError as exc:
            # The status is committed (at the upstream's acceptance, or the
            # first chunk): the error is an `error` event, and the stream ends.
            yield typed_event(envelope(exc, call.request_id))
            return
        assert builder is not None  # chunks() has a first chunk or raises
        for payload in builder.finish_events():
            yield typed_event(payload)
    finally:
        # Reached on normal end, on error, and when the client disconnects.
        call.close()
