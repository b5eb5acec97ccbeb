"""Concurrent calls' OpenSearch requests sent as one, on a real node: writes in
one `_bulk` (group commit), reads by id in one `_mget`, appends to one
conversation reserved together. Each caller gets its own outcome: a refused
item fails its caller alone, a failed request fails every caller in it with
UNAVAILABLE and acknowledges nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from marie_kit.errors import ServiceError
from marie_memory.records import ROLE_ASSISTANT, ROLE_USER, Conversation, Message
from marie_memory.stores.batching import BulkWriter, DocReader, item_result
from marie_memory.stores.opensearch import OpenSearchStore, index_prefix
from opensearchpy import AsyncOpenSearch

from tests.stack import free_ports

WRITERS = 8


@pytest.fixture
async def client(opensearch_url: str) -> AsyncIterator[AsyncOpenSearch]:
    opened = AsyncOpenSearch(hosts=[opensearch_url], timeout=30)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def index(client: AsyncOpenSearch, tmp_path: Path) -> str:
    name = index_prefix(str(tmp_path))
    await client.indices.create(
        index=name, body={"mappings": {"properties": {"n": {"type": "long"}}}}
    )
    return name


@pytest.fixture
async def store(opensearch_url: str, tmp_path: Path) -> AsyncIterator[OpenSearchStore]:
    opened = await OpenSearchStore.open(opensearch_url, prefix=index_prefix(str(tmp_path)))
    try:
        yield opened
    finally:
        await opened.close()


def _create(index: str, doc_id: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"create": {"_index": index, "_id": doc_id}}, body]


async def _stored(client: AsyncOpenSearch, index: str, doc_id: str) -> bool:
    found = await client.get(index=index, id=doc_id, ignore=404)
    return bool(found.get("found"))


async def test_concurrent_writes_land_in_one_bulk_request(
    client: AsyncOpenSearch, index: str
) -> None:
    writer = BulkWriter(client)
    results = await asyncio.gather(
        *(writer.write(_create(index, f"d{i}", {"n": i})) for i in range(WRITERS))
    )
    assert (writer.grouped.requests, writer.grouped.parts) == (1, WRITERS)
    # Each caller got its own item.
    assert [item_result(items[0])["_id"] for items in results] == [f"d{i}" for i in range(WRITERS)]
    assert all(item_result(items[0])["status"] == 201 for items in results)
    for i in range(WRITERS):
        assert await _stored(client, index, f"d{i}")


async def test_writes_arriving_during_a_request_go_out_together_in_the_next(
    client: AsyncOpenSearch, index: str
) -> None:
    writer = BulkWriter(client)
    first = asyncio.ensure_future(writer.write(_create(index, "first", {"n": 0})))
    await asyncio.sleep(0)  # the first request is on its way
    rest = await asyncio.gather(
        *(writer.write(_create(index, f"d{i}", {"n": i})) for i in range(WRITERS))
    )
    await first
    assert (writer.grouped.requests, writer.grouped.parts) == (2, WRITERS + 1)
    assert all(item_result(items[0])["status"] == 201 for items in rest)


async def test_a_refused_item_fails_only_its_caller(client: AsyncOpenSearch, index: str) -> None:
    writer = BulkWriter(client)
    await writer.write(_create(index, "taken", {"n": 1}))
    taken, malformed, fine = await asyncio.gather(
        writer.write(_create(index, "taken", {"n": 2})),
        writer.write(_create(index, "bad", {"n": "not a number"})),
        writer.write(_create(index, "fine", {"n": 3})),
    )
    assert item_result(taken[0])["status"] == 409
    assert item_result(malformed[0])["status"] == 400
    assert item_result(fine[0])["status"] == 201
    assert not await _stored(client, index, "bad")
    assert await _stored(client, index, "fine")
    stored = await client.get(index=index, id="taken")
    assert stored["_source"] == {"n": 1}


async def test_an_unreachable_node_fails_every_caller_with_unavailable() -> None:
    (dead,) = free_ports(1)
    client = AsyncOpenSearch(hosts=[f"http://127.0.0.1:{dead}"], timeout=5, max_retries=0)
    try:
        writer = BulkWriter(client)
        outcomes = await asyncio.gather(
            *(writer.write(_create("anything", f"d{i}", {"n": i})) for i in range(3)),
            return_exceptions=True,
        )
    finally:
        await client.close()
    for outcome in outcomes:
        assert isinstance(outcome, ServiceError)
        assert outcome.code == grpc.StatusCode.UNAVAILABLE
        assert outcome.reason == "STORE_UNAVAILABLE"


async def test_a_node_dying_fails_the_callers_in_flight_and_acknowledges_nothing(
    index: str,
) -> None:
    """A node that accepts the connection and closes it without an answer:
    the callers in that request fail, and none of them is told it was stored."""
    closing = await asyncio.start_server(_hang_up, "127.0.0.1", 0)
    port = closing.sockets[0].getsockname()[1]
    dying = AsyncOpenSearch(hosts=[f"http://127.0.0.1:{port}"], timeout=5, max_retries=0)
    try:
        writer = BulkWriter(dying)
        outcomes = await asyncio.gather(
            *(writer.write(_create(index, f"d{i}", {"n": i})) for i in range(3)),
            return_exceptions=True,
        )
    finally:
        await dying.close()
        closing.close()
    assert all(
        isinstance(o, ServiceError) and o.code == grpc.StatusCode.UNAVAILABLE for o in outcomes
    )


async def _hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1)
    writer.close()


async def test_concurrent_reads_by_id_share_one_mget(client: AsyncOpenSearch, index: str) -> None:
    await client.index(index=index, id="here", body={"n": 1})  # no refresh: realtime reads
    reader = DocReader(client)
    here, missing, no_index = await asyncio.gather(
        reader.get(index, "here"),
        reader.get(index, "missing"),
        reader.get(f"{index}-absent", "x"),
    )
    assert (reader.grouped.requests, reader.grouped.parts) == (1, 3)
    assert here["found"] and here["_source"] == {"n": 1}
    assert isinstance(here["_seq_no"], int) and isinstance(here["_primary_term"], int)
    assert not missing["found"]
    assert no_index["error"]["type"] == "index_not_found_exception"


async def _conversation(store: OpenSearchStore, conversation_id: str = "c1") -> Conversation:
    return await store.create_conversation(
        Conversation(conversation_id, "alice", create_time=1.0, update_time=1.0)
    )


def _turn(n: int, request_id: str = "") -> list[Message]:
    prefix = request_id or f"t{n}"
    return [
        Message(f"{prefix}-q", "", ROLE_USER, f"question {n}"),
        Message(f"{prefix}-a", "", ROLE_ASSISTANT, f"answer {n}"),
    ]


async def test_concurrent_appends_to_one_conversation_are_reserved_together(
    store: OpenSearchStore,
) -> None:
    await _conversation(store)
    turns = 16
    results = await asyncio.gather(
        *(store.append_messages("alice", "c1", _turn(n), 2.0, f"r{n}") for n in range(turns))
    )
    positions = []
    for n, result in enumerate(results):
        assert result is not None
        stored, _ = result
        assert [m.content for m in stored] == [f"question {n}", f"answer {n}"]
        assert stored[1].position == stored[0].position + 1
        positions += [m.position for m in stored]
    assert sorted(positions) == list(range(2 * turns))
    conversation = await store.get_conversation("alice", "c1")
    assert conversation is not None and conversation.message_count == 2 * turns
    listed = await store.list_messages("alice", "c1", False, None, 100)
    assert listed is not None and [m.position for m in listed] == list(range(2 * turns))
    # Fewer write requests than appends: reservations and messages grouped.
    assert store._writer.grouped.requests < turns


async def test_one_request_id_twice_in_one_batch_is_stored_once(store: OpenSearchStore) -> None:
    await _conversation(store)
    first, again = await asyncio.gather(
        store.append_messages("alice", "c1", _turn(1, "same"), 2.0, "same"),
        store.append_messages("alice", "c1", _turn(1, "same"), 2.0, "same"),
    )
    assert first is not None and again is not None
    assert [m.position for m in first[0]] == [m.position for m in again[0]] == [0, 1]
    conversation = await store.get_conversation("alice", "c1")
    assert conversation is not None and conversation.message_count == 2
    listed = await store.list_messages("alice", "c1", False, None, 100)
    assert listed is not None and [m.content for m in listed] == ["question 1", "answer 1"]


async def test_appends_from_two_stores_stay_exact_when_a_remembered_version_is_stale(
    opensearch_url: str, tmp_path: Path
) -> None:
    """Each store remembers the conversation's version it wrote last; the other
    store's appends make it stale, which costs a conflict, never a position."""
    prefix = index_prefix(str(tmp_path))
    one = await OpenSearchStore.open(opensearch_url, prefix=prefix)
    two = await OpenSearchStore.open(opensearch_url, prefix=prefix)
    try:
        await _conversation(one)
        for n in range(6):
            result = await (one, two)[n % 2].append_messages("alice", "c1", _turn(n), 2.0)
            assert result is not None
            assert [m.position for m in result[0]] == [2 * n, 2 * n + 1]
        conversation = await two.get_conversation("alice", "c1")
        assert conversation is not None and conversation.message_count == 12
    finally:
        await one.close()
        await two.close()


async def test_an_append_to_another_users_conversation_in_a_batch_is_not_found(
    store: OpenSearchStore,
) -> None:
    await _conversation(store)
    mine, theirs = await asyncio.gather(
        store.append_messages("alice", "c1", _turn(1), 2.0),
        store.append_messages("bob", "c1", _turn(2), 2.0),
    )
    assert mine is not None and [m.position for m in mine[0]] == [0, 1]
    assert theirs is None
    conversation = await store.get_conversation("alice", "c1")
    assert conversation is not None and conversation.message_count == 2
