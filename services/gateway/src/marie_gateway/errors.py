"""The one error shape of the HTTP surface: OpenAI's envelope, and the one table
that maps gRPC errors from the services onto it."""

from __future__ import annotations

import grpc
import orjson
from marie_kit.errors import ServiceError


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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after

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


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


def invalid_api_key(message: str = "Invalid API key provided.") -> ApiError:
    return ApiError(401, message, "authentication_error", "invalid_api_key")


def permission_denied(message: str) -> ApiError:
    return ApiError(403, message, "permission_error", "permission_denied")


# (gRPC code, ErrorInfo reason or None for any) -> (HTTP status, type, code).
# Reasons are checked first, then the code alone.
_BY_REASON: dict[str, tuple[int, str, str]] = {
    "MODEL_NOT_FOUND": (404, "invalid_request_error", "model_not_found"),
    "PROVIDER_NOT_FOUND": (404, "invalid_request_error", "model_not_found"),
    "AMBIGUOUS_MODEL": (400, "invalid_request_error", "ambiguous_model"),
    "INVALID_API_KEY": (401, "authentication_error", "invalid_api_key"),
    "PROVIDER_UNAVAILABLE": (503, "server_error", "provider_unavailable"),
    "UPSTREAM_ERROR": (502, "server_error", "upstream_error"),
    "UPSTREAM_BAD_REQUEST": (400, "invalid_request_error", "upstream_bad_request"),
    "UPSTREAM_RATE_LIMITED": (429, "rate_limit_error", "rate_limit_exceeded"),
    "UPSTREAM_TIMEOUT": (504, "server_error", "upstream_timeout"),
}
_BY_CODE: dict[grpc.StatusCode, tuple[int, str, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_request"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", "invalid_request"),
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
# Messages of these are the services' own words, safe and useful to pass on;
# for internal errors the client gets a generic message and the request id.
_SERVER_SIDE = {500}


def from_service_error(error: ServiceError, request_id: str) -> ApiError:
    """Map a service's error onto the OpenAI envelope."""
    status, type_, code = _BY_REASON.get(error.reason) or _BY_CODE.get(error.code) or _DEFAULT
    message = error.message
    if status in _SERVER_SIDE:
        message = f"The server had an error processing the request (request id {request_id})."
    param = error.metadata.get("field")
    retry_after = 1 if status == 429 else None
    return ApiError(status, message, type_, code, param, retry_after=retry_after)


def from_rpc_error(error: grpc.aio.AioRpcError, request_id: str) -> ApiError:
    return from_service_error(ServiceError.from_rpc_error(error), request_id)
