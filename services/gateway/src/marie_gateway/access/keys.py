"""API-key checks on the hot path: extraction from headers, a short-lived
in-process cache of validations, and a watcher of auth's key events that drops
revoked keys from the cache at once.

While the event stream is down, every request is validated by the auth
service, so a revocation is not missed while auth can answer. When auth cannot
be reached at all, a key validated recently keeps working until its cached
entry expires (at most `key_cache_ttl_seconds`); a key not in the cache gets
503 (auth unavailable), never 401. When the stream is back (SYNC) the whole
cache is dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field

import grpc
from marie.auth.v1 import auth_service_pb2 as auth_pb
from marie.auth.v1 import auth_service_pb2_grpc as auth_grpc
from marie_kit.apikeys import is_well_formed
from marie_kit.context import outgoing_metadata
from marie_kit.identity import ALLOWED_MODELS_HEADER, allowed_models_value, identity_metadata
from marie_kit.limits import NO_LIMITS, Limits

from marie_gateway.http.errors import from_rpc_error, invalid_api_key, permission_denied
from marie_gateway.http.metrics import KEY_CACHE_HIT, KEY_CACHE_MISS, KEY_CACHE_STALE

log = logging.getLogger("marie.gateway.access")

# Scopes a key needs (the auth service's names; "admin" implies every other).
SCOPE_CHAT = "chat"
SCOPE_MODELS = "models:read"
SCOPE_EMBEDDINGS = "embeddings"
SCOPE_MEMORY = "memory"
SCOPE_ADMIN = "admin"
_RECONNECT_MAX_SECONDS = 5.0
_CACHE_MAX_ENTRIES = 100_000
#: A key validated within this time is never held back by the invalid-key
#: slow-down of its address (it is still checked: cached, or asked of auth).
RECENTLY_VALID_SECONDS = 24 * 3600.0
#: A key refused within this time is refused again without asking auth, and
#: counts once against its address however often it is retried.
RECENTLY_REFUSED_SECONDS = 60.0
_RECENT_MAX_ENTRIES = 100_000
# Auth could not answer: the cache may stand in for it.
_AUTH_DOWN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, from a validated key."""

    key_id: str
    owner: str
    scopes: frozenset[str]
    allowed_models: tuple[str, ...]
    limits: Limits = NO_LIMITS
    #: `allowed_models` as metadata for the services, which check the resolved
    #: model before any upstream call (providers' routing/model_access.py); empty when
    #: unrestricted. Envoy's key check sends the same header.
    models_metadata: tuple[tuple[str, str], ...] = field(init=False, default=())
    #: The key id and owner as metadata: whose entries of the providers'
    #: response cache a model call may see (marie_providers.cache).
    identity: tuple[tuple[str, str], ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if self.allowed_models:
            value = allowed_models_value(self.allowed_models)
            object.__setattr__(self, "models_metadata", ((ALLOWED_MODELS_HEADER, value),))
        object.__setattr__(self, "identity", identity_metadata(self.key_id, self.owner))

    def require_scope(self, scope: str) -> None:
        if scope not in self.scopes and SCOPE_ADMIN not in self.scopes:
            raise permission_denied(f"This API key lacks the '{scope}' scope.")

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata of a call made for this caller: the request id and, for a
        key limited to some models, those models."""
        return outgoing_metadata() + self.models_metadata

    def model_call_metadata(self) -> tuple[tuple[str, str], ...]:
        """`call_metadata` of a generation or embeddings call: with the caller's
        identity, by which the providers' response cache keeps tenants apart."""
        return outgoing_metadata() + self.models_metadata + self.identity


def extract_key(authorization: str | None, x_api_key: str | None) -> str:
    """The key from `Authorization: Bearer …` or `X-API-Key`; 401 when absent."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise invalid_api_key("Malformed Authorization header: expected 'Bearer <key>'.")
        return token.strip()
    if x_api_key:
        return x_api_key.strip()
    raise invalid_api_key(
        "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
        "or in the 'X-API-Key' header."
    )


class KeyValidator:
    """Validates keys through the auth service, caching answers briefly."""

    def __init__(self, channel: grpc.aio.Channel, *, cache_ttl: float, timeout: float) -> None:
        self._stub = auth_grpc.AuthServiceStub(channel)
        self._cache_ttl = cache_ttl
        self._timeout = timeout
        # sha256(key) -> (principal, expires at monotonic); no plaintext keys kept.
        self._cache: dict[bytes, tuple[Principal, float]] = {}
        # sha256(key) -> when it last validated / was last refused (monotonic),
        # oldest first; digests only, never a key.
        self._valid_seen: dict[bytes, float] = {}
        self._refused_seen: dict[bytes, float] = {}
        self._events_live = False
        self._watcher: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._cache_ttl > 0:
            self._watcher = asyncio.create_task(self._watch(), name="key-events")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)

    def cached(self, key: str) -> Principal | None:
        """The principal of `key` if it was validated recently and is still
        cached (no call to auth); None otherwise."""
        hit = self._cache.get(hashlib.sha256(key.encode()).digest())
        if hit is not None and hit[1] > time.monotonic() and self._events_live:
            return hit[0]
        return None

    def validated_recently(self, key: str) -> bool:
        """Whether `key` was found valid within RECENTLY_VALID_SECONDS."""
        return _seen_within(self._valid_seen, key, RECENTLY_VALID_SECONDS)

    def refused_recently(self, key: str) -> bool:
        """Whether `key` was found invalid within RECENTLY_REFUSED_SECONDS."""
        return _seen_within(self._refused_seen, key, RECENTLY_REFUSED_SECONDS)

    def remember_valid(self, key: str) -> None:
        """Note a key found valid without auth (the admin secret)."""
        _remember(self._valid_seen, hashlib.sha256(key.encode()).digest())

    async def validate(self, key: str, request_id: str) -> Principal:
        """The principal of `key`; ApiError 401 when it is not valid."""
        digest = hashlib.sha256(key.encode()).digest()
        hit = self._cache.get(digest)
        now = time.monotonic()
        if hit is not None and hit[1] > now and self._events_live:
            # The very string auth validated: well-formed, no checksum to redo.
            KEY_CACHE_HIT.inc()
            return hit[0]
        if not is_well_formed(key):
            _remember(self._refused_seen, digest)
            raise invalid_api_key()
        KEY_CACHE_MISS.inc()
        try:
            reply = await self._stub.ValidateApiKey(
                auth_pb.ValidateApiKeyRequest(key=key),
                timeout=self._timeout,
                metadata=outgoing_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                # Unknown, revoked, expired and malformed keys: one answer.
                _remember(self._refused_seen, digest)
                self._valid_seen.pop(digest, None)
                raise invalid_api_key() from None
            if exc.code() in _AUTH_DOWN and hit is not None and hit[1] > now:
                # Auth is unreachable: a recent validation stands until it expires.
                KEY_CACHE_STALE.inc()
                return hit[0]
            raise from_rpc_error(exc, request_id) from None
        p = reply.principal
        principal = Principal(
            key_id=p.key_id,
            owner=p.owner,
            scopes=frozenset(p.scopes),
            allowed_models=tuple(p.allowed_models),
            limits=Limits(
                requests_per_minute=p.limits.requests_per_minute,
                tokens_per_minute=p.limits.tokens_per_minute,
                tokens_per_day=p.limits.tokens_per_day,
                max_concurrent_requests=p.limits.max_concurrent_requests,
            ),
        )
        _remember(self._valid_seen, digest)
        ttl = min(self._cache_ttl, reply.cache_ttl_seconds)
        if p.HasField("expire_time"):
            ttl = min(ttl, p.expire_time.ToSeconds() - time.time())
        # Cached even while the event stream is down: served then only when
        # auth cannot be reached (above); the next SYNC drops it.
        if ttl > 0:
            if len(self._cache) >= _CACHE_MAX_ENTRIES:
                self._cache.clear()
            self._cache[digest] = (principal, now + ttl)
        return principal

    def _drop_key(self, key_id: str) -> None:
        # Validated recently stays true of a revoked key: it only spares the
        # key the slow-down, and auth refuses it (then it is forgotten).
        for digest in [d for d, (p, _) in self._cache.items() if p.key_id == key_id]:
            del self._cache[digest]

    async def _watch(self) -> None:
        delay = 0.1
        while True:
            try:
                call = self._stub.WatchKeyEvents(auth_pb.WatchKeyEventsRequest())
                async for event in call:
                    if event.type == auth_pb.KEY_EVENT_TYPE_SYNC:
                        self._cache.clear()
                        self._events_live = True
                        delay = 0.1
                    elif event.type in (
                        auth_pb.KEY_EVENT_TYPE_REVOKED,
                        auth_pb.KEY_EVENT_TYPE_UPDATED,
                    ):
                        self._drop_key(event.key_id)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                log.warning("key event stream lost: %s", exc.code().name)
            except Exception:
                log.exception("key event stream failed")
            # Until the stream is back (its SYNC drops the cache), every
            # request asks auth; the cache answers only when auth cannot.
            self._events_live = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX_SECONDS)


def _seen_within(seen: dict[bytes, float], key: str, seconds: float) -> bool:
    at = seen.get(hashlib.sha256(key.encode()).digest())
    return at is not None and time.monotonic() - at < seconds


def _remember(seen: dict[bytes, float], digest: bytes) -> None:
    """Note `digest` now, newest last; the oldest go when the map is full."""
    seen.pop(digest, None)
    if len(seen) >= _RECENT_MAX_ENTRIES:
        for old in list(seen)[: _RECENT_MAX_ENTRIES // 10]:
            del seen[old]
    seen[digest] = time.monotonic()
