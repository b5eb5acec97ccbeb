"""A store that has run out of space: the error its callers get, and a
readiness that says so until it can write again.

A write refused for lack of space (SQLite's SQLITE_FULL: the disk is full, or
the file reached its configured maximum; ENOSPC; OpenSearch's read-only block
at the flood-stage disk watermark) is RESOURCE_EXHAUSTED with reason
STORAGE_FULL and a retry delay (the gateway answers 507 with `Retry-After`),
never INTERNAL. The refused write was never acknowledged, so nothing
acknowledged is lost. From that moment the service reports NOT_SERVING (its
gRPC health, which load balancers, compose and the gateway's `/readyz` read)
and tries a small write every few seconds; the first that succeeds makes it
SERVING again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import sqlite3
from collections.abc import Awaitable, Callable

import grpc

from marie_kit.errors import ServiceError

log = logging.getLogger("marie.storage")

STORAGE_FULL = "STORAGE_FULL"
#: How long callers are asked to wait before retrying a refused write.
RETRY_AFTER_SECONDS = 30
#: How often a full store is tried again.
PROBE_SECONDS = 2.0
# What OpenSearch says of an index it made read-only at the flood stage.
_OPENSEARCH_FULL = ("flood-stage watermark", "read-only-allow-delete", "read_only_allow_delete")


def is_storage_full(exc: BaseException) -> bool:
    """Whether `exc` is a write refused for lack of space."""
    if isinstance(exc, ServiceError):
        return exc.reason == STORAGE_FULL
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    # opensearch-py's TransportError carries the server's reason in its text.
    text = str(exc)
    return "cluster_block_exception" in text and any(s in text for s in _OPENSEARCH_FULL)


def storage_full(domain: str) -> ServiceError:
    """The error of a write refused for lack of space."""
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        STORAGE_FULL,
        "the store has no space left for this write; nothing was changed. Retry later",
        domain=domain,
        metadata={"retry_after_seconds": str(RETRY_AFTER_SECONDS)},
    )


class StorageWatch:
    """Tracks whether a store can write: `report()` when a write was refused
    for lack of space; `probe` (a small write that raises while there is no
    room) then runs every `interval` seconds until it succeeds. The server
    binds `set_ready`, which turns the service's health NOT_SERVING and back.
    """

    def __init__(
        self, probe: Callable[[], Awaitable[None]], *, interval: float = PROBE_SECONDS
    ) -> None:
        self._probe = probe
        self._interval = interval
        self._set_ready: Callable[[bool], Awaitable[None]] | None = None
        self._task: asyncio.Task[None] | None = None
        self.full = False

    def bind(self, set_ready: Callable[[bool], Awaitable[None]]) -> None:
        self._set_ready = set_ready

    def report(self) -> None:
        """A write was refused for lack of space: not ready until one succeeds."""
        if self.full:
            return
        self.full = True
        log.error("the store is full: writes are refused and the service is not ready")
        self._task = asyncio.get_running_loop().create_task(self._recover(), name="storage-probe")

    async def _recover(self) -> None:
        if self._set_ready is not None:
            await self._set_ready(False)
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._probe()
            except Exception as exc:
                if not is_storage_full(exc):
                    log.warning("storage probe failed", extra={"error": repr(exc)})
                continue
            break
        self.full = False
        log.info("the store can write again: the service is ready")
        if self._set_ready is not None:
            await self._set_ready(True)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
