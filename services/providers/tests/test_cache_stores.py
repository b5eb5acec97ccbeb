"""The response cache stores' contract, on SQLite and on OpenSearch
(osmem-server, or the cluster at OPENSEARCH_URL when set): entries by key,
one tenant's never shown to another, expiry, and eviction past the size."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from marie_providers.cache.opensearch_store import OpenSearchCacheStore
from marie_providers.cache.sqlite_store import SQLiteCacheStore
from marie_providers.cache.store import CacheStore, Entry

MAX_BYTES = 1000


@pytest.fixture(params=["sqlite", "opensearch"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CacheStore]:
    opened: SQLiteCacheStore | OpenSearchCacheStore
    if request.param == "sqlite":
        opened = await SQLiteCacheStore.open(tmp_path / "cache.sqlite3", max_bytes=MAX_BYTES)
    else:
        osmem: Any = (
            None if os.environ.get("OPENSEARCH_URL") else request.getfixturevalue("osmem_clone")
        )
        url = os.environ.get("OPENSEARCH_URL") or osmem.url
        prefix = "t" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]
        opened = await OpenSearchCacheStore.open(url, prefix=prefix, max_bytes=MAX_BYTES)
    yield opened
    await opened.close()


def entry(key: str, tenant: str = "owner\x00a", *, size: int = 10, age: float = 0.0) -> Entry:
    now = time.time() - age
    return Entry(key, tenant, "chat", now, now + 3600, bytes([len(key)]) * size)


async def settle(store: CacheStore) -> None:
    if isinstance(store, OpenSearchCacheStore):
        # What a sweep sees is what a refresh made searchable.
        await store._client.indices.refresh(index=store._index)


async def test_an_entry_is_found_by_its_key_for_its_tenant_only(store: CacheStore) -> None:
    await store.put(entry("k1"))
    now = time.time()
    found = await store.get("k1", "owner\x00a", now)
    assert found is not None and found.body == entry("k1").body
    assert await store.get("k1", "owner\x00b", now) is None
    assert await store.get("k2", "owner\x00a", now) is None


async def test_an_expired_entry_is_not_found(store: CacheStore) -> None:
    await store.put(entry("k1"))
    assert await store.get("k1", "owner\x00a", time.time() + 3601) is None


async def test_a_put_replaces_the_entry_of_its_key(store: CacheStore) -> None:
    await store.put(entry("k1", size=10))
    await store.put(entry("k1", size=20))
    found = await store.get("k1", "owner\x00a", time.time())
    assert found is not None and len(found.body) == 20


async def test_past_the_size_limit_the_oldest_entries_go(store: CacheStore) -> None:
    keys = [f"entry{i}" for i in range(8)]  # 8 x 150 bytes: over the 1000 of the limit
    for i, key in enumerate(keys):
        await store.put(entry(key, size=150, age=100 - i))
    await settle(store)
    if isinstance(store, OpenSearchCacheStore):
        await store.sweep(time.time())  # what a write starts at most once a minute
    now = time.time()
    present = [k for k in keys if await store.get(k, "owner\x00a", now) is not None]
    assert 0 < len(present) < len(keys)
    assert len(present) * 150 <= MAX_BYTES
    # The newest stay.
    assert present == keys[len(keys) - len(present) :]
