"""Page sizes and opaque page tokens bound to the request that produced them."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from marie_memory.errors import invalid_argument


def page_size(requested: int, default: int, maximum: int, field: str = "page_size") -> int:
    """0 means the default, above the maximum means the maximum, negative is refused."""
    if requested < 0:
        raise invalid_argument(field, f"{field} must not be negative")
    if requested == 0:
        return default
    return min(requested, maximum)


def _fingerprint(fields: Any) -> str:
    raw = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def encode_token(cursor: Any, fields: Any) -> str:
    """A token carrying `cursor`, valid only with the same request `fields`."""
    raw = json.dumps({"c": cursor, "f": _fingerprint(fields)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, fields: Any) -> Any:
    """The cursor in `token`, or None for an empty token; INVALID_ARGUMENT when the
    token is malformed or was made for other request fields."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise invalid_argument("page_token", "malformed page token") from exc
    if not isinstance(value, dict) or "c" not in value:
        raise invalid_argument("page_token", "malformed page token")
    if value.get("f") != _fingerprint(fields):
        raise invalid_argument("page_token", "page token was made for a request with other fields")
    return value["c"]
