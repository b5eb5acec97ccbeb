"""The verified caller identity that travels with a gRPC call as metadata.

Set by Envoy's key check (for calls from outside) or by the gateway (for the
calls it makes for a request); Envoy strips any client-sent `x-marie-*`
header, so a service may trust these. The owner is percent-encoded UTF-8
(gRPC metadata values are printable ASCII).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote, unquote

KEY_ID_HEADER = "x-marie-key-id"
OWNER_HEADER = "x-marie-owner"
#: A key's allowed models (percent-encoded patterns, comma-separated); absent
#: for a key that may use every model. Providers checks it
#: (marie_providers.routing.model_access); the memory service passes it on to
#: the model calls it makes for the key.
ALLOWED_MODELS_HEADER = "x-marie-allowed-models"

# Every call of a key carries its owner (twice through Envoy: owner and
# tenant) and allowed models as metadata, which gRPC refuses past 8 KiB in
# all: auth keeps a key's settings within these encoded sizes.
MAX_OWNER_VALUE = 1024
MAX_ALLOWED_MODELS_VALUE = 2048

# Printable ASCII but '%' and space stays readable; the rest is percent-encoded.
_OWNER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")


def encode_value(text: str) -> str:
    """`text` as a metadata value: printable ASCII, the rest percent-encoded UTF-8."""
    return quote(text, safe=_OWNER_SAFE)


def allowed_models_value(patterns: Iterable[str]) -> str:
    """The `ALLOWED_MODELS_HEADER` value of a key's allowed models."""
    return ",".join(quote(p, safe="/*:@+") for p in patterns)


def identity_metadata(key_id: str, owner: str) -> tuple[tuple[str, str], ...]:
    """The metadata naming a caller (none for an empty key id)."""
    if not key_id:
        return ()
    return ((KEY_ID_HEADER, key_id), (OWNER_HEADER, encode_value(owner)))


def identity_from_metadata(
    metadata: Iterable[tuple[str, str | bytes]] | None,
) -> tuple[str, str]:
    """(key id, owner) of a call's metadata; empty strings when absent."""
    key_id = owner = ""
    for name, value in metadata or ():
        if not isinstance(value, str):
            continue
        if name == KEY_ID_HEADER:
            key_id = value
        elif name == OWNER_HEADER:
            owner = unquote(value)
    return key_id, owner


def allowed_models_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The `ALLOWED_MODELS_HEADER` value of a call's metadata, as sent; "" when absent."""
    for name, value in metadata or ():
        if name == ALLOWED_MODELS_HEADER and isinstance(value, str):
            return value
    return ""
