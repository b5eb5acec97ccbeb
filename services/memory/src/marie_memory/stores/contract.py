"""The interface every store implements (SQLite, OpenSearch), over the plain records.

Every store method that reads or writes user data takes the `user_id` and
never touches another user's rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from marie_memory.records import (
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
)


class DuplicateMemory(Exception):
    """Raised by `apply_memory_changes` (stores shared by several processes) when
    a memory to add has the text of a memory another call has just stored;
    nothing of the change set was written."""

    def __init__(self, memory: Memory) -> None:
        super().__init__(f"memory {memory.id} holds this text already")
        self.memory = memory


class Store(Protocol):
    """Storage for conversations, messages, memories, history and the extraction queue.

    Every write is durable when the awaited call returns. Methods that name
    a resource return None (or False) when it does not exist for that user.
    List cursors are opaque tuples produced by the store (`next_cursor`);
    the core turns them into page tokens.
    """

    #: Whether the store itself keeps one memory per text of a user under
    #: concurrent adds (raising DuplicateMemory), across processes.
    claims_texts: bool

    async def close(self) -> None: ...

    async def probe_write(self) -> None:
        """A small write and its removal; raises while the store has no room
        (marie_kit.storage: how the service knows it can write again)."""

    # --- embedding space --------------------------------------------------
    async def get_embedding_space(self) -> EmbeddingSpace | None: ...
    async def set_embedding_space(self, space: EmbeddingSpace | None) -> None:
        """Record the space; None (or a new space) drops every stored vector."""

    async def memories_without_vectors(self, limit: int) -> list[Memory]:
        """Memories (any user) that have no vector in the current space."""

    async def set_vectors(self, vectors: Sequence[tuple[str, str, Sequence[float]]]) -> None:
        """Store (user_id, memory_id, vector) triples; unknown memories are skipped."""

    async def messages_without_vectors(self, limit: int) -> list[tuple[str, Message]]:
        """(user_id, message) of messages with content, oldest first, that have
        neither a vector in the current space nor a mark that they get none."""

    async def set_message_vectors(self, vectors: Sequence[MessageVector]) -> None:
        """Store each message's vector, or the mark that it gets none in the current
        space (vector None), and its note in its metadata (MESSAGE_EMBEDDING_NOTE);
        unknown messages are skipped. A new space clears both."""

    async def vector_search_messages(
        self,
        user_id: str,
        vector: Sequence[float],
        conversation_id: str,
        roles: Sequence[int],
        limit: int,
    ) -> list[MessageHit]:
        """Cosine similarity against the user's message vectors, best first; `relevance`
        is the cosine and the one snippet is the message's start, escaped, no marks."""

    # --- conversations ----------------------------------------------------
    async def create_conversation(self, conversation: Conversation) -> Conversation:
        """Stores it; when its id exists already for the same user (a retried
        create: the id derives from the request id), changes nothing and
        returns the stored one."""

    async def get_conversation(self, user_id: str, conversation_id: str) -> Conversation | None: ...
    async def list_conversations(
        self, user_id: str, order_by_update: bool, after: tuple[float, str] | None, limit: int
    ) -> list[Conversation]:
        """Newest first by create (or update) time, ties by id descending,
        strictly after the (time, id) cursor."""

    async def update_conversation(
        self, user_id: str, conversation_id: str, changes: Mapping[str, object], update_time: float
    ) -> Conversation | None: ...
    async def delete_conversation(self, user_id: str, conversation_id: str) -> int | None:
        """Deletes it and its messages; the number of messages, or None."""

    # --- messages ---------------------------------------------------------
    async def append_messages(
        self,
        user_id: str,
        conversation_id: str,
        messages: Sequence[Message],
        now: float,
        request_id: str = "",
    ) -> tuple[list[Message], Conversation] | None:
        """Atomically appends; ids are given, positions and times assigned here.
        With a `request_id` (the ids then derive from it), an append already
        made under it is not made again: the messages it stored are returned.
        Positions are unique and `message_count` counts the stored messages
        however many processes append to one conversation at once."""

    async def list_messages(
        self, user_id: str, conversation_id: str, descending: bool, after: int | None, limit: int
    ) -> list[Message] | None:
        """By position, strictly after the `after` position in the given order."""

    async def search_messages(
        self,
        user_id: str,
        query: str,
        conversation_id: str,
        roles: Sequence[int],
        limit: int,
    ) -> list[MessageHit]:
        """Keyword (BM25) search, best first, at most `limit` hits."""

    # --- memories ---------------------------------------------------------
    async def get_memory(self, user_id: str, memory_id: str) -> Memory | None: ...
    async def find_memory_by_hash(self, user_id: str, text_hash: str) -> Memory | None: ...
    async def list_memories(
        self,
        user_id: str,
        memory_filter: MemoryFilter,
        after: tuple[float, str] | None,
        limit: int,
    ) -> list[Memory]:
        """Newest created first, ties by id descending, after the cursor."""

    async def apply_memory_changes(self, user_id: str, changes: Sequence[MemoryChange]) -> None:
        """Applies every change and its history entry in one transaction; may
        raise DuplicateMemory (then nothing was written)."""

    async def delete_all_memories(self, user_id: str) -> int:
        """Erases memories, vectors and history of the user; the count of memories."""

    async def history(
        self, user_id: str, memory_id: str, after: int | None, limit: int
    ) -> list[tuple[int, HistoryEntry]] | None:
        """(sequence, entry) oldest first after the sequence; None when neither the
        memory nor any history of it exists for this user."""

    async def keyword_search_memories(
        self, user_id: str, query: str, memory_filter: MemoryFilter, limit: int
    ) -> list[ScoredMemory]:
        """BM25, best first; `score` is the raw relevance (larger is better)."""

    async def vector_search_memories(
        self, user_id: str, vector: Sequence[float], memory_filter: MemoryFilter, limit: int
    ) -> list[ScoredMemory]:
        """Cosine similarity against the user's vectors, best first."""

    async def hybrid_search_memories(
        self,
        user_id: str,
        query: str,
        vector: Sequence[float],
        memory_filter: MemoryFilter,
        limit: int,
    ) -> list[ScoredMemory] | None:
        """Hybrid search done by the store itself, best first, `score` already
        normalised and weighted (0..1); None when the store cannot (then the
        service combines vector and keyword searches)."""

    # --- extraction queue -------------------------------------------------
    async def enqueue_job(self, job: ExtractionJob) -> None:
        """Queues it; a job whose id is queued (or finished) already is left as it is."""

    async def due_jobs(self, now: float, limit: int) -> list[ExtractionJob]:
        """Queued jobs due at `now`, the earliest due first."""

    async def take_job(self, job_id: str, now: float, lease_seconds: float) -> bool:
        """Takes a due job for one run: moves its next attempt `lease_seconds`
        on, unless it is not due (any more). True for exactly one of several
        callers (processes) taking the same job at once."""

    async def get_job(self, user_id: str, job_id: str) -> ExtractionJob | None:
        """A queued job, or a finished one (kept FINISHED_JOB_SECONDS), of this user."""

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
        """Takes a job off the queue and keeps its outcome (JOB_SUCCEEDED or
        JOB_FAILED) for FINISHED_JOB_SECONDS; outcomes older than that go."""

    async def retry_job(self, job_id: str, next_attempt_time: float, error: str) -> None:
        """Counts a failed attempt and makes the job due again at `next_attempt_time`."""

    async def count_jobs(self) -> int:
        """Queued jobs."""

    async def oldest_job_time(self) -> float | None:
        """When the oldest queued job was queued (its `create_time`); None when
        the queue is empty."""


#: How long a finished extraction job's outcome is kept.
FINISHED_JOB_SECONDS = 7 * 86_400.0
