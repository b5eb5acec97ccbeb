"""What a call does with the response cache, and the key of its answer.

The key is a SHA-256 of the tenant (the caller's owner, or its key id for a
key without one), the operation, the deployments the route resolved to (in
the order they would be tried: a key allowed fewer models, or a split's
other arm, resolves to others) and the request as the upstream would get
it, with what does not change the answer cleared: the completion id, the
end-user id, `aggregate` (a whole answer and a stream are the same answer)
and the cache policy itself. Messages are in it as they arrive here, so an
answer built on one user's memories (the gateway adds them to the messages)
is never the answer to another's.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from marie.providers.v1 import provider_service_pb2 as pb
from marie_kit.identity import identity_from_metadata

from marie_providers.errors import bad_request

#: Bumped whenever what goes into a key changes: old entries then just miss.
KEY_VERSION = b"marie-cache-v1"

Request = pb.StreamChatCompletionRequest | pb.StreamCompletionRequest | pb.CreateEmbeddingsRequest


@dataclass(frozen=True, slots=True)
class Use:
    """How one call uses the cache: look up (answers at most `max_age` seconds
    old), store its answer, or both."""

    lookup: bool
    store: bool
    max_age: float


BYPASS = Use(lookup=False, store=False, max_age=0.0)
_MODES = frozenset(pb.CacheMode.values())


def tenant_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """Whose answers a call may see: its owner (or its key, for a key without
    an owner), tagged so the two never collide; "" for a call that names no
    caller (the deployment's own), which never uses the cache."""
    key_id, owner = identity_from_metadata(metadata)
    if owner:
        return "owner\x00" + owner
    if key_id:
        return "key\x00" + key_id
    return ""


def check_policy(policy: pb.CachePolicy) -> None:
    """INVALID_ARGUMENT for a policy no caller could mean."""
    if policy.mode not in _MODES:
        raise bad_request("cache.mode", f"unknown cache mode {policy.mode}")
    if policy.max_age_seconds < 0:
        raise bad_request("cache.max_age_seconds", "cache.max_age_seconds must not be negative")


def decide(
    policy: pb.CachePolicy,
    *,
    default_on: bool,
    ttl: float,
) -> Use:
    """The call's use of the cache: its policy, or the operation's default."""
    mode = policy.mode
    if mode == pb.CACHE_MODE_UNSPECIFIED:
        mode = pb.CACHE_MODE_USE if default_on else pb.CACHE_MODE_BYPASS
    if mode == pb.CACHE_MODE_BYPASS:
        return BYPASS
    max_age = ttl
    if policy.max_age_seconds:
        max_age = min(float(policy.max_age_seconds), ttl)
    return Use(lookup=mode == pb.CACHE_MODE_USE, store=True, max_age=max_age)


def chat_default(request: pb.StreamChatCompletionRequest | pb.StreamCompletionRequest) -> bool:
    """Whether chat the caller did not ask about may be cached by default (when
    the operator turns that on): only greedy sampling (temperature 0 given),
    whose answer a second call would repeat."""
    sampling = request.sampling
    return sampling.HasField("temperature") and sampling.temperature == 0


def _part(out: hashlib._Hash, data: bytes) -> None:
    # Length-prefixed: no two sequences of parts hash the same bytes.
    out.update(len(data).to_bytes(8, "big"))
    out.update(data)


def cache_key(tenant: str, operation: str, deployments: Sequence[str], request: Request) -> str:
    """The hex key of `request`'s answer for `tenant` on those deployments."""
    normal = copy.deepcopy(request)
    normal.ClearField("user")
    normal.ClearField("cache")
    if not isinstance(normal, pb.CreateEmbeddingsRequest):
        normal.ClearField("completion_id")
        normal.ClearField("aggregate")
    digest = hashlib.sha256(KEY_VERSION)
    _part(digest, tenant.encode())
    _part(digest, operation.encode())
    _part(digest, "\n".join(deployments).encode())
    _part(digest, normal.SerializeToString(deterministic=True))
    return digest.hexdigest()
