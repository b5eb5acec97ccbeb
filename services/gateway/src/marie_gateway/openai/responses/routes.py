"""OpenAI's Responses API: `POST /v1/responses` (answered whole or streamed as
its typed events), `GET` and `DELETE /v1/responses/{id}`, and
`GET /v1/responses/{id}/input_items`.

A request becomes a chat on the providers service through the same
translation and the same call as `/v1/chat/completions` (`items.py`, then
`openai/generation.py`): the same key checks, limits, usage, metrics and cancellation.

With `store` (the default) the response is kept in the memory service
(`store.py`) so `previous_response_id` can continue it. The stored
response is created before the model is asked: when the memory service is
down, a request that stores gets a 503 saying so (and `store: false` works
without it); nothing is generated that could not be kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from marie.providers.v1 import provider_service_pb2 as pb
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from marie_gateway.access.keys import SCOPE_CHAT
from marie_gateway.access.tenancy import responses_user_id
from marie_gateway.core import Gateway
from marie_gateway.http.bodies import JSONResponse, parse_body
from marie_gateway.http.errors import ApiError, bad_request
from marie_gateway.http.params import MAX_ID_LENGTH, int_query, path_text, text_query
from marie_gateway.http.sse import EventStreamResponse, typed_event
from marie_gateway.openai.enrichment import enrich_chat
from marie_gateway.openai.generation import ChatCall, open_chat
from marie_gateway.openai.mapping import chat_request_to_proto
from marie_gateway.openai.responses.items import (
    ITEMS,
    ResponseBuilder,
    chat_messages,
    chat_parameters,
    input_items,
    new_id,
    response_object,
)
from marie_gateway.openai.responses.schemas import RESPONSE_ITEM_TAGS, ResponsesRequest
from marie_gateway.openai.responses.store import PREFIX, ResponseStore

log = logging.getLogger("marie.gateway.responses")

#: Items a page of `input_items` holds by default and at most (OpenAI's).
DEFAULT_PAGE = 20
MAX_PAGE = 100


class ResponsesRoutes:
    """Handlers of the `/v1/responses` routes."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.store = ResponseStore(gw)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/responses", self.create, methods=["POST"]),
            Route("/v1/responses/{response_id}", self.retrieve, methods=["GET"]),
            Route("/v1/responses/{response_id}", self.delete, methods=["DELETE"]),
            Route("/v1/responses/{response_id}/input_items", self.list_input, methods=["GET"]),
        ]

    async def create(self, request: Request) -> Response | EventStreamResponse:
        gw = self.gw
        principal = await gw.authorize(request, SCOPE_CHAT)
        tally = await gw.admit(request, principal, "responses")
        body = parse_body(ResponsesRequest, await gw.read_body(request), RESPONSE_ITEM_TAGS)
        tally.requested = body.model
        # Stored responses are the tenant's, kept apart from its conversations.
        tenant = responses_user_id(principal)
        history: list[Any] = []
        if body.previous_response_id:
            for record in await self.store.chain(tenant, body.previous_response_id):
                history += ITEMS.validate_python(record["input"] + record["response"]["output"])
        items = input_items(body)
        if not items and not history:
            raise bad_request("'input' has no items.", "input")
        current = body.input if isinstance(body.input, list) else ITEMS.validate_python(items)
        messages = chat_messages(history + current, body.instructions)
        response_id = await self.store.create(tenant, body.model) if body.store else new_id("resp")
        answer = _Answer(self.store, tenant, body, response_id, items)
        try:
            chat = chat_request_to_proto(
                chat_parameters(body, messages),
                response_id,
                model=body.model,
                aggregate=not body.stream,
            )
            await enrich_chat(gw, principal, body.user, chat)
            call = open_chat(gw, request, principal, chat, tally)
            async with call.answering():
                if body.stream:
                    await call.start()
                    call.streaming()
                    answer.streaming = True
                    return EventStreamResponse(
                        answer.events(call),
                        [(b"x-request-id", call.request_id.encode())],
                        on_close=call.close,
                        keep_alive_seconds=gw.settings.sse_keep_alive_seconds,
                    )
                first = await call.first()
                answer.begin(first)
                answer.builder.add(first)
                async for chunk in call.chunks():
                    answer.builder.add(chunk)
                answer.builder.finish_events()
                await answer.save_quietly()
                return JSONResponse(answer.builder.response)
        finally:
            answer.abandon_unless_kept()

    async def _tenant(self, request: Request) -> str:
        principal = await self.gw.enter(request, SCOPE_CHAT)
        return responses_user_id(principal)

    async def retrieve(self, request: Request) -> Response:
        tenant = await self._tenant(request)
        if request.query_params.get("stream") in ("true", "1"):
            raise bad_request("Streaming a stored response again is not supported.", "stream")
        record = await self.store.load(tenant, path_text(request, "response_id"))
        return JSONResponse(record["response"])

    async def list_input(self, request: Request) -> Response:
        tenant = await self._tenant(request)
        params = request.query_params
        order = params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise bad_request("'order' is 'asc' or 'desc'.", "order")
        limit = int_query(request, "limit", default=DEFAULT_PAGE, minimum=1, maximum=MAX_PAGE)
        record = await self.store.load(tenant, path_text(request, "response_id"))
        items: list[dict[str, Any]] = record["input"]
        if order == "desc":
            items = items[::-1]
        after = text_query(request, "after", MAX_ID_LENGTH)
        if after:
            ids = [i["id"] for i in items]
            if after not in ids:
                raise bad_request(f"No input item with id '{after}'.", "after")
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        return JSONResponse(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(items) > len(page),
            }
        )

    async def delete(self, request: Request) -> Response:
        tenant = await self._tenant(request)
        response_id = path_text(request, "response_id")
        await self.store.delete(tenant, response_id)
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


class _Answer:
    """One response being made: its builder, and its keeping when stored."""

    def __init__(
        self,
        store: ResponseStore,
        tenant: str,
        body: ResponsesRequest,
        response_id: str,
        items: list[dict[str, Any]],
    ) -> None:
        self._store = store
        self._tenant = tenant
        self._body = body
        self._items = items
        self.response_id = response_id
        self.builder: ResponseBuilder
        self._kept = not body.store
        #: The answer is an event stream, which keeps its answer itself.
        self.streaming = False

    def begin(self, first: pb.StreamChatCompletionResponse | None) -> ResponseBuilder:
        """The response's builder, from the answer's first chunk; without one
        (the answer failed or was left before it), in the requested model's name."""
        if first is None:
            created, model = int(time.time()), self._body.model
        else:
            created, model = first.created or int(time.time()), first.model
        self.builder = ResponseBuilder(
            response_object(self._body, self.response_id, created, model),
            parallel_tool_calls=self._body.parallel_tool_calls is not False,
        )
        return self.builder

    def _record(self) -> dict[str, Any]:
        return {"response": self.builder.response, "input": self._items}

    async def save_quietly(self) -> None:
        """Keep the answer; a failure to keep it is logged, the answer is
        made and sent all the same."""
        if self._kept:
            return
        self._kept = True
        try:
            await self._store.save(self._tenant, self.response_id, self._record())
        except ApiError as exc:
            log.warning("response not stored", extra={"error": exc.message})

    def abandon_unless_kept(self) -> None:
        """The request ended before its answer was kept: a stream carries on
        (it keeps its own answer); otherwise the empty stored response goes."""
        if not self._kept and not self.streaming:
            self._kept = True
            self._store.later(self._store.delete(self._tenant, self.response_id), "deleted")

    async def events(self, call: ChatCall) -> AsyncIterator[bytes]:
        builder: ResponseBuilder | None = None
        try:
            try:
                async for chunk in call.chunks():
                    if builder is None:
                        builder = self.begin(chunk)
                        payloads = builder.start() + builder.add(chunk)
                    else:
                        payloads = builder.add(chunk)
                    for payload in payloads:
                        yield typed_event(payload)
            except ApiError as exc:
                # The status is committed (at the upstream's acceptance, or the
                # first chunk): the failure travels as events, and the failed
                # response is kept as such.
                started = builder is not None
                builder = builder or self.begin(None)
                failed = ([] if started else builder.start()) + builder.failed(exc)
                await self.save_quietly()
                for payload in failed:
                    yield typed_event(payload)
                return
            assert builder is not None  # chunks() has a first chunk or raises
            last = builder.finish_events()
            # Kept before the client hears it is done: a continuation sent
            # right after finds it.
            await self.save_quietly()
            for payload in last:
                yield typed_event(payload)
        finally:
            call.close()
            if not self._kept:
                # The client left mid-answer: what was said is kept, marked so.
                builder = builder or self.begin(None)
                builder.cancelled()
                self._kept = True
                self._store.later(
                    self._store.save(self._tenant, self.response_id, self._record()), "saved"
                )


__all__ = ["PREFIX", "ResponsesRoutes"]
