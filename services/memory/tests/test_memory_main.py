"""`python -m marie_memory`: serves, drains on SIGTERM, refuses bad settings in one line,
and a SIGKILL in the middle of writes loses no acknowledged write."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import grpc
from marie.memory.v1 import memory_service_pb2 as pb
from marie.memory.v1 import memory_service_pb2_grpc as pb_grpc
from marie_kit.channels import insecure_channel, wait_until_serving
from marie_memory.records import EmbeddingSpace, MemoryFilter
from marie_memory.stores.sqlite import SqliteStore

START_TIMEOUT_SECONDS = 20.0


def _environment(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MARIE_", "OPENSEARCH"))}
    return {**env, "MARIE_DATA_DIR": str(data_dir), "MARIE_MEMORY_PORT": "0", **extra}


async def _start(data_dir: Path, **extra: str) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "marie_memory",
        env=_environment(data_dir, **extra),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None

    async def address() -> str:
        assert process.stdout is not None
        while True:
            raw = await process.stdout.readline()
            if not raw:
                raise AssertionError("exited before serving")
            entry = json.loads(raw)
            if entry.get("message") == "serving":
                return str(entry["address"])

    try:
        return process, await asyncio.wait_for(address(), START_TIMEOUT_SECONDS)
    except BaseException:
        process.kill()
        await process.wait()
        raise


async def test_the_service_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    process, address = await _start(tmp_path)
    try:
        await wait_until_serving(address, "marie.memory.v1.MemoryService", timeout=5)
        async with insecure_channel(address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            await stub.CreateConversation(pb.CreateConversationRequest(user_id="u"))
        process.send_signal(signal.SIGTERM)
        stdout, _ = await asyncio.wait_for(process.communicate(), START_TIMEOUT_SECONDS)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    assert '"stopped"' in stdout.decode()
    assert (tmp_path / "memory.sqlite3").exists()


async def test_a_bad_setting_exits_with_one_line(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "marie_memory",
        env=_environment(tmp_path, MARIE_MEMORY_VECTOR_WEIGHT="2"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), START_TIMEOUT_SECONDS)
    assert process.returncode == 2
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("invalid settings: MARIE_MEMORY_VECTOR_WEIGHT")


async def test_sigkill_during_writes_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    process, address = await _start(tmp_path)
    acknowledged_memories: list[str] = []
    acknowledged_messages: list[str] = []
    try:
        async with insecure_channel(address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            conv = (
                await stub.CreateConversation(pb.CreateConversationRequest(user_id="u"))
            ).conversation

            async def write_memories(worker: int) -> None:
                for i in range(10_000):
                    reply = await stub.AddMemories(
                        pb.AddMemoriesRequest(
                            user_id="u",
                            infer=False,
                            messages=[
                                pb.SourceMessage(
                                    role=pb.MESSAGE_ROLE_USER, content=f"fact {worker}-{i}"
                                )
                            ],
                        )
                    )
                    acknowledged_memories.append(reply.results[0].memory.id)

            async def write_messages() -> None:
                for i in range(10_000):
                    reply = await stub.AppendMessages(
                        pb.AppendMessagesRequest(
                            user_id="u",
                            conversation_id=conv.id,
                            messages=[
                                pb.Message(role=pb.MESSAGE_ROLE_USER, content=f"message {i}")
                            ],
                        )
                    )
                    acknowledged_messages.append(reply.messages[0].id)

            writers = [
                asyncio.create_task(write_memories(0)),
                asyncio.create_task(write_memories(1)),
                asyncio.create_task(write_messages()),
            ]
            for _ in range(3000):  # the writes are acknowledged well within 30 s
                if len(acknowledged_memories) >= 100 and len(acknowledged_messages) >= 50:
                    break
                await asyncio.sleep(0.01)
            process.kill()  # SIGKILL with writes in flight
            await process.wait()
            results = await asyncio.gather(*writers, return_exceptions=True)
            assert all(isinstance(r, grpc.aio.AioRpcError) for r in results)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    store = await SqliteStore.open(tmp_path / "memory.sqlite3")
    try:
        stored = {m.id for m in await store.list_memories("u", MemoryFilter(), None, 100_000)}
        assert set(acknowledged_memories) <= stored
        messages = await store.list_messages("u", conv.id, False, None, 100_000)
        assert messages is not None
        assert set(acknowledged_messages) <= {m.id for m in messages}
        assert [m.position for m in messages] == list(range(len(messages)))
    finally:
        await store.close()


async def test_a_refused_embedding_model_change_exits_with_one_line(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "memory.sqlite3")
    await store.set_embedding_space(EmbeddingSpace("ollama/old-embed", 8))
    await store.close()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "marie_memory",
        env=_environment(
            tmp_path,
            MARIE_MEMORY_EMBEDDING_MODEL="ollama/new-embed",
            MARIE_MEMORY_ON_MODEL_CHANGE="refuse",
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), START_TIMEOUT_SECONDS)
    assert process.returncode == 2
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert "'ollama/new-embed'" in lines[0] and "'ollama/old-embed'" in lines[0]


async def test_an_unreachable_opensearch_exits_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "marie_memory",
        env=_environment(
            tmp_path, MARIE_MEMORY_STORE="opensearch", OPENSEARCH_URL=f"http://127.0.0.1:{port}"
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), START_TIMEOUT_SECONDS * 3)
    assert process.returncode == 2
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"cannot open the opensearch store at http://127.0.0.1:{port}")
