"""What a request asks of the response cache, from its `Cache-Control` header
and its body's `metadata.cache`, as the providers' `CachePolicy`; and the
`x-marie-cache` answer header.

Both take `Cache-Control` directives (case-insensitive, comma-separated):
`max-age=N` asks for caching and accepts a stored answer at most N seconds
old (`max-age=0`: revalidate), `no-cache` skips the lookup and stores the
fresh answer, `no-store` neither looks up nor stores. `metadata.cache` also
takes `true` (cache, any age within the TTL) and `false` (as `no-store`).
Directives Marie does not use (`private`, `no-transform`, …) are ignored as
HTTP caches ignore them; a directive Marie uses with a malformed value
(`max-age=soon`) is a 400 naming where it came from, since the client meant
something by it. With both, the stricter wins: `no-store`, then `no-cache`,
then the smaller max-age.
"""

from __future__ import annotations

from collections.abc import Mapping

from marie.providers.v1 import provider_service_pb2 as pb

from marie_gateway.http.errors import bad_request

HEADER = "x-marie-cache"
#: The largest max-age the contract holds (RFC 9111 §1.2.2: a larger one means this).
MAX_AGE_LIMIT = 2**31 - 1
#: How modes rank when two sources say different things: the stricter wins.
_STRICTNESS = {
    pb.CACHE_MODE_UNSPECIFIED: 0,
    pb.CACHE_MODE_USE: 1,
    pb.CACHE_MODE_REFRESH: 2,
    pb.CACHE_MODE_BYPASS: 3,
}
#: What `metadata.cache` (and a header) holds at most.
MAX_VALUE_LENGTH = 512


def parse(value: str, where: str) -> pb.CachePolicy | None:
    """The policy `value` asks for; None when it asks nothing of a cache."""
    if len(value) > MAX_VALUE_LENGTH:
        raise bad_request(f"{where} is longer than {MAX_VALUE_LENGTH} characters.", where)
    mode = pb.CACHE_MODE_UNSPECIFIED
    max_age = 0
    for part in value.split(","):
        name, eq, arg = part.strip().partition("=")
        name = name.strip().lower()
        arg = arg.strip()
        if name == "no-store":
            mode = pb.CACHE_MODE_BYPASS
        elif name == "no-cache":
            mode = max(mode, pb.CACHE_MODE_REFRESH, key=_STRICTNESS.__getitem__)
        elif name == "max-age":
            seconds = _delta_seconds(arg if eq else "", where)
            if seconds == 0:
                mode = max(mode, pb.CACHE_MODE_REFRESH, key=_STRICTNESS.__getitem__)
            else:
                mode = max(mode, pb.CACHE_MODE_USE, key=_STRICTNESS.__getitem__)
                max_age = seconds if not max_age else min(max_age, seconds)
    if mode == pb.CACHE_MODE_UNSPECIFIED:
        return None
    return pb.CachePolicy(mode=mode, max_age_seconds=max_age if mode == pb.CACHE_MODE_USE else 0)


def _delta_seconds(arg: str, where: str) -> int:
    """RFC 9111's delta-seconds (digits; quoted tolerated), capped at 2^31-1."""
    text = arg[1:-1] if len(arg) >= 2 and arg[0] == arg[-1] == '"' else arg
    if not text.isascii() or not text.isdigit():
        raise bad_request(
            f"{where}: max-age takes a number of seconds (max-age=300), not {arg!r}.", where
        )
    return min(int(text), MAX_AGE_LIMIT)


def _metadata_policy(metadata: Mapping[str, object] | None) -> pb.CachePolicy | None:
    if not metadata or "cache" not in metadata:
        return None
    value = metadata["cache"]
    if value is True or value == "true":
        return pb.CachePolicy(mode=pb.CACHE_MODE_USE)
    if value is False or value == "false":
        return pb.CachePolicy(mode=pb.CACHE_MODE_BYPASS)
    if not isinstance(value, str):
        raise bad_request(
            "metadata.cache takes Cache-Control directives ('max-age=300', 'no-cache',"
            " 'no-store') or 'true'/'false'.",
            "metadata.cache",
        )
    policy = parse(value, "metadata.cache")
    if policy is None:
        raise bad_request(
            f"metadata.cache asks nothing of the cache: {value!r}; use 'max-age=N',"
            " 'no-cache', 'no-store', 'true' or 'false'.",
            "metadata.cache",
        )
    return policy


def request_policy(
    headers: Mapping[str, str], metadata: Mapping[str, object] | None = None
) -> pb.CachePolicy | None:
    """The policy a request asks for (None: the operation's default); 400 for a
    malformed one."""
    found = [
        p
        for p in (
            parse(headers["cache-control"], "Cache-Control")
            if "cache-control" in headers
            else None,
            _metadata_policy(metadata),
        )
        if p is not None
    ]
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    a, b = found
    mode = max(a.mode, b.mode, key=_STRICTNESS.__getitem__)
    if mode != pb.CACHE_MODE_USE:
        return pb.CachePolicy(mode=mode)
    ages = [p.max_age_seconds for p in found if p.max_age_seconds]
    return pb.CachePolicy(mode=mode, max_age_seconds=min(ages) if ages else 0)


def answer_header(result: int) -> tuple[bytes, bytes] | None:
    """The `x-marie-cache` header of an answer: hit or miss; none when the
    cache took no part."""
    if result == pb.CACHE_RESULT_HIT:
        return (HEADER.encode(), b"hit")
    if result == pb.CACHE_RESULT_MISS:
        return (HEADER.encode(), b"miss")
    return None
