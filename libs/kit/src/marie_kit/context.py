"""Per-request context: the request id that follows a call across services."""

from __future__ import annotations

import contextvars
import secrets

REQUEST_ID_HEADER = "x-request-id"
# Longer ids from callers are cut: the id is logged everywhere and must stay cheap.
MAX_REQUEST_ID_LENGTH = 128

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def new_request_id() -> str:
    """A fresh request id: 96 random bits, hex encoded."""
    return secrets.token_hex(12)


def clean_request_id(value: str | None) -> str:
    """The caller's id when it is usable, else a new one."""
    if value and len(value) <= MAX_REQUEST_ID_LENGTH and value.isprintable():
        return value
    return new_request_id()


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata that passes the current request id downstream."""
    rid = request_id_var.get()
    return ((REQUEST_ID_HEADER, rid),) if rid else ()
