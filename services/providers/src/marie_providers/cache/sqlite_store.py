"""The embedded response cache: one SQLite file of entries, on a worker thread
of its own (lookups never block the event loop). Expired entries and, past
the size limit, the oldest ones are deleted as new ones are written."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from marie_kit.sqlite import open_on_thread, write_transaction

from marie_providers.cache.store import Entry

A = TypeVar("A")
T = TypeVar("T")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cache_entries (
    key       TEXT PRIMARY KEY,
    tenant    TEXT NOT NULL,
    operation TEXT NOT NULL,
    stored    REAL NOT NULL,
    expires   REAL NOT NULL,
    size      INTEGER NOT NULL,
    body      BLOB NOT NULL
);
-- Covers the size total and the eviction order without reading the bodies.
CREATE INDEX IF NOT EXISTS cache_entries_stored ON cache_entries (stored, size);
CREATE INDEX IF NOT EXISTS cache_entries_expires ON cache_entries (expires);
"""

_GET = "SELECT tenant, operation, stored, expires, body FROM cache_entries WHERE key = ?"
_PUT = (
    "INSERT OR REPLACE INTO cache_entries (key, tenant, operation, stored, expires, size, body) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
#: Entries removed at once when the cache is over its size (a tenth of the
#: limit's worth, at least one), so writes do not evict one by one.
_EVICT_FRACTION = 0.1


class SQLiteCacheStore:
    """Response cache entries in one SQLite file; `max_bytes` bounds the
    entries' total size (the file itself stays a little larger)."""

    def __init__(
        self, db: sqlite3.Connection, executor: ThreadPoolExecutor, max_bytes: int
    ) -> None:
        self._db = db
        self._executor = executor
        self._max_bytes = max_bytes

    @classmethod
    async def open(cls, path: Path, *, max_bytes: int) -> SQLiteCacheStore:
        db, executor = await open_on_thread(
            path, _SCHEMA, thread_name="cache-sqlite", schema_version=SCHEMA_VERSION
        )
        # A cache may lose its last writes to a power cut (WAL keeps the file
        # whole): no fsync per stored answer.
        await asyncio.get_running_loop().run_in_executor(
            executor, db.execute, "PRAGMA synchronous = NORMAL"
        )
        return cls(db, executor, max_bytes)

    async def _run(self, fn: Callable[[A], T], arg: A) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, arg)

    async def get(self, key: str, tenant: str, now: float) -> Entry | None:
        row = await self._run(self._get, key)
        if row is None or row["tenant"] != tenant or row["expires"] <= now:
            return None
        return Entry(
            key, row["tenant"], row["operation"], row["stored"], row["expires"], row["body"]
        )

    def _get(self, key: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._db.execute(_GET, (key,)).fetchone()
        return row

    async def put(self, entry: Entry) -> None:
        await self._run(self._put, entry)

    def _put(self, entry: Entry) -> None:
        db = self._db
        with write_transaction(db):
            db.execute("DELETE FROM cache_entries WHERE expires <= ?", (entry.stored,))
            db.execute(
                _PUT,
                (
                    entry.key,
                    entry.tenant,
                    entry.operation,
                    entry.stored,
                    entry.expires,
                    len(entry.body),
                    entry.body,
                ),
            )
            total = db.execute("SELECT COALESCE(SUM(size), 0) FROM cache_entries").fetchone()[0]
            if total > self._max_bytes:
                self._evict(total - self._max_bytes + int(self._max_bytes * _EVICT_FRACTION))

    def _evict(self, free: int) -> None:
        """Delete the oldest entries until `free` bytes are gone."""
        freed = 0
        doomed = []
        for row in self._db.execute("SELECT key, size FROM cache_entries ORDER BY stored"):
            if freed >= free:
                break
            doomed.append((row["key"],))
            freed += row["size"]
        self._db.executemany("DELETE FROM cache_entries WHERE key = ?", doomed)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._db.close)
        self._executor.shutdown(wait=True)
