"""Per-request context: the request id that follows a call across services."""

from __future__ import annotations

import contextvars
import re
import secrets

REQUEST_ID_HEADER = "x-request-id"
# Longer ids from callers are cut: the id is logged everywhere and must stay cheap.
MAX_REQUEST_ID_LENGTH = 128
# What a caller's id may hold: it becomes gRPC metadata (printable ASCII only,
# or the call fails) and a log field. Anything else is replaced, not repaired.
_SAFE_REQUEST_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID_LENGTH}}}")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def new_request_id() -> str:
    """A fresh request id: 96 random bits, hex encoded."""
    return secrets.token_hex(12)


def clean_request_id(value: str | None) -> str:
    """The caller's id when it is visible ASCII of at most 128 characters, else a new one."""
    if value and _SAFE_REQUEST_ID.fullmatch(value):
        return value
    return new_request_id()


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata that passes the current request id downstream."""
    rid = request_id_var.get()
    return ((REQUEST_ID_HEADER, rid),) if rid else ()
