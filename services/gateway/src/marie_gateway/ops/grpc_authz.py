"""Authorization of gRPC calls that reach the services through Envoy.

Envoy's `ext_authz` filter (deploy/envoy/envoy.yaml) asks the gateway, before
it forwards a gRPC call on its public listener, with the call's method, path
and key headers: `POST /_authz/marie.providers.v1.ProviderService/ListModels`.
The gateway answers with the same key checks as its HTTP API (one
`KeyValidator`, so the same cache and the same at-once revocation):

- 200 with `x-marie-key-id`, `x-marie-owner`, for a key without the `admin`
  scope `x-marie-tenant` (the key's tenant: its owner, or its id when it has
  none; the memory service refuses user ids of other tenants,
  marie_kit.tenancy), for a key limited to some models
  `x-marie-allowed-models`, and for the calls of the providers and memory
  services (`METERED_METHODS`) `x-marie-limits`, the key's limits: the
  service admits such a call against them, and records the ones that spend
  model capacity in the usage ledger (marie_kit.metering), as the gateway
  does for its HTTP API. Envoy adds these headers to the call;
- 401 when the key is missing, malformed, unknown, revoked or expired;
- 403 when the key lacks the method's scope, or the method is not in the table;
- 429 when the client address sent too many invalid keys lately, 503 when a
  key cannot be checked because auth is unreachable.

Envoy turns a refusal into the gRPC call's status, by its own table (401
UNAUTHENTICATED, 403 PERMISSION_DENIED, 429 and 503 UNAVAILABLE), with the
body as grpc-message. So a refusal's body is its plain message, and it
carries `grpc-status-details-bin` (the same code and message, and an
ErrorInfo: reason INVALID_API_KEY, PERMISSION_DENIED, RATE_LIMITED or
SERVICE_UNAVAILABLE), which Envoy passes to the client: gRPC clients get
the same error shape through Envoy as from the services themselves.

Only the key's scopes are checked here (Envoy sends no request body); its
allowed models travel on to the providers service, which checks the model a
call resolves to, as it does for the HTTP API.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any

import grpc
from google.protobuf.descriptor import FileDescriptor
from marie.auth.v1 import auth_service_pb2
from marie.memory.v1 import memory_service_pb2
from marie_kit import identity
from marie_kit.errors import STATUS_DETAILS_KEY, ServiceError
from marie_kit.limits import LIMITS_HEADER, limits_value
from marie_kit.tenancy import TENANT_HEADER
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, request_response

from marie_gateway.access.keys import (
    SCOPE_ADMIN,
    SCOPE_CHAT,
    SCOPE_EMBEDDINGS,
    SCOPE_MEMORY,
    SCOPE_MODELS,
    Principal,
)
from marie_gateway.access.tenancy import key_tenant
from marie_gateway.core import Gateway
from marie_gateway.http.errors import ApiError, permission_denied

KEY_ID_HEADER = identity.KEY_ID_HEADER
OWNER_HEADER = identity.OWNER_HEADER

_PROVIDERS = "/marie.providers.v1.ProviderService/"
_MEMORY = "/marie.memory.v1.MemoryService/"


def _every_method(file: FileDescriptor, service: str, scope: str) -> dict[str, str]:
    """Every RPC of `service` (from its compiled contract) mapped to `scope`."""
    methods = file.services_by_name[service].methods
    return {f"/{m.containing_service.full_name}/{m.name}": scope for m in methods}


#: gRPC full method -> the scope a key needs to call it. A method that is not
#: here (a new RPC, another service, health, reflection) is refused.
METHOD_SCOPES: Mapping[str, str] = MappingProxyType(
    {
        f"{_PROVIDERS}StreamChatCompletion": SCOPE_CHAT,
        f"{_PROVIDERS}CreateChatCompletion": SCOPE_CHAT,
        f"{_PROVIDERS}StreamCompletion": SCOPE_CHAT,
        f"{_PROVIDERS}ListProviders": SCOPE_MODELS,
        f"{_PROVIDERS}GetProviderHealth": SCOPE_MODELS,
        f"{_PROVIDERS}ListModels": SCOPE_MODELS,
        f"{_PROVIDERS}GetModel": SCOPE_MODELS,
        f"{_PROVIDERS}SearchModels": SCOPE_MODELS,
        f"{_PROVIDERS}CreateEmbeddings": SCOPE_EMBEDDINGS,
        **_every_method(auth_service_pb2.DESCRIPTOR, "AuthService", SCOPE_ADMIN),
        **_every_method(memory_service_pb2.DESCRIPTOR, "MemoryService", SCOPE_MEMORY),
    }
)


#: The calls their service holds to the key's limits: every call of the
#: providers and memory services (those that spend model capacity are also
#: recorded in the usage ledger). AuthService calls, for admin keys, are not
#: counted. Only these carry `x-marie-limits`; the gateway's own calls never
#: do (it meters them itself).
METERED_METHODS = frozenset(
    method for method in METHOD_SCOPES if method.startswith((_PROVIDERS, _MEMORY))
)


def required_scope(method: str) -> str:
    """The scope `method` (`/package.Service/Method`) needs; 403 for an unknown method."""
    scope = METHOD_SCOPES.get(method)
    if scope is None:
        raise permission_denied(f"The gRPC method '{method}' is not available through Envoy.")
    return scope


def upstream_headers(principal: Principal, method: str) -> dict[str, str]:
    """What Envoy adds to an allowed call of `method`: who is calling and,
    for a call that spends model capacity, the key's limits."""
    # The owner is percent-encoded UTF-8, as gRPC metadata must be printable ASCII.
    headers = dict(identity.identity_metadata(principal.key_id, principal.owner))
    if SCOPE_ADMIN not in principal.scopes:
        # An admin key may name any tenant (as over REST): no tenant bound.
        headers[TENANT_HEADER] = identity.encode_value(key_tenant(principal))
    headers.update(principal.models_metadata)
    if method in METERED_METHODS:
        headers[LIMITS_HEADER] = limits_value(principal.limits)
    return headers


# The gRPC code Envoy gives a refused call, from the check's HTTP status
# (Envoy's Grpc::Utility::httpToGrpcStatus): the rich status must agree.
_ENVOY_GRPC_CODES: Mapping[int, grpc.StatusCode] = MappingProxyType(
    {
        401: grpc.StatusCode.UNAUTHENTICATED,
        403: grpc.StatusCode.PERMISSION_DENIED,
        429: grpc.StatusCode.UNAVAILABLE,
        503: grpc.StatusCode.UNAVAILABLE,
    }
)
# ErrorInfo reasons as the services spell them, where the HTTP code differs.
_REASONS: Mapping[str, str] = MappingProxyType({"rate_limit_exceeded": "RATE_LIMITED"})


def refusal(error: ApiError) -> Response:
    """A refused check as Envoy passes it to a gRPC client: the plain message
    as body (Envoy's grpc-message) and the rich status in
    `grpc-status-details-bin`, with `retry-after` when there is one."""
    code = error.code or "permission_denied"
    metadata = {"retry_after_seconds": str(error.retry_after)} if error.retry_after else {}
    status = ServiceError(
        _ENVOY_GRPC_CODES.get(error.status, grpc.StatusCode.UNKNOWN),
        _REASONS.get(code, code.upper()),
        error.message,
        metadata=metadata,
    ).to_status()
    rich = dict(status.trailing_metadata)[STATUS_DETAILS_KEY]
    assert isinstance(rich, bytes)
    # Binary metadata is base64 on the wire; gRPC decoders accept it unpadded.
    headers = {STATUS_DETAILS_KEY: base64.b64encode(rich).decode().rstrip("=")}
    if error.retry_after:
        headers["retry-after"] = str(error.retry_after)
    return Response(error.message, error.status, headers=headers, media_type="text/plain")


class AnyMethod:
    """A request handler routed for every HTTP method (Starlette routes a plain
    function for GET only unless told a list)."""

    def __init__(self, handler: Callable[[Request], Awaitable[Response]]) -> None:
        self._app = request_response(handler)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._app(scope, receive, send)


def routes(gw: Gateway) -> list[BaseRoute]:
    """`/_authz/{package.Service}/{Method}` for every HTTP method (gRPC's is POST)."""

    async def grpc_authz(request: Request) -> Response:
        method = "/" + request.path_params["method"]
        try:
            principal = await gw.authenticate(request)
            principal.require_scope(required_scope(method))
        except ApiError as error:
            return refusal(error)
        return Response(headers=upstream_headers(principal, method))

    # Internal: Envoy's ext_authz check, prefixed to the gRPC call's path and
    # sent with its method (Envoy answers 404 for /_authz from outside).
    return [Route("/_authz/{method:path}", AnyMethod(grpc_authz))]
