"""API-key lifecycle and validation: the auth service's core, free of gRPC.

`KeyManager` issues keys (the plaintext leaves it exactly once), stores only
their digests, validates presented keys and publishes revocations and
updates to WatchKeyEvents subscribers.

Other processes (the CLI) can use it directly on the same database:

    async with open_key_manager(load_settings(AuthSettings)) as keys:
        issued = await keys.create(KeySpec(name="ci-bot", scopes=("chat",)))
        print(issued.key)

Changes made that way reach no running service's event stream, so prefer the
gRPC API while the service is up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from marie_kit.apikeys import display_form, generate_key, is_well_formed, key_digest

from marie_auth.errors import invalid_api_key, invalid_argument, key_inactive, key_not_found
from marie_auth.events import KeyEventBroadcaster, KeyEventType
from marie_auth.scopes import effective_scopes
from marie_auth.settings import DEFAULT_VALIDATION_CACHE_TTL_SECONDS, AuthSettings
from marie_auth.spec_rules import SPEC_FIELDS, checked_spec
from marie_auth.sqlite_store import SqliteKeyStore
from marie_auth.store import (
    InvalidPageToken,
    KeyLimits,
    KeyPage,
    KeyRecord,
    KeySpec,
    KeyState,
    KeyStore,
)

log = logging.getLogger("marie.auth.keys")

KEY_ID_PREFIX = "key_"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_GRACE_PERIOD_SECONDS = 86_400
#: last_used_time is written at most this often per key, to keep validation read-only.
TOUCH_INTERVAL_SECONDS = 60.0
#: How often the service looks for keys that have just expired.
DEFAULT_EXPIRY_CHECK_SECONDS = 1.0
#: How often the service reads the store's change log for events of other processes.
DEFAULT_EVENT_POLL_SECONDS = 0.2
#: Events are kept this long in the change log (a replica down longer re-syncs).
EVENT_RETENTION_SECONDS = 3600.0
PRUNE_INTERVAL_SECONDS = 60.0

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_key_id(now: float) -> str:
    """A key id: "key_" and a ULID (48 bits of milliseconds, 80 random bits, Crockford base32).

    Ids sort by creation time and say nothing about the secret."""
    value = (int(now * 1000) << 80) | secrets.randbits(80)
    chars = []
    for _ in range(26):
        value, rem = divmod(value, 32)
        chars.append(_CROCKFORD[rem])
    return KEY_ID_PREFIX + "".join(reversed(chars))


@dataclass(frozen=True)
class IssuedKey:
    """A newly created key: its record and its plaintext, which is never available again."""

    record: KeyRecord
    key: str = field(repr=False)


@dataclass(frozen=True)
class RotatedKey(IssuedKey):
    """A rotation's result: the new key, and the old one as it now stands."""

    previous: KeyRecord = field(kw_only=True)


@dataclass(frozen=True)
class Principal:
    """Who a valid key belongs to and what it may do."""

    key_id: str
    key_name: str
    owner: str
    #: Effective scopes: the key's own, or the defaults when it has none.
    scopes: tuple[str, ...]
    allowed_models: tuple[str, ...]
    limits: KeyLimits
    expire_time: float | None


@dataclass(frozen=True)
class Validation:
    """A successful validation and how long the caller may cache it."""

    principal: Principal
    #: The configured TTL, shortened so that a cached answer never outlives the key's expiry.
    cache_ttl_seconds: int


class KeyManager:
    """Creates, reads, changes, revokes, rotates and validates API keys.

    Owns its store: `close()` waits for background writes, then closes it.
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        pepper: bytes = b"",
        cache_ttl_seconds: int = DEFAULT_VALIDATION_CACHE_TTL_SECONDS,
        events: KeyEventBroadcaster | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._pepper = pepper
        self._cache_ttl_seconds = cache_ttl_seconds
        self._events = events
        self._clock = clock
        # Serialises read-modify-write changes made through this manager.
        self._write_lock = asyncio.Lock()
        self._touching: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        # Change-log entries this manager wrote (and published already).
        self._own_events: set[int] = set()
        self._closed = False

    def now(self) -> float:
        """The manager's clock (unix seconds); key states are judged against it."""
        return self._clock()

    # -- lifecycle -------------------------------------------------------------

    async def create(self, spec: KeySpec) -> IssuedKey:
        """A new active key with `spec`; INVALID_ARGUMENT when a setting is bad."""
        now = self._clock()
        spec = checked_spec(spec, now)
        key = generate_key()
        record = self._new_record(spec, key, now)
        await self._store.create(record)
        log.info("api key created", extra={"key_id": record.id, "owner": spec.owner})
        return IssuedKey(record, key)

    def _new_record(self, spec: KeySpec, key: str, now: float) -> KeyRecord:
        return KeyRecord(
            id=new_key_id(now),
            digest=key_digest(key, self._pepper),
            display=display_form(key),
            spec=spec,
            state=KeyState.ACTIVE,
            create_time=now,
            update_time=now,
        )

    async def probe_store(self) -> None:
        """A small write and its removal on the store; raises while it has no room."""
        await self._store.probe_write()

    async def get(self, key_id: str) -> KeyRecord:
        """The key with this id; NOT_FOUND (KEY_NOT_FOUND) when there is none."""
        if not key_id:
            raise invalid_argument("id", "id is required")
        record = await self._store.get(key_id)
        if record is None:
            raise key_not_found(key_id)
        return record

    async def list(
        self,
        *,
        owner: str | None = None,
        include_inactive: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> KeyPage:
        """A page of keys, newest first. `page_size` 0 means 50; above 500 it is cut to 500."""
        if page_size < 0:
            raise invalid_argument("page_size", "page_size must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        try:
            return await self._store.list_page(
                owner=owner,
                include_inactive=include_inactive,
                page_size=size,
                page_token=page_token,
                now=self._clock(),
            )
        except InvalidPageToken as exc:
            raise invalid_argument("page_token", "invalid page token") from exc

    async def update(self, key_id: str, spec: KeySpec, paths: Collection[str]) -> KeyRecord:
        """Set the fields named in `paths` to their values in `spec`.

        `paths` are KeySpec field names (the proto's update_mask paths); empty
        or unknown paths are INVALID_ARGUMENT. A revoked key cannot be changed
        (FAILED_PRECONDITION, KEY_INACTIVE); an expired one can, e.g. to extend it.
        """
        if not paths:
            raise invalid_argument("update_mask", "update_mask must name at least one field")
        unknown = sorted(set(paths) - SPEC_FIELDS)
        if unknown:
            raise invalid_argument(
                "update_mask",
                f"cannot update {unknown[0]!r}; updatable fields: {', '.join(sorted(SPEC_FIELDS))}",
            )
        async with self._write_lock:
            current = await self.get(key_id)
            if current.state is KeyState.REVOKED:
                raise key_inactive(key_id, KeyState.REVOKED.value)
            now = self._clock()
            changes = {path: getattr(spec, path) for path in paths}
            merged = checked_spec(dataclasses.replace(current.spec, **changes), now, paths)
            updated = await self._store.update(key_id, merged, now)
        if updated is None:
            raise key_not_found(key_id)
        log.info("api key updated", extra={"key_id": key_id, "fields": sorted(paths)})
        await self._log_event(KeyEventType.UPDATED, key_id)
        return updated

    async def revoke(self, key_id: str) -> KeyRecord:
        """Revoke the key for good; revoking a revoked key returns it unchanged."""
        async with self._write_lock:
            current = await self.get(key_id)
            if current.state is KeyState.REVOKED:
                return current
            revoked = await self._store.revoke(key_id, self._clock())
        if revoked is None:
            raise key_not_found(key_id)
        log.info("api key revoked", extra={"key_id": key_id})
        await self._log_event(KeyEventType.REVOKED, key_id)
        return revoked

    async def rotate(self, key_id: str, grace_period_seconds: int = 0) -> RotatedKey:
        """A new key with the old one's settings; the old one is revoked now, or expires
        after the grace period (an expiry is stored, so it holds across restarts)."""
        if not 0 <= grace_period_seconds <= MAX_GRACE_PERIOD_SECONDS:
            raise invalid_argument(
                "grace_period_seconds",
                f"grace_period_seconds must be 0 to {MAX_GRACE_PERIOD_SECONDS}",
            )
        async with self._write_lock:
            old = await self.get(key_id)
            now = self._clock()
            state = old.state_at(now)
            if state is not KeyState.ACTIVE:
                raise key_inactive(key_id, state.value)
            key = generate_key()
            new = self._new_record(old.spec, key, now)
            retired = self._retire(old, now, grace_period_seconds)
            await self._store.rotate(new, retired)
        log.info(
            "api key rotated",
            extra={"key_id": new.id, "previous_id": key_id, "grace_seconds": grace_period_seconds},
        )
        if retired.state is KeyState.REVOKED:
            await self._log_event(KeyEventType.REVOKED, key_id)
        elif retired.spec.expire_time != old.spec.expire_time:
            await self._log_event(KeyEventType.UPDATED, key_id)
        return RotatedKey(new, key, previous=retired)

    @staticmethod
    def _retire(old: KeyRecord, now: float, grace_seconds: int) -> KeyRecord:
        if grace_seconds == 0:
            return dataclasses.replace(
                old, state=KeyState.REVOKED, revoke_time=now, update_time=now
            )
        expire_time = now + grace_seconds
        if old.spec.expire_time is not None and old.spec.expire_time < expire_time:
            return old  # It already expires within the grace period.
        spec = dataclasses.replace(old.spec, expire_time=expire_time)
        return dataclasses.replace(old, spec=spec, update_time=now)

    # -- validation ------------------------------------------------------------

    async def validate(self, key: str) -> Validation:
        """The principal of an active key.

        Unknown, revoked, expired and malformed keys all raise the same
        UNAUTHENTICATED (INVALID_API_KEY) error. The key is never logged.
        """
        if not is_well_formed(key):
            raise invalid_api_key()
        record = await self._store.get_by_digest(key_digest(key, self._pepper))
        now = self._clock()
        if record is None or not record.is_active(now):
            raise invalid_api_key()
        self._touch_later(record, now)
        spec = record.spec
        ttl = self._cache_ttl_seconds
        if spec.expire_time is not None:
            ttl = min(ttl, max(0, math.floor(spec.expire_time - now)))
        principal = Principal(
            key_id=record.id,
            key_name=spec.name,
            owner=spec.owner,
            scopes=effective_scopes(spec.scopes),
            allowed_models=spec.allowed_models,
            limits=spec.limits,
            expire_time=spec.expire_time,
        )
        return Validation(principal, ttl)

    def _touch_later(self, record: KeyRecord, now: float) -> None:
        """Record the use off the response path, at most about once a minute per key."""
        last = record.last_used_time
        if last is not None and now - last < TOUCH_INTERVAL_SECONDS:
            return
        if self._closed or record.id in self._touching:
            return
        self._touching.add(record.id)
        task = asyncio.create_task(self._touch(record.id, now))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _touch(self, key_id: str, now: float) -> None:
        try:
            await self._store.touch_last_used(key_id, now)
        except Exception:
            log.warning("could not record key use", extra={"key_id": key_id}, exc_info=True)
        finally:
            self._touching.discard(key_id)

    # -- events ----------------------------------------------------------------

    async def _log_event(self, event_type: KeyEventType, key_id: str) -> None:
        """Write the event to the store's change log (which every replica on the
        same store follows), and publish it to this process's subscribers."""
        try:
            self._own_events.add(
                await self._store.append_event(event_type.value, key_id, self._clock())
            )
        except Exception:
            # The change itself is stored; other replicas' gateways then learn
            # of it when their cached validations expire.
            log.warning("could not log key event", extra={"key_id": key_id}, exc_info=True)
        self._publish(event_type, key_id)

    async def follow_events(self, interval: float = DEFAULT_EVENT_POLL_SECONDS) -> None:
        """Publish the events any process (another replica, the CLI) logged in
        the shared store, as they appear; runs until cancelled. Old events are
        pruned about once a minute."""
        seq = await self._store.last_event_seq()
        last_prune = 0.0
        while True:
            await asyncio.sleep(interval)
            try:
                events = await self._store.events_after(seq)
                now = self._clock()
                if now - last_prune > PRUNE_INTERVAL_SECONDS:
                    await self._store.prune_events(now - EVENT_RETENTION_SECONDS)
                    last_prune = now
            except Exception:
                log.warning("could not read key events", exc_info=True)
                continue
            for seq, event_type, key_id, _ in events:
                if seq in self._own_events:
                    # Published when it happened here.
                    self._own_events.discard(seq)
                    continue
                self._publish(KeyEventType(event_type), key_id)

    def _publish(self, event_type: KeyEventType, key_id: str) -> None:
        if self._events is not None:
            self._events.publish(event_type, key_id)

    async def notify_expirations(self, interval: float = DEFAULT_EXPIRY_CHECK_SECONDS) -> None:
        """Publish REVOKED for each key as its expiry passes; runs until cancelled.

        Expiry needs no job to take effect (validation checks it); this only
        tells gateways at once, instead of when their cached answer runs out.
        """
        last = self._clock()
        while True:
            await asyncio.sleep(interval)
            now = self._clock()
            if now <= last:
                continue
            try:
                expired = await self._store.ids_expiring(last, now)
            except Exception:
                log.warning("could not look for expired keys", exc_info=True)
                continue
            for key_id in expired:
                self._publish(KeyEventType.REVOKED, key_id)
            last = now

    async def flush(self) -> None:
        """Wait until every pending last-used write has finished."""
        while pending := [task for task in self._background if not task.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        """Wait for pending last-used writes, then close the store."""
        if self._closed:
            return
        self._closed = True
        await self.flush()
        await self._store.close()


async def open_store(settings: AuthSettings) -> KeyStore:
    """The key store `settings` select, opened."""
    match settings.store:
        case "sqlite":
            return await SqliteKeyStore.open(settings.db_path, max_bytes=settings.db_max_bytes)
        case "opensearch":
            from marie_auth.opensearch_store import OpenSearchKeyStore  # noqa: PLC0415

            return await OpenSearchKeyStore.open(
                settings.opensearch_url, prefix=settings.opensearch_index_prefix
            )


@asynccontextmanager
async def open_key_manager(
    settings: AuthSettings,
    *,
    events: KeyEventBroadcaster | None = None,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[KeyManager]:
    """A `KeyManager` on the store `settings` select; closed (store included) on exit."""
    store = await open_store(settings)
    manager = KeyManager(
        store,
        pepper=settings.pepper_bytes,
        cache_ttl_seconds=settings.validation_cache_ttl_seconds,
        events=events,
        clock=clock,
    )
    try:
        yield manager
    finally:
        await manager.close()
