"""The OpenSearch store (`MARIE_MEMORY_STORE=opensearch`), on opensearch-py's async client.

Indices (`<prefix>_…`, prefix `marie` by default): `conversations`,
`messages`, `memory` (the original design's `marie_memory`), `memory_vectors`
(one `knn_vector` per memory, HNSW on the lucene engine, cosine), `history`,
`jobs` and `meta` (the embedding space). Every document carries its
`user_id`; every query filters on it (inside the knn clause for vectors).

Several memory replicas may write to one cluster at once, so no invariant
rests on a lock inside one process. A write is acknowledged by OpenSearch
before the call returns, but no request waits for an index refresh
(`refresh=wait_for` costs up to a second): documents are read back by id
(realtime get), and listings refresh the index first when what they need may
not be searchable yet. Appends reserve their positions on the conversation
document with optimistic concurrency (`if_seq_no`/`if_primary_term`), then
write the messages: positions are unique and `message_count` counts what is
stored. Appends to one conversation that meet in one process share one
reservation (a conditional write, checked by OpenSearch like any other). A
memory's text hash is claimed (a document created only if absent) before the
memory is written, so one text is stored once per user however many replicas
add it. OpenSearch has no multi-document transactions: a change set is
checked before it is written (ids free, memories present), written with one
bulk request, and on a partial failure the documents it created are removed
again (best effort). Concurrent calls' writes go out together in one bulk
request, their reads by id in one mget (`batching`): one round trip and one
translog fsync serve many calls. Searches see a write within the index's
refresh interval (1 s); a replica's own writes at once.

Vectors live in their own index so that a new embedding space (another
dimension) only drops and recreates that index. A memory records the space
of its vector (`vector_space`), so memories lacking one are found by query.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import html
import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from marie_kit.settings import opensearch_hosts
from opensearchpy import AsyncOpenSearch, ConflictError, NotFoundError, TransportError

from marie_memory.records import (
    EVENT_ADD,
    EVENT_DELETE,
    EVENT_UPDATE,
    MESSAGE_EMBEDDING_NOTE,
    Conversation,
    EmbeddingSpace,
    ExtractionJob,
    HistoryEntry,
    Memory,
    MemoryChange,
    MemoryFilter,
    Message,
    MessageHit,
    MessageVector,
    ScoredMemory,
    ToolCall,
)
from marie_memory.stores.batching import BulkWriter, DocReader, item_result
from marie_memory.stores.contract import FINISHED_JOB_SECONDS, DuplicateMemory
from marie_memory.stores.keywords import highlight_fragments, mark_words, query_words, search_form

log = logging.getLogger("marie.memory.opensearch")

WAIT = "wait_for"
MAX_RESULTS = 10_000
#: How long a claim on a text without its memory is taken for a write in
#: progress (then for a writer that died).
CLAIM_WRITE_SECONDS = 5.0
#: The `meta` document that says every stored memory's text is claimed.
CLAIMS_DONE = "hash_claims_complete"
#: Request ids of a conversation's most recent appends, kept on its document:
#: how far back a retried append is recognised.
RECENT_APPENDS = 64
#: Connections to the cluster: enough for every request of a busy replica in
#: flight at once (opensearch-py's default, 10, queues them in the client).
CONNECTIONS = 64
#: Conversations whose last version this process wrote is remembered (an
#: append then needs no read first; a stale one costs a conflict and a read).
KNOWN_VERSIONS = 1024
_DISABLED = {"type": "object", "enabled": False}
_KEYWORD = {"type": "keyword"}

MAPPINGS: dict[str, dict[str, Any]] = {
    "conversations": {
        "id": _KEYWORD,
        "user_id": _KEYWORD,
        "title": {"type": "text"},
        "provider": _KEYWORD,
        "model": _KEYWORD,
        "metadata": _DISABLED,
        "create_time": {"type": "double"},
        "update_time": {"type": "double"},
        "message_count": {"type": "long"},
        # The last appends' request ids with their first position and count.
        "appends": _DISABLED,
    },
    "messages": {
        "id": _KEYWORD,
        "conversation_id": _KEYWORD,
        "user_id": _KEYWORD,
        "position": {"type": "long"},
        "role": {"type": "integer"},
        "content": {"type": "text"},
        # The content as keyword search compares it (keywords.search_form).
        "content_folded": {"type": "text"},
        "create_time": {"type": "double"},
        "metadata": _DISABLED,
        "tool_calls": _DISABLED,
        "has_content": {"type": "boolean"},
        "vector_space": _KEYWORD,
    },
    "memory": {
        "id": _KEYWORD,
        "user_id": _KEYWORD,
        "text": {"type": "text"},
        "text_folded": {"type": "text"},
        "hash": _KEYWORD,
        "categories": _KEYWORD,
        "metadata": _DISABLED,
        # "key\u0000value" per metadata pair: what metadata filters match.
        "meta_pairs": _KEYWORD,
        "source_conversation_id": _KEYWORD,
        "create_time": {"type": "double"},
        "update_time": {"type": "double"},
        "vector_space": _KEYWORD,
    },
    "history": {
        "id": _KEYWORD,
        "memory_id": _KEYWORD,
        "user_id": _KEYWORD,
        "seq": {"type": "long"},
    },
    "jobs": {
        "id": _KEYWORD,
        "user_id": _KEYWORD,
        "next_attempt_time": {"type": "double"},
        "create_time": {"type": "double"},
    },
    "finished_jobs": {
        "id": _KEYWORD,
        "user_id": _KEYWORD,
        "finish_time": {"type": "double"},
        "results": _DISABLED,
    },
    "meta": {"value": _DISABLED},
    # One document per (user, text hash): the memory that holds that text.
    "memory_hashes": {"user_id": _KEYWORD, "memory_id": _KEYWORD},
}


def _jitter(most: float) -> float:
    """A random wait before trying a conflicting write again (no secret: spreading only)."""
    return random.uniform(0, most)  # noqa: S311


def keyword_text(query: str) -> str:
    """The words of a free-text query for a `match` query, read as the SQLite store reads them."""
    return " ".join(query_words(query))


def folded_words(query: str) -> list[str]:
    """The words of a query in the form the `*_folded` fields hold."""
    return [search_form(w) for w in query_words(query)]


def keyword_match(field: str, query: str) -> dict[str, Any]:
    """Any word of `query` in `field`, compared folded (`<field>_folded`, and
    the field itself for documents written before it existed)."""
    return {
        "bool": {
            "should": [
                {"match": {f"{field}_folded": {"query": " ".join(folded_words(query))}}},
                {"match": {field: {"query": keyword_text(query), "operator": "or"}}},
            ],
            "minimum_should_match": 1,
        }
    }


def space_key(space: EmbeddingSpace) -> str:
    return f"{space.model}#{space.dimension}"


def vector_index_body(dimension: int, *, messages: bool = False) -> dict[str, Any]:
    """A vectors index: knn_vector with HNSW on the lucene engine, cosine similarity,
    beside the keyword fields its knn filters use."""
    if messages:
        fields: dict[str, Any] = {
            "message_id": _KEYWORD,
            "conversation_id": _KEYWORD,
            "role": {"type": "integer"},
        }
    else:
        fields = {
            "memory_id": _KEYWORD,
            # The memory's text again: the BM25 half of the hybrid query runs
            # on this index, beside the knn half.
            "text": {"type": "text"},
            "text_folded": {"type": "text"},
            "categories": _KEYWORD,
            "meta_pairs": _KEYWORD,
            "source_conversation_id": _KEYWORD,
        }
    return {
        "settings": {"index": {"knn": True}},
        "mappings": {
            "properties": {
                "user_id": _KEYWORD,
                **fields,
                "vector": {
                    "type": "knn_vector",
                    "dimension": dimension,
                    "method": {"name": "hnsw", "space_type": "cosinesimil", "engine": "lucene"},
                },
            }
        },
    }


def filter_clauses(user_id: str, memory_filter: MemoryFilter) -> list[dict[str, Any]]:
    """The bool filter of a user's memories (and of their vectors) under a MemoryFilter."""
    clauses: list[dict[str, Any]] = [{"term": {"user_id": user_id}}]
    if memory_filter.source_conversation_id:
        clauses.append({"term": {"source_conversation_id": memory_filter.source_conversation_id}})
    if memory_filter.categories:
        clauses.append({"terms": {"categories": list(memory_filter.categories)}})
    for key, value in sorted(memory_filter.metadata.items()):
        clauses.append({"term": {"meta_pairs": f"{key}\u0000{value}"}})
    return clauses


def knn_query_body(
    user_id: str, vector: Sequence[float], memory_filter: MemoryFilter, k: int
) -> dict[str, Any]:
    """A knn search of one user's vectors; the user filter sits inside the knn clause
    (lucene engine: filtering during the HNSW search, so k results of that user)."""
    return {
        "size": k,
        "_source": ["memory_id"],
        "query": {
            "knn": {
                "vector": {
                    "vector": [float(x) for x in vector],
                    "k": k,
                    "filter": {"bool": {"filter": filter_clauses(user_id, memory_filter)}},
                }
            }
        },
    }


def message_knn_body(
    user_id: str, vector: Sequence[float], conversation_id: str, roles: Sequence[int], k: int
) -> dict[str, Any]:
    """A knn search of one user's message vectors, the filters inside the knn clause."""
    filters: list[dict[str, Any]] = [{"term": {"user_id": user_id}}]
    if conversation_id:
        filters.append({"term": {"conversation_id": conversation_id}})
    if roles:
        filters.append({"terms": {"role": list(roles)}})
    return {
        "size": k,
        "_source": ["message_id"],
        "query": {
            "knn": {
                "vector": {
                    "vector": [float(x) for x in vector],
                    "k": k,
                    "filter": {"bool": {"filter": filters}},
                }
            }
        },
    }


def hybrid_pipeline_body(vector_weight: float, keyword_weight: float) -> dict[str, Any]:
    """The search pipeline of hybrid memory search: each sub-query's scores
    min-max normalised, then their weighted arithmetic mean (the weights in the
    order of `hybrid_query_body`'s queries: keyword, then vector)."""
    return {
        "description": "Marie hybrid memory search: min_max, weighted arithmetic mean",
        "phase_results_processors": [
            {
                "normalization-processor": {
                    "normalization": {"technique": "min_max"},
                    "combination": {
                        "technique": "arithmetic_mean",
                        "parameters": {"weights": [keyword_weight, vector_weight]},
                    },
                }
            }
        ],
    }


def hybrid_query_body(
    user_id: str, query: str, vector: Sequence[float], memory_filter: MemoryFilter, k: int
) -> dict[str, Any]:
    """A `hybrid` query on the vectors index: BM25 on the text and knn on the
    vector, the user's filter in both (inside the knn clause for knn)."""
    filters = filter_clauses(user_id, memory_filter)
    return {
        "size": k,
        "_source": ["memory_id"],
        "query": {
            "hybrid": {
                "queries": [
                    {
                        "bool": {
                            "must": [keyword_match("text", query)],
                            "filter": filters,
                        }
                    },
                    {
                        "knn": {
                            "vector": {
                                "vector": [float(x) for x in vector],
                                "k": k,
                                "filter": {"bool": {"filter": filters}},
                            }
                        }
                    },
                ]
            }
        },
    }


def keyword_query_body(
    user_id: str, query: str, memory_filter: MemoryFilter, limit: int
) -> dict[str, Any]:
    return {
        "size": limit,
        "query": {
            "bool": {
                "must": [keyword_match("text", query)],
                "filter": filter_clauses(user_id, memory_filter),
            }
        },
        "sort": [{"_score": "desc"}, {"id": "asc"}],
    }


def message_search_body(
    user_id: str, query: str, conversation_id: str, roles: Sequence[int], limit: int
) -> dict[str, Any]:
    filters: list[dict[str, Any]] = [{"term": {"user_id": user_id}}]
    if conversation_id:
        filters.append({"term": {"conversation_id": conversation_id}})
    if roles:
        filters.append({"terms": {"role": list(roles)}})
    return {
        "size": limit,
        "query": {
            "bool": {
                "must": [keyword_match("content", query)],
                "filter": filters,
            }
        },
        "sort": [{"_score": "desc"}, {"create_time": "asc"}, {"id": "asc"}],
        "highlight": {
            "pre_tags": ["<mark>"],
            "post_tags": ["</mark>"],
            "encoder": "html",
            "fields": {"content": {"number_of_fragments": 3, "fragment_size": 200}},
            # Words as written: a match found only folded is highlighted by the store.
            "highlight_query": {"match": {"content": keyword_text(query)}},
        },
    }


def _meta_pairs(metadata: Mapping[str, str]) -> list[str]:
    return [f"{k}\u0000{v}" for k, v in sorted(metadata.items())]


def _conversation_doc(c: Conversation) -> dict[str, Any]:
    return {
        "id": c.id,
        "user_id": c.user_id,
        "title": c.title,
        "provider": c.provider,
        "model": c.model,
        "metadata": dict(c.metadata),
        "create_time": c.create_time,
        "update_time": c.update_time,
        "message_count": c.message_count,
    }


def _conversation(src: Mapping[str, Any]) -> Conversation:
    return Conversation(
        id=src["id"],
        user_id=src["user_id"],
        title=src["title"],
        provider=src["provider"],
        model=src["model"],
        metadata=dict(src.get("metadata") or {}),
        create_time=src["create_time"],
        update_time=src["update_time"],
        message_count=src["message_count"],
    )


def _message_doc(user_id: str, m: Message) -> dict[str, Any]:
    return {
        "id": m.id,
        "conversation_id": m.conversation_id,
        "user_id": user_id,
        "position": m.position,
        "role": m.role,
        "content": m.content,
        "content_folded": search_form(m.content),
        "provider": m.provider,
        "model": m.model,
        "prompt_tokens": m.prompt_tokens,
        "completion_tokens": m.completion_tokens,
        "create_time": m.create_time,
        "metadata": dict(m.metadata),
        "name": m.name,
        "tool_calls": {"calls": [[c.id, c.function_name, c.arguments] for c in m.tool_calls]},
        "tool_call_id": m.tool_call_id,
        "has_content": bool(m.content),
    }


def _message(src: Mapping[str, Any]) -> Message:
    return Message(
        id=src["id"],
        conversation_id=src["conversation_id"],
        role=src["role"],
        content=src["content"],
        provider=src["provider"],
        model=src["model"],
        prompt_tokens=src["prompt_tokens"],
        completion_tokens=src["completion_tokens"],
        create_time=src["create_time"],
        metadata=dict(src.get("metadata") or {}),
        position=src["position"],
        name=src["name"],
        tool_calls=tuple(ToolCall(*c) for c in (src.get("tool_calls") or {}).get("calls", [])),
        tool_call_id=src["tool_call_id"],
    )


def _memory_doc(m: Memory, vector_space: str = "") -> dict[str, Any]:
    return {
        "id": m.id,
        "user_id": m.user_id,
        "text": m.text,
        "text_folded": search_form(m.text),
        "hash": m.hash,
        "categories": list(m.categories),
        "metadata": dict(m.metadata),
        "meta_pairs": _meta_pairs(m.metadata),
        "source_conversation_id": m.source_conversation_id,
        "source_message_ids": list(m.source_message_ids),
        "create_time": m.create_time,
        "update_time": m.update_time,
        "vector_space": vector_space,
    }


def _memory(src: Mapping[str, Any]) -> Memory:
    return Memory(
        id=src["id"],
        user_id=src["user_id"],
        text=src["text"],
        hash=src["hash"],
        categories=tuple(src.get("categories") or ()),
        metadata=dict(src.get("metadata") or {}),
        source_conversation_id=src.get("source_conversation_id", ""),
        source_message_ids=tuple(src.get("source_message_ids") or ()),
        create_time=src["create_time"],
        update_time=src["update_time"],
    )


def _history_doc(user_id: str, seq: int, e: HistoryEntry) -> dict[str, Any]:
    return {
        "id": e.id,
        "memory_id": e.memory_id,
        "user_id": user_id,
        "seq": seq,
        "event": e.event,
        "old_text": e.old_text,
        "new_text": e.new_text,
        "create_time": e.create_time,
        "actor": e.actor,
        "inferred": e.inferred,
    }


def _history(src: Mapping[str, Any]) -> HistoryEntry:
    return HistoryEntry(
        id=src["id"],
        memory_id=src["memory_id"],
        event=src["event"],
        old_text=src["old_text"],
        new_text=src["new_text"],
        create_time=src["create_time"],
        actor=src["actor"],
        inferred=bool(src["inferred"]),
    )


def _job_doc(j: ExtractionJob) -> dict[str, Any]:
    return {
        "id": j.id,
        "user_id": j.user_id,
        "payload": j.payload,
        "attempts": j.attempts,
        "next_attempt_time": j.next_attempt_time,
        "create_time": j.create_time,
        "last_error": j.last_error,
    }


def _job(src: Mapping[str, Any]) -> ExtractionJob:
    return ExtractionJob(
        id=src["id"],
        user_id=src["user_id"],
        payload=src["payload"],
        attempts=src["attempts"],
        next_attempt_time=src["next_attempt_time"],
        create_time=src["create_time"],
        last_error=src.get("last_error", ""),
    )


def _finished_job(src: Mapping[str, Any]) -> ExtractionJob:
    return ExtractionJob(
        id=src["id"],
        user_id=src["user_id"],
        payload="",
        attempts=src["attempts"],
        next_attempt_time=0.0,
        create_time=src["create_time"],
        last_error=src.get("last_error", ""),
        state=src["state"],
        finish_time=src["finish_time"],
        failure_reason=src.get("failure_reason", ""),
        results=src.get("results", ""),
    )


AppendResult = tuple[list[Message], Conversation] | None


@dataclass
class _PendingAppend:
    """An append waiting for its conversation's next reservation."""

    user_id: str
    messages: list[Message]
    now: float
    request_id: str
    done: asyncio.Future[AppendResult] = dataclasses.field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def answer(self, result: AppendResult | BaseException) -> None:
        if self.done.done():
            return
        if isinstance(result, BaseException):
            self.done.set_exception(result)
        else:
            self.done.set_result(result)


class OpenSearchStore:
    """The `Store` on an OpenSearch cluster. Open with `await OpenSearchStore.open(url)`."""

    #: One text is one memory however many processes add it at once (the
    #: text's claim): verbatim adds need no lock in the process.
    claims_texts = True

    def __init__(self, client: AsyncOpenSearch, prefix: str) -> None:
        self._client = client
        # Concurrent calls' writes share bulk requests, their reads by id mget requests.
        self._writer = BulkWriter(client)
        self._reader = DocReader(client)
        # Appends waiting for their conversation's next reservation, and the
        # tasks making them (one per conversation with appends waiting).
        self._appending: dict[str, list[_PendingAppend]] = {}
        self._append_runs: set[asyncio.Task[None]] = set()
        # conversation id -> (document, seq_no, primary_term) this process wrote last.
        self._versions: OrderedDict[str, tuple[dict[str, Any], int, int]] = OrderedDict()
        self._prefix = prefix
        # Indices this process wrote to since it last refreshed them: its own
        # searches refresh those first (read-your-writes without wait_for).
        self._dirty: set[str] = set()
        self._space: EmbeddingSpace | None = None
        self._seq = 0
        #: The hybrid search pipeline's name, once it exists; None: hybrid
        #: scores are combined by the service (see `ensure_hybrid_pipeline`).
        self.hybrid_pipeline: str | None = None
        #: Why there is no pipeline, when the cluster refused to create one.
        self.hybrid_pipeline_refusal = ""
        self._backfill: asyncio.Task[None] | None = None
        #: Every stored memory's text is claimed (older ones by
        #: `claim_older_memories`): a text without a claim is not stored.
        self._claims_complete = False

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        prefix: str = "marie",
        hybrid_weights: tuple[float, float] | None = None,
    ) -> OpenSearchStore:
        """`hybrid_weights` (vector, keyword): create the hybrid search pipeline
        with them when missing (`ensure_hybrid_pipeline`)."""
        client = AsyncOpenSearch(hosts=opensearch_hosts(url), timeout=30, maxsize=CONNECTIONS)
        store = cls(client, prefix)
        try:
            await store._create_indices()
            store._space = await store.get_embedding_space()
            store._claims_complete = await store._get("meta", CLAIMS_DONE) is not None
            if hybrid_weights is not None:
                await store.ensure_hybrid_pipeline(*hybrid_weights)
        except BaseException:
            await client.close()
            raise
        store._backfill = asyncio.get_running_loop().create_task(
            store._fold_quietly(), name="opensearch-fold"
        )
        return store

    async def _fold_quietly(self) -> None:
        try:
            await self.fold_older_documents()
        except Exception as exc:  # the next start tries again
            log.warning("older documents not folded", extra={"error": repr(exc)[:500]})
        try:
            await self.claim_older_memories()
        except Exception as exc:  # the next start tries again
            log.warning("older memories not claimed", extra={"error": repr(exc)[:500]})

    async def claim_older_memories(self, batch: int = 500) -> int:
        """Claims the texts of memories stored before texts were claimed (once
        per cluster; a replica doing it at the same time is harmless); then an
        add looks a text up by its claim alone. The number claimed."""
        if self._claims_complete:
            return 0
        done = 0
        after: list[Any] | None = None
        while True:
            body: dict[str, Any] = {
                "size": batch,
                "_source": ["id", "user_id", "hash", "create_time"],
                "sort": [{"create_time": "asc"}, {"id": "asc"}],
            }
            if after is not None:
                body["search_after"] = after
            hits = await self._search("memory", body)
            if not hits:
                break
            actions: list[dict[str, Any]] = []
            for h in hits:
                m = h["_source"]
                actions.append(
                    {
                        "create": {
                            "_index": self.index("memory_hashes"),
                            "_id": self._claim_id(m["user_id"], m["hash"]),
                        }
                    }
                )
                actions.append({"user_id": m["user_id"], "memory_id": m["id"], "time": 0.0})
            reply = await self._client.bulk(body=actions)
            done += sum(1 for i in reply["items"] if i["create"].get("status") == 201)
            after = hits[-1]["sort"]
        await self._client.index(
            index=self.index("meta"), id=CLAIMS_DONE, body={"value": {"done": True}}
        )
        self._claims_complete = True
        if done:
            log.info("older memories' texts claimed", extra={"memories": done})
        return done

    async def fold_older_documents(self, batch: int = 500) -> int:
        """Give documents written before the `*_folded` fields existed their
        folded text, a batch at a time (until then keyword search finds them
        by their words as written); the number updated."""
        done = 0
        for name, field in (
            ("messages", "content"),
            ("memory", "text"),
            ("memory_vectors", "text"),
        ):
            index = self.index(name)
            body = {
                "size": batch,
                "_source": [field],
                "query": {
                    "bool": {
                        "must": [{"exists": {"field": field}}],
                        "must_not": [{"exists": {"field": f"{field}_folded"}}],
                    }
                },
            }
            while True:
                try:
                    reply = await self._client.search(index=index, body=body)
                except NotFoundError:
                    break
                hits = reply["hits"]["hits"]
                if not hits:
                    break
                actions: list[dict[str, Any]] = []
                for h in hits:
                    actions.append({"update": {"_index": index, "_id": h["_id"]}})
                    actions.append({"doc": {f"{field}_folded": search_form(h["_source"][field])}})
                await self._bulk(actions)
                await self._refresh(name)  # the next search must not find these again
                done += len(hits)
        if done:
            log.info("older documents folded for keyword search", extra={"documents": done})
        return done

    async def ensure_hybrid_pipeline(self, vector_weight: float, keyword_weight: float) -> bool:
        """Creates (or updates) `<prefix>_hybrid`, the search pipeline with the
        normalization processor, and uses it for hybrid memory search. The
        processor comes with the neural-search plugin: a cluster without it
        refuses the pipeline (400), and hybrid scores are then combined by the
        service, as on SQLite. Answers whether the pipeline is in use."""
        name = self.index("hybrid")
        body = hybrid_pipeline_body(vector_weight, keyword_weight)
        try:
            await self._client.transport.perform_request(
                "PUT", f"/_search/pipeline/{name}", body=body
            )
        except TransportError as exc:
            if not isinstance(exc.status_code, int) or not 400 <= exc.status_code < 500:
                raise
            self.hybrid_pipeline = None
            self.hybrid_pipeline_refusal = f"{exc.status_code} {exc.error}: {exc.info}"[:500]
            log.warning(
                "OpenSearch refused the hybrid search pipeline (no normalization-processor, "
                "which the neural-search plugin provides); hybrid scores are combined by the "
                "service",
                extra={"pipeline": name, "error": self.hybrid_pipeline_refusal},
            )
            return False
        self.hybrid_pipeline = name
        return True

    def index(self, name: str) -> str:
        return f"{self._prefix}_{name}"

    async def _create_indices(self) -> None:
        for name, properties in MAPPINGS.items():
            index = self.index(name)
            if not await self._client.indices.exists(index=index):
                try:
                    await self._client.indices.create(
                        index=index, body={"mappings": {"properties": properties}}
                    )
                    continue
                except TransportError as exc:
                    # Another replica starting at the same time created it.
                    if exc.error != "resource_already_exists_exception":
                        raise
            # Fields added since the index was created (adding is allowed).
            await self._client.indices.put_mapping(index=index, body={"properties": properties})

    async def _delete_where(self, *, index: str, body: dict[str, Any], refresh: bool) -> Any:
        """delete_by_query after a refresh: it deletes what a search finds, and
        a write of any replica since the last refresh is not found yet."""
        await self._client.indices.refresh(index=index)
        return await self._client.delete_by_query(index=index, body=body, refresh=refresh)

    async def _refresh(self, name: str) -> None:
        self._dirty.discard(name)
        await self._client.indices.refresh(index=self.index(name))

    async def _searchable(self, name: str) -> None:
        """Refreshes `name` when this process wrote to it since its last refresh."""
        if name in self._dirty:
            await self._refresh(name)

    async def close(self) -> None:
        if self._backfill is not None:
            self._backfill.cancel()
            await asyncio.gather(self._backfill, return_exceptions=True)
        while self._append_runs:
            await asyncio.gather(*self._append_runs, return_exceptions=True)
        await self._writer.grouped.close()
        await self._reader.grouped.close()
        await self._client.close()

    async def probe_write(self) -> None:
        # Refused (cluster_block_exception) while the index is read-only for
        # lack of disk; a delete is allowed even then.
        await self._client.index(
            index=self.index("meta"), id="storage_probe", body={"probe": True}, refresh=False
        )
        await self._client.delete(index=self.index("meta"), id="storage_probe", ignore=404)

    def _next_seq(self) -> int:
        # History order: time in microseconds, strictly increasing in this process.
        self._seq = max(self._seq + 1, int(time.time() * 1_000_000))
        return self._seq

    async def _get(self, name: str, doc_id: str) -> dict[str, Any] | None:
        found = await self._get_versioned(name, doc_id)
        return None if found is None else found[0]

    async def _users_docs(
        self, name: str, user_id: str, doc_ids: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        """The user's documents of these ids that exist, by id, in one round
        trip (realtime, as `_get`, grouped with concurrent reads): a search's
        hits looked up one `get` at a time made a 50-candidate vector search
        50 round trips."""
        if not doc_ids:
            return {}
        docs = await self._reader.get_many(self.index(name), list(dict.fromkeys(doc_ids)))
        return {
            d["_id"]: d["_source"]
            for d in docs
            if d.get("found") and d["_source"]["user_id"] == user_id
        }

    async def _search(self, name: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        await self._searchable(name)
        return await self._search_as_is(name, body)

    async def _search_as_is(self, name: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        reply = await self._client.search(index=self.index(name), body=body)
        hits: list[dict[str, Any]] = reply["hits"]["hits"]
        return hits

    # --- embedding space --------------------------------------------------

    async def get_embedding_space(self) -> EmbeddingSpace | None:
        doc = await self._get("meta", "embedding_space")
        if doc is None:
            return None
        value = json.loads(doc["value"]["json"])
        return EmbeddingSpace(value["model"], int(value["dimension"]))

    async def set_embedding_space(self, space: EmbeddingSpace | None) -> None:
        if space == await self.get_embedding_space():
            return
        for name in ("memory_vectors", "message_vectors"):
            if await self._client.indices.exists(index=self.index(name)):
                await self._client.indices.delete(index=self.index(name))
        if space is None:
            await self._client.delete(index=self.index("meta"), id="embedding_space", refresh=WAIT)
        else:
            await self._client.indices.create(
                index=self.index("memory_vectors"), body=vector_index_body(space.dimension)
            )
            await self._client.indices.create(
                index=self.index("message_vectors"),
                body=vector_index_body(space.dimension, messages=True),
            )
            value = {"model": space.model, "dimension": space.dimension}
            await self._client.index(
                index=self.index("meta"),
                id="embedding_space",
                body={"value": {"json": json.dumps(value)}},
                refresh=WAIT,
            )
        self._space = space

    async def memories_without_vectors(self, limit: int) -> list[Memory]:
        if self._space is None:
            must_not: list[dict[str, Any]] = []
        else:
            must_not = [{"term": {"vector_space": space_key(self._space)}}]
        hits = await self._search(
            "memory",
            {
                "size": limit,
                "query": {"bool": {"must_not": must_not}},
                "sort": [{"create_time": "asc"}, {"id": "asc"}],
            },
        )
        return [_memory(h["_source"]) for h in hits]

    async def set_vectors(self, vectors: Sequence[tuple[str, str, Sequence[float]]]) -> None:
        if self._space is None or not vectors:
            return
        key = space_key(self._space)
        actions: list[dict[str, Any]] = []
        for user_id, memory_id, vector in vectors:
            memory = await self.get_memory(user_id, memory_id)
            if memory is None:
                continue  # unknown, or another user's: skipped
            actions += [
                {"index": {"_index": self.index("memory_vectors"), "_id": memory_id}},
                self._vector_doc(memory, vector),
                {"update": {"_index": self.index("memory"), "_id": memory_id}},
                {"doc": {"vector_space": key}},
            ]
        if actions:
            await self._bulk(actions)

    async def messages_without_vectors(self, limit: int) -> list[tuple[str, Message]]:
        must_not: list[dict[str, Any]] = []
        if self._space is not None:
            must_not.append({"term": {"vector_space": space_key(self._space)}})
        hits = await self._search(
            "messages",
            {
                "size": limit,
                "query": {
                    "bool": {"filter": [{"term": {"has_content": True}}], "must_not": must_not}
                },
                "sort": [{"create_time": "asc"}, {"id": "asc"}],
            },
        )
        return [(h["_source"]["user_id"], _message(h["_source"])) for h in hits]

    async def set_message_vectors(self, vectors: Sequence[MessageVector]) -> None:
        # A message that gets no vector is marked with the space all the same
        # (so it is not handed out again), with no document in the vectors index.
        if self._space is None or not vectors:
            return
        key = space_key(self._space)
        actions: list[dict[str, Any]] = []
        for item in vectors:
            doc = await self._get("messages", item.message_id)
            if doc is None or doc["user_id"] != item.user_id:
                continue
            if item.vector is not None:
                actions += [
                    {"index": {"_index": self.index("message_vectors"), "_id": item.message_id}},
                    {
                        "user_id": item.user_id,
                        "message_id": item.message_id,
                        "conversation_id": doc["conversation_id"],
                        "role": doc["role"],
                        "vector": [float(x) for x in item.vector],
                    },
                ]
            change: dict[str, Any] = {"vector_space": key}
            if item.note:
                change["metadata"] = {**doc.get("metadata", {}), MESSAGE_EMBEDDING_NOTE: item.note}
            actions += [
                {"update": {"_index": self.index("messages"), "_id": item.message_id}},
                {"doc": change},
            ]
        if actions:
            await self._bulk(actions)

    async def vector_search_messages(
        self,
        user_id: str,
        vector: Sequence[float],
        conversation_id: str,
        roles: Sequence[int],
        limit: int,
    ) -> list[MessageHit]:
        if self._space is None or len(vector) != self._space.dimension:
            return []
        hits = await self._search(
            "message_vectors",
            message_knn_body(user_id, vector, conversation_id, roles, min(limit, MAX_RESULTS)),
        )
        docs = await self._users_docs(
            "messages", user_id, [h["_source"]["message_id"] for h in hits]
        )
        out = []
        titles: dict[str, str] = {}
        for h in hits:
            doc = docs.get(h["_source"]["message_id"])
            if doc is None:
                continue
            message = _message(doc)
            if message.conversation_id not in titles:
                found = await self.get_conversation(user_id, message.conversation_id)
                titles[message.conversation_id] = found.title if found else ""
            out.append(
                MessageHit(
                    message=message,
                    conversation_title=titles[message.conversation_id],
                    relevance=2.0 * float(h["_score"]) - 1.0,
                    snippets=[html.escape(message.content[:200])],
                )
            )
        return out

    def _vector_doc(self, memory: Memory, vector: Sequence[float]) -> dict[str, Any]:
        return {
            "user_id": memory.user_id,
            "memory_id": memory.id,
            "text": memory.text,
            "text_folded": search_form(memory.text),
            "categories": list(memory.categories),
            "meta_pairs": _meta_pairs(memory.metadata),
            "source_conversation_id": memory.source_conversation_id,
            "vector": [float(x) for x in vector],
        }

    async def _bulk(self, actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        items = await self._write(actions)
        failed = [i for i in items if item_result(i).get("error")]
        if failed:
            raise RuntimeError(f"OpenSearch refused {len(failed)} write(s): {failed[:1]}")
        return items

    async def _write(self, actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The items of `actions`, written with other calls' writes (group commit)."""
        self._touch(actions)
        return await self._writer.write(actions)

    async def _write_doc(
        self, op: str, name: str, doc_id: str, body: Mapping[str, Any], **conditions: int
    ) -> Mapping[str, Any]:
        """Writes one document (`op`: create or index) with other calls' writes;
        its result. ConflictError when it exists (create) or moved on (conditions)."""
        header = {op: {"_index": self.index(name), "_id": doc_id, **conditions}}
        [item] = await self._write([header, dict(body)])
        result = item_result(item)
        if result.get("status") == 409:
            raise ConflictError(409, "version_conflict_engine_exception", dict(result))
        if result.get("error"):
            raise RuntimeError(f"OpenSearch refused a write: {result}")
        return result

    def _touch(self, actions: Sequence[Mapping[str, Any]]) -> None:
        prefix = f"{self._prefix}_"
        for action in actions:
            for op in ("create", "index", "update", "delete"):
                meta = action.get(op)
                if isinstance(meta, Mapping) and "_index" in meta:
                    self._dirty.add(str(meta["_index"]).removeprefix(prefix))

    async def _get_versioned(
        self, name: str, doc_id: str
    ) -> tuple[dict[str, Any], int, int] | None:
        """(source, seq_no, primary_term) by realtime get, or None."""
        found = await self._reader.get(self.index(name), doc_id)
        error = found.get("error")
        # A missing document (or index) is an answer, not an error.
        if error is not None and error.get("type") != "index_not_found_exception":
            raise RuntimeError(f"OpenSearch refused a read: {error}")
        if not found.get("found"):
            return None
        return found["_source"], int(found["_seq_no"]), int(found["_primary_term"])

    async def _put_if(
        self, name: str, doc_id: str, body: Mapping[str, Any], seq: int, term: int
    ) -> tuple[int, int]:
        """Writes the document only if it is still at (seq, term); ConflictError
        otherwise. Its new (seq, term)."""
        result = await self._write_doc(
            "index", name, doc_id, body, if_seq_no=seq, if_primary_term=term
        )
        return int(result["_seq_no"]), int(result["_primary_term"])

    # --- conversations ----------------------------------------------------

    async def create_conversation(self, conversation: Conversation) -> Conversation:
        self._dirty.add("conversations")
        try:
            await self._client.index(
                index=self.index("conversations"),
                id=conversation.id,
                body=_conversation_doc(conversation),
                op_type="create",
            )
        except ConflictError:
            # A retried create (the id derives from the request id).
            stored = await self.get_conversation(conversation.user_id, conversation.id)
            if stored is None:
                raise ValueError(f"{conversation.id} is another user's conversation") from None
            return stored
        return conversation

    async def get_conversation(self, user_id: str, conversation_id: str) -> Conversation | None:
        doc = await self._get("conversations", conversation_id)
        if doc is None or doc["user_id"] != user_id:
            return None
        return _conversation(doc)

    async def list_conversations(
        self, user_id: str, order_by_update: bool, after: tuple[float, str] | None, limit: int
    ) -> list[Conversation]:
        column = "update_time" if order_by_update else "create_time"
        body: dict[str, Any] = {
            "size": limit,
            "query": {"bool": {"filter": [{"term": {"user_id": user_id}}]}},
            "sort": [{column: "desc"}, {"id": "desc"}],
        }
        if after is not None:
            body["search_after"] = [after[0], after[1]]
        # Another replica may have just created one: a listing sees every
        # acknowledged write (a refresh with nothing new costs little).
        await self._refresh("conversations")
        return [_conversation(h["_source"]) for h in await self._search("conversations", body)]

    async def update_conversation(
        self, user_id: str, conversation_id: str, changes: Mapping[str, object], update_time: float
    ) -> Conversation | None:
        # Optimistic concurrency: an append on another replica between the
        # read and the write must not lose its message_count.
        while True:
            found = await self._get_versioned("conversations", conversation_id)
            if found is None or found[0]["user_id"] != user_id:
                return None
            source, seq, term = found
            doc = {**source, **changes, "update_time": update_time}
            try:
                seq, term = await self._put_if("conversations", conversation_id, doc, seq, term)
            except ConflictError:
                await asyncio.sleep(_jitter(0.01))
                continue
            self._remember(conversation_id, doc, seq, term)
            return _conversation(doc)

    async def delete_conversation(self, user_id: str, conversation_id: str) -> int | None:
        if await self.get_conversation(user_id, conversation_id) is None:
            return None
        self._versions.pop(conversation_id, None)
        reply = await self._delete_where(
            index=self.index("messages"),
            body={
                "query": {
                    "bool": {
                        "filter": [
                            {"term": {"conversation_id": conversation_id}},
                            {"term": {"user_id": user_id}},
                        ]
                    }
                }
            },
            refresh=True,
        )
        if self._space is not None:
            await self._delete_where(
                index=self.index("message_vectors"),
                body={
                    "query": {
                        "bool": {
                            "filter": [
                                {"term": {"conversation_id": conversation_id}},
                                {"term": {"user_id": user_id}},
                            ]
                        }
                    }
                },
                refresh=True,
            )
        await self._client.delete(
            index=self.index("conversations"), id=conversation_id, refresh=True
        )
        return int(reply.get("deleted", 0))

    # --- messages ---------------------------------------------------------

    async def append_messages(
        self,
        user_id: str,
        conversation_id: str,
        messages: Sequence[Message],
        now: float,
        request_id: str = "",
    ) -> AppendResult:
        # Appends to one conversation that meet in this process take their
        # positions together: one reservation (one conditional write) for all
        # of them, where each alone would conflict with the others. Nothing
        # rests on it: the reservation is checked by OpenSearch all the same.
        pending = _PendingAppend(user_id, list(messages), now, request_id)
        waiting = self._appending.get(conversation_id)
        if waiting is not None:
            waiting.append(pending)
        else:
            self._appending[conversation_id] = [pending]
            self._in_background(self._run_appends(conversation_id))
        # Once positions are reserved, the messages are written even if the
        # caller gives up meanwhile: a reservation never stays without them.
        return await asyncio.shield(pending.done)

    async def _run_appends(self, conversation_id: str) -> None:
        """Makes the conversation's waiting appends, a batch at a time, until none wait."""
        try:
            while waiting := self._appending[conversation_id]:
                batch = list(waiting)
                waiting.clear()
                try:
                    await self._append_batch(conversation_id, batch)
                except Exception as exc:  # each caller sees it; the next batch goes on
                    for pending in batch:
                        pending.answer(exc)
        finally:
            del self._appending[conversation_id]

    async def _append_batch(self, conversation_id: str, batch: Sequence[_PendingAppend]) -> None:
        attempt = 0
        while True:
            found = self._versions.get(conversation_id) or await self._get_versioned(
                "conversations", conversation_id
            )
            if found is None:
                for pending in batch:
                    pending.answer(None)
                return
            source, seq, term = found
            owner = source["user_id"]
            recent = list((source.get("appends") or {}).get("recent") or [])
            count = int(source["message_count"])
            reserved: list[tuple[_PendingAppend, list[Message]]] = []
            replays: list[tuple[_PendingAppend, int]] = []
            for pending in batch:
                if pending.user_id != owner:
                    pending.answer(None)
                    continue
                n = len(pending.messages)
                earlier = [f for rid, f, c in recent if rid == pending.request_id and c == n]
                if pending.request_id and earlier:
                    # A retried append (or the same one twice in this batch).
                    replays.append((pending, earlier[0]))
                    continue
                stored = [
                    m.stored(conversation_id, count + i, pending.now)
                    for i, m in enumerate(pending.messages)
                ]
                if pending.request_id:
                    recent = [*recent, [pending.request_id, count, n]][-RECENT_APPENDS:]
                count += n
                reserved.append((pending, stored))
            doc = source
            if reserved:
                doc = {
                    **source,
                    "message_count": count,
                    "update_time": max(p.now for p, _ in reserved),
                    "appends": {"recent": recent},
                }
                try:
                    # The reservation: each append's positions are its own.
                    seq, term = await self._put_if("conversations", conversation_id, doc, seq, term)
                except ConflictError:
                    # Another append (any replica) came first: read again.
                    self._versions.pop(conversation_id, None)
                    attempt += 1
                    await asyncio.sleep(_jitter(min(0.05, 0.002 * 2**attempt)))
                    continue
                self._remember(conversation_id, doc, seq, term)
            break
        # The positions are taken: the next batch reserves while these are
        # written (its reservation and these messages share a bulk request).
        self._in_background(self._write_reserved(owner, doc, reserved, replays))

    async def _write_reserved(
        self,
        owner: str,
        doc: Mapping[str, Any],
        reserved: Sequence[tuple[_PendingAppend, list[Message]]],
        replays: Sequence[tuple[_PendingAppend, int]],
    ) -> None:
        """Writes a batch's messages at their reserved positions, and answers its appends."""
        try:
            conversation = _conversation(doc)
            # One write per append, sent together: a refused message fails its append alone.
            written = await asyncio.gather(
                *(self._write_messages(owner, stored) for _, stored in reserved),
                return_exceptions=True,
            )
            for (pending, stored), error in zip(reserved, written, strict=True):
                outcome = error if isinstance(error, BaseException) else (stored, conversation)
                pending.answer(outcome)
            for pending, first in replays:
                try:
                    pending.answer(
                        await self._replay(owner, doc, pending.messages, first, pending.now)
                    )
                except Exception as exc:
                    pending.answer(exc)
        except Exception as exc:  # no caller waits for ever
            for pending, _ in [*reserved, *replays]:
                pending.answer(exc)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Runs append work that no caller's cancellation may stop (`close` waits for it)."""
        task = asyncio.get_running_loop().create_task(work, name="opensearch-appends")
        self._append_runs.add(task)
        task.add_done_callback(self._append_runs.discard)

    def _remember(self, conversation_id: str, doc: dict[str, Any], seq: int, term: int) -> None:
        """The conversation's version this process just wrote: the next append's guess."""
        self._versions[conversation_id] = (doc, seq, term)
        self._versions.move_to_end(conversation_id)
        while len(self._versions) > KNOWN_VERSIONS:
            self._versions.popitem(last=False)

    async def _replay(
        self,
        user_id: str,
        conversation: Mapping[str, Any],
        messages: Sequence[Message],
        first: int,
        now: float,
    ) -> tuple[list[Message], Conversation]:
        """A retried append: the messages stored under its request id (written
        now if the first call reserved their positions but did not get to it)."""
        ids = [m.id for m in messages]
        found = await self._reader.get_many(self.index("messages"), ids)
        docs = {d["_id"]: d["_source"] for d in found if d.get("found")}
        missing = [
            m.stored(conversation["id"], first + i, now)
            for i, m in enumerate(messages)
            if m.id not in docs
        ]
        if missing:
            await self._write_messages(user_id, missing)
            docs.update({m.id: _message_doc(user_id, m) for m in missing})
        return [_message(docs[i]) for i in ids], _conversation(conversation)

    async def _write_messages(self, user_id: str, stored: Sequence[Message]) -> None:
        actions: list[dict[str, Any]] = []
        for m in stored:
            # `index`, not `create`: writing a reserved message again is harmless.
            actions += [
                {"index": {"_index": self.index("messages"), "_id": m.id}},
                _message_doc(user_id, m),
            ]
        await self._bulk(actions)

    async def _undo_creates(self, name: str, ids: Sequence[str]) -> None:
        actions: list[dict[str, Any]] = [
            {"delete": {"_index": self.index(name), "_id": i}} for i in ids
        ]
        if actions:
            await self._write(actions)

    async def list_messages(
        self, user_id: str, conversation_id: str, descending: bool, after: int | None, limit: int
    ) -> list[Message] | None:
        conversation = await self.get_conversation(user_id, conversation_id)
        if conversation is None:
            return None
        body: dict[str, Any] = {
            "size": limit,
            "query": {
                "bool": {
                    "filter": [
                        {"term": {"conversation_id": conversation_id}},
                        {"term": {"user_id": user_id}},
                    ]
                }
            },
            "sort": [{"position": "desc" if descending else "asc"}],
        }
        if after is not None:
            body["search_after"] = [after]
        found = [_message(h["_source"]) for h in await self._search("messages", body)]
        # The count is read in real time, the messages by search: fewer than
        # the count promises means some are not searchable yet (appended on
        # any replica since the last refresh).
        count = conversation.message_count
        if descending:
            expected = min(limit, count if after is None else max(0, min(after, count)))
        else:
            expected = min(limit, max(0, count - (0 if after is None else after + 1)))
        if len(found) < expected:
            await self._refresh("messages")
            found = [_message(h["_source"]) for h in await self._search("messages", body)]
        return found

    async def search_messages(
        self,
        user_id: str,
        query: str,
        conversation_id: str,
        roles: Sequence[int],
        limit: int,
    ) -> list[MessageHit]:
        if not keyword_text(query):
            return []
        hits = await self._search(
            "messages",
            message_search_body(user_id, query, conversation_id, roles, min(limit, MAX_RESULTS)),
        )
        titles: dict[str, str] = {}
        out = []
        for h in hits:
            message = _message(h["_source"])
            if message.conversation_id not in titles:
                found = await self.get_conversation(user_id, message.conversation_id)
                titles[message.conversation_id] = found.title if found else ""
            snippets = (h.get("highlight") or {}).get("content") or highlight_fragments(
                mark_words(message.content, folded_words(query))
            )
            out.append(
                MessageHit(
                    message=message,
                    conversation_title=titles[message.conversation_id],
                    relevance=float(h.get("_score") or 0.0),
                    snippets=list(snippets)[:3],
                )
            )
        return out

    # --- memories ---------------------------------------------------------

    async def get_memory(self, user_id: str, memory_id: str) -> Memory | None:
        doc = await self._get("memory", memory_id)
        if doc is None or doc["user_id"] != user_id:
            return None
        return _memory(doc)

    def _claim_id(self, user_id: str, text_hash: str) -> str:
        return hashlib.sha256(f"{user_id}\u0000{text_hash}".encode()).hexdigest()

    async def _claimed(self, user_id: str, text_hash: str) -> Memory | None:
        """The live memory holding this text, by its claim (realtime)."""
        claim = await self._get("memory_hashes", self._claim_id(user_id, text_hash))
        if claim is None:
            return None
        memory = await self.get_memory(user_id, claim["memory_id"])
        return memory if memory is not None and memory.hash == text_hash else None

    async def _claim(self, memory: Memory) -> None:
        """Claims the memory's text for it; DuplicateMemory when a live memory holds it."""
        claim_id = self._claim_id(memory.user_id, memory.hash)
        body = {"user_id": memory.user_id, "memory_id": memory.id, "time": time.time()}
        waited = 0.0
        while True:
            try:
                await self._write_doc("create", "memory_hashes", claim_id, body)
                return
            except ConflictError:
                pass
            found = await self._get_versioned("memory_hashes", claim_id)
            if found is None:
                continue  # released meanwhile
            source, seq, term = found
            if source["memory_id"] == memory.id:
                return
            holder = await self.get_memory(memory.user_id, source["memory_id"])
            if holder is not None and holder.hash == memory.hash:
                raise DuplicateMemory(holder)
            # No memory behind the claim: its writer is still writing it (a
            # fresh claim), or it was rewritten, deleted or never written.
            fresh = time.time() - float(source.get("time", 0.0)) < CLAIM_WRITE_SECONDS
            if holder is None and fresh and waited < CLAIM_WRITE_SECONDS:
                await asyncio.sleep(0.02)
                waited += 0.02
                continue
            try:
                await self._put_if("memory_hashes", claim_id, body, seq, term)
                return
            except ConflictError:
                continue

    async def _release(self, memory_id: str, user_id: str, text_hash: str) -> None:
        claim_id = self._claim_id(user_id, text_hash)
        found = await self._get_versioned("memory_hashes", claim_id)
        if found is None or found[0]["memory_id"] != memory_id:
            return
        try:
            await self._client.delete(
                index=self.index("memory_hashes"),
                id=claim_id,
                if_seq_no=found[1],
                if_primary_term=found[2],
            )
        except (ConflictError, NotFoundError):
            return

    async def find_memory_by_hash(self, user_id: str, text_hash: str) -> Memory | None:
        claimed = await self._claimed(user_id, text_hash)
        if claimed is not None:
            return claimed
        if self._claims_complete:
            return None
        # Memories stored before texts were claimed, until they are: searchable
        # long since, so no refresh (memories stored since are found by their
        # claims, in real time).
        hits = await self._search_as_is(
            "memory",
            {
                "size": 1,
                "query": {
                    "bool": {
                        "filter": [{"term": {"user_id": user_id}}, {"term": {"hash": text_hash}}]
                    }
                },
                "sort": [{"create_time": "asc"}],
            },
        )
        return _memory(hits[0]["_source"]) if hits else None

    async def list_memories(
        self,
        user_id: str,
        memory_filter: MemoryFilter,
        after: tuple[float, str] | None,
        limit: int,
    ) -> list[Memory]:
        body: dict[str, Any] = {
            "size": limit,
            "query": {"bool": {"filter": filter_clauses(user_id, memory_filter)}},
            "sort": [{"create_time": "desc"}, {"id": "desc"}],
        }
        if after is not None:
            body["search_after"] = [after[0], after[1]]
        await self._refresh("memory")
        return [_memory(h["_source"]) for h in await self._search("memory", body)]

    async def apply_memory_changes(self, user_id: str, changes: Sequence[MemoryChange]) -> None:
        # Check first: every change must be possible before anything is written.
        previous: dict[str, dict[str, Any]] = {}
        for change in changes:
            if change.memory.user_id != user_id:
                raise ValueError("a change names another user's memory")
            if change.event == EVENT_ADD:
                # Written with `create`: an id taken already is refused by
                # OpenSearch itself (409, undone below), no lookup needed.
                continue
            existing = await self._get("memory", change.memory.id)
            if change.event == EVENT_ADD and existing is not None:
                raise ValueError(f"memory {change.memory.id} already exists")
            if change.event != EVENT_ADD and (existing is None or existing["user_id"] != user_id):
                raise ValueError(f"memory {change.memory.id} does not exist")
            if existing is not None:
                previous[change.memory.id] = existing
        # Then the texts added: a text another replica has just stored is
        # refused as a whole (DuplicateMemory), before anything is written.
        claimed = await self._claim_all([c.memory for c in changes if c.event == EVENT_ADD])
        key = space_key(self._space) if self._space else ""
        memories, vectors, history = (
            self.index("memory"),
            self.index("memory_vectors"),
            self.index("history"),
        )
        actions: list[dict[str, Any]] = []
        created: list[str] = []
        erased: list[str] = []
        for change in changes:
            memory = change.memory
            if change.event in (EVENT_ADD, EVENT_UPDATE):
                has_vector = change.vector is not None and self._space is not None
                space = key if has_vector else ""
                if change.event == EVENT_UPDATE and change.vector is None:
                    space = previous.get(memory.id, {}).get("vector_space", "")
                op = "create" if change.event == EVENT_ADD else "index"
                actions += [
                    {op: {"_index": memories, "_id": memory.id}},
                    _memory_doc(memory, space),
                ]
                if change.event == EVENT_ADD:
                    created.append(memory.id)
                if has_vector:
                    assert change.vector is not None
                    actions += [
                        {"index": {"_index": vectors, "_id": memory.id}},
                        self._vector_doc(memory, change.vector),
                    ]
                elif change.event == EVENT_UPDATE and key and space == key:
                    # The vector stays, but the filters knn applies inside its
                    # clause live on the vector document: keep them in step.
                    filters = self._vector_doc(memory, ())
                    del filters["vector"]
                    actions += [
                        {"update": {"_index": vectors, "_id": memory.id}},
                        {"doc": filters},
                    ]
            elif change.event == EVENT_DELETE:
                actions += [
                    {"delete": {"_index": memories, "_id": memory.id}},
                    {"delete": {"_index": vectors, "_id": memory.id}},
                ]
                if change.erase_history:
                    erased.append(memory.id)
            if change.history is not None:
                actions += [
                    {"create": {"_index": history, "_id": change.history.id}},
                    _history_doc(user_id, self._next_seq(), change.history),
                ]
        if actions:
            items = await self._write(actions)
            failed = [
                item
                for item in items
                for op, result in item.items()
                if result.get("error") and not (op == "delete" and result.get("status") == 404)
            ]
            if failed:
                await self._refused(user_id, items, created, claimed)
        await self._follow_claims(user_id, changes, previous)
        for memory_id in erased:
            await self._delete_where(
                index=history,
                body={
                    "query": {
                        "bool": {
                            "filter": [
                                {"term": {"user_id": user_id}},
                                {"term": {"memory_id": memory_id}},
                            ]
                        }
                    }
                },
                refresh=True,
            )

    async def _refused(
        self,
        user_id: str,
        items: Sequence[Mapping[str, Any]],
        created: Sequence[str],
        claimed: Sequence[Memory],
    ) -> None:
        """Undoes a change set OpenSearch refused in part, then raises: DuplicateMemory
        when a memory to create exists already (the same request, retried)."""
        results = [(op, result) for item in items for op, result in item.items()]
        # Undo only what this call created: a create refused with 409 is the
        # other call's memory.
        mine = {r["_id"] for op, r in results if op == "create" and r.get("status") == 201}
        await self._undo_creates("memory", [i for i in created if i in mine])
        # And the history entries it wrote for them.
        history = self.index("history")
        await self._undo_creates(
            "history",
            [
                r["_id"]
                for op, r in results
                if op == "create" and r.get("status") == 201 and r.get("_index") == history
            ],
        )
        taken = [
            r["_id"]
            for op, r in results
            if op == "create" and r.get("status") == 409 and r["_id"] in created
        ]
        for memory in claimed:
            if memory.id not in taken:
                await self._release(memory.id, memory.user_id, memory.hash)
        holder = await self.get_memory(user_id, taken[0]) if taken else None
        if holder is not None:
            raise DuplicateMemory(holder)
        failed = [r for op, r in results if r.get("error")]
        raise RuntimeError(f"OpenSearch refused {len(failed)} write(s): {failed[:1]}")

    async def _claim_all(self, memories: Sequence[Memory]) -> list[Memory]:
        """Claims every text, or none (DuplicateMemory)."""
        claimed: list[Memory] = []
        try:
            for memory in memories:
                await self._claim(memory)
                claimed.append(memory)
        except DuplicateMemory:
            for memory in claimed:
                await self._release(memory.id, memory.user_id, memory.hash)
            raise
        return claimed

    async def _follow_claims(
        self,
        user_id: str,
        changes: Sequence[MemoryChange],
        previous: Mapping[str, Mapping[str, Any]],
    ) -> None:
        """Claims follow texts that changed or went (a stale claim is harmless:
        it is checked against its memory, and taken over)."""
        for change in changes:
            before = previous.get(change.memory.id)
            if before is None:
                continue
            if change.event == EVENT_DELETE or (
                change.event == EVENT_UPDATE and before["hash"] != change.memory.hash
            ):
                await self._release(change.memory.id, user_id, before["hash"])
            if change.event == EVENT_UPDATE and before["hash"] != change.memory.hash:
                # Another memory may hold this text already: it keeps the claim.
                with contextlib.suppress(DuplicateMemory):
                    await self._claim(change.memory)

    async def delete_all_memories(self, user_id: str) -> int:
        query = {"query": {"bool": {"filter": [{"term": {"user_id": user_id}}]}}}
        reply = await self._delete_where(index=self.index("memory"), body=query, refresh=True)
        for name in ("history", "jobs", "finished_jobs", "memory_hashes"):
            await self._delete_where(index=self.index(name), body=query, refresh=True)
        if self._space is not None:
            await self._delete_where(index=self.index("memory_vectors"), body=query, refresh=True)
        return int(reply.get("deleted", 0))

    async def history(
        self, user_id: str, memory_id: str, after: int | None, limit: int
    ) -> list[tuple[int, HistoryEntry]] | None:
        body: dict[str, Any] = {
            "size": limit,
            "query": {
                "bool": {
                    "filter": [{"term": {"user_id": user_id}}, {"term": {"memory_id": memory_id}}]
                }
            },
            "sort": [{"seq": "asc"}],
        }
        if after is not None:
            body["search_after"] = [after]
        await self._refresh("history")
        hits = await self._search("history", body)
        if not hits and after is None and await self.get_memory(user_id, memory_id) is None:
            return None
        return [(int(h["_source"]["seq"]), _history(h["_source"])) for h in hits]

    async def keyword_search_memories(
        self, user_id: str, query: str, memory_filter: MemoryFilter, limit: int
    ) -> list[ScoredMemory]:
        if not keyword_text(query):
            return []
        hits = await self._search(
            "memory", keyword_query_body(user_id, query, memory_filter, min(limit, MAX_RESULTS))
        )
        return [ScoredMemory(_memory(h["_source"]), float(h["_score"] or 0.0)) for h in hits]

    async def vector_search_memories(
        self, user_id: str, vector: Sequence[float], memory_filter: MemoryFilter, limit: int
    ) -> list[ScoredMemory]:
        if self._space is None or len(vector) != self._space.dimension:
            return []
        hits = await self._search(
            "memory_vectors", knn_query_body(user_id, vector, memory_filter, limit)
        )
        found = await self._memories_of(user_id, [h["_source"]["memory_id"] for h in hits])
        # The lucene engine's cosine score is (1 + cos) / 2.
        return [
            ScoredMemory(found[h["_source"]["memory_id"]], 2.0 * float(h["_score"]) - 1.0)
            for h in hits
            if h["_source"]["memory_id"] in found
        ]

    async def _memories_of(self, user_id: str, memory_ids: Sequence[str]) -> dict[str, Memory]:
        """The user's memories of these ids that exist, by id."""
        docs = await self._users_docs("memory", user_id, memory_ids)
        return {doc_id: _memory(doc) for doc_id, doc in docs.items()}

    async def hybrid_search_memories(
        self,
        user_id: str,
        query: str,
        vector: Sequence[float],
        memory_filter: MemoryFilter,
        limit: int,
    ) -> list[ScoredMemory] | None:
        if self.hybrid_pipeline is None or self._space is None:
            return None
        if len(vector) != self._space.dimension or not keyword_text(query):
            return None
        await self._searchable("memory_vectors")
        reply = await self._client.search(
            index=self.index("memory_vectors"),
            body=hybrid_query_body(user_id, query, vector, memory_filter, min(limit, MAX_RESULTS)),
            params={"search_pipeline": self.hybrid_pipeline},
        )
        hits = reply["hits"]["hits"]
        found = await self._memories_of(user_id, [h["_source"]["memory_id"] for h in hits])
        return [
            ScoredMemory(found[h["_source"]["memory_id"]], float(h["_score"] or 0.0))
            for h in hits
            if h["_source"]["memory_id"] in found
        ]

    # --- extraction queue -------------------------------------------------

    async def enqueue_job(self, job: ExtractionJob) -> None:
        # No refresh: the queue finds it within the refresh interval.
        if await self._get("finished_jobs", job.id) is not None:
            return  # a retried call's job that ran already
        self._dirty.add("jobs")
        try:
            await self._client.index(
                index=self.index("jobs"), id=job.id, body=_job_doc(job), op_type="create"
            )
        except ConflictError:
            return  # queued already (a retried call: the id derives from its request id)

    async def due_jobs(self, now: float, limit: int) -> list[ExtractionJob]:
        hits = await self._search(
            "jobs",
            {
                "size": limit,
                "query": {"range": {"next_attempt_time": {"lte": now}}},
                "sort": [{"next_attempt_time": "asc"}, {"create_time": "asc"}],
            },
        )
        return [_job(h["_source"]) for h in hits]

    async def take_job(self, job_id: str, now: float, lease_seconds: float) -> bool:
        # Optimistic concurrency: of the replicas that found the job due, the
        # first to move its next attempt past the lease runs it.
        found = await self._get_versioned("jobs", job_id)
        if found is None or found[0]["next_attempt_time"] > now:
            return False
        source, seq, term = found
        try:
            await self._put_if(
                "jobs", job_id, {**source, "next_attempt_time": now + lease_seconds}, seq, term
            )
        except (ConflictError, NotFoundError):
            return False
        return True

    async def get_job(self, user_id: str, job_id: str) -> ExtractionJob | None:
        doc = await self._get("jobs", job_id)
        if doc is not None and doc["user_id"] == user_id:
            return _job(doc)
        doc = await self._get("finished_jobs", job_id)
        if doc is not None and doc["user_id"] == user_id:
            return _finished_job(doc)
        return None

    async def finish_job(
        self,
        job_id: str,
        *,
        state: int,
        finish_time: float,
        reason: str = "",
        error: str = "",
        results: str = "",
    ) -> None:
        doc = await self._get("jobs", job_id)
        if doc is None:
            return
        # The outcome first: a failure in between leaves the job queued, to be
        # finished again, never lost.
        await self._client.index(
            index=self.index("finished_jobs"),
            id=job_id,
            body={
                "id": job_id,
                "user_id": doc["user_id"],
                "attempts": doc["attempts"] + 1,
                "create_time": doc["create_time"],
                "finish_time": finish_time,
                "state": state,
                "failure_reason": reason,
                "last_error": error[:1000],
                "results": results,
            },
            refresh=WAIT,
        )
        with contextlib.suppress(NotFoundError):
            await self._client.delete(index=self.index("jobs"), id=job_id, refresh=WAIT)
        await self._delete_where(
            index=self.index("finished_jobs"),
            body={"query": {"range": {"finish_time": {"lt": finish_time - FINISHED_JOB_SECONDS}}}},
            refresh=True,
        )

    async def retry_job(self, job_id: str, next_attempt_time: float, error: str) -> None:
        doc = await self._get("jobs", job_id)
        if doc is None:
            return
        doc.update(
            attempts=doc["attempts"] + 1,
            next_attempt_time=next_attempt_time,
            last_error=error[:1000],
        )
        await self._client.index(index=self.index("jobs"), id=job_id, body=doc, refresh=WAIT)

    async def count_jobs(self) -> int:
        await self._searchable("jobs")
        reply = await self._client.count(index=self.index("jobs"))
        return int(reply["count"])

    async def oldest_job_time(self) -> float | None:
        hits = await self._search(
            "jobs", {"size": 1, "query": {"match_all": {}}, "sort": [{"create_time": "asc"}]}
        )
        return float(hits[0]["_source"]["create_time"]) if hits else None


def index_prefix(text: str) -> str:
    """A valid index prefix from any text (tests use one per test)."""
    return "t" + hashlib.sha256(text.encode()).hexdigest()[:12]
