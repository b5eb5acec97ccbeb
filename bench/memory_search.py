"""Memory search latency on SQLite at 1k, 10k and 100k memories of one user.

For each size: a fresh store is filled with memories (texts from a 2,000-word
vocabulary, random 768-dimension vectors in the space of the embedding
model), then the same queries run

- in the store: vector search (numpy, warm per-user cache) and keyword (BM25);
- through the service: SearchMemories in hybrid mode over gRPC, the query
  embedded by the providers service in front of a fake Ollama;
- the query embedding alone (providers' CreateEmbeddings), reported apart.

Usage: make bench   (or .venv/bin/python bench/memory_search.py --sizes 1000,10000)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from marie.memory.v1 import memory_service_pb2 as mpb  # noqa: E402
from marie.memory.v1 import memory_service_pb2_grpc as mpb_grpc  # noqa: E402
from marie.providers.v1 import provider_service_pb2 as ppb  # noqa: E402
from marie.providers.v1 import provider_service_pb2_grpc as ppb_grpc  # noqa: E402
from marie_kit.channels import insecure_channel  # noqa: E402
from marie_kit.server import start_server  # noqa: E402
from marie_memory.core import new_id, text_hash  # noqa: E402
from marie_memory.records import (  # noqa: E402
    EVENT_ADD,
    EmbeddingSpace,
    HistoryEntry,
    Memory,
    MemoryChange,
    MemoryFilter,
)
from marie_memory.service import MemoryComponent  # noqa: E402
from marie_memory.settings import MemorySettings  # noqa: E402
from marie_memory.stores.sqlite import SqliteStore  # noqa: E402
from marie_providers.service import ProvidersComponent  # noqa: E402
from marie_providers.settings import ProvidersSettings  # noqa: E402

from tests.fakes import FakeOllama  # noqa: E402

MODEL = "ollama/nomic-embed-text:latest"
DIMENSION = 768
USER = "bench-user"
QUERIES = 200


def _add(text: str, vector: list[float]) -> MemoryChange:
    now = time.time()
    mem = Memory(new_id("mem"), USER, text, text_hash(text), create_time=now, update_time=now)
    entry = HistoryEntry(new_id("hist"), mem.id, EVENT_ADD, "", text, now, USER, False)
    return MemoryChange(EVENT_ADD, mem, entry, vector)


def _vocabulary(rng: random.Random) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(4, 9))) for _ in range(2000)]


async def _fill(path: Path, size: int, words: list[str], rng: random.Random) -> float:
    store = await SqliteStore.open(path)
    await store.set_embedding_space(EmbeddingSpace(MODEL, DIMENSION))
    vectors = np.random.default_rng(size).standard_normal((size, DIMENSION), dtype=np.float32)
    started = time.perf_counter()
    for start in range(0, size, 1000):
        batch = [
            _add(" ".join(rng.choices(words, k=8)) + f" #{i}", vectors[i].tolist())
            for i in range(start, min(size, start + 1000))
        ]
        await store.apply_memory_changes(USER, batch)
    await store.close()
    return time.perf_counter() - started


async def _timed(fn: Callable[[str], Awaitable[object]], queries: list[str]) -> list[float]:
    await fn(queries[0])  # warm caches (the per-user vector matrix)
    samples = []
    for q in queries:
        t = time.perf_counter()
        await fn(q)
        samples.append((time.perf_counter() - t) * 1000)
    return samples


def _p(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100)[int(q) - 1]


async def bench(
    size: int, fake: FakeOllama, providers_target: str
) -> list[tuple[str, list[float]]]:
    rng = random.Random(7)
    words = _vocabulary(rng)
    queries = [" ".join(rng.choices(words, k=3)) for _ in range(QUERIES)]
    rows: list[tuple[str, list[float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "memory.sqlite3"
        fill = await _fill(path, size, words, rng)
        print(f"  {size:>7} memories written in {fill:.1f} s", flush=True)
        store = await SqliteStore.open(path)
        qvec = np.random.default_rng(0).standard_normal(DIMENSION).tolist()
        rows.append(
            (
                "store vector (numpy)",
                await _timed(
                    lambda q: store.vector_search_memories(USER, qvec, MemoryFilter(), 10), queries
                ),
            )
        )
        rows.append(
            (
                "store keyword (BM25)",
                await _timed(
                    lambda q: store.keyword_search_memories(USER, q, MemoryFilter(), 50), queries
                ),
            )
        )
        await store.close()
        settings = MemorySettings(
            data_dir=Path(tmp), port=0, providers_addr=providers_target, embedding_model=MODEL
        )
        server = await start_server([MemoryComponent(settings)])
        try:
            async with (
                insecure_channel(server.target) as channel,
                insecure_channel(providers_target) as pchannel,
            ):
                stub = mpb_grpc.MemoryServiceStub(channel)
                providers = ppb_grpc.ProviderServiceStub(pchannel)
                rows.append(
                    (
                        "RPC hybrid (incl. embedding)",
                        await _timed(
                            lambda q: stub.SearchMemories(
                                mpb.SearchMemoriesRequest(user_id=USER, query=q, top_k=10)
                            ),
                            queries,
                        ),
                    )
                )
                rows.append(
                    (
                        "query embedding alone",
                        await _timed(
                            lambda q: providers.CreateEmbeddings(
                                ppb.CreateEmbeddingsRequest(model=MODEL, inputs=[q])
                            ),
                            queries,
                        ),
                    )
                )
        finally:
            await server.stop(1)
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"\nMemory search latency, one user, {DIMENSION} dimensions, {QUERIES} queries\n")
    with FakeOllama() as fake:
        providers = await start_server(
            [ProvidersComponent(ProvidersSettings(ollama_base_url=fake.base_url, port=0))]
        )
        try:
            results = {size: await bench(size, fake, providers.target) for size in sizes}
        finally:
            await providers.stop(1)
    print(f"\n{'memories':>9}  {'search':<30} {'p50 ms':>8} {'p95 ms':>8}")
    for size, rows in results.items():
        for name, samples in rows:
            print(f"{size:>9}  {name:<30} {_p(samples, 50):>8.2f} {_p(samples, 95):>8.2f}")
    print("\nRPC hybrid = embedding + vector + BM25 + ranking; the fake Ollama embeds in Python.")


if __name__ == "__main__":
    asyncio.run(main())
