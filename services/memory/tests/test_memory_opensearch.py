"""The OpenSearch store beyond the contract suite: the query bodies it sends for what
osmem-server cannot run (knn), checked against OpenSearch's documented query DSL, and
the whole service on the OpenSearch store (osmem-server, or OPENSEARCH_URL when set)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from marie.memory.v1 import memory_service_pb2 as pb
from marie.memory.v1 import memory_service_pb2_grpc as pb_grpc
from marie_kit.channels import insecure_channel, is_serving
from marie_memory.records import EmbeddingSpace, MemoryFilter
from marie_memory.settings import MemorySettings
from marie_memory.stores.opensearch import (
    CLAIMS_DONE,
    OpenSearchStore,
    _memory_doc,
    filter_clauses,
    hybrid_pipeline_body,
    hybrid_query_body,
    index_prefix,
    keyword_query_body,
    knn_query_body,
    message_knn_body,
    message_search_body,
    vector_index_body,
)
from memory_testkit import StartMemory, add, memory, opensearch_target

from tests.stack import free_ports


def test_knn_search_filters_by_user_inside_the_knn_clause() -> None:
    # https://opensearch.org/docs/latest/search-plugins/knn/filter-search-knn/
    # ("Efficient k-NN filtering": lucene engine, `filter` inside the knn field).
    body = knn_query_body(
        "alice", [0.5, -0.5], MemoryFilter(categories=("food",), metadata={"app": "web"}), 7
    )
    assert body == {
        "size": 7,
        "_source": ["memory_id"],
        "query": {
            "knn": {
                "vector": {
                    "vector": [0.5, -0.5],
                    "k": 7,
                    "filter": {
                        "bool": {
                            "filter": [
                                {"term": {"user_id": "alice"}},
                                {"terms": {"categories": ["food"]}},
                                {"term": {"meta_pairs": "app\u0000web"}},
                            ]
                        }
                    },
                }
            }
        },
    }


def test_message_knn_search_filters_inside_the_knn_clause() -> None:
    body = message_knn_body("alice", [1.0], "conv_1", [2, 3], 4)
    assert body["query"]["knn"]["vector"] == {
        "vector": [1.0],
        "k": 4,
        "filter": {
            "bool": {
                "filter": [
                    {"term": {"user_id": "alice"}},
                    {"term": {"conversation_id": "conv_1"}},
                    {"terms": {"role": [2, 3]}},
                ]
            }
        },
    }
    messages = vector_index_body(8, messages=True)["mappings"]["properties"]
    assert set(messages) == {"user_id", "message_id", "conversation_id", "role", "vector"}


def test_the_vector_index_is_hnsw_on_lucene_with_cosine() -> None:
    # https://opensearch.org/docs/latest/field-types/supported-field-types/knn-vector/
    body = vector_index_body(768)
    assert body["settings"] == {"index": {"knn": True}}
    assert body["mappings"]["properties"]["vector"] == {
        "type": "knn_vector",
        "dimension": 768,
        "method": {"name": "hnsw", "space_type": "cosinesimil", "engine": "lucene"},
    }
    assert body["mappings"]["properties"]["user_id"] == {"type": "keyword"}


# "the green tea": its words compared folded (the `_folded` field), or as
# written for documents stored before that field existed.
GREEN_TEA = {
    "bool": {
        "should": [
            {"match": {"text_folded": {"query": "green tea"}}},
            {"match": {"text": {"query": "green tea", "operator": "or"}}},
        ],
        "minimum_should_match": 1,
    }
}


def test_keyword_and_message_queries_always_filter_by_user() -> None:
    memories = keyword_query_body("bob", "the green tea", MemoryFilter(), 5)
    assert memories["query"]["bool"]["must"] == [GREEN_TEA]
    assert memories["query"]["bool"]["filter"] == filter_clauses("bob", MemoryFilter())
    messages = message_search_body("bob", "lisbon", "conv_1", [2], 20)
    assert messages["query"]["bool"]["filter"] == [
        {"term": {"user_id": "bob"}},
        {"term": {"conversation_id": "conv_1"}},
        {"terms": {"role": [2]}},
    ]
    assert messages["highlight"]["pre_tags"] == ["<mark>"]
    assert messages["highlight"]["encoder"] == "html"  # the rest of the text is escaped


@pytest.mark.parametrize("kind", ["osmem", "opensearch"])
async def test_the_service_runs_on_the_opensearch_store(
    start_memory: StartMemory, request: pytest.FixtureRequest, kind: str, tmp_path: Path
) -> None:
    settings = MemorySettings(
        data_dir=tmp_path,
        port=0,
        store="opensearch",
        opensearch_url=opensearch_target(request, kind),
        opensearch_index_prefix=index_prefix(str(tmp_path)),
        embedding_model="",
    )
    server = await start_memory(settings)
    async with insecure_channel(server.target) as channel:
        assert await is_serving(channel, "marie.memory.v1.MemoryService")
        stub = pb_grpc.MemoryServiceStub(channel)
        conv = (
            await stub.CreateConversation(pb.CreateConversationRequest(user_id="u", title="Trip"))
        ).conversation
        await stub.AppendMessages(
            pb.AppendMessagesRequest(
                user_id="u",
                conversation_id=conv.id,
                messages=[pb.Message(role=pb.MESSAGE_ROLE_USER, content="Lisbon <in> May")],
            )
        )
        found = await stub.SearchMessages(pb.SearchMessagesRequest(user_id="u", query="lisbon"))
        assert found.hits[0].snippets == ["<mark>Lisbon</mark> &lt;in&gt; May"]
        assert found.hits[0].conversation_title == "Trip"
        await stub.AddMemories(
            pb.AddMemoriesRequest(
                user_id="u",
                infer=False,
                messages=[pb.SourceMessage(role=pb.MESSAGE_ROLE_USER, content="Likes green tea")],
            )
        )
        search = await stub.SearchMemories(pb.SearchMemoriesRequest(user_id="u", query="tea"))
        assert search.mode_used == pb.SEARCH_MODE_KEYWORD
        assert [r.memory.text for r in search.results] == ["Likes green tea"]
        assert (
            await stub.SearchMemories(pb.SearchMemoriesRequest(user_id="v", query="tea"))
        ).results == []
        erased = await stub.DeleteAllMemories(pb.DeleteAllMemoriesRequest(user_id="u"))
        assert erased.deleted_count == 1


def test_the_hybrid_pipeline_normalises_min_max_and_weights_the_mean() -> None:
    # https://opensearch.org/docs/latest/search-plugins/search-pipelines/normalization-processor/
    assert hybrid_pipeline_body(0.7, 0.3)["phase_results_processors"] == [
        {
            "normalization-processor": {
                "normalization": {"technique": "min_max"},
                "combination": {
                    "technique": "arithmetic_mean",
                    # One weight per sub-query of the hybrid query, in its order.
                    "parameters": {"weights": [0.3, 0.7]},
                },
            }
        }
    ]


def test_the_hybrid_query_holds_bm25_then_knn_with_the_user_filter_inside_knn() -> None:
    # https://opensearch.org/docs/latest/query-dsl/compound/hybrid/
    body = hybrid_query_body("alice", "the green tea", [0.5, -0.5], MemoryFilter(), 9)
    keyword, knn = body["query"]["hybrid"]["queries"]
    assert keyword == {"bool": {"must": [GREEN_TEA], "filter": [{"term": {"user_id": "alice"}}]}}
    assert knn == {
        "knn": {
            "vector": {
                "vector": [0.5, -0.5],
                "k": 9,
                "filter": {"bool": {"filter": [{"term": {"user_id": "alice"}}]}},
            }
        }
    }
    assert body["size"] == 9
    # The BM25 half runs on the vectors index, which carries the text.
    assert vector_index_body(4)["mappings"]["properties"]["text"] == {"type": "text"}
    assert vector_index_body(4)["mappings"]["properties"]["text_folded"] == {"type": "text"}


async def test_a_cluster_without_the_normalization_processor_leaves_hybrid_to_the_service(
    opensearch_url: str, tmp_path: Path
) -> None:
    """The real node has k-NN but not neural-search (not on Maven Central): the
    pipeline is refused, said once, and hybrid search is the service's."""
    store = await OpenSearchStore.open(
        opensearch_url, prefix=index_prefix(str(tmp_path)), hybrid_weights=(0.7, 0.3)
    )
    try:
        assert store.hybrid_pipeline is None
        assert "normalization-processor" in store.hybrid_pipeline_refusal
        await store.set_embedding_space(EmbeddingSpace("fake/embed", 2))
        assert (
            await store.hybrid_search_memories("alice", "tea", [1.0, 0.0], MemoryFilter(), 5)
            is None
        )
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["osmem", "opensearch"])
async def test_documents_stored_before_folding_are_folded_at_start(
    request: pytest.FixtureRequest, kind: str, tmp_path: Path
) -> None:
    """A memory written without its `text_folded` field (as before this
    field existed) is found by a folded query once the store has given it one."""
    url = opensearch_target(request, kind)
    prefix = index_prefix(str(tmp_path))
    store = await OpenSearchStore.open(url, prefix=prefix)
    try:
        # What the start runs in the background (folding, then claims), done
        # before we write: else it may fold the document below itself.
        assert store._backfill is not None
        await store._backfill
        old = memory("alice", "Works at \uff21\uff23\uff2d\uff25 Corp")
        doc = {k: v for k, v in _memory_doc(old).items() if k != "text_folded"}
        await store._client.index(index=store.index("memory"), id=old.id, body=doc, refresh=True)
        # Searchable before the fold's search looks for it: the run of the
        # whole suite once saw the fold find nothing (not reproduced alone).
        for _ in range(50):
            visible = await store._client.count(
                index=store.index("memory"), body={"query": {"ids": {"values": [old.id]}}}
            )
            if visible["count"]:
                break
            await asyncio.sleep(0.1)
        assert await store.keyword_search_memories("alice", "acme", MemoryFilter(), 5) == []

        assert await store.fold_older_documents() == 1
        await store._client.indices.refresh(index=store.index("memory"))
        hits = await store.keyword_search_memories("alice", "acme", MemoryFilter(), 5)
        assert [h.memory.id for h in hits] == [old.id]
        assert await store.fold_older_documents() == 0
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["osmem", "opensearch"])
async def test_memories_stored_before_texts_were_claimed_are_claimed_at_start(
    request: pytest.FixtureRequest, kind: str, tmp_path: Path
) -> None:
    """A memory written without its text's claim (as before claims existed) is
    found by its text before and after the store claims it, and once every
    text is claimed an unclaimed text is answered without a search."""
    url = opensearch_target(request, kind)
    prefix = index_prefix(str(tmp_path))
    store = await OpenSearchStore.open(url, prefix=prefix)
    try:
        assert store._backfill is not None
        await store._backfill  # what the start runs, on empty indices: all claimed
        assert store._claims_complete
        old = memory("alice", "Keeps bees")
        await store._client.index(
            index=store.index("memory"), id=old.id, body=_memory_doc(old), refresh=True
        )
        await store._client.delete(index=store.index("meta"), id=CLAIMS_DONE, refresh=True)
    finally:
        await store.close()
    store = await OpenSearchStore.open(url, prefix=prefix)
    try:
        if store._backfill is not None:
            await store._backfill  # the start's backfill: folding, then claims
        assert store._claims_complete
        assert await store.claim_older_memories() == 0
        found = await store.find_memory_by_hash("alice", old.hash)
        assert found is not None and found.id == old.id
        claim = await store._get("memory_hashes", store._claim_id("alice", old.hash))
        assert claim is not None and claim["memory_id"] == old.id
        assert await store.find_memory_by_hash("bob", old.hash) is None
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["osmem"])
async def test_a_dead_node_among_several_is_skipped(
    request: pytest.FixtureRequest, kind: str, tmp_path: Path
) -> None:
    """OPENSEARCH_URL may name several nodes: with one of them dead (nothing
    listens there), the store opens and answers through the other."""
    url = opensearch_target(request, kind)
    (dead,) = free_ports(1)
    store = await OpenSearchStore.open(
        f"http://127.0.0.1:{dead}, {url}", prefix=index_prefix(str(tmp_path))
    )
    try:
        for i in range(6):  # the client takes turns: the dead node comes up
            await store.apply_memory_changes("alice", [add(memory("alice", f"fact {i}"))])
        listed = await store.list_memories("alice", MemoryFilter(), None, 10)
        assert sorted(m.text for m in listed) == [f"fact {i}" for i in range(6)]
    finally:
        await store.close()
