"""The memory service's core, free of gRPC: validation, paging, search and memory changes.

Every method takes the `user_id` and only ever reads or writes that user's
data; a resource of another user is answered exactly like a missing one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from marie_kit import tracing
from marie_kit.errors import ServiceError

from marie_memory import fusion, limits
from marie_memory.embedding import DOCUMENT, Embeddings
from marie_memory.errors import (
    conversation_not_found,
    extraction_model_not_configured,
    invalid_argument,
    job_not_found,
    memory_not_found,
)
from marie_memory.job_payload import encode_request
from marie_memory.paging import decode_token, encode_token, page_size
from marie_memory.records import (
    EVENT_ADD,
    EVENT_DELETE,
    EVENT_NONE,
    EVENT_UPDATE,
    ROLE_SYSTEM,
    AddRequest,
    AddResult,
    ChangePlan,
    Conversation,
    ExtractionJob,
    HistoryEntry,
    Memory,
    MemoryChange,
    MemoryFilter,
    Message,
    MessageHit,
    ScoredMemory,
)
from marie_memory.stores.contract import DuplicateMemory, Store
from marie_memory.stores.keywords import STOPWORDS, WORD

log = logging.getLogger("marie.memory.core")

# SearchMode values (same numbers as the proto enum).
MODE_UNSPECIFIED = 0
MODE_HYBRID = 1
MODE_VECTOR = 2
MODE_KEYWORD = 3

CONVERSATION_FIELDS = frozenset({"title", "provider", "model", "metadata"})
MEMORY_FIELDS = frozenset({"text", "categories", "metadata"})
# Candidates fetched from each ranking before hybrid scores are combined.
MIN_CANDIDATES = 50
# "user" (and "the user's"): in nearly every extracted fact, so no sign of closeness.
_USER_WORD = re.compile(r"\b(?:the\s+)?users?(?:'s)?\b", re.IGNORECASE)
#: Letters two words must share at their start to count as one (peanut, peanuts).
STEM_LETTERS = 5


def content_stems(text: str) -> set[str]:
    """The words of `text` that say something (no stopword, no "user", 3 letters
    or more), each by its first STEM_LETTERS letters."""
    return {
        w[:STEM_LETTERS]
        for w in (m.lower() for m in WORD.findall(text))
        if len(w) >= 3 and w not in STOPWORDS and w not in ("user", "users")
    }


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def derived_id(prefix: str, *parts: str | int) -> str:
    """An id that a retried call computes again: from the caller's request id
    and where the resource belongs. Shaped like `new_id`'s."""
    digest = hashlib.sha256("\u0000".join(str(p) for p in parts).encode()).hexdigest()
    return f"{prefix}_{digest[:24]}"


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class ScoredHit:
    message: Message
    conversation_title: str
    score: float
    snippets: Sequence[str]


@dataclass(frozen=True, slots=True)
class Ranked:
    """One page of ranked results with the mode actually used."""

    mode_used: int
    mode_note: str
    memories: list[ScoredMemory] = field(default_factory=list)
    hits: list[ScoredHit] = field(default_factory=list)
    next_page_token: str = ""


class Extractor(Protocol):
    """What the core asks of an extractor: the changes of AddMemories with inference,
    planned (model calls made, vectors included) but not written."""

    async def plan(self, core: MemoryCore, request: AddRequest, model: str) -> ChangePlan: ...

    async def check_allowed(self, model: str, allowed_models: str) -> None:
        """PERMISSION_DENIED (MODEL_NOT_ALLOWED) when `model` is outside
        `allowed_models`; nothing when it is within, or when that cannot be
        known now (providers unreachable: the job's own calls will tell)."""


class MemoryCore:
    """What the servicer calls; holds the store, the embeddings and the extractor."""

    def __init__(
        self,
        store: Store,
        embeddings: Embeddings,
        *,
        extractor: Extractor | None = None,
        default_extraction_model: str = "",
        vector_weight: float = 0.35,
        keyword_weight: float = 0.65,
        similar_memories: int = 5,
        close_similarity: float = 0.88,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.embeddings = embeddings
        self.extractor = extractor
        self.default_extraction_model = default_extraction_model
        total = vector_weight + keyword_weight
        self._vector_weight = vector_weight / total
        self._keyword_weight = keyword_weight / total
        self._similar = similar_memories
        self._close_similarity = close_similarity
        self._clock = clock
        #: Called after a job is queued (the queue's wake-up).
        self.on_enqueue: Callable[[], None] | None = None
        # Query embeddings that outlived their search's deadline (they fill the cache).
        self._pending: set[asyncio.Future[list[float]]] = set()
        # Memory writes of one user run one at a time, so dedupe sees every write.
        self._user_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    @property
    def similar_count(self) -> int:
        """How many similar stored memories each extracted fact is compared with."""
        return self._similar

    def now(self) -> float:
        return self._clock()

    # --- conversations ----------------------------------------------------

    async def create_conversation(
        self,
        user_id: str,
        title: str,
        provider: str,
        model: str,
        metadata: Mapping[str, str],
        *,
        request_id: str = "",
    ) -> Conversation:
        limits.request_id(request_id)
        now = self._clock()
        conversation = Conversation(
            id=derived_id("conv", user_id, "conversation", request_id)
            if request_id
            else new_id("conv"),
            user_id=limits.user_id(user_id),
            title=limits.text("title", title, limits.MAX_TITLE),
            provider=limits.text("provider", provider, limits.MAX_PROVIDER),
            model=limits.text("model", model, limits.MAX_MODEL),
            metadata=limits.metadata("metadata", metadata),
            create_time=now,
            update_time=now,
        )
        return await self.store.create_conversation(conversation)

    async def get_conversation(self, user_id: str, conversation_id: str) -> Conversation:
        limits.user_id(user_id)
        limits.required_id("conversation_id", conversation_id)
        found = await self.store.get_conversation(user_id, conversation_id)
        if found is None:
            raise conversation_not_found(conversation_id)
        return found

    async def list_conversations(
        self, user_id: str, size: int, token: str, order_by: str
    ) -> tuple[list[Conversation], str]:
        limits.user_id(user_id)
        order = order_by.strip() or "create_time desc"
        if order not in ("create_time desc", "update_time desc"):
            raise invalid_argument(
                "order_by", 'order_by is "create_time desc" or "update_time desc"'
            )
        by_update = order == "update_time desc"
        limit = page_size(size, 20, 100)
        fields = ["conversations", user_id, order]
        cursor = decode_token(token, fields)
        after = _time_cursor(cursor)
        items = await self.store.list_conversations(user_id, by_update, after, limit + 1)
        next_token = ""
        if len(items) > limit:
            items = items[:limit]
            last = items[-1]
            next_token = encode_token(
                [last.update_time if by_update else last.create_time, last.id], fields
            )
        return items, next_token

    async def update_conversation(
        self, user_id: str, conversation_id: str, values: Conversation, paths: Sequence[str]
    ) -> Conversation:
        limits.user_id(user_id)
        limits.required_id("conversation.id", conversation_id)
        if not paths:
            raise invalid_argument("update_mask", "update_mask names no field")
        changes: dict[str, object] = {}
        for path in paths:
            if path not in CONVERSATION_FIELDS:
                raise invalid_argument(
                    "update_mask", f"{path!r} cannot be changed (title, provider, model, metadata)"
                )
            if path == "metadata":
                changes[path] = limits.metadata("conversation.metadata", values.metadata)
            else:
                maximum = {"title": limits.MAX_TITLE, "provider": limits.MAX_PROVIDER}.get(
                    path, limits.MAX_MODEL
                )
                changes[path] = limits.text(f"conversation.{path}", getattr(values, path), maximum)
        updated = await self.store.update_conversation(
            user_id, conversation_id, changes, self._clock()
        )
        if updated is None:
            raise conversation_not_found(conversation_id)
        return updated

    async def delete_conversation(self, user_id: str, conversation_id: str) -> int:
        limits.user_id(user_id)
        limits.required_id("conversation_id", conversation_id)
        deleted = await self.store.delete_conversation(user_id, conversation_id)
        if deleted is None:
            raise conversation_not_found(conversation_id)
        return deleted

    # --- messages ---------------------------------------------------------

    async def append_messages(
        self,
        user_id: str,
        conversation_id: str,
        messages: Sequence[Message],
        request_id: str = "",
    ) -> tuple[list[Message], Conversation]:
        limits.user_id(user_id)
        limits.required_id("conversation_id", conversation_id)
        limits.request_id(request_id)
        if not 1 <= len(messages) <= limits.MAX_MESSAGES:
            raise invalid_argument("messages", f"1 to {limits.MAX_MESSAGES} messages")
        checked = []
        for i, m in enumerate(messages):
            name = f"messages[{i}]"
            if not 1 <= m.role <= 4:
                raise invalid_argument(f"{name}.role", "role is required")
            if len(m.content.encode("utf-8")) > limits.MAX_MESSAGE_BYTES:
                raise invalid_argument(f"{name}.content", "content is larger than 1 MiB")
            if not m.content and not m.tool_calls:
                raise invalid_argument(f"{name}.content", "content is required")
            if m.prompt_tokens < 0 or m.completion_tokens < 0:
                raise invalid_argument(f"{name}.prompt_tokens", "token counts are never negative")
            limits.metadata(f"{name}.metadata", m.metadata)
            limits.text(f"{name}.name", m.name, limits.MAX_NAME)
            limits.text(f"{name}.provider", m.provider, limits.MAX_PROVIDER)
            limits.text(f"{name}.model", m.model, limits.MAX_MODEL)
            for j, call in enumerate(m.tool_calls):
                limits.text(f"{name}.tool_calls[{j}].id", call.id, limits.MAX_NAME)
                limits.text(
                    f"{name}.tool_calls[{j}].function_name",
                    call.function_name,
                    limits.MAX_NAME,
                    required=True,
                )
            message_id = (
                derived_id("msg", user_id, conversation_id, request_id, i)
                if request_id
                else new_id("msg")
            )
            checked.append(replace(m, id=message_id, conversation_id=conversation_id))
        result = await self.store.append_messages(
            user_id, conversation_id, checked, self._clock(), request_id
        )
        if result is None:
            raise conversation_not_found(conversation_id)
        self.embeddings.wake()  # the new messages get their vectors in the background
        return result

    async def list_messages(
        self, user_id: str, conversation_id: str, size: int, token: str, order_by: str
    ) -> tuple[list[Message], str]:
        limits.user_id(user_id)
        limits.required_id("conversation_id", conversation_id)
        order = order_by.strip() or "position asc"
        if order not in ("position asc", "position desc"):
            raise invalid_argument("order_by", 'order_by is "position asc" or "position desc"')
        descending = order == "position desc"
        limit = page_size(size, 100, 1000)
        fields = ["messages", user_id, conversation_id, order]
        cursor = decode_token(token, fields)
        if cursor is not None and (not isinstance(cursor, int) or isinstance(cursor, bool)):
            raise invalid_argument("page_token", "malformed page token")
        items = await self.store.list_messages(
            user_id, conversation_id, descending, cursor, limit + 1
        )
        if items is None:
            raise conversation_not_found(conversation_id)
        next_token = ""
        if len(items) > limit:
            items = items[:limit]
            next_token = encode_token(items[-1].position, fields)
        return items, next_token

    async def search_messages(
        self,
        user_id: str,
        query: str,
        *,
        conversation_id: str,
        size: int,
        token: str,
        mode: int,
        roles: Sequence[int],
        budget: float | None = None,
    ) -> Ranked:
        limits.user_id(user_id)
        limits.query(query)
        for i, role in enumerate(roles):
            if not 1 <= role <= 4:
                raise invalid_argument(f"roles[{i}]", "unknown role")
        limit = page_size(size, 20, 100)
        fields = ["search", user_id, query, conversation_id, mode, sorted(roles)]
        offset = decode_token(token, fields) or 0
        if not isinstance(offset, int) or offset < 0:
            raise invalid_argument("page_token", "malformed page token")
        if mode not in (MODE_UNSPECIFIED, MODE_HYBRID, MODE_VECTOR, MODE_KEYWORD):
            raise invalid_argument("mode", "unknown search mode")
        if conversation_id and await self.store.get_conversation(user_id, conversation_id) is None:
            raise conversation_not_found(conversation_id)
        used, note, vector = await self._query_vector(query, mode, budget)
        wanted = offset + limit + 1
        scores: dict[str, float] = {}
        found: dict[str, MessageHit] = {}
        vector_hits: list[MessageHit] = []
        keyword_hits: list[MessageHit] = []
        if vector is not None:
            vector_hits = await self.store.vector_search_messages(
                user_id, vector, conversation_id, roles, wanted
            )
        if used in (MODE_HYBRID, MODE_KEYWORD):
            keyword_hits = await self.store.search_messages(
                user_id, query, conversation_id, roles, wanted
            )
        # Keyword hits carry the highlighted snippets: they win over vector ones.
        for hit in (*vector_hits, *keyword_hits):
            found[hit.message.id] = hit
        if used == MODE_HYBRID:
            # As memories (fusion.py): each side min-max scaled, then weighted.
            scores = fusion.min_max_fusion(
                [(hit.message.id, hit.relevance) for hit in vector_hits],
                [(hit.message.id, hit.relevance) for hit in keyword_hits],
                vector_weight=self._vector_weight,
                keyword_weight=self._keyword_weight,
            )
        elif used == MODE_KEYWORD:
            best = keyword_hits[0].relevance if keyword_hits else 1.0
            scores = {hit.message.id: _ratio(hit.relevance, best) for hit in keyword_hits}
        else:
            scores = {hit.message.id: max(0.0, min(1.0, hit.relevance)) for hit in vector_hits}
        # Ties go oldest first, as the stores order equal ranks (pages stay stable).
        ranked = sorted(
            scores.items(),
            key=lambda item: (
                -item[1],
                found[item[0]].message.create_time,
                found[item[0]].message.conversation_id,
                found[item[0]].message.position,
            ),
        )
        page = ranked[offset : offset + limit]
        hits = [
            ScoredHit(
                found[message_id].message,
                found[message_id].conversation_title,
                score,
                found[message_id].snippets,
            )
            for message_id, score in page
        ]
        next_token = encode_token(offset + limit, fields) if len(ranked) > offset + limit else ""
        if vector is not None and self.embeddings.messages_pending and not note:
            note = "recent messages are still being embedded: vector results may be incomplete"
        return Ranked(used, note, hits=hits, next_page_token=next_token)

    # --- memories ---------------------------------------------------------

    async def get_memory(self, user_id: str, memory_id: str) -> Memory:
        limits.user_id(user_id)
        limits.required_id("memory_id", memory_id)
        found = await self.store.get_memory(user_id, memory_id)
        if found is None:
            raise memory_not_found(memory_id)
        return found

    async def list_memories(
        self, user_id: str, size: int, token: str, memory_filter: MemoryFilter
    ) -> tuple[list[Memory], str]:
        limits.user_id(user_id)
        _check_filter(memory_filter)
        limit = page_size(size, 50, 500)
        fields = [
            "memories",
            user_id,
            sorted(memory_filter.metadata.items()),
            sorted(memory_filter.categories),
            memory_filter.source_conversation_id,
        ]
        after = _time_cursor(decode_token(token, fields))
        items = await self.store.list_memories(user_id, memory_filter, after, limit + 1)
        next_token = ""
        if len(items) > limit:
            items = items[:limit]
            next_token = encode_token([items[-1].create_time, items[-1].id], fields)
        return items, next_token

    async def search_memories(
        self,
        user_id: str,
        query: str,
        *,
        top_k: int,
        threshold: float,
        memory_filter: MemoryFilter,
        mode: int,
        budget: float | None = None,
    ) -> Ranked:
        """`budget`: the seconds the caller waits (its deadline); a query embedding not
        made within most of it gives keyword results, and the vector comes for the
        next search of the same text."""
        with tracing.span("memory.search", {"marie.memory.top_k": top_k}):
            return await self._search_memories(
                user_id,
                query,
                top_k=top_k,
                threshold=threshold,
                memory_filter=memory_filter,
                mode=mode,
                budget=budget,
            )

    async def _search_memories(
        self,
        user_id: str,
        query: str,
        *,
        top_k: int,
        threshold: float,
        memory_filter: MemoryFilter,
        mode: int,
        budget: float | None,
    ) -> Ranked:
        limits.user_id(user_id)
        limits.query(query)
        _check_filter(memory_filter)
        if not 0 <= threshold <= 1:
            raise invalid_argument("score_threshold", "score_threshold is from 0 to 1")
        if mode not in (MODE_UNSPECIFIED, MODE_HYBRID, MODE_VECTOR, MODE_KEYWORD):
            raise invalid_argument("mode", "unknown search mode")
        k = page_size(top_k, 10, 100, "top_k")
        candidates = max(MIN_CANDIDATES, 4 * k)
        # Keyword candidates are looked up while the query is embedded (the
        # embedding is most of a hybrid search's time); unused when the store
        # combines both itself.
        keyword_lookup: asyncio.Future[list[ScoredMemory]] | None = None
        if mode != MODE_VECTOR:
            keyword_lookup = asyncio.ensure_future(
                self.store.keyword_search_memories(user_id, query, memory_filter, candidates)
            )
        try:
            used, note, vector = await self._query_vector(query, mode, budget)
            scores, found = await self._ranked_memories(
                user_id=user_id,
                query=query,
                memory_filter=memory_filter,
                candidates=candidates,
                used=used,
                vector=vector,
                keyword_lookup=keyword_lookup,
            )
        finally:
            if keyword_lookup is not None:
                if not keyword_lookup.done():
                    keyword_lookup.cancel()
                elif not keyword_lookup.cancelled():
                    keyword_lookup.exception()  # an unused lookup's failure is not news
        ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
        results = [
            ScoredMemory(found[memory_id], score)
            for memory_id, score in ranked
            if score >= threshold and (score > 0 or threshold == 0)
        ][:k]
        if self.embeddings.backfilling and vector is not None and not note:
            note = "memories are being re-embedded: vector results may be incomplete"
        return Ranked(used, note, memories=results)

    async def _ranked_memories(
        self,
        *,
        user_id: str,
        query: str,
        memory_filter: MemoryFilter,
        candidates: int,
        used: int,
        vector: list[float] | None,
        keyword_lookup: asyncio.Future[list[ScoredMemory]] | None,
    ) -> tuple[dict[str, float], dict[str, Memory]]:
        """Each candidate's score (0..1) and the candidates, for the mode used."""
        found: dict[str, Memory] = {}
        if used == MODE_HYBRID and vector is not None and not self.embeddings.backfilling:
            # The store's own hybrid search (OpenSearch's normalization
            # pipeline), when it has one: scores already weighted, 0..1.
            combined = await self.store.hybrid_search_memories(
                user_id, query, vector, memory_filter, candidates
            )
            if combined is not None:
                found = {hit.memory.id: hit.memory for hit in combined}
                return {hit.memory.id: max(0.0, min(1.0, hit.score)) for hit in combined}, found
        vector_hits: list[ScoredMemory] = []
        if vector is not None:
            vector_hits = await self.store.vector_search_memories(
                user_id, vector, memory_filter, candidates
            )
        if used == MODE_VECTOR:
            found = {hit.memory.id: hit.memory for hit in vector_hits}
            return {hit.memory.id: max(0.0, min(1.0, hit.score)) for hit in vector_hits}, found
        assert keyword_lookup is not None
        keyword_hits = await keyword_lookup
        for hit in (*vector_hits, *keyword_hits):
            found.setdefault(hit.memory.id, hit.memory)
        if used == MODE_KEYWORD:
            best = keyword_hits[0].score if keyword_hits else 1.0
            return {hit.memory.id: _ratio(hit.score, best) for hit in keyword_hits}, found
        return self._fuse(vector_hits, keyword_hits), found

    def _fuse(
        self, vector_hits: Sequence[ScoredMemory], keyword_hits: Sequence[ScoredMemory]
    ) -> dict[str, float]:
        """Hybrid scores from the two candidate lists (fusion.py says how and why)."""
        return fusion.min_max_fusion(
            [(hit.memory.id, hit.score) for hit in vector_hits],
            [(hit.memory.id, hit.score) for hit in keyword_hits],
            vector_weight=self._vector_weight,
            keyword_weight=self._keyword_weight,
        )

    async def _query_vector(
        self, query: str, mode: int, budget: float | None = None
    ) -> tuple[int, str, list[float] | None]:
        """The mode to use, why it differs from the request, and the query's vector."""
        if mode == MODE_KEYWORD:
            return MODE_KEYWORD, "", None
        if mode == MODE_VECTOR:
            return MODE_VECTOR, "", await self.embeddings.embed_query(query)
        if not self.embeddings.configured:
            return MODE_KEYWORD, "no embedding model configured", None
        embedding = asyncio.ensure_future(self.embeddings.embed_query(query))
        if budget is not None:
            # Leave the keyword search its share of the caller's deadline.
            done, _ = await asyncio.wait({embedding}, timeout=budget - min(0.1, budget / 3))
            if not done:
                # It goes on, and fills the cache for the next search of this text.
                self._pending.add(embedding)
                embedding.add_done_callback(_forget(self._pending))
                return MODE_KEYWORD, "the query could not be embedded in time", None
        try:
            vector = await embedding
        except Exception as exc:  # any failure to embed falls back to keywords
            log.info("hybrid search fell back to keywords", extra={"error": str(exc)})
            return MODE_KEYWORD, "the embedding model could not be reached", None
        return MODE_HYBRID, "", vector

    async def update_memory(
        self, user_id: str, values: Memory, paths: Sequence[str], actor: str
    ) -> Memory:
        limits.user_id(user_id)
        limits.required_id("memory.id", values.id)
        limits.text("actor", actor, limits.MAX_ACTOR)
        if not paths:
            raise invalid_argument("update_mask", "update_mask names no field")
        for path in paths:
            if path not in MEMORY_FIELDS:
                raise invalid_argument(
                    "update_mask", f"{path!r} cannot be changed (text, categories, metadata)"
                )
        if "text" in paths:
            limits.text("memory.text", values.text, limits.MAX_MEMORY_TEXT, required=True)
        if "categories" in paths:
            limits.categories("memory.categories", values.categories)
        if "metadata" in paths:
            limits.metadata("memory.metadata", values.metadata)
        async with self._user_locks[user_id]:
            current = await self.store.get_memory(user_id, values.id)
            if current is None:
                raise memory_not_found(values.id)
            now = self._clock()
            updated = replace(current, update_time=now)
            vector = None
            if "text" in paths and values.text != current.text:
                updated = replace(updated, text=values.text, hash=text_hash(values.text))
                if self.embeddings.configured:
                    vector = (await self.embeddings.embed([values.text]))[0]
            if "categories" in paths:
                updated = replace(updated, categories=tuple(values.categories))
            if "metadata" in paths:
                updated = replace(updated, metadata=dict(values.metadata))
            entry = HistoryEntry(
                new_id("hist"),
                current.id,
                EVENT_UPDATE,
                current.text,
                updated.text,
                now,
                actor or user_id,
                False,
            )
            await self.store.apply_memory_changes(
                user_id, [MemoryChange(EVENT_UPDATE, updated, entry, vector)]
            )
            return updated

    async def delete_memory(
        self, user_id: str, memory_id: str, erase_history: bool, actor: str
    ) -> None:
        limits.user_id(user_id)
        limits.required_id("memory_id", memory_id)
        limits.text("actor", actor, limits.MAX_ACTOR)
        async with self._user_locks[user_id]:
            current = await self.store.get_memory(user_id, memory_id)
            if current is None:
                raise memory_not_found(memory_id)
            entry = None
            if not erase_history:
                entry = HistoryEntry(
                    new_id("hist"),
                    memory_id,
                    EVENT_DELETE,
                    current.text,
                    "",
                    self._clock(),
                    actor or user_id,
                    False,
                )
            change = MemoryChange(EVENT_DELETE, current, entry, erase_history=erase_history)
            await self.store.apply_memory_changes(user_id, [change])

    async def delete_all_memories(self, user_id: str) -> int:
        limits.user_id(user_id)
        async with self._user_locks[user_id]:
            return await self.store.delete_all_memories(user_id)

    async def memory_history(
        self, user_id: str, memory_id: str, size: int, token: str
    ) -> tuple[list[HistoryEntry], str]:
        limits.user_id(user_id)
        limits.required_id("memory_id", memory_id)
        limit = page_size(size, 100, 1000)
        fields = ["history", user_id, memory_id]
        cursor = decode_token(token, fields)
        if cursor is not None and (not isinstance(cursor, int) or isinstance(cursor, bool)):
            raise invalid_argument("page_token", "malformed page token")
        rows = await self.store.history(user_id, memory_id, cursor, limit + 1)
        if rows is None:
            raise memory_not_found(memory_id)
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            next_token = encode_token(rows[-1][0], fields)
        return [entry for _, entry in rows], next_token

    # --- AddMemories ------------------------------------------------------

    def check_add(self, request: AddRequest) -> None:
        """Validates an AddMemories request (also before queueing it)."""
        limits.user_id(request.user_id)
        if not 1 <= len(request.messages) <= limits.MAX_MESSAGES:
            raise invalid_argument("messages", f"1 to {limits.MAX_MESSAGES} messages")
        total = 0
        for i, m in enumerate(request.messages):
            if not 1 <= m.role <= 4:
                raise invalid_argument(f"messages[{i}].role", "role is required")
            if not m.content:
                raise invalid_argument(f"messages[{i}].content", "content is required")
            total += len(m.content.encode("utf-8"))
            if not request.infer and m.role != ROLE_SYSTEM:
                limits.text(f"messages[{i}].content", m.content, limits.MAX_MEMORY_TEXT)
        if total > limits.MAX_MESSAGE_BYTES:
            raise invalid_argument("messages", "the messages hold more than 1 MiB together")
        limits.categories("categories", request.categories)
        limits.metadata("metadata", request.metadata)
        limits.text("actor", request.actor, limits.MAX_ACTOR)
        limits.text("extraction_model", request.extraction_model, limits.MAX_MODEL)
        limits.text("extraction_provider", request.extraction_provider, limits.MAX_PROVIDER)
        limits.request_id(request.request_id)

    def extraction_model(self, request: AddRequest) -> str:
        """The model inference will use; FAILED_PRECONDITION when there is none."""
        model = request.extraction_model or self.default_extraction_model
        if not model:
            raise extraction_model_not_configured()
        if request.extraction_provider and request.extraction_model:
            return f"{request.extraction_provider}/{request.extraction_model}"
        return model

    async def _check_add_fully(self, request: AddRequest) -> str:
        """Everything AddMemories checks before changing anything; the model to use."""
        self.check_add(request)
        model = self.extraction_model(request) if request.infer else ""
        if request.infer and self.extractor is None:
            raise extraction_model_not_configured()
        if request.conversation_id:
            found = await self.store.get_conversation(request.user_id, request.conversation_id)
            if found is None:
                raise conversation_not_found(request.conversation_id)
        return model

    async def enqueue_memories(self, request: AddRequest) -> str:
        """Checks an inferring AddMemories request and queues it durably; the job id.

        A key limited to some models is refused here, as a synchronous call
        would be, when the extraction model is not one of them: queued, the
        job could only be dropped later."""
        model = await self._check_add_fully(request)
        if request.allowed_models and self.extractor is not None:
            await self.extractor.check_allowed(model, request.allowed_models)
        now = self._clock()
        job_id = (
            derived_id("job", request.user_id, "job", request.request_id)
            if request.request_id
            else new_id("job")
        )
        # The job carries the trace context of the call that queued it: its
        # span, when it runs, is linked to that call.
        trace_context: dict[str, str] = {}
        tracing.inject(trace_context)
        job = ExtractionJob(
            job_id, request.user_id, encode_request(request, trace_context), 0, now, now
        )
        await self.store.enqueue_job(job)
        if self.on_enqueue is not None:
            self.on_enqueue()
        return job.id

    async def add_memories(self, request: AddRequest) -> tuple[list[AddResult], str]:
        model = await self._check_add_fully(request)
        if not request.infer and self.store.claims_texts:
            # The store keeps one memory per text however many calls (or
            # replicas) add it at once: no turns to take.
            plan = await self._apply(request.user_id, await self._plan(request, model))
            return list(plan.results), model
        # The lock spares this process's calls for one user a race among
        # themselves; nothing rests on it with a store that claims texts:
        # other replicas' races end in the claims (DuplicateMemory), as NONE.
        async with self._user_locks[request.user_id]:
            plan = await self._plan(request, model)
            plan = await self._apply(request.user_id, plan)
        return list(plan.results), model

    async def plan_memories(self, request: AddRequest) -> tuple[ChangePlan, str]:
        """What AddMemories would change (the model calls made), written by
        `apply_planned`; the model used."""
        model = await self._check_add_fully(request)
        async with self._user_locks[request.user_id]:
            return await self._plan(request, model), model

    async def apply_planned(
        self, user_id: str, plan: ChangePlan, wanted: Callable[[], Awaitable[bool]]
    ) -> ChangePlan | None:
        """Writes a plan of `plan_memories` if `wanted()` still says so (checked under
        the user's lock: an erasure in between wins); the plan as written, or None."""
        async with self._user_locks[user_id]:
            if not await wanted():
                return None
            return await self._apply(user_id, plan)

    async def _plan(self, request: AddRequest, model: str) -> ChangePlan:
        if request.infer:
            assert self.extractor is not None
            return await self.extractor.plan(self, request, model)
        return await self._plan_verbatim(request)

    async def _apply(self, user_id: str, plan: ChangePlan) -> ChangePlan:
        """Writes a plan; the plan as written: a memory added meanwhile (by this
        process, whose write may have waited for the store, or by another
        replica) with the text of one to add stands, and that add is NONE."""
        changes = list(plan.changes)
        results = list(plan.results)

        def keep(held: Memory) -> None:
            nonlocal changes, results
            changes = [
                c for c in changes if not (c.event == EVENT_ADD and c.memory.hash == held.hash)
            ]
            results = [
                AddResult(EVENT_NONE, held)
                if r.event == EVENT_ADD and r.memory.hash == held.hash and r.memory.id != held.id
                else r
                for r in results
            ]

        if not self.store.claims_texts:  # else the store refuses a duplicate itself
            for change in list(changes):
                if change.event == EVENT_ADD:
                    found = await self.store.find_memory_by_hash(user_id, change.memory.hash)
                    if found is not None:
                        keep(found)
        while changes:
            try:
                await self.store.apply_memory_changes(user_id, changes)
                break
            except DuplicateMemory as taken:
                keep(taken.memory)
        return ChangePlan(tuple(changes), tuple(results))

    async def close_memories(self, user_id: str, text: str) -> list[Memory]:
        """The user's stored memories close enough to `text` for a model to compare
        them: sharing a keyword with it (besides "user"), or, with embeddings, of
        vector similarity `close_similarity` or more; at most `similar_count`."""
        found: dict[str, Memory] = {}
        words = _USER_WORD.sub(" ", text)
        if words.strip():
            for hit in await self.store.keyword_search_memories(
                user_id, words, MemoryFilter(), self._similar
            ):
                found.setdefault(hit.memory.id, hit.memory)
        if self.embeddings.configured:
            try:
                # A fact compared with stored facts: a document, as they are.
                vector = await self.embeddings.embed_query(text, DOCUMENT)
            except ServiceError:
                vector = None  # keywords alone, then
            if vector is not None:
                for hit in await self.store.vector_search_memories(
                    user_id, vector, MemoryFilter(), self._similar
                ):
                    if hit.score >= self._close_similarity:
                        found.setdefault(hit.memory.id, hit.memory)
        return list(found.values())[: self._similar]

    async def get_job(self, user_id: str, job_id: str) -> ExtractionJob:
        limits.user_id(user_id)
        limits.required_id("job_id", job_id)
        found = await self.store.get_job(user_id, job_id)
        if found is None:
            raise job_not_found(job_id)
        return found

    def new_memory(
        self, request: AddRequest, text: str, categories: Sequence[str], memory_id: str = ""
    ) -> Memory:
        now = self._clock()
        merged = list(dict.fromkeys([*categories, *request.categories]))[: limits.MAX_CATEGORIES]
        return Memory(
            id=memory_id or new_id("mem"),
            user_id=request.user_id,
            text=text,
            hash=text_hash(text),
            categories=tuple(merged),
            metadata=dict(request.metadata),
            source_conversation_id=request.conversation_id,
            source_message_ids=tuple(m.message_id for m in request.messages if m.message_id),
            create_time=now,
            update_time=now,
        )

    def history_entry(
        self,
        request: AddRequest,
        memory_id: str,
        event: int,
        *,
        old: str,
        new: str,
        inferred: bool,
    ) -> HistoryEntry:
        return HistoryEntry(
            new_id("hist"),
            memory_id,
            event,
            old,
            new,
            self._clock(),
            request.actor or request.user_id,
            inferred,
        )

    async def vectors_for(self, texts: Sequence[str]) -> list[list[float]] | list[None]:
        """Vectors for new texts, or Nones when no embedding model is configured."""
        if not self.embeddings.configured:
            return [None] * len(texts)
        return await self.embeddings.embed(texts)

    async def _plan_verbatim(self, request: AddRequest) -> ChangePlan:
        results: list[AddResult] = []
        seen: dict[str, Memory] = {}
        fresh: list[Memory] = []
        for i, m in enumerate(request.messages):
            if m.role == ROLE_SYSTEM:
                continue
            # A retried call finds what the first one stored under its ids.
            memory_id = (
                derived_id("mem", request.user_id, request.request_id, i)
                if request.request_id
                else ""
            )
            digest = text_hash(m.content)
            # Both looked up at once (two round trips to a remote store).
            stored, existing = await asyncio.gather(
                self._stored_memory(request.user_id, memory_id),
                self._stored_by_text(request.user_id, digest, seen),
            )
            if stored is not None:
                seen[stored.hash] = stored
                results.append(AddResult(EVENT_ADD, stored))
                continue
            if existing is not None:
                results.append(AddResult(EVENT_NONE, existing))
                continue
            memory = self.new_memory(request, m.content, (), memory_id)
            seen[digest] = memory
            fresh.append(memory)
            results.append(AddResult(EVENT_ADD, memory))
        vectors = await self.vectors_for([m.text for m in fresh])
        changes = [
            MemoryChange(
                EVENT_ADD,
                memory,
                self.history_entry(
                    request, memory.id, EVENT_ADD, old="", new=memory.text, inferred=False
                ),
                vector,
            )
            for memory, vector in zip(fresh, vectors, strict=True)
        ]
        return ChangePlan(tuple(changes), tuple(results))

    async def _stored_memory(self, user_id: str, memory_id: str) -> Memory | None:
        return await self.store.get_memory(user_id, memory_id) if memory_id else None

    async def _stored_by_text(
        self, user_id: str, digest: str, seen: Mapping[str, Memory]
    ) -> Memory | None:
        """The memory holding this text: one of this call's, or a stored one."""
        return seen.get(digest) or await self.store.find_memory_by_hash(user_id, digest)


def _forget(
    pending: set[asyncio.Future[list[float]]],
) -> Callable[[asyncio.Future[list[float]]], None]:
    def done(future: asyncio.Future[list[float]]) -> None:
        pending.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.info("a late query embedding failed", extra={"error": str(future.exception())})

    return done


def _ratio(value: float, best: float) -> float:
    if best <= 0:
        return 0.0
    return max(0.0, min(1.0, value / best))


def _time_cursor(cursor: object) -> tuple[float, str] | None:
    if cursor is None:
        return None
    match cursor:
        case [float() | int() as at, str() as last_id] if not isinstance(at, bool):
            return float(at), last_id
    raise invalid_argument("page_token", "malformed page token")


def _check_filter(memory_filter: MemoryFilter) -> None:
    limits.metadata("filter.metadata", memory_filter.metadata)
    for i, category in enumerate(memory_filter.categories):
        limits.text(f"filter.categories[{i}]", category, limits.MAX_CATEGORY)
