"""The one error shape of the HTTP surface: OpenAI's envelope (its answer and
its schema), and the one table that maps gRPC errors from the services onto it."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import grpc
import orjson
from marie_kit.errors import ServiceError
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from marie_gateway.http.metrics import upstream_errors

log = logging.getLogger("marie.gateway.errors")


class ApiError(Exception):
    """An error answered as `{"error": {message, type, param, code}}` with `status`.

    A plain exception, not a frozen dataclass: Starlette clears the traceback
    of handled exceptions, which a frozen instance refuses."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        *,
        retry_after: int | None = None,
        close: bool = False,
        upstream: bool = False,
        reason: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        # Every error has a machine-readable code; the status's when none is given.
        self.code = code or DEFAULT_CODES.get(status, "error")
        self.param = param
        self.retry_after = retry_after
        # The connection cannot be reused (e.g. an unread body is still coming).
        self.close = close
        # A model server answered this (its refusal passed on): the request
        # reached a model, so it counts in the usage ledger even as a 4xx.
        self.upstream = upstream
        # The ErrorInfo reason of a service's error ("DEPLOYMENT_BUSY"), for
        # surfaces whose vocabulary tells more cases apart than OpenAI's.
        self.reason = reason

    def envelope(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.envelope())


#: The code of an error that names none, by status. A 400 about a request
#: field or parameter is `invalid_value` (`missing_field` when a required one
#: is absent, `invalid_json` for a body that is not a JSON object).
DEFAULT_CODES = {
    400: "invalid_value",
    401: "invalid_api_key",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    499: "client_closed",
    500: "server_error",
    501: "not_implemented",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout",
    507: "insufficient_storage",
}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


def invalid_api_key(message: str = "Invalid API key provided.") -> ApiError:
    return ApiError(401, message, "authentication_error", "invalid_api_key")


def permission_denied(message: str) -> ApiError:
    return ApiError(403, message, "permission_error", "permission_denied")


def service_unavailable(message: str) -> ApiError:
    return ApiError(503, message, "server_error", "service_unavailable", retry_after=1)


def client_closed() -> ApiError:
    """The client left before its answer: nobody reads this, the access log does."""
    return ApiError(499, "Client closed the request.", code="client_closed")


# (gRPC code, ErrorInfo reason or None for any) -> (HTTP status, type, code).
# Reasons are checked first, then the code alone.
_BY_REASON: dict[str, tuple[int, str, str]] = {
    "MODEL_NOT_FOUND": (404, "invalid_request_error", "model_not_found"),
    "PROVIDER_NOT_FOUND": (404, "invalid_request_error", "model_not_found"),
    "AMBIGUOUS_MODEL": (400, "invalid_request_error", "ambiguous_model"),
    "INVALID_API_KEY": (401, "authentication_error", "invalid_api_key"),
    "PROVIDER_UNAVAILABLE": (503, "server_error", "provider_unavailable"),
    "CIRCUIT_OPEN": (503, "server_error", "provider_unavailable"),
    "UPSTREAM_AUTH_FAILED": (503, "server_error", "provider_unavailable"),
    "INPUT_TOO_LARGE": (400, "invalid_request_error", "context_length_exceeded"),
    "UNSUPPORTED_BY_PROVIDER": (400, "invalid_request_error", "unsupported_by_provider"),
    "UPSTREAM_ERROR": (502, "server_error", "upstream_error"),
    "UPSTREAM_BAD_REQUEST": (400, "invalid_request_error", "upstream_bad_request"),
    "UPSTREAM_RATE_LIMITED": (429, "rate_limit_error", "rate_limit_exceeded"),
    "UPSTREAM_TIMEOUT": (504, "server_error", "upstream_timeout"),
    # A service's store has no room for the write (marie_kit.storage).
    "STORAGE_FULL": (507, "server_error", "insufficient_storage"),
}
_BY_CODE: dict[grpc.StatusCode, tuple[int, str, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", "failed_precondition"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", "permission_denied"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error", "not_implemented"),
    grpc.StatusCode.CANCELLED: (499, "server_error", "cancelled"),
}
_DEFAULT = (500, "server_error", "server_error")

# What a client is told of a server-side failure: plain words and the request
# id. The services' own messages name addresses, URLs and transport states
# ("ipv4:127.0.0.1:37217: Failed to connect"), which are for the operator: they
# go to the log line carrying the same request id.
_SERVER_SIDE_MESSAGES: dict[str, str] = {
    "PROVIDER_UNAVAILABLE": "The provider{of} is not reachable right now{for_model}",
    "UPSTREAM_ERROR": "The provider{of} failed to answer{for_model}",
    "UPSTREAM_TIMEOUT": "The provider{of} did not answer in time{for_model}",
    "CIRCUIT_OPEN": (
        "The provider{of} is unavailable{for_model} right now: its recent requests"
        " failed; retry in {retry_after} s"
    ),
    "UPSTREAM_AUTH_FAILED": (
        "The provider{of} refused the credentials Marie is configured with;"
        " an operator must check its API key"
    ),
}
_SERVER_SIDE_BY_STATUS: dict[int, str] = {
    501: "This operation is not implemented",
    507: "The store has no space left for this change; nothing was changed. Retry later",
    503: "A Marie service is unavailable right now",
    504: "The request took too long to complete",
}
# Where a provider's failure comes from (its ErrorInfo domain): told apart from a
# Marie service that is down, whose failure carries no provider.
PROVIDERS_DOMAIN = "marie.providers"
_PROVIDER_UNAVAILABLE = (503, "server_error", "provider_unavailable")


def _client_message(error: ServiceError, status: int, request_id: str) -> str:
    if status < 500:
        # Client errors are the services' own words about the request: useful.
        return error.message
    provider = error.metadata.get("provider")
    model = error.metadata.get("model")
    of = f" '{provider}'" if provider else ""
    for_model = f" for model '{model}'" if model else ""
    text = _SERVER_SIDE_MESSAGES.get(error.reason) or _SERVER_SIDE_BY_STATUS.get(status)
    if error.reason == "UPSTREAM_AUTH_FAILED" and (variable := error.metadata.get("api_key_env")):
        # No key at all: what to set is the fix, and a variable's name is no secret.
        text = f"The provider{{of}} has no API key: an operator must set {variable}"
    if text is None:
        text = "The server had an error processing the request"
    said = text.format(of=of, for_model=for_model, retry_after=_retry_after(error))
    return f"{said} (request id {request_id})."


def _mapping(error: ServiceError) -> tuple[int, str, str]:
    found = _BY_REASON.get(error.reason)
    if found is not None:
        return found
    if (
        error.code == grpc.StatusCode.UNAVAILABLE
        and error.domain == PROVIDERS_DOMAIN
        and "provider" in error.metadata
    ):
        # An upstream provider is unavailable, not a Marie service.
        return _PROVIDER_UNAVAILABLE
    return _BY_CODE.get(error.code) or _DEFAULT


def from_service_error(error: ServiceError, request_id: str) -> ApiError:
    """Map a service's error onto the OpenAI envelope."""
    upstream_errors(error.reason).inc()
    status, type_, code = _mapping(error)
    if status >= 500:
        log.warning(
            "backend error",
            extra={
                "grpc_code": error.code.name,
                "reason": error.reason,
                "detail": error.message,
                **{f"info_{k}": v for k, v in error.metadata.items()},
            },
        )
    message = _client_message(error, status, request_id)
    param = error.metadata.get("field") if status < 500 else None
    retry_after = _retry_after(error) if status in (429, 503, 507) else None
    return ApiError(
        status,
        message,
        type_,
        code,
        param,
        retry_after=retry_after,
        upstream="upstream_status" in error.metadata,
        reason=error.reason,
    )


def _retry_after(error: ServiceError) -> int:
    """Whole seconds to wait: what the upstream asked for, when providers passed it on."""
    try:
        asked = float(error.metadata.get("retry_after_seconds", "1"))
    except ValueError:
        asked = 1.0
    return max(1, math.ceil(asked)) if math.isfinite(asked) else 1


def from_rpc_error(error: grpc.aio.AioRpcError, request_id: str) -> ApiError:
    return from_service_error(ServiceError.from_rpc_error(error), request_id)


def error_response(error: ApiError, headers: Mapping[str, str] | None = None) -> Response:
    """The OpenAI envelope of `error`, with `Retry-After` when it has one."""
    out = dict(headers or {})
    if error.retry_after:
        out["retry-after"] = str(error.retry_after)
    return Response(error.body(), error.status, headers=out, media_type="application/json")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(frozen=True)

    message: str
    type: str = Field(description="invalid_request_error, authentication_error, …")
    param: str | None = Field(description="The request field at fault, when one is.")
    code: str | None = Field(description="A stable machine-readable code.")


class ErrorEnvelope(BaseModel):
    """Every error, on every route: OpenAI's envelope."""

    model_config = ConfigDict(frozen=True)

    error: ErrorDetail
