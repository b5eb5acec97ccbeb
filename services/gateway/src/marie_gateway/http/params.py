"""Query and path parameters, read within bounds: a number out of its range
(`limit=99999999999999999999`, `nan`, `inf`) or a value longer than any
real one (a 5,000-character id) is a 400 naming the parameter, never a 500
or a call that carries it on to a service."""

from __future__ import annotations

import math
import re

from starlette.requests import Request

from marie_gateway.http.errors import bad_request

#: The largest value of a protobuf int32 (page sizes, top_k).
INT32_MAX = 2**31 - 1
#: The longest id a path or query may name (every id Marie makes is far shorter).
MAX_ID_LENGTH = 128
#: The longest model name (as in the request bodies).
MAX_MODEL_LENGTH = 512
#: The longest page token (tokens are opaque, but never this long).
MAX_PAGE_TOKEN_LENGTH = 4096

_INTEGER = re.compile(r"-?[0-9]{1,30}")


def int_query(
    request: Request, name: str, *, default: int = 0, minimum: int = 0, maximum: int = INT32_MAX
) -> int:
    """An integer query parameter in [minimum, maximum]; `default` when absent or empty."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if _INTEGER.fullmatch(raw) is None:
        raise bad_request(f"'{name}' must be an integer.", name)
    value = int(raw)
    if not minimum <= value <= maximum:
        raise bad_request(f"'{name}' must be from {minimum} to {maximum}.", name)
    return value


def float_query(
    request: Request, name: str, *, default: float = 0.0, minimum: float, maximum: float
) -> float:
    """A finite number in [minimum, maximum]; `default` when absent or empty."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise bad_request(f"'{name}' must be a number.", name) from None
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise bad_request(f"'{name}' must be a number from {minimum:g} to {maximum:g}.", name)
    return value


def text_query(request: Request, name: str, max_length: int, default: str = "") -> str:
    """A text query parameter of at most `max_length` characters."""
    value = request.query_params.get(name, default)
    if len(value) > max_length:
        raise bad_request(f"'{name}' is longer than {max_length} characters.", name)
    return value


def texts_query(request: Request, name: str, max_length: int) -> list[str]:
    """Every value of a repeated query parameter, each at most `max_length` characters."""
    values = request.query_params.getlist(name)
    if any(len(v) > max_length for v in values):
        raise bad_request(f"'{name}' values are at most {max_length} characters.", name)
    return values


def path_text(request: Request, name: str, max_length: int = MAX_ID_LENGTH) -> str:
    """A path parameter (an id, by default) of at most `max_length` characters."""
    value: str = request.path_params[name]
    if len(value) > max_length:
        raise bad_request(f"'{name}' is longer than {max_length} characters.", name)
    return value
