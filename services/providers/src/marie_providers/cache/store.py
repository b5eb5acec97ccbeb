"""What a response cache store does, whichever holds the entries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored answer: the serialized response, whose tenant it is, and
    when it was stored (Unix seconds)."""

    key: str
    tenant: str
    operation: str
    stored: float
    expires: float
    body: bytes


class CacheStore(Protocol):
    """Entries by key; a store never answers one tenant with another's entry."""

    async def get(self, key: str, tenant: str, now: float) -> Entry | None:
        """The unexpired entry of `key` stored for `tenant`; None otherwise."""

    async def put(self, entry: Entry) -> None:
        """Store (or replace) `entry`, evicting the oldest entries past the
        size limit and the expired ones."""

    async def close(self) -> None: ...
