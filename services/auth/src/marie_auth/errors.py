"""The auth service's errors: stable reasons in the "marie.auth" ErrorInfo domain."""

from __future__ import annotations

import grpc
from marie_kit.errors import ServiceError
from marie_kit.errors import invalid_argument as _invalid_argument

DOMAIN = "marie.auth"

INVALID_API_KEY = "INVALID_API_KEY"
KEY_NOT_FOUND = "KEY_NOT_FOUND"
KEY_INACTIVE = "KEY_INACTIVE"


def invalid_api_key() -> ServiceError:
    """The one answer for unknown, revoked, expired and malformed keys alike.

    The message and metadata never hint at which of those it was, so a caller
    probing keys learns nothing beyond "no".
    """
    return ServiceError(
        grpc.StatusCode.UNAUTHENTICATED, INVALID_API_KEY, "invalid API key", domain=DOMAIN
    )


def key_not_found(key_id: str) -> ServiceError:
    """NOT_FOUND for a key id (ids are not secret, so naming it is fine)."""
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        KEY_NOT_FOUND,
        f"API key {key_id!r} not found",
        domain=DOMAIN,
        metadata={"id": key_id},
    )


def key_inactive(key_id: str, state: str) -> ServiceError:
    """FAILED_PRECONDITION: the operation needs a key that is not revoked (or expired)."""
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        KEY_INACTIVE,
        f"API key {key_id!r} is {state}",
        domain=DOMAIN,
        metadata={"id": key_id, "state": state},
    )


def invalid_argument(field: str, message: str) -> ServiceError:
    """INVALID_ARGUMENT in the auth domain, naming the offending request field."""
    return _invalid_argument(field, message, domain=DOMAIN)
