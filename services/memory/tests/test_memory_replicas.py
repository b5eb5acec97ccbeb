"""Two memory service processes on one real OpenSearch node, as compose and
Kubernetes run them: nothing may rest on a lock inside one process.

Appends to one conversation from both replicas at once keep positions unique
and `message_count` equal to the messages stored; a request id makes a
retried append, conversation or memory take effect once, whichever replica
the retry reaches; one text added on both replicas at once is one memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from marie.memory.v1 import memory_service_pb2 as pb
from marie.memory.v1 import memory_service_pb2_grpc as pb_grpc
from marie_kit.channels import insecure_channel, wait_until_serving
from marie_memory.stores.opensearch import index_prefix

START_TIMEOUT_SECONDS = 60.0
TURNS = 200
CONCURRENCY = 16
USER = "5:acme/alice"


@dataclass
class Replica:
    process: asyncio.subprocess.Process
    address: str
    log: Path


async def _start(data_dir: Path, log: Path, opensearch_url: str, prefix: str) -> Replica:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MARIE_", "OPENSEARCH"))}
    env.update(
        MARIE_DATA_DIR=str(data_dir),
        MARIE_MEMORY_PORT="0",
        MARIE_MEMORY_STORE="opensearch",
        OPENSEARCH_URL=opensearch_url,
        MARIE_MEMORY_OPENSEARCH_INDEX_PREFIX=prefix,
        # A log file, not a pipe: nobody drains a pipe while the load runs.
        MARIE_LOG_LEVEL="INFO",
    )
    data_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before the process
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "marie_memory", env=env, stdout=out, stderr=out
        )
    deadline = asyncio.get_running_loop().time() + START_TIMEOUT_SECONDS
    while asyncio.get_running_loop().time() < deadline:
        for line in log.read_text(errors="replace").splitlines():  # noqa: ASYNC240
            if '"serving"' in line:
                entry = json.loads(line)
                if entry.get("message") == "serving":
                    address = str(entry["address"])
                    await wait_until_serving(address, "marie.memory.v1.MemoryService")
                    return Replica(process, address, log)
        if process.returncode is not None:
            break
        await asyncio.sleep(0.1)
    if process.returncode is None:
        process.kill()
    await process.wait()
    tail = log.read_text()[-3000:]  # noqa: ASYNC240 - failing anyway
    raise AssertionError(f"memory replica did not serve:\n{tail}")


@pytest.fixture
async def replicas(tmp_path: Path, opensearch_url: str) -> AsyncIterator[list[Replica]]:
    prefix = index_prefix(str(tmp_path))
    started = await asyncio.gather(
        *(
            _start(tmp_path / f"r{i}", tmp_path / f"r{i}.log", opensearch_url, prefix)
            for i in range(2)
        )
    )
    try:
        yield list(started)
    finally:
        for replica in started:
            if replica.process.returncode is None:
                replica.process.send_signal(signal.SIGTERM)
        for replica in started:
            try:
                await asyncio.wait_for(replica.process.wait(), 30)
            except TimeoutError:
                replica.process.kill()
                await replica.process.wait()


@pytest.fixture
async def stubs(replicas: list[Replica]) -> AsyncIterator[list[pb_grpc.MemoryServiceAsyncStub]]:
    channels = [insecure_channel(r.address) for r in replicas]
    try:
        yield [pb_grpc.MemoryServiceStub(c) for c in channels]
    finally:
        for channel in channels:
            await channel.close()


def _turn(n: int) -> list[pb.Message]:
    return [
        pb.Message(role=pb.MESSAGE_ROLE_USER, content=f"question {n}"),
        pb.Message(role=pb.MESSAGE_ROLE_ASSISTANT, content=f"answer {n}"),
    ]


async def _all_messages(
    stub: pb_grpc.MemoryServiceAsyncStub, conversation_id: str
) -> list[pb.Message]:
    out: list[pb.Message] = []
    token = ""
    while True:
        page = await stub.ListMessages(
            pb.ListMessagesRequest(
                user_id=USER, conversation_id=conversation_id, page_size=1000, page_token=token
            )
        )
        out.extend(page.messages)
        token = page.next_page_token
        if not token:
            return out


async def test_turns_from_two_replicas_keep_positions_unique_and_the_count_exact(
    stubs: Sequence[pb_grpc.MemoryServiceAsyncStub],
) -> None:
    created = await stubs[0].CreateConversation(pb.CreateConversationRequest(user_id=USER))
    conversation_id = created.conversation.id
    gate = asyncio.Semaphore(CONCURRENCY)

    async def turn(n: int) -> None:
        async with gate:
            await stubs[n % 2].AppendMessages(
                pb.AppendMessagesRequest(
                    user_id=USER, conversation_id=conversation_id, messages=_turn(n)
                ),
                timeout=60,
            )

    await asyncio.gather(*(turn(n) for n in range(TURNS)))

    # Read from the replica that did not create the conversation, at once.
    stored = await _all_messages(stubs[1], conversation_id)
    positions = [m.position for m in stored]
    assert sorted(positions) == list(range(2 * TURNS)), "duplicate or missing positions"
    assert len({m.id for m in stored}) == 2 * TURNS
    conversation = await stubs[1].GetConversation(
        pb.GetConversationRequest(user_id=USER, conversation_id=conversation_id)
    )
    assert conversation.conversation.message_count == len(stored) == 2 * TURNS
    # Each turn's two messages are adjacent, question first.
    by_position = {m.position: m.content for m in stored}
    for position in range(0, 2 * TURNS, 2):
        question, answer = by_position[position], by_position[position + 1]
        assert question.startswith("question ")
        assert answer == "answer " + question.removeprefix("question ")


async def test_a_retried_append_is_stored_once_whichever_replica_it_reaches(
    stubs: Sequence[pb_grpc.MemoryServiceAsyncStub],
) -> None:
    created = await stubs[0].CreateConversation(pb.CreateConversationRequest(user_id=USER))
    conversation_id = created.conversation.id
    request = pb.AppendMessagesRequest(
        user_id=USER, conversation_id=conversation_id, messages=_turn(1), request_id="turn-1"
    )
    # The first call and two retries, one racing it on the other replica.
    first, racing = await asyncio.gather(
        stubs[0].AppendMessages(request), stubs[1].AppendMessages(request)
    )
    retried = await stubs[1].AppendMessages(request)
    assert [m.id for m in first.messages] == [m.id for m in racing.messages]
    assert [m.id for m in first.messages] == [m.id for m in retried.messages]
    assert [m.position for m in retried.messages] == [0, 1]
    other = await stubs[0].AppendMessages(
        pb.AppendMessagesRequest(
            user_id=USER, conversation_id=conversation_id, messages=_turn(2), request_id="turn-2"
        )
    )
    assert [m.position for m in other.messages] == [2, 3]
    stored = await _all_messages(stubs[0], conversation_id)
    assert [m.content for m in stored] == ["question 1", "answer 1", "question 2", "answer 2"]
    assert other.conversation.message_count == 4


async def test_a_retried_create_conversation_creates_one(
    stubs: Sequence[pb_grpc.MemoryServiceAsyncStub],
) -> None:
    request = pb.CreateConversationRequest(user_id=USER, title="Tea", request_id="create-1")
    first = await stubs[0].CreateConversation(request)
    retried = await stubs[1].CreateConversation(request)
    assert retried.conversation.id == first.conversation.id
    listed = await stubs[1].ListConversations(pb.ListConversationsRequest(user_id=USER))
    assert [c.id for c in listed.conversations] == [first.conversation.id]
    # The same request id of another user is another conversation.
    theirs = await stubs[1].CreateConversation(
        pb.CreateConversationRequest(user_id="3:bob/bob", request_id="create-1")
    )
    assert theirs.conversation.id != first.conversation.id


async def test_memories_are_stored_once_under_retries_and_races(
    stubs: Sequence[pb_grpc.MemoryServiceAsyncStub],
) -> None:
    def add(text: str, request_id: str = "") -> pb.AddMemoriesRequest:
        return pb.AddMemoriesRequest(
            user_id=USER,
            messages=[pb.SourceMessage(role=pb.MESSAGE_ROLE_USER, content=text)],
            infer=False,
            request_id=request_id,
        )

    # One request retried on the other replica while the first runs.
    first, retried = await asyncio.gather(
        stubs[0].AddMemories(add("I drink green tea.", "add-1")),
        stubs[1].AddMemories(add("I drink green tea.", "add-1")),
    )
    assert first.results[0].memory.id == retried.results[0].memory.id
    # One text sent by two callers (no request id) at once, eight times over.
    raced = await asyncio.gather(
        *(stubs[i % 2].AddMemories(add("I live in Lyon.")) for i in range(8))
    )
    assert len({r.results[0].memory.id for r in raced}) == 1
    assert (
        sorted(pb.MemoryEvent.Name(r.results[0].event) for r in raced)
        == ["MEMORY_EVENT_ADD"] + ["MEMORY_EVENT_NONE"] * 7
    )
    listed = await stubs[1].ListMemories(pb.ListMemoriesRequest(user_id=USER))
    assert sorted(m.text for m in listed.memories) == ["I drink green tea.", "I live in Lyon."]


async def test_a_request_id_that_is_not_printable_ascii_is_refused(
    stubs: Sequence[pb_grpc.MemoryServiceAsyncStub],
) -> None:
    for bad in ("x" * 129, "tab\there", "é"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stubs[0].CreateConversation(
                pb.CreateConversationRequest(user_id=USER, request_id=bad)
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    listed = await stubs[0].ListConversations(pb.ListConversationsRequest(user_id=USER))
    assert list(listed.conversations) == []
