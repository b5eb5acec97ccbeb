"""Embedded SQLite stores' common ground: one connection per store, opened on
a worker thread of its own (all SQLite work stays off the event loop), in WAL
mode with synchronous=FULL (an acknowledged write survives a crash or a power
cut), a busy timeout for other processes on the same file, and a schema
applied idempotently under a version check.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: How long a write waits for another process (another replica) holding the lock.
BUSY_TIMEOUT_MS = 5000


def connect(
    path: Path,
    schema: str,
    *,
    schema_version: int | None = None,
    foreign_keys: bool = False,
    max_bytes: int = 0,
    functions: Mapping[str, Callable[[str], str]] | None = None,
    migrate: Callable[[sqlite3.Connection, int], None] | None = None,
) -> sqlite3.Connection:
    """Open (creating it and its folder) and migrate `path`; rows are `sqlite3.Row`.

    Autocommit (`isolation_level=None`): multi-statement writes open their own
    transaction. A file of a newer `schema_version` than this build knows is
    refused rather than misread. With `max_bytes`, a write that would grow the
    file past it fails as on a full disk (SQLITE_FULL). `functions` (one text
    argument, deterministic) are registered before the schema runs, so its
    triggers may call them; `migrate(db, old_version)` runs after it when the
    file's version is older than `schema_version` (0 for a new file too).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        if foreign_keys:
            db.execute("PRAGMA foreign_keys = ON")
        for name, fn in (functions or {}).items():
            db.create_function(name, 1, fn, deterministic=True)
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if schema_version is not None and version > schema_version:
            raise RuntimeError(
                f"{path} has schema version {version}; this build knows {schema_version} at most"
            )
        db.executescript(schema)
        if schema_version is not None:
            if migrate is not None and version < schema_version:
                migrate(db, version)
            db.execute(f"PRAGMA user_version = {schema_version}")
        if max_bytes:
            page_size = db.execute("PRAGMA page_size").fetchone()[0]
            db.execute(f"PRAGMA max_page_count = {max(1, max_bytes // page_size)}")
    except BaseException:
        db.close()
        raise
    return db


async def open_on_thread(
    path: Path,
    schema: str,
    *,
    thread_name: str,
    schema_version: int | None = None,
    foreign_keys: bool = False,
    max_bytes: int = 0,
    functions: Mapping[str, Callable[[str], str]] | None = None,
    migrate: Callable[[sqlite3.Connection, int], None] | None = None,
) -> tuple[sqlite3.Connection, ThreadPoolExecutor]:
    """`connect` on a new single worker thread; the store then runs every call
    on that thread (`loop.run_in_executor(executor, …)`)."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
    loop = asyncio.get_running_loop()
    try:
        db = await loop.run_in_executor(
            executor,
            lambda: connect(
                path,
                schema,
                schema_version=schema_version,
                foreign_keys=foreign_keys,
                max_bytes=max_bytes,
                functions=functions,
                migrate=migrate,
            ),
        )
    except BaseException:
        executor.shutdown(wait=False)
        raise
    return db, executor


@contextlib.contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """`BEGIN IMMEDIATE` … `COMMIT`, rolled back when anything fails, the
    COMMIT included (on a full disk it is often the COMMIT that fails, and a
    transaction left open would refuse every later write)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


#: What a storage probe writes (and removes again): enough to need new pages.
PROBE_BYTES = 64 * 1024


def probe_write(db: sqlite3.Connection) -> None:
    """One small committed write and its removal (run on the store's thread):
    raises SQLITE_FULL while the disk, or the file's maximum, has no room."""
    with write_transaction(db):
        db.execute("CREATE TABLE IF NOT EXISTS marie_storage_probe (data BLOB)")
        db.execute("INSERT INTO marie_storage_probe VALUES (zeroblob(?))", (PROBE_BYTES,))
        db.execute("DELETE FROM marie_storage_probe")
