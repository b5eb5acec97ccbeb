"""One providers generation call made for an HTTP request, as every generating
surface (`/v1/chat/completions`, `/v1/completions`, `/v1/responses`) makes it:
tracked for shutdown, its first chunk awaited while a client disconnect still
cancels it, the rest read with errors mapped to the OpenAI envelope, and closed
once: cancelled, untracked, tokens counted and tallied; and its relay to the
client, as SSE events or one JSON answer, in each endpoint's dialect."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Generic, Protocol, TypeVar

import grpc
from marie.providers.v1 import provider_service_pb2 as pb
from marie_kit.acceptance import accepted_cache_result
from starlette.requests import Request
from starlette.responses import Response

from marie_gateway.access.keys import Principal
from marie_gateway.access.tally import Tally
from marie_gateway.core import SHUTDOWN_MESSAGE, Cancellable, Gateway
from marie_gateway.http import caching
from marie_gateway.http.bodies import JSONResponse
from marie_gateway.http.context import current_request_id
from marie_gateway.http.errors import ApiError, client_closed, from_rpc_error, service_unavailable
from marie_gateway.http.metrics import STREAMS_IN_FLIGHT, provider_of, time_to_first_token, tokens
from marie_gateway.http.sse import DONE, DisconnectWatch, EventStreamResponse, event
from marie_gateway.openai.mapping import usage_payload


class Chunk(Protocol):
    """What every streamed providers chunk has (chat's and text completions')."""

    @property
    def id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def created(self) -> int: ...
    @property
    def usage(self) -> pb.Usage: ...
    @property
    def cache(self) -> int: ...
    def HasField(self, field_name: Any) -> bool: ...


C = TypeVar("C", bound=Chunk)


class StreamCall(Cancellable, Protocol):
    """A server-streaming gRPC call as read here (or several read as one)."""

    async def read(self) -> Any: ...

    async def initial_metadata(self) -> Any: ...


def count_tokens(model: str, usage: pb.Usage) -> None:
    provider, model_id = provider_of(model)
    tokens(provider, model_id, "in").inc(usage.prompt_tokens)
    tokens(provider, model_id, "out").inc(usage.completion_tokens)


def add_usage(total: pb.Usage | None, more: pb.Usage) -> pb.Usage:
    """`total` + `more` (several calls answer one request: several choices)."""
    if total is None:
        return more
    return pb.Usage(
        prompt_tokens=total.prompt_tokens + more.prompt_tokens,
        completion_tokens=total.completion_tokens + more.completion_tokens,
        total_tokens=total.total_tokens + more.total_tokens,
        cached_prompt_tokens=total.cached_prompt_tokens + more.cached_prompt_tokens,
    )


class GenerationCall(Generic[C]):
    """A streaming providers call on behalf of one request, yielding `chunk_type`.

    Use: `async with call.answering():` around everything up to the answer
    (`first()` and the whole reply when it is not streamed; `start()` when it
    is); for a streamed answer call `streaming()` inside it, read `chunks()`
    (the first chunk among them) in the event generator, which calls
    `close()` in its `finally`, and pass `close` as the EventStreamResponse's
    `on_close` (a generator that never started runs no `finally`)."""

    def __init__(
        self, gw: Gateway, request: Request, call: StreamCall, chunk_type: type[C], tally: Tally
    ) -> None:
        self.gw = gw
        self.tally = tally
        self.request_id = current_request_id()
        self._started = time.perf_counter()
        self._chunk_type = chunk_type
        self.call = call
        gw.track(call)
        # Until the response starts, a client that leaves must still stop the
        # call (a model loading for 30 s generates for nobody otherwise).
        self._watch = DisconnectWatch(request.receive, self.call)
        self.model = ""
        #: The answer's usage, as its chunks report it (a cache hit's is the
        #: original call's); `spent`: what upstream calls of this request used.
        self.usage: pb.Usage | None = None
        self.spent: pb.Usage | None = None
        #: The first chunk's cache result; whether any chunk was replayed.
        self.cache: int = pb.CACHE_RESULT_UNSPECIFIED
        self.hit = False
        self._streaming = False
        self._closed = False
        #: Whether the first chunk arrived; one `start()` read, for `chunks()` to pass on.
        self._answered = False
        self._ahead: C | None = None

    @asynccontextmanager
    async def answering(self) -> AsyncIterator[None]:
        """The time before the answer starts: failures become ApiErrors with
        their HTTP status; the call is closed on leaving unless it streams."""
        try:
            yield
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, self.request_id) from None
        except asyncio.CancelledError:
            if self._watch.fired:
                # Nobody is left to answer; 499 shows in the access log only.
                raise client_closed() from None
            if self.gw.cut_by_shutdown():
                raise service_unavailable(SHUTDOWN_MESSAGE) from None
            raise
        finally:
            await self._watch.stop()
            if not self._streaming:
                self.close()

    async def first(self) -> C:
        """The first chunk. Nothing is sent before it: until then every
        failure is a plain HTTP error with the right status."""
        first = await self.call.read()
        if not isinstance(first, self._chunk_type):  # grpc.aio.EOF
            raise _no_reply()
        self._first_arrived(first)
        return first

    async def start(self) -> None:
        """Wait until a streamed answer may start: when providers says an
        upstream accepted the request (its stream's initial metadata), so the
        status and headers go out while the model works, off the first
        token's path; else (a cache hit, a whole reply) at the first chunk,
        which `chunks()` passes on first. Until then every failure is a plain
        HTTP error with its status; one after acceptance and before the first
        chunk comes from `chunks()`, as later ones do (OpenAI's own streams
        behave so)."""
        cache_result = accepted_cache_result(await self.call.initial_metadata())
        if cache_result is not None:
            self.cache = cache_result
            return
        self._ahead = await self.first()

    def _first_arrived(self, first: C) -> None:
        time_to_first_token(*provider_of(first.model)).observe(time.perf_counter() - self._started)
        self._answered = True
        self.model = first.model
        self.cache = first.cache
        self._note(first)

    def cache_headers(self) -> list[tuple[bytes, bytes]]:
        """`x-marie-cache: hit|miss` when the response cache took part."""
        header = caching.answer_header(self.cache)
        return [header] if header else []

    def streaming(self) -> None:
        """The answer is an event stream from here on: it watches for the
        disconnect itself, and closes the call when it ends."""
        self._streaming = True
        STREAMS_IN_FLIGHT.inc()

    async def chunks(self) -> AsyncIterator[C]:
        """The chunks not yet read (after `first()`: the rest; after `start()`:
        all). A failure raises ApiError: the call's error, a stream that ended
        without a reply, or 503 when the shutdown's grace period is over."""
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            yield ahead
        while True:
            try:
                read = await self.call.read()
            except grpc.aio.AioRpcError as exc:
                self.tally.failed = True
                raise from_rpc_error(exc, self.request_id) from None
            except asyncio.CancelledError:
                if not self.gw.cut_by_shutdown():
                    raise
                # The grace period is over: the answer says so rather than
                # being cut mid-air.
                self.tally.failed = True
                raise service_unavailable(SHUTDOWN_MESSAGE) from None
            if not isinstance(read, self._chunk_type):  # grpc.aio.EOF
                if not self._answered:
                    self.tally.failed = True
                    raise _no_reply()
                return
            if self._answered:
                self._note(read)
            else:
                self._first_arrived(read)
            yield read

    def _note(self, chunk: C) -> None:
        replayed = chunk.cache == pb.CACHE_RESULT_HIT
        if replayed:
            self.hit = True
        if chunk.HasField("usage"):
            # Summed: several calls read as one (choices) each report theirs.
            self.usage = add_usage(self.usage, chunk.usage)
            # A count made without generating spent nothing.
            if not replayed and not chunk.usage.counted_only:
                self.spent = add_usage(self.spent, chunk.usage)

    def close(self) -> None:
        """End the call (idempotent): reached on normal end, on error and when
        the client disconnects; what was used is counted once."""
        if self._closed:
            return
        self._closed = True
        self.call.cancel()
        self.gw.untrack(self.call)
        if self._streaming:
            STREAMS_IN_FLIGHT.dec()
        if self.spent is not None:
            count_tokens(self.model, self.spent)
            self.tally.add(self.model, self.spent)
        if self.hit:
            self.tally.add_cached(self.model)


ChatCall = GenerationCall[pb.StreamChatCompletionResponse]


def _no_reply() -> ApiError:
    return ApiError(502, "The provider ended the stream without a reply.", "server_error")


class WholeReply:
    """A unary `CreateChatCompletion` call read as a stream: its chunks, then EOF.

    Cancelling it cancels the call; its errors surface from the first `read`,
    as a stream's would."""

    __slots__ = ("_call", "_chunks")

    def __init__(
        self,
        call: grpc.aio.UnaryUnaryCall[
            pb.CreateChatCompletionRequest, pb.CreateChatCompletionResponse
        ],
    ) -> None:
        self._call = call
        self._chunks: list[pb.StreamChatCompletionResponse] | None = None

    async def read(self) -> Any:
        if self._chunks is None:
            reply = await self._call
            self._chunks = list(reversed(reply.chunks))
        return self._chunks.pop() if self._chunks else grpc.aio.EOF

    async def initial_metadata(self) -> Any:
        return await self._call.initial_metadata()

    def cancel(self) -> bool:
        return self._call.cancel()


def open_chat(
    gw: Gateway,
    request: Request,
    principal: Principal,
    chat: pb.StreamChatCompletionRequest,
    tally: Tally,
) -> ChatCall:
    """Open the providers call for a request: `StreamChatCompletion`, or, when
    only the whole reply is wanted (`chat.aggregate`), `CreateChatCompletion`,
    a unary call that costs less (bench/grpc_floor.py) and reads the same."""
    # The key's allowed models travel with the call: providers checks the
    # model it resolves before any upstream call.
    providers = gw.backends().providers
    timeout = gw.settings.request_timeout_seconds
    metadata = principal.model_call_metadata()
    call: StreamCall
    if chat.aggregate:
        call = WholeReply(
            providers.CreateChatCompletion(
                pb.CreateChatCompletionRequest(chat=chat), timeout=timeout, metadata=metadata
            )
        )
    else:
        call = providers.StreamChatCompletion(chat, timeout=timeout, metadata=metadata)
    return GenerationCall(gw, request, call, pb.StreamChatCompletionResponse, tally)


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


async def relay(
    call: GenerationCall[C], dialect: Dialect[C], *, stream: bool, include_usage: bool
) -> Response | EventStreamResponse:
    """Answer a request from a providers stream: as SSE events (`stream`) or as one
    JSON answer; the call brings the usage, metrics, shutdown and disconnect
    handling every generating route shares."""
    async with call.answering():
        if stream:
            await call.start()
            call.streaming()
            return EventStreamResponse(
                _sse_events(call, dialect, include_usage),
                [(b"x-request-id", call.request_id.encode()), *call.cache_headers()],
                on_close=call.close,
                keep_alive_seconds=call.gw.settings.sse_keep_alive_seconds,
            )
        first = await call.first()
        dialect.add(first)
        async for chunk in call.chunks():
            dialect.add(chunk)
        headers = {k.decode(): v.decode() for k, v in call.cache_headers()}
        created = first.created or int(time.time())
        return JSONResponse(dialect.whole(first.id, created, first.model), headers=headers or None)


async def _sse_events(
    call: GenerationCall[C], dialect: Dialect[C], include_usage: bool
) -> AsyncIterator[bytes]:
    head: dict[str, Any] = {}
    try:
        try:
            async for chunk in call.chunks():
                if not head:
                    created = chunk.created or int(time.time())
                    head = {"id": chunk.id, "object": dialect.chunk_object, "created": created}
                if (payload := dialect.event(head, chunk)) is not None:
                    yield event(payload)
        except ApiError as exc:
            # The status is committed (at the upstream's acceptance, or the
            # first chunk): the error travels as an event, then the stream
            # ends normally.
            yield event(exc.envelope())
            yield DONE
            return
        if include_usage and call.usage is not None:
            yield event(usage_payload(head, call.model, call.usage))
        yield DONE
    finally:
        # Reached on normal end, on error, and when the client disconnects.
        call.close()
