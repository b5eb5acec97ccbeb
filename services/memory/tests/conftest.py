"""Fixtures for the memory service's tests.

`store` runs the store contract suite (test_memory_store_contract.py) against
every store implementation (STORE_KINDS).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from marie.memory.v1 import memory_service_pb2_grpc as pb_grpc
from marie_kit.channels import insecure_channel
from marie_kit.server import RunningServer, start_server
from marie_memory.service import MemoryComponent
from marie_memory.settings import MemorySettings
from marie_memory.stores.contract import Store
from marie_memory.stores.opensearch import OpenSearchStore, index_prefix
from marie_memory.stores.sqlite import SqliteStore
from marie_providers.service import ProvidersComponent
from marie_providers.settings import ProvidersSettings
from memory_testkit import (
    EMBEDDING_MODEL,
    EXTRACTION_MODEL,
    MemoryStub,
    StartMemory,
    opensearch_target,
)

from tests.fakes.ollama import FakeOllama
from tests.opensearch_node import START_TIMEOUT_SECONDS, OpenSearchNode, OpenSearchUnavailable

STOP_GRACE_SECONDS = 0.5


#: sqlite: a file; osmem: the OpenSearch store on osmem-server (the emulator);
#: opensearch: the OpenSearch store on a real node (OPENSEARCH_URL, or one
#: assembled from Maven Central for the test session: tests/opensearch_node.py).
STORE_KINDS = ["sqlite", "osmem", "opensearch"]


#: The first test on the real node also waits for it to start (download once,
#: then ~15-60 s on a busy 2-core machine): more than the suite's 120 s.
REAL_NODE_TIMEOUT_SECONDS = START_TIMEOUT_SECONDS + 120


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        on_node = "opensearch" in (params.get("store"), params.get("kind"))
        if on_node or "opensearch_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(REAL_NODE_TIMEOUT_SECONDS))


@pytest.fixture(scope="session")
def opensearch_url() -> Iterator[str]:
    """A real OpenSearch: OPENSEARCH_URL when set, else one node for the whole
    session (started on first use, ~15-30 s here; stopped at the end). Without
    Java 17+ or Maven Central the tests that need it are skipped saying why,
    except under CI, where that is a failure."""
    if os.environ.get("OPENSEARCH_URL"):
        yield os.environ["OPENSEARCH_URL"]
        return
    try:
        node = OpenSearchNode.start()
    except OpenSearchUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no real OpenSearch node here: {exc}")
    try:
        yield node.url
    finally:
        node.stop()


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """Every store implementation: SQLite on a file in tmp_path; OpenSearch on
    osmem-server and on a real node, each test with its own index prefix."""
    opened: Store
    if request.param == "sqlite":
        opened = await SqliteStore.open(tmp_path / "memory.sqlite3")
    else:
        url = opensearch_target(request, request.param)
        opened = await OpenSearchStore.open(url, prefix=index_prefix(str(tmp_path)))
    yield opened
    await opened.close()


@pytest.fixture
def emulated(request: pytest.FixtureRequest, store: Store) -> bool:
    """True when the store runs on osmem-server (no knn query)."""
    return bool(request.node.callspec.params.get("store") == "osmem")


@pytest.fixture
def settings(tmp_path: Path) -> MemorySettings:
    # Explicit values win over whatever MARIE_* variables the environment holds.
    return MemorySettings(
        data_dir=tmp_path / "data", port=0, embedding_model="", extraction_model=""
    )


@pytest.fixture
async def start_memory() -> AsyncIterator[StartMemory]:
    """Starts memory servers (each on a fresh port); stops those still running at the end."""
    running: list[RunningServer] = []

    async def start(settings: MemorySettings) -> RunningServer:
        server = await start_server([MemoryComponent(settings)])
        running.append(server)
        return server

    yield start
    for server in running:
        await server.stop(STOP_GRACE_SECONDS)


@pytest.fixture
async def server(start_memory: StartMemory, settings: MemorySettings) -> RunningServer:
    return await start_memory(settings)


@pytest.fixture
async def stub(server: RunningServer) -> AsyncIterator[MemoryStub]:
    async with insecure_channel(server.target) as channel:
        yield pb_grpc.MemoryServiceStub(channel)


@pytest.fixture(scope="session")
def ollama_server() -> Iterator[FakeOllama]:
    with FakeOllama() as fake:
        yield fake


@pytest.fixture
def ollama(ollama_server: FakeOllama) -> FakeOllama:
    """The fake Ollama with its default models and no recorded requests."""
    ollama_server.reset(models=True)
    return ollama_server


@pytest.fixture
async def providers(ollama: FakeOllama) -> AsyncIterator[RunningServer]:
    """A real providers service in front of the fake Ollama."""
    settings = ProvidersSettings(
        ollama_base_url=ollama.base_url,
        ollama_enabled=True,
        port=0,
        connect_timeout_seconds=2,
        read_timeout_seconds=10,
    )
    server = await start_server([ProvidersComponent(settings)])
    yield server
    await server.stop(STOP_GRACE_SECONDS)


@pytest.fixture
def ai_settings(tmp_path: Path, providers: RunningServer) -> MemorySettings:
    """Settings with embeddings and extraction through the providers service."""
    return MemorySettings(
        data_dir=tmp_path / "data",
        port=0,
        providers_addr=providers.target,
        embedding_model=EMBEDDING_MODEL,
        extraction_model=EXTRACTION_MODEL,
        queue_poll_seconds=0.05,
        queue_backoff_seconds=0.05,
    )


@pytest.fixture
async def ai_stub(
    start_memory: StartMemory, ai_settings: MemorySettings
) -> AsyncIterator[MemoryStub]:
    server = await start_memory(ai_settings)
    async with insecure_channel(server.target) as channel:
        yield pb_grpc.MemoryServiceStub(channel)
