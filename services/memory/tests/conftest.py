"""Fixtures for the memory service's tests.

`store` runs the store contract suite (test_memory_store_contract.py) against
every store implementation; a new implementation joins by adding its opener
to STORE_OPENERS.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from marie_memory.records import Store
from marie_memory.sqlite_store import SqliteStore


async def _sqlite(tmp_path: Path) -> Store:
    return await SqliteStore.open(tmp_path / "memory.sqlite3")


STORE_OPENERS: dict[str, Callable[[Path], Awaitable[Store]]] = {"sqlite": _sqlite}


@pytest.fixture(params=sorted(STORE_OPENERS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opened = await STORE_OPENERS[request.param](tmp_path)
    yield opened
    await opened.close()
