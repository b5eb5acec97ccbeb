"""What the auth service stores about a key, and the interface every key store implements.

Values here are plain dataclasses, not protos: the store and the core know
nothing of gRPC. A store never sees a plaintext key, only its digest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class KeyState(StrEnum):
    """Where a key is in its lifecycle.

    Stores persist only ACTIVE and REVOKED; EXPIRED is derived from the
    expiry at read time, so a key expires on time without any job running.
    """

    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"


@dataclass(frozen=True)
class KeyLimits:
    """Per-key limits; zero means no limit."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    tokens_per_day: int = 0
    max_concurrent_requests: int = 0


@dataclass(frozen=True)
class KeySpec:
    """A key's settings: what its owner chooses at creation and may change later."""

    name: str
    owner: str = ""
    #: As requested; empty means the default scopes (see `scopes.effective_scopes`).
    scopes: tuple[str, ...] = ()
    #: Exact model ids or patterns ending in "*"; empty means every model.
    allowed_models: tuple[str, ...] = ()
    limits: KeyLimits = KeyLimits()
    #: Unix time after which the key is refused; None means never.
    expire_time: float | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class KeyRecord:
    """A stored key: its settings plus what the service keeps about it. Times are unix seconds."""

    id: str
    #: SHA-256 or HMAC-SHA256 (hex) of the plaintext key; the plaintext is never stored.
    #: Kept out of reprs: it is the lookup handle for the key, so not for logs.
    digest: str = field(repr=False)
    #: Prefix and last four characters, for people to recognise the key.
    display: str
    spec: KeySpec
    #: ACTIVE or REVOKED; see `state_at` for the effective state.
    state: KeyState
    create_time: float
    update_time: float
    revoke_time: float | None = None
    last_used_time: float | None = None

    def state_at(self, now: float) -> KeyState:
        """The effective state at unix time `now`: REVOKED, EXPIRED or ACTIVE."""
        if self.state is KeyState.REVOKED:
            return KeyState.REVOKED
        if self.spec.expire_time is not None and self.spec.expire_time <= now:
            return KeyState.EXPIRED
        return KeyState.ACTIVE

    def is_active(self, now: float) -> bool:
        """True when the key is accepted at unix time `now`."""
        return self.state_at(now) is KeyState.ACTIVE


@dataclass(frozen=True)
class KeyPage:
    """One page of keys, newest first, and the opaque token for the next ("" on the last)."""

    keys: list[KeyRecord]
    next_page_token: str


class InvalidPageToken(ValueError):
    """A page token this store did not issue (or cannot read any more)."""


class KeyStore(Protocol):
    """Persistence for API keys. Implementations must not block the event loop."""

    async def create(self, record: KeyRecord) -> None:
        """Insert a new key."""

    async def get(self, key_id: str) -> KeyRecord | None:
        """The key with this id, or None."""

    async def get_by_digest(self, digest: str) -> KeyRecord | None:
        """The key whose plaintext has this digest, or None."""

    async def list_page(
        self,
        *,
        owner: str | None,
        include_inactive: bool,
        page_size: int,
        page_token: str,
        now: float,
    ) -> KeyPage:
        """Up to `page_size` keys, newest first, after the position `page_token` marks.

        `owner` None lists every owner's keys. Without `include_inactive`, keys
        revoked or expired at `now` are left out. Raises `InvalidPageToken`.
        """

    async def update(self, key_id: str, spec: KeySpec, update_time: float) -> KeyRecord | None:
        """Replace a key's settings; None when there is no such key. Never changes its state."""

    async def revoke(self, key_id: str, revoke_time: float) -> KeyRecord | None:
        """Mark a key revoked (keeping the first revoke time); None when there is no such key."""

    async def rotate(self, new: KeyRecord, retired: KeyRecord) -> None:
        """In one transaction: insert `new` and save `retired` (the old key, now revoked
        or with its expiry brought forward) so a crash never leaves half a rotation."""

    async def touch_last_used(self, key_id: str, used_time: float) -> None:
        """Record that the key was accepted at `used_time` (never moves backwards)."""

    async def ids_expiring(self, after: float, until: float) -> list[str]:
        """Ids of unrevoked keys whose expiry lies in (`after`, `until`]."""

    async def append_event(self, event_type: str, key_id: str, at: float) -> int:
        """Append a key event ("revoked", "updated") to the store's change log;
        its sequence number."""

    async def last_event_seq(self) -> int:
        """The sequence number of the newest event in the change log (0: none)."""

    async def events_after(self, seq: int, limit: int = 1000) -> list[tuple[int, str, str, float]]:
        """Up to `limit` events (seq, type, key_id, time) newer than `seq`, oldest first."""

    async def prune_events(self, before: float) -> None:
        """Forget events older than `before`."""

    async def probe_write(self) -> None:
        """A small write and its removal; raises while the store has no room
        (marie_kit.storage: how the service knows it can write again)."""

    async def close(self) -> None:
        """Release the store's resources; further calls fail."""
