"""The admin API over auth's key RPCs (scope `admin`): `POST/GET /api/keys`,
`GET/PATCH/DELETE /api/keys/{key_id}`, `POST /api/keys/{key_id}/rotate`.

The plaintext of a key is in the answers of create and rotate only. Auth's
rules apply unchanged (its INVALID_ARGUMENT names the field, answered as 400
with `param`); a revoked key cannot be changed (400 `failed_precondition`).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp
from marie.auth.v1 import auth_service_pb2 as auth_pb
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from marie_gateway.access.keys import SCOPE_ADMIN
from marie_gateway.api.schemas import ApiKeyList, ApiKeyOut, CreatedApiKey, KeyLimitsOut
from marie_gateway.core import Gateway
from marie_gateway.http.bodies import JSONResponse, parse_body
from marie_gateway.http.context import current_request_id
from marie_gateway.http.errors import bad_request, from_rpc_error
from marie_gateway.http.params import MAX_PAGE_TOKEN_LENGTH, int_query, path_text, text_query

_STATES: dict[int, Literal["active", "revoked", "expired"]] = {
    auth_pb.API_KEY_STATE_ACTIVE: "active",
    auth_pb.API_KEY_STATE_REVOKED: "revoked",
    auth_pb.API_KEY_STATE_EXPIRED: "expired",
}


# Auth's own limits (services/auth, spec_rules.py), checked here too so that a
# value far too long is refused before it travels anywhere.
MAX_NAME = 100
MAX_OWNER = 256
MAX_MODEL_PATTERN = 256
MAX_ALLOWED_MODELS = 256
MAX_SCOPE = 32
MAX_LABELS = 64
Scope = Annotated[str, StringConstraints(max_length=MAX_SCOPE)]
ModelPattern = Annotated[str, StringConstraints(min_length=1, max_length=MAX_MODEL_PATTERN)]
LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=63)]
LabelValue = Annotated[str, StringConstraints(max_length=256)]


class KeyLimitsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int = Field(0, ge=0, le=2**31 - 1)
    tokens_per_minute: int = Field(0, ge=0, le=2**31 - 1)
    tokens_per_day: int = Field(0, ge=0, le=2**63 - 1)
    max_concurrent_requests: int = Field(0, ge=0, le=2**31 - 1)


class KeySettings(BaseModel):
    """A key's settings; in a PATCH, only the fields sent change."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="1 to 100 characters.", max_length=MAX_NAME)
    owner: str | None = Field(None, description="User or team id.", max_length=MAX_OWNER)
    scopes: list[Scope] | None = Field(
        None,
        description="chat, models:read, embeddings, memory, admin; [] means all but admin.",
        max_length=16,
    )
    allowed_models: list[ModelPattern] | None = Field(
        None,
        description="Model ids or 'provider/*'; [] means every model.",
        max_length=MAX_ALLOWED_MODELS,
    )
    limits: KeyLimitsIn | None = None
    expires_at: dt.datetime | None = Field(
        None, description="ISO 8601; null (in a PATCH) removes the expiry."
    )
    labels: dict[LabelKey, LabelValue] | None = Field(None, max_length=MAX_LABELS)


class CreateKeyRequest(KeySettings):
    name: str | None = Field(None, description="1 to 100 characters; required.")


class RotateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_period_seconds: int = Field(
        0, ge=0, le=86_400, description="How long the old secret keeps working; 0: revoked now."
    )


_MASK_PATHS = {
    "name": "name",
    "owner": "owner",
    "scopes": "scopes",
    "allowed_models": "allowed_models",
    "limits": "limits",
    "expires_at": "expire_time",
    "labels": "labels",
}


def _iso(ts: Timestamp, present: bool) -> str | None:
    if not present:
        return None
    return ts.ToDatetime(dt.UTC).isoformat().replace("+00:00", "Z")


def key_out(key: auth_pb.ApiKey) -> ApiKeyOut:
    limits = key.limits
    return ApiKeyOut(
        object="api_key",
        id=key.id,
        name=key.name,
        owner=key.owner,
        display=key.display,
        state=_STATES.get(key.state, "active"),
        scopes=list(key.scopes),
        allowed_models=list(key.allowed_models),
        limits=KeyLimitsOut(
            requests_per_minute=limits.requests_per_minute,
            tokens_per_minute=limits.tokens_per_minute,
            tokens_per_day=limits.tokens_per_day,
            max_concurrent_requests=limits.max_concurrent_requests,
        ),
        labels=dict(key.labels),
        created_at=_iso(key.create_time, key.HasField("create_time")),
        updated_at=_iso(key.update_time, key.HasField("update_time")),
        expires_at=_iso(key.expire_time, key.HasField("expire_time")),
        revoked_at=_iso(key.revoke_time, key.HasField("revoke_time")),
        last_used_at=_iso(key.last_used_time, key.HasField("last_used_time")),
    )


def _apply(settings: KeySettings, target: auth_pb.ApiKey | auth_pb.CreateApiKeyRequest) -> None:
    if settings.name is not None:
        target.name = settings.name
    if settings.owner is not None:
        target.owner = settings.owner
    if settings.scopes is not None:
        target.scopes.extend(settings.scopes)
    if settings.allowed_models is not None:
        target.allowed_models.extend(settings.allowed_models)
    if settings.limits is not None:
        target.limits.CopyFrom(auth_pb.KeyLimits(**settings.limits.model_dump()))
    if settings.expires_at is not None:
        expires = settings.expires_at
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=dt.UTC)
        target.expire_time.FromDatetime(expires)
    if settings.labels is not None:
        target.labels.update(settings.labels)


class KeyRoutes:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/api/keys", self.create, methods=["POST"]),
            Route("/api/keys", self.list, methods=["GET"]),
            Route("/api/keys/{key_id}", self.get, methods=["GET"]),
            Route("/api/keys/{key_id}", self.update, methods=["PATCH"]),
            Route("/api/keys/{key_id}", self.revoke, methods=["DELETE"]),
            Route("/api/keys/{key_id}/rotate", self.rotate, methods=["POST"]),
        ]

    async def _call(self, method: str, message: Any) -> Any:
        try:
            return await getattr(self.gw.backends().auth, method)(
                message, timeout=self.gw.settings.control_timeout_seconds
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, current_request_id()) from None

    async def create(self, request: Request) -> Response:
        await self.gw.enter(request, SCOPE_ADMIN)
        body = parse_body(CreateKeyRequest, await self.gw.read_body(request))
        if not body.name:
            raise bad_request("'name' is required.", "name")
        message = auth_pb.CreateApiKeyRequest()
        _apply(body, message)
        created = await self._call("CreateApiKey", message)
        out = CreatedApiKey(key=created.key, api_key=key_out(created.api_key))
        return JSONResponse(out.model_dump(mode="json"))

    async def list(self, request: Request) -> Response:
        await self.gw.enter(request, SCOPE_ADMIN)
        q = request.query_params
        size = int_query(request, "page_size", default=50, minimum=1, maximum=500)
        reply = await self._call(
            "ListApiKeys",
            auth_pb.ListApiKeysRequest(
                owner=text_query(request, "owner", MAX_OWNER),
                include_inactive=q.get("include_inactive", "").lower() in ("1", "true"),
                page_size=size,
                page_token=text_query(request, "page_token", MAX_PAGE_TOKEN_LENGTH),
            ),
        )
        out = ApiKeyList(
            object="list",
            data=[key_out(k) for k in reply.api_keys],
            next_page_token=reply.next_page_token or None,
        )
        return JSONResponse(out.model_dump(mode="json"))

    async def get(self, request: Request) -> Response:
        await self.gw.enter(request, SCOPE_ADMIN)
        reply = await self._call(
            "GetApiKey", auth_pb.GetApiKeyRequest(id=path_text(request, "key_id"))
        )
        return JSONResponse(key_out(reply.api_key).model_dump(mode="json"))

    async def update(self, request: Request) -> Response:
        await self.gw.enter(request, SCOPE_ADMIN)
        body = parse_body(KeySettings, await self.gw.read_body(request))
        sent = body.model_fields_set
        if not sent:
            raise bad_request("Send at least one setting to change.")
        for name in sent - {"expires_at"}:
            if getattr(body, name) is None:
                raise bad_request(f"'{name}' must not be null.", name)
        key = auth_pb.ApiKey(id=path_text(request, "key_id"))
        _apply(body, key)
        reply = await self._call(
            "UpdateApiKey",
            auth_pb.UpdateApiKeyRequest(
                api_key=key, update_mask=FieldMask(paths=sorted(_MASK_PATHS[n] for n in sent))
            ),
        )
        return JSONResponse(key_out(reply.api_key).model_dump(mode="json"))

    async def revoke(self, request: Request) -> Response:
        await self.gw.enter(request, SCOPE_ADMIN)
        reply = await self._call(
            "RevokeApiKey", auth_pb.RevokeApiKeyRequest(id=path_text(request, "key_id"))
        )
        return JSONResponse(key_out(reply.api_key).model_dump(mode="json"))

    async def rotate(self, request: Request) -> Response:
        await self.gw.enter(request, SCOPE_ADMIN)
        raw = await self.gw.read_body(request)
        body = (
            parse_body(RotateKeyRequest, raw) if raw else RotateKeyRequest(grace_period_seconds=0)
        )
        reply = await self._call(
            "RotateApiKey",
            auth_pb.RotateApiKeyRequest(
                id=path_text(request, "key_id"),
                grace_period_seconds=body.grace_period_seconds,
            ),
        )
        out = CreatedApiKey(
            key=reply.key,
            api_key=key_out(reply.api_key),
            previous_id=reply.previous_id,
        )
        return JSONResponse(out.model_dump(mode="json"))
