"""Memory writes with replicas in mind: `AddMemories` (`infer: false`) and
conversation turns (`AppendMessages` of two messages), over gRPC, on a real
OpenSearch node at the store's own refresh interval (1 s, not the tests'
100 ms), with the SQLite store measured in the same run as the baseline.

Concurrency 16. Memory writes: each call one new text (a new memory, its
text claimed, its history written). Turns: all on one conversation (positions
reserved with optimistic concurrency, so conflicts are part of the cost),
then checked: unique positions, `message_count` = messages stored.
No embedding model: the store's path alone (an embedding model adds its own
call per text).

`--http` also measures `POST /api/memories` (`infer: false`, one key, so one
user) through a whole suite started with `marie up`, memory on the same node.

Usage: make bench   (or .venv/bin/python bench/memory_writes.py --calls 400)
A/B against another checkout: give both the same running node
(`--opensearch-url`; each run writes to indices of its own) and run them
alternately; the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from marie.memory.v1 import memory_service_pb2 as mpb  # noqa: E402
from marie.memory.v1 import memory_service_pb2_grpc as mpb_grpc  # noqa: E402
from marie_kit.channels import insecure_channel  # noqa: E402
from marie_kit.server import start_server  # noqa: E402
from marie_memory.service import MemoryComponent  # noqa: E402
from marie_memory.settings import MemorySettings  # noqa: E402

from bench.common import cpu_seconds  # noqa: E402
from tests.opensearch_node import OpenSearchNode  # noqa: E402
from tests.stack import start_stack  # noqa: E402

#: Calls in flight at once (`--concurrency`).
CONCURRENCY = 16
USER = "bench-user"


async def _timed(calls: int, one: Callable[[int], Awaitable[object]]) -> list[float]:
    """Latencies (ms) of `calls` calls of `one(i)`, CONCURRENCY at a time."""
    out: list[float] = []
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        while next_i < calls:
            i = next_i
            next_i += 1
            started = time.perf_counter()
            await one(i)
            out.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return out


Row = tuple[str, str, float, float, float]
#: CPU per call of each process, one line per measured call (printed last).
CPU_NOTES: list[str] = []


def _listener(url: str) -> dict[str, int]:
    """The process listening on the URL's port (the OpenSearch node), if found."""
    port = int(url.rstrip("/").rsplit(":", 1)[-1])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) in inodes:
                return {"opensearch": int(fd.parts[2])}
        except OSError:
            continue  # closed or gone meanwhile
    return {}


async def _timed_cpu(
    what: str, pids: dict[str, int], calls: int, one: Callable[[int], Awaitable[object]]
) -> list[float]:
    """`_timed`, noting each process's CPU per call meanwhile."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    ms = await _timed(calls, one)
    spent = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    per_call = ", ".join(f"{name} {1000 * s / calls:.2f}" for name, s in spent.items())
    CPU_NOTES.append(f"{what}: {per_call} ms (total {1000 * sum(spent.values()) / calls:.2f})")
    return ms


def _row(store: str, what: str, ms: list[float]) -> Row:
    ms = sorted(ms)
    return (
        store,
        what,
        statistics.median(ms),
        ms[int(len(ms) * 0.95) - 1],
        len(ms) / (sum(ms) / 1000 / CONCURRENCY),
    )


async def _measure(
    settings: MemorySettings, calls: int, label: str, node: dict[str, int]
) -> list[Row]:
    server = await start_server([MemoryComponent(settings)])
    rows: list[Row] = []
    try:
        async with insecure_channel(server.target) as channel:
            stub = mpb_grpc.MemoryServiceStub(channel)
            # Warm-up (index creation, first connections), not measured.
            await stub.AddMemories(
                mpb.AddMemoriesRequest(
                    user_id=USER,
                    messages=[mpb.SourceMessage(role=mpb.MESSAGE_ROLE_USER, content="warm up")],
                    infer=False,
                )
            )

            async def add(i: int) -> object:
                return await stub.AddMemories(
                    mpb.AddMemoriesRequest(
                        user_id=USER,
                        messages=[
                            mpb.SourceMessage(
                                role=mpb.MESSAGE_ROLE_USER, content=f"Fact number {i} of {label}"
                            )
                        ],
                        infer=False,
                        request_id=f"add-{label}-{i}",
                    )
                )

            pids = {"bench (client and memory)": os.getpid(), **node}
            added = await _timed_cpu(f"{label} AddMemories", pids, calls, add)
            rows.append(_row(label, "AddMemories infer=false", added))
            conv = (
                await stub.CreateConversation(
                    mpb.CreateConversationRequest(user_id=USER, title="bench")
                )
            ).conversation

            async def turn(i: int) -> object:
                return await stub.AppendMessages(
                    mpb.AppendMessagesRequest(
                        user_id=USER,
                        conversation_id=conv.id,
                        messages=[
                            mpb.Message(role=mpb.MESSAGE_ROLE_USER, content=f"question {i}"),
                            mpb.Message(role=mpb.MESSAGE_ROLE_ASSISTANT, content=f"answer {i}"),
                        ],
                        request_id=f"turn-{i}",
                    )
                )

            rows.append(_row(label, "AppendMessages (1 conversation)", await _timed(calls, turn)))
            got = await stub.GetConversation(
                mpb.GetConversationRequest(user_id=USER, conversation_id=conv.id)
            )
            positions: list[int] = []
            token = ""
            while True:
                page = await stub.ListMessages(
                    mpb.ListMessagesRequest(
                        user_id=USER, conversation_id=conv.id, page_size=100, page_token=token
                    )
                )
                positions += [m.position for m in page.messages]
                token = page.next_page_token
                if not token:
                    break
            assert len(set(positions)) == len(positions) == 2 * calls, (len(positions), calls)
            assert got.conversation.message_count == 2 * calls
    finally:
        await server.stop(0)
    return rows


async def _post_memories(base_url: str, key: str, calls: int, pids: dict[str, int]) -> list[float]:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=60
    ) as client:

        async def post(text: str) -> None:
            reply = await client.post(
                "/api/memories",
                json={"messages": [{"role": "user", "content": text}], "infer": False},
            )
            assert reply.status_code == 200, reply.text

        await post("warm up")
        return await _timed_cpu(
            "POST /api/memories", pids, calls, lambda i: post(f"Fact number {i} over HTTP")
        )


def _http(url: str, calls: int) -> Row:
    """`POST /api/memories` through a suite whose memory is on the node."""
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack(
            Path(tmp),
            "http://127.0.0.1:9",  # no model is called
            MARIE_MEMORY_STORE="opensearch",
            OPENSEARCH_URL=url,
            MARIE_MEMORY_OPENSEARCH_INDEX_PREFIX=f"bench{time.time_ns()}",
        )
        try:
            key = stack.create_key("bench")
            pids = {**stack.service_pids(), "client": os.getpid(), **_listener(url)}
            ms = asyncio.run(_post_memories(stack.base_url, key, calls, pids))
        finally:
            stack.stop()
    return _row("opensearch", "POST /api/memories (HTTP)", ms)


async def _both(url: str, calls: int) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = MemorySettings(data_dir=Path(tmp) / "sqlite", port=0)
        rows += await _measure(sqlite, calls, "sqlite", {})
        rows += await _measure(
            MemorySettings(
                data_dir=Path(tmp) / "os",
                port=0,
                store="opensearch",
                opensearch_url=url,
                # Fresh indices per run: runs may share a node.
                opensearch_index_prefix=f"bench{time.time_ns()}",
            ),
            calls,
            "opensearch",
            _listener(url),
        )
    return rows


def main() -> None:
    global CONCURRENCY  # noqa: PLW0603 (one run, one setting)
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument(
        "--opensearch-url", default="", help="a running node to use (else one is started)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=CONCURRENCY,
        help="calls in flight at once (1: a call's own round trips, no queueing)",
    )
    parser.add_argument(
        "--http", action="store_true", help="also POST /api/memories through a whole suite"
    )
    args = parser.parse_args()
    CONCURRENCY = args.concurrency
    node = None if args.opensearch_url else OpenSearchNode.start()
    url = args.opensearch_url or (node.url if node else "")
    try:
        # The store's refresh interval in production (the node's test template
        # says 100 ms): what a write waiting for a refresh would pay.
        httpx.put(
            f"{url}/_index_template/bench",
            json={
                "index_patterns": ["bench*"],
                "priority": 10,
                "template": {
                    "settings": {"index.number_of_replicas": 0, "index.refresh_interval": "1s"}
                },
            },
            timeout=30,
        ).raise_for_status()
        load_before = os.getloadavg()[0]
        rows = asyncio.run(_both(url, args.calls))
        if args.http:
            rows.append(_http(url, args.calls))
        load_after = os.getloadavg()[0]
    finally:
        if node is not None:
            node.stop()
    print(
        f"\nMemory writes, {args.calls} calls each at concurrency {CONCURRENCY}"
        f" (load average {load_before:.1f} before, {load_after:.1f} after):"
    )
    print(f"{'store':<11} {'call':<34} {'p50 ms':>8} {'p95 ms':>8} {'calls/s':>8}")
    for store, what, p50, p95, rate in rows:
        print(f"{store:<11} {what:<34} {p50:8.1f} {p95:8.1f} {rate:8.0f}")
    print("CPU per call:")
    for note in CPU_NOTES:
        print(f"  {note}")


if __name__ == "__main__":
    main()
