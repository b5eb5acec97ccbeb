"""Anthropic's rate-limit headers (`anthropic-ratelimit-requests-limit`,
`-remaining`, `-reset` and the `-tokens-` ones) beside the `x-ratelimit-*`
headers every limited answer carries: the same figures, with the reset as
Anthropic writes it, an RFC 3339 time."""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any

from marie_gateway.http.context import RATE_HEADERS_KEY

_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?$")


def seconds_of(text: str) -> float:
    """The seconds of a duration as `x-ratelimit-reset-*` writes it ("12ms", "1.5s", "6m0s")."""
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    match = _DURATION.match(text)
    if match is None:
        return 0.0
    hours, minutes, seconds = match.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)


def add_anthropic_headers(scope: MutableMapping[str, Any]) -> None:
    """Add Anthropic's counterparts of the request's `x-ratelimit-*` headers."""
    headers: list[tuple[bytes, bytes]] = scope.get(RATE_HEADERS_KEY) or []
    if not headers:
        return
    now = datetime.now(UTC)
    extra: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if not name.startswith(b"x-ratelimit-"):
            continue  # Marie's own (x-marie-budget-*) go out as they are
        what, _, kind = name.removeprefix(b"x-ratelimit-").partition(b"-")
        out = b"anthropic-ratelimit-" + kind + b"-" + what
        if what == b"reset":
            when = now + timedelta(seconds=seconds_of(value.decode()))
            extra.append((out, when.strftime("%Y-%m-%dT%H:%M:%SZ").encode()))
        else:
            extra.append((out, value))
    scope[RATE_HEADERS_KEY] = headers + extra
