"""Errors in Anthropic's shape: `{"type": "error", "error": {"type", "message"},
"request_id"}` with Anthropic's statuses and error types. The gateway's shared
code raises `ApiError` (OpenAI's vocabulary); this surface converts it at its
boundary, so key failures, limits, body bounds and unknown paths under
`/v1/messages` all answer as Anthropic would."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from marie_gateway.http.context import current_request_id
from marie_gateway.http.errors import ApiError

#: The header Anthropic's clients always send; on `/v1/models` it selects this shape.
VERSION_HEADER = "anthropic-version"
#: Where Anthropic's answers carry the request id (its SDKs read it from there).
REQUEST_ID_HEADER = "request-id"
#: How a token count was made (`upstream` or `estimate`), on its answer.
COUNT_HEADER = "x-marie-token-count"
#: What browsers may read of this surface's answers (besides the gateway's own).
EXPOSED_HEADERS = (
    REQUEST_ID_HEADER,
    COUNT_HEADER,
    *(
        f"anthropic-ratelimit-{name}-{what}"
        for name in ("requests", "tokens")
        for what in ("limit", "remaining", "reset")
    ),
)
#: The status Anthropic answers when it is overloaded; its SDKs retry it.
OVERLOADED = 529

# Anthropic's error type of each status it uses.
_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    504: "timeout_error",
    OVERLOADED: "overloaded_error",
}
# Providers' reasons that mean "the model's deployments are full or resting":
# Anthropic's 529, which clients retry after a while.
_OVERLOADED_REASONS = frozenset({"DEPLOYMENT_BUSY", "CIRCUIT_OPEN"})


def is_anthropic(request: Request) -> bool:
    """Whether the request's errors are answered in Anthropic's shape: every
    path under `/v1/messages`, and `/v1/models…` when the caller sent
    `anthropic-version` (as Anthropic's clients always do)."""
    path: str = request.scope["path"]
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return True
    return path.startswith("/v1/models") and VERSION_HEADER in request.headers


def status_and_type(error: ApiError) -> tuple[int, str]:
    """Anthropic's status and error type for an error of the gateway."""
    if error.reason in _OVERLOADED_REASONS or error.status == 503:
        return OVERLOADED, "overloaded_error"
    status = 404 if error.status == 405 else error.status
    kind = _TYPES.get(status)
    if kind is None:
        kind = "api_error" if status >= 500 else "invalid_request_error"
    return status, kind


def envelope(error: ApiError, request_id: str | None = None) -> dict[str, Any]:
    """The error object (also the data of a stream's `error` event)."""
    _, kind = status_and_type(error)
    out: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": error.message}}
    out["request_id"] = request_id or current_request_id()
    return out


def error_response(error: ApiError, headers: Mapping[str, str] | None = None) -> Response:
    """The whole answer: Anthropic's status and envelope, `retry-after` when
    the error has one, and `request-id`."""
    status, _ = status_and_type(error)
    request_id = current_request_id()
    out = {**(headers or {}), REQUEST_ID_HEADER: request_id}
    if error.retry_after:
        out["retry-after"] = str(error.retry_after)
    elif status == OVERLOADED:
        out["retry-after"] = "1"
    if error.close:
        out["connection"] = "close"
    body = orjson.dumps(envelope(error, request_id))
    return Response(body, status, headers=out, media_type="application/json")


# -- described for the OpenAPI document ------------------------------------------


class AnthropicErrorDetail(BaseModel):
    model_config = ConfigDict(frozen=True)

    type: Literal[
        "invalid_request_error",
        "authentication_error",
        "billing_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "rate_limit_error",
        "timeout_error",
        "api_error",
        "overloaded_error",
    ]
    message: str


class AnthropicError(BaseModel):
    """Every error of the Anthropic surface (and the data of a stream's
    `error` event): 400, 401, 403, 404, 413, 429 (with `retry-after`), 500,
    504 or 529 (overloaded: every deployment of the model busy or resting)."""

    model_config = ConfigDict(frozen=True)

    type: Literal["error"]
    error: AnthropicErrorDetail
    request_id: str = Field(description="Also in the `request-id` and `x-request-id` headers.")
