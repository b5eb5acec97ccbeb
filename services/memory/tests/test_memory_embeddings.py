"""Embeddings through a real providers service in front of the fake Ollama: hybrid and
vector search, the recorded embedding space, model changes, and providers going away."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from marie.memory.v1 import memory_service_pb2 as pb
from marie.memory.v1 import memory_service_pb2_grpc as pb_grpc
from marie_kit.channels import insecure_channel
from marie_kit.server import RunningServer, start_server
from marie_memory.embedding import ModelChangeRefused
from marie_memory.records import EmbeddingSpace
from marie_memory.service import MemoryComponent
from marie_memory.settings import MemorySettings
from marie_memory.stores.sqlite import SqliteStore
from marie_providers.service import ProvidersComponent
from marie_providers.settings import ProvidersSettings
from memory_testkit import EMBEDDING_MODEL, MemoryStub, StartMemory

from tests.fakes.ollama import FakeModel, FakeOllama
from tests.grpc_testing import rpc_error

USER = "alice"


async def _remember(stub: MemoryStub, *texts: str, **fields: Any) -> list[pb.Memory]:
    reply = await stub.AddMemories(
        pb.AddMemoriesRequest(
            user_id=USER,
            infer=False,
            messages=[pb.SourceMessage(role=pb.MESSAGE_ROLE_USER, content=t) for t in texts],
            **fields,
        )
    )
    return [r.memory for r in reply.results]


async def _search(stub: MemoryStub, query: str, **fields: Any) -> pb.SearchMemoriesResponse:
    return await stub.SearchMemories(pb.SearchMemoriesRequest(user_id=USER, query=query, **fields))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_hybrid_is_the_default_and_ranks_by_meaning_and_keywords(
    ai_stub: MemoryStub, ollama: FakeOllama, ai_settings: MemorySettings
) -> None:
    tea, _, _ = await _remember(
        ai_stub, "Likes green tea in the morning", "Has a dog named Rex", "Works as a nurse"
    )
    await _remember(ai_stub, "Plays chess", categories=["games"])
    assert any(
        r.body["input"]
        == ["Likes green tea in the morning", "Has a dog named Rex", "Works as a nurse"]
        for r in ollama.embed_requests
    )

    hybrid = await _search(ai_stub, "green tea")
    assert (hybrid.mode_used, hybrid.mode_note) == (pb.SEARCH_MODE_HYBRID, "")
    assert hybrid.results[0].memory.id == tea.id
    assert all(0 <= r.score <= 1 for r in hybrid.results)
    # Only the best match shares words: its hybrid score is well above the rest.
    assert hybrid.results[0].score > 0.5 > hybrid.results[1].score

    vector = await _search(ai_stub, "tea", mode=pb.SEARCH_MODE_VECTOR, top_k=2)
    assert vector.mode_used == pb.SEARCH_MODE_VECTOR and len(vector.results) == 2
    assert vector.results[0].memory.id == tea.id

    strict = await _search(ai_stub, "green tea", score_threshold=0.5)
    assert [r.memory.id for r in strict.results] == [tea.id]
    games = await _search(ai_stub, "green tea", filter=pb.MemoryFilter(categories=["games"]))
    assert [r.memory.text for r in games.results] == ["Plays chess"]

    store = await SqliteStore.open(ai_settings.db_path)
    try:
        assert await store.get_embedding_space() == EmbeddingSpace(EMBEDDING_MODEL, 768)
    finally:
        await store.close()


async def test_a_strong_keyword_match_outside_the_vector_candidates_leads_hybrid(
    ai_stub: MemoryStub,
) -> None:
    # As with real embedders, every vector candidate is close to the query (cosine
    # ~0.67: two of its three words), and one memory only keyword search finds: the
    # query's rare word among many others, so its vector is far (outside the vector
    # side's 50 candidates). Adding raw cosines to BM25 ratios never let it in.
    await _remember(ai_stub, *(f"quartz stone {i}" for i in range(60)))
    filler = " ".join(f"w{i}" for i in range(30))
    [pebble] = await _remember(ai_stub, f"pebble {filler}")

    vector = await _search(ai_stub, "quartz stone pebble", mode=pb.SEARCH_MODE_VECTOR, top_k=50)
    assert pebble.id not in [r.memory.id for r in vector.results]
    keyword = await _search(ai_stub, "quartz stone pebble", mode=pb.SEARCH_MODE_KEYWORD)
    assert keyword.results[0].memory.id == pebble.id

    hybrid = await _search(ai_stub, "quartz stone pebble")

    assert hybrid.mode_used == pb.SEARCH_MODE_HYBRID
    assert hybrid.results[0].memory.id == pebble.id
    assert all(0 <= r.score <= 1 for r in hybrid.results)


async def test_a_new_text_gets_a_new_vector(ai_stub: MemoryStub) -> None:
    memory = (await _remember(ai_stub, "Lives in Lisbon"))[0]
    await _remember(ai_stub, "Owns a bicycle")
    await ai_stub.UpdateMemory(
        pb.UpdateMemoryRequest(
            user_id=USER,
            memory=pb.Memory(id=memory.id, text="Lives in Porto"),
            update_mask=FieldMask(paths=["text"]),
        )
    )
    found = await _search(ai_stub, "porto", mode=pb.SEARCH_MODE_VECTOR, top_k=1)
    assert found.results[0].memory.id == memory.id
    assert found.results[0].score > 0.5


async def test_providers_down_means_keyword_search_said_so_and_no_write(
    start_memory: StartMemory, ai_settings: MemorySettings
) -> None:
    settings = ai_settings.model_copy(update={"providers_addr": f"127.0.0.1:{_closed_port()}"})
    server = await start_memory(settings)
    async with insecure_channel(server.target) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        error = await rpc_error(_remember(stub, "Likes tea"))
        assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
        assert (await stub.ListMemories(pb.ListMemoriesRequest(user_id=USER))).memories == []
        reply = await _search(stub, "tea")
        assert reply.mode_used == pb.SEARCH_MODE_KEYWORD
        assert reply.mode_note == "the embedding model could not be reached"
        error = await rpc_error(_search(stub, "tea", mode=pb.SEARCH_MODE_VECTOR))
        assert error.reason == "PROVIDER_UNAVAILABLE"


async def test_a_changed_model_is_refused_or_re_embedded_never_mixed(
    start_memory: StartMemory, ai_settings: MemorySettings, ollama: FakeOllama
) -> None:
    first = await start_memory(ai_settings)
    async with insecure_channel(first.target) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        memories = await _remember(stub, "Likes green tea", "Has a dog", "Reads novels")
    await first.stop(0.5)

    ollama.add_model(
        FakeModel(name="tiny-embed:latest", embedding_dimension=32, capabilities=["embedding"])
    )
    changed = ai_settings.model_copy(
        update={"embedding_model": "ollama/tiny-embed:latest", "on_model_change": "refuse"}
    )
    with pytest.raises(ModelChangeRefused, match="ollama/nomic-embed-text:latest"):
        await start_server([MemoryComponent(changed)])

    server = await start_memory(replace_setting(changed, on_model_change="reembed"))
    async with insecure_channel(server.target) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        for _ in range(200):
            reply = await _search(stub, "green tea", mode=pb.SEARCH_MODE_VECTOR)
            if len(reply.results) == 3 and reply.mode_note == "":
                break
            await asyncio.sleep(0.05)
        assert reply.results[0].memory.id == memories[0].id
        assert len(reply.results) == 3 and reply.mode_note == ""
    tiny = [r for r in ollama.embed_requests if r.body["model"] == "tiny-embed:latest"]
    assert {t for r in tiny for t in r.body["input"]} >= {m.text for m in memories}
    await server.stop(0.5)
    store = await SqliteStore.open(ai_settings.db_path)
    try:
        assert await store.get_embedding_space() == EmbeddingSpace("ollama/tiny-embed:latest", 32)
        assert await store.memories_without_vectors(10) == []
    finally:
        await store.close()


async def _providers_with_prefixes(ollama: FakeOllama, folder: Path) -> RunningServer:
    config = folder / "marie.yaml"
    config.write_text(
        "providers:\n"
        f"  ollama:\n    type: ollama\n    base_url: {ollama.base_url}\n"
        "    embedding_prefixes: {query: 'search_query: ', document: 'search_document: '}\n"
    )
    settings = ProvidersSettings(config=config, ollama_enabled=False, port=0)
    return await start_server([ProvidersComponent(settings)])


async def test_stored_texts_are_documents_and_searches_queries_and_a_new_handling_re_embeds(
    start_memory: StartMemory, ai_settings: MemorySettings, ollama: FakeOllama, tmp_path: Path
) -> None:
    first = await start_memory(ai_settings)
    async with insecure_channel(first.target) as channel:
        memories = await _remember(
            pb_grpc.MemoryServiceStub(channel), "Likes green tea", "Has a dog", "Reads novels"
        )
    await first.stop(0.5)
    texts = {m.text for m in memories}

    providers = await _providers_with_prefixes(ollama, tmp_path)
    try:
        ollama.reset()
        server = await start_memory(
            ai_settings.model_copy(update={"providers_addr": providers.target})
        )
        async with insecure_channel(server.target) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            for _ in range(200):
                reply = await _search(stub, "green tea", mode=pb.SEARCH_MODE_VECTOR)
                if len(reply.results) == 3 and reply.mode_note == "":
                    break
                await asyncio.sleep(0.05)
            assert len(reply.results) == 3 and reply.mode_note == ""
            assert reply.results[0].memory.id == memories[0].id
            [added] = await _remember(stub, "Drinks coffee")
            hybrid = await _search(stub, "a hot drink")
            assert hybrid.mode_used == pb.SEARCH_MODE_HYBRID
        sent = [t for r in ollama.embed_requests for t in r.body["input"]]
        # Every stored memory was embedded again, as a document; every search as a query.
        assert {f"search_document: {t}" for t in texts | {added.text}} <= set(sent)
        assert {"search_query: green tea", "search_query: a hot drink"} <= set(sent)
        assert not set(sent) & (texts | {"green tea", "a hot drink"})
        await server.stop(0.5)
    finally:
        await providers.stop(0.5)
    store = await SqliteStore.open(ai_settings.db_path)
    try:
        space = await store.get_embedding_space()
        assert space is not None and space.model.startswith(f"{EMBEDDING_MODEL}#prefixes:")
        assert await store.memories_without_vectors(10) == []
    finally:
        await store.close()


async def test_a_repeated_query_is_embedded_once_whatever_the_mode(
    start_memory: StartMemory, ai_settings: MemorySettings, ollama: FakeOllama, tmp_path: Path
) -> None:
    providers = await _providers_with_prefixes(ollama, tmp_path)
    try:
        server = await start_memory(
            ai_settings.model_copy(update={"providers_addr": providers.target})
        )
        async with insecure_channel(server.target) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            await _remember(stub, "green tea")
            ollama.reset()
            for mode in (pb.SEARCH_MODE_HYBRID, pb.SEARCH_MODE_VECTOR, pb.SEARCH_MODE_HYBRID):
                reply = await _search(stub, "green tea", mode=mode)
                assert reply.results[0].memory.text == "green tea"
        await server.stop(0.5)
    finally:
        await providers.stop(0.5)

    sent = [t for r in ollama.embed_requests for t in r.body["input"]]
    assert sent == ["search_query: green tea"]


def replace_setting(settings: MemorySettings, **changes: Any) -> MemorySettings:
    return settings.model_copy(update=changes)


async def test_messages_are_embedded_after_they_are_appended_and_searched_by_meaning(
    ai_stub: MemoryStub,
) -> None:
    conv = (
        await ai_stub.CreateConversation(pb.CreateConversationRequest(user_id=USER, title="T"))
    ).conversation
    other = (
        await ai_stub.CreateConversation(pb.CreateConversationRequest(user_id="bob"))
    ).conversation
    await ai_stub.AppendMessages(
        pb.AppendMessagesRequest(
            user_id=USER,
            conversation_id=conv.id,
            messages=[
                pb.Message(role=pb.MESSAGE_ROLE_USER, content="Green tea <3 every morning"),
                pb.Message(role=pb.MESSAGE_ROLE_ASSISTANT, content="Noted about your dog"),
            ],
        )
    )
    await ai_stub.AppendMessages(
        pb.AppendMessagesRequest(
            user_id="bob",
            conversation_id=other.id,
            messages=[pb.Message(role=pb.MESSAGE_ROLE_USER, content="green tea for bob")],
        )
    )
    request = pb.SearchMessagesRequest(user_id=USER, query="tea", mode=pb.SEARCH_MODE_VECTOR)
    for _ in range(200):
        reply = await ai_stub.SearchMessages(request)
        if len(reply.hits) == 2 and reply.mode_note == "":
            break
        await asyncio.sleep(0.05)
    assert reply.mode_used == pb.SEARCH_MODE_VECTOR and reply.mode_note == ""
    assert [h.message.content for h in reply.hits] == [
        "Green tea <3 every morning",
        "Noted about your dog",
    ]
    # Found by meaning: one snippet from the start, escaped, without marks.
    assert reply.hits[0].snippets == ["Green tea &lt;3 every morning"]
    assert reply.hits[0].conversation_title == "T"

    hybrid = await ai_stub.SearchMessages(pb.SearchMessagesRequest(user_id=USER, query="tea"))
    assert (hybrid.mode_used, hybrid.mode_note) == (pb.SEARCH_MODE_HYBRID, "")
    assert hybrid.hits[0].snippets == ["Green <mark>tea</mark> &lt;3 every morning"]
    assert hybrid.hits[0].score > hybrid.hits[1].score
