"""The gateway's HTTP application: OpenAI-compatible `/v1` routes over the gRPC
services, plus health endpoints. Routes stay thin: parse, authorize, call,
translate."""

from __future__ import annotations

import array
import asyncio
import base64
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import orjson
from marie.providers.v1 import provider_service_pb2 as pb
from marie.providers.v1 import provider_service_pb2_grpc as pb_grpc
from marie_kit.channels import insecure_channel, is_serving
from marie_kit.context import clean_request_id, outgoing_metadata, request_id_var
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, request_response

from marie_gateway.access import (
    SCOPE_CHAT,
    SCOPE_EMBEDDINGS,
    SCOPE_MODELS,
    KeyValidator,
    Principal,
    extract_key,
)
from marie_gateway.errors import ApiError, bad_request, from_rpc_error, permission_denied
from marie_gateway.grpc_authz import required_scope, upstream_headers
from marie_gateway.mapping import (
    FINISH_REASONS,
    CompletionAggregate,
    chat_request_to_proto,
    chunk_delta,
    usage_dict,
)
from marie_gateway.protocol import ChatCompletionRequest, EmbeddingsRequest
from marie_gateway.settings import GatewaySettings
from marie_gateway.sse import DONE, DisconnectWatch, EventStreamResponse, event

log = logging.getLogger("marie.gateway")
access_log = logging.getLogger("marie.access")

if TYPE_CHECKING:
    from marie.providers.v1.provider_service_pb2_grpc import ProviderServiceAsyncStub

M = TypeVar("M", bound=BaseModel)


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


@dataclass
class Backends:
    """Long-lived channels and stubs, made once at start-up."""

    providers_channel: grpc.aio.Channel
    auth_channel: grpc.aio.Channel
    providers: ProviderServiceAsyncStub
    keys: KeyValidator


def _error_response(error: ApiError) -> Response:
    headers = {"retry-after": str(error.retry_after)} if error.retry_after else None
    return Response(error.body(), error.status, headers=headers, media_type="application/json")


_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _param(loc: tuple[int | str, ...]) -> str:
    """The field path of a pydantic error location, OpenAI style: `messages[0].role`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in _TYPE_LABELS and not part[:1].isupper():
            # Union branch labels ("str", "list[…]", model names) are not fields.
            out += f".{part}" if out else part
    return out


def parse_body(model: type[M], raw: bytes) -> M:
    """Validate a JSON body; 400 naming the first bad field."""
    if not raw:
        raise bad_request("The request body is empty; expected a JSON object.")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # Of a union's per-branch errors, the deepest one says most about the
        # mistake ("unknown content part type", not "should be a string"); at
        # equal depth, a broken rule beats a mere "wrong type" for another branch.
        first = max(errors, key=lambda e: (len(e["loc"]), not e["type"].endswith("_type")))
        if first["type"] == "json_invalid":
            raise bad_request(f"The request body is not valid JSON: {first['msg']}") from None
        if first["type"] == "model_type" and not first["loc"]:
            raise bad_request("The request body must be a JSON object.") from None
        param = _param(first["loc"])
        where = f"'{param}': " if param else ""
        raise bad_request(f"Invalid request: {where}{first['msg']}", param or None) from None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body larger than {limit} bytes.")


def _request_id(request: Request) -> str:
    return request_id_var.get() or clean_request_id(None)


class Gateway:
    """The route handlers, sharing settings and the long-lived backends."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._backends: Backends | None = None

    def backends(self) -> Backends:
        assert self._backends is not None, "used before the lifespan started"
        return self._backends

    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        async for part in request.stream():
            chunks.append(part)
            size += len(part)
            if size > limit:
                raise _too_large(limit)
        return b"".join(chunks)

    async def authenticate(self, request: Request) -> Principal:
        """The caller's principal from its key header; 401 without a valid key."""
        headers = request.headers
        key = extract_key(headers.get("authorization"), headers.get("x-api-key"))
        return await self.backends().keys.validate(key, _request_id(request))

    async def authorize(self, request: Request, scope: str) -> Principal:
        principal = await self.authenticate(request)
        principal.require_scope(scope)
        return principal

    async def grpc_authz(self, request: Request) -> Response:
        """Envoy's ext_authz check of a gRPC call (see grpc_authz.py): 200 with
        the caller's identity for the upstream, or the 401/403 envelope."""
        principal = await self.authenticate(request)
        principal.require_scope(required_scope("/" + request.path_params["method"]))
        return Response(headers=upstream_headers(principal))

    async def chat_completions(self, request: Request) -> Response | EventStreamResponse:
        rid = _request_id(request)
        principal = await self.authorize(request, SCOPE_CHAT)
        body = parse_body(ChatCompletionRequest, await self.read_body(request))
        if "/" in body.model:
            principal.require_model(body.model)
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        call = self.backends().providers.StreamChatCompletion(
            chat_request_to_proto(body, completion_id),
            timeout=self.settings.request_timeout_seconds,
            metadata=outgoing_metadata(),
        )
        # Until the response starts, a client that leaves must still stop the
        # call (a model loading for 30 s generates for nobody otherwise).
        watch = DisconnectWatch(request.receive, call)
        try:
            # Nothing is sent before the first chunk: until then every failure
            # is a plain HTTP error with the right status.
            first = await call.read()
            if not isinstance(first, pb.StreamChatCompletionResponse):  # grpc.aio.EOF
                raise ApiError(
                    502, "The provider ended the stream without a reply.", "server_error"
                )
            if not principal.may_use(first.model):
                call.cancel()
                raise permission_denied(f"This API key may not use the model '{first.model}'.")
            created = first.created or int(time.time())
            if body.stream:
                # The event stream watches for the disconnect itself from here on.
                await watch.stop()
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                events = self._sse_events(call, first, created, include_usage, rid)
                return EventStreamResponse(events, [(b"x-request-id", rid.encode())])
            aggregate = CompletionAggregate()
            aggregate.add(first)
            while isinstance(chunk := await call.read(), pb.StreamChatCompletionResponse):
                aggregate.add(chunk)
            return JSONResponse(aggregate.response(first.id, created, first.model))
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, rid) from None
        except asyncio.CancelledError:
            if watch.fired:
                # Nobody is left to answer; 499 shows in the access log only.
                raise ApiError(499, "Client closed the request.", code="client_closed") from None
            raise
        finally:
            await watch.stop()

    async def _sse_events(
        self,
        call: grpc.aio.UnaryStreamCall[
            pb.StreamChatCompletionRequest, pb.StreamChatCompletionResponse
        ],
        first: pb.StreamChatCompletionResponse,
        created: int,
        include_usage: bool,
        rid: str,
    ) -> AsyncIterator[bytes]:
        head = {"id": first.id, "object": "chat.completion.chunk", "created": created}
        model = first.model
        usage: pb.Usage | None = None
        try:
            chunk = first
            while True:
                delta = chunk_delta(chunk)
                finish = FINISH_REASONS.get(chunk.finish_reason)
                if chunk.HasField("usage"):
                    usage = chunk.usage
                if delta or finish:
                    payload: dict[str, Any] = {
                        **head,
                        "model": model,
                        "choices": [
                            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                        ],
                    }
                    yield event(payload)
                try:
                    read = await call.read()
                except grpc.aio.AioRpcError as exc:
                    # After the first byte the status is committed: the error
                    # travels as an event, then the stream ends normally.
                    yield event(from_rpc_error(exc, rid).envelope())
                    yield DONE
                    return
                if not isinstance(read, pb.StreamChatCompletionResponse):  # grpc.aio.EOF
                    break
                chunk = read
            if include_usage and usage is not None:
                yield event({**head, "model": model, "choices": [], "usage": usage_dict(usage)})
            yield DONE
        finally:
            # Reached on normal end, on error, and when the client disconnects.
            call.cancel()

    async def list_models(self, request: Request) -> Response:
        rid = _request_id(request)
        principal = await self.authorize(request, SCOPE_MODELS)
        try:
            reply = await self.backends().providers.ListModels(
                pb.ListModelsRequest(),
                timeout=self.settings.control_timeout_seconds,
                metadata=outgoing_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, rid) from None
        data = [_model_object(m) for m in reply.models if principal.may_use(m.id)]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        rid = _request_id(request)
        principal = await self.authorize(request, SCOPE_MODELS)
        model_id = request.path_params["model_id"]
        try:
            reply = await self.backends().providers.GetModel(
                pb.GetModelRequest(model=model_id),
                timeout=self.settings.control_timeout_seconds,
                metadata=outgoing_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, rid) from None
        if not principal.may_use(reply.model.id):
            raise ApiError(404, f"The model '{model_id}' does not exist.", code="model_not_found")
        return JSONResponse(_model_object(reply.model))

    async def embeddings(self, request: Request) -> Response:
        rid = _request_id(request)
        principal = await self.authorize(request, SCOPE_EMBEDDINGS)
        body = parse_body(EmbeddingsRequest, await self.read_body(request))
        if "/" in body.model:
            principal.require_model(body.model)
        inputs = [body.input] if isinstance(body.input, str) else body.input
        try:
            reply = await self.backends().providers.CreateEmbeddings(
                pb.CreateEmbeddingsRequest(
                    model=body.model,
                    inputs=inputs,
                    dimensions=body.dimensions or 0,
                    user=body.user or "",
                ),
                timeout=self.settings.request_timeout_seconds,
                metadata=outgoing_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, rid) from None
        if not principal.may_use(reply.model):
            raise permission_denied(f"This API key may not use the model '{reply.model}'.")
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

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        b = self.backends()
        checks = {
            "providers": await is_serving(b.providers_channel, timeout=1.0),
            "auth": await is_serving(b.auth_channel, timeout=1.0),
        }
        ready = all(checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503
        )

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        providers_channel = insecure_channel(self.settings.providers_addr)
        auth_channel = insecure_channel(self.settings.auth_addr)
        keys = KeyValidator(
            auth_channel,
            cache_ttl=self.settings.key_cache_ttl_seconds,
            timeout=self.settings.control_timeout_seconds,
        )
        keys.start()
        self._backends = Backends(
            providers_channel, auth_channel, pb_grpc.ProviderServiceStub(providers_channel), keys
        )
        log.info(
            "gateway ready",
            extra={"providers": self.settings.providers_addr, "auth": self.settings.auth_addr},
        )
        try:
            yield
        finally:
            await keys.close()
            await providers_channel.close()
            await auth_channel.close()

    async def api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _error_response(exc)

    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}."
            return _error_response(ApiError(404, message, code="unknown_url"))
        if exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
            return _error_response(ApiError(405, message, code="method_not_allowed"))
        return _error_response(ApiError(exc.status_code, str(exc.detail)))

    async def server_error(self, request: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        message = (
            f"The server had an error processing the request (request id {_request_id(request)})."
        )
        return _error_response(ApiError(500, message, "server_error", "server_error"))


def create_app(settings: GatewaySettings) -> Starlette:
    """Build the gateway application; channels open in its lifespan."""
    gw = Gateway(settings)
    routes = [
        Route("/v1/chat/completions", gw.chat_completions, methods=["POST"]),
        Route("/v1/models", gw.list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", gw.get_model, methods=["GET"]),
        Route("/v1/embeddings", gw.embeddings, methods=["POST"]),
        Route("/healthz", gw.healthz, methods=["GET"]),
        Route("/readyz", gw.readyz, methods=["GET"]),
        # Internal: Envoy's ext_authz check, prefixed to the gRPC call's path
        # and sent with its method (Envoy answers 404 for /_authz from outside).
        Route("/_authz/{method:path}", AnyMethod(gw.grpc_authz)),
    ]
    app = Starlette(
        routes=routes,
        lifespan=gw.lifespan,
        exception_handlers={
            ApiError: gw.api_error,
            HTTPException: gw.http_error,
            Exception: gw.server_error,
        },
    )
    return app


class AnyMethod:
    """A request handler routed for every HTTP method (Starlette routes a plain
    function for GET only unless told a list)."""

    def __init__(self, handler: Callable[[Request], Awaitable[Response]]) -> None:
        self._app = request_response(handler)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._app(scope, receive, send)


def _model_object(model: pb.ModelInfo) -> dict[str, Any]:
    created = model.modified_time.seconds if model.HasField("modified_time") else 0
    return {"id": model.id, "object": "model", "created": created, "owned_by": model.provider}


ASGIApp = Callable[
    [dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


class RequestContext:
    """Pure ASGI middleware: request id in and out, and one access-log line.

    Pure ASGI (not BaseHTTPMiddleware) because this runs on every request and
    must cost microseconds."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        rid = clean_request_id(incoming)
        request_id_var.set(rid)
        started = time.perf_counter()
        status = 500
        response_started = False
        rid_header = (b"x-request-id", rid.encode())

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                headers = list(message.get("headers", ()))
                if not any(k == b"x-request-id" for k, _ in headers):
                    headers.append(rid_header)
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Starlette re-raises after its 500 handler has logged the error and
            # answered; once answered, there is nothing left to do with it.
            if not response_started:
                raise
        finally:
            access_log.info(
                "http",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "latency_ms": round((time.perf_counter() - started) * 1000, 3),
                },
            )
