"""A store out of space, through a real gRPC server and a real SQLite file
whose size is capped (`PRAGMA max_page_count`: SQLite's own SQLITE_FULL, the
error a full disk gives): the call is STORAGE_FULL, not INTERNAL; health is
NOT_SERVING until a probe write succeeds; nothing half-written remains."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from marie_kit.channels import insecure_channel, is_serving
from marie_kit.errors import ServiceError
from marie_kit.server import RunningServer, start_server
from marie_kit.sqlite import connect, probe_write, write_transaction
from marie_kit.storage import STORAGE_FULL, StorageWatch, is_storage_full

SERVICE = "test.v1.Notes"
SCHEMA = "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body BLOB NOT NULL);"
NOTE_BYTES = 32 * 1024


def _identity(b: bytes) -> bytes:
    return b


class NotesComponent:
    """Writes notes (two rows per call, in one transaction) to a capped SQLite file."""

    service_names: Sequence[str] = (SERVICE,)
    domain = "marie.test"

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.db: sqlite3.Connection | None = None
        self.storage = StorageWatch(self._probe, interval=0.05)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _probe(self) -> None:
        assert self.db is not None
        await self._run(probe_write, self.db)

    def _write(self, body: bytes) -> None:
        assert self.db is not None
        with write_transaction(self.db):
            self.db.execute("INSERT INTO notes (body) VALUES (?)", (body,))
            self.db.execute("INSERT INTO notes (body) VALUES (?)", (body,))

    def register(self, server: grpc.aio.Server) -> None:
        async def write(request: bytes, context: Any) -> bytes:
            await self._run(self._write, b"x" * NOTE_BYTES)
            return b"ok"

        async def count(request: bytes, context: Any) -> bytes:
            db = self.db
            assert db is not None
            rows = await self._run(lambda: db.execute("SELECT count(*) FROM notes").fetchone()[0])
            return str(rows).encode()

        async def clear(request: bytes, context: Any) -> bytes:
            assert self.db is not None
            await self._run(self.db.execute, "DELETE FROM notes")
            return b"ok"

        handlers = {
            name: grpc.unary_unary_rpc_method_handler(fn, _identity, _identity)
            for name, fn in (("Write", write), ("Count", count), ("Clear", clear))
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    async def start(self) -> None:
        self.db = await self._run(lambda: connect(self.path, SCHEMA, max_bytes=self.max_bytes))

    async def stopping(self) -> None:
        pass

    async def close(self) -> None:
        if self.db is not None:
            await self._run(self.db.close)
        self.executor.shutdown()


@pytest.fixture
async def notes(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, grpc.aio.Channel]]:
    component = NotesComponent(tmp_path / "notes.sqlite3", max_bytes=512 * 1024)
    running = await start_server([component])
    async with insecure_channel(running.target) as channel:
        yield running, channel
    await running.stop(0)


def _call(channel: grpc.aio.Channel, method: str) -> Any:
    return channel.unary_unary(f"/{SERVICE}/{method}", _identity, _identity)(b"", timeout=5)


async def _fill(channel: grpc.aio.Channel) -> ServiceError:
    """Write until a write is refused; that refusal."""
    for _ in range(100):
        try:
            await _call(channel, "Write")
        except grpc.aio.AioRpcError as exc:
            return ServiceError.from_rpc_error(exc)
    raise AssertionError("the capped file never filled up")


async def _wait_serving(channel: grpc.aio.Channel, serving: bool) -> None:
    for _ in range(200):
        if await is_serving(channel, SERVICE) == serving:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"health never became {'SERVING' if serving else 'NOT_SERVING'}")


async def test_a_write_refused_for_lack_of_space_is_storage_full_and_not_ready(
    notes: tuple[RunningServer, grpc.aio.Channel],
) -> None:
    _, channel = notes
    error = await _fill(channel)

    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == STORAGE_FULL
    assert error.metadata["retry_after_seconds"] == "30"
    assert "Traceback" not in error.message and "sqlite" not in error.message.lower()
    await _wait_serving(channel, False)
    # Each write is two rows in one transaction: the refused one left neither.
    assert int(await _call(channel, "Count")) % 2 == 0


async def test_readiness_comes_back_once_writes_succeed_again(
    notes: tuple[RunningServer, grpc.aio.Channel],
) -> None:
    _, channel = notes
    await _fill(channel)
    await _wait_serving(channel, False)
    # Reads still work, and so does what frees space.
    assert int(await _call(channel, "Count")) > 0
    await _call(channel, "Clear")

    await _wait_serving(channel, True)
    assert await _call(channel, "Write") == b"ok"


def test_what_counts_as_a_full_store() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    assert is_storage_full(full)
    assert is_storage_full(OSError(28, "No space left on device"))
    assert is_storage_full(
        Exception(
            "AuthorizationException(403, 'cluster_block_exception', 'index [marie_memory] "
            "blocked by: [TOO_MANY_REQUESTS/12/disk usage exceeded flood-stage watermark, "
            "index has read-only-allow-delete block];')"
        )
    )
    assert not is_storage_full(sqlite3.OperationalError("database is locked"))
    assert not is_storage_full(OSError(13, "Permission denied"))
