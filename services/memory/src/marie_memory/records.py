"""What the memory service stores and what an AddMemories call asks for, as plain values.

The stores and the core know nothing of gRPC: records are frozen dataclasses,
times are unix seconds (floats), enums are the proto's integer values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

# MessageRole values (same numbers as the proto enum).
ROLE_SYSTEM = 1
ROLE_USER = 2
ROLE_ASSISTANT = 3
ROLE_TOOL = 4

# MemoryEvent values (same numbers as the proto enum).
EVENT_ADD = 1
EVENT_UPDATE = 2
EVENT_DELETE = 3
EVENT_NONE = 4


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    user_id: str
    title: str = ""
    provider: str = ""
    model: str = ""
    create_time: float = 0.0
    update_time: float = 0.0
    message_count: int = 0
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    function_name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    conversation_id: str
    role: int
    content: str
    provider: str = ""
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    create_time: float = 0.0
    metadata: Mapping[str, str] = field(default_factory=dict)
    position: int = 0
    name: str = ""
    tool_calls: Sequence[ToolCall] = ()
    tool_call_id: str = ""

    def stored(self, conversation_id: str, position: int, now: float) -> Message:
        """The message as a store keeps it: in its conversation, at its position,
        written now, with copies of what the caller could still change."""
        return replace(
            self,
            conversation_id=conversation_id,
            create_time=now,
            metadata=dict(self.metadata),
            position=position,
            tool_calls=tuple(self.tool_calls),
        )


@dataclass(frozen=True, slots=True)
class Memory:
    id: str
    user_id: str
    text: str
    hash: str
    categories: Sequence[str] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    source_conversation_id: str = ""
    source_message_ids: Sequence[str] = ()
    create_time: float = 0.0
    update_time: float = 0.0


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    id: str
    memory_id: str
    event: int
    old_text: str
    new_text: str
    create_time: float
    actor: str
    inferred: bool


@dataclass(frozen=True, slots=True)
class MemoryFilter:
    """Every condition set must hold; the empty filter matches everything."""

    metadata: Mapping[str, str] = field(default_factory=dict)
    categories: Sequence[str] = ()
    source_conversation_id: str = ""

    def is_empty(self) -> bool:
        return not self.metadata and not self.categories and not self.source_conversation_id

    def matches(self, memory: Memory) -> bool:
        if self.source_conversation_id and (
            memory.source_conversation_id != self.source_conversation_id
        ):
            return False
        if self.categories and not set(self.categories) & set(memory.categories):
            return False
        return all(memory.metadata.get(k) == v for k, v in self.metadata.items())


@dataclass(frozen=True, slots=True)
class MessageHit:
    message: Message
    conversation_title: str
    #: Raw keyword relevance, larger is better (not normalised).
    relevance: float
    #: Fragments with `<mark>` around matched terms, the rest HTML-escaped.
    snippets: Sequence[str]


@dataclass(frozen=True, slots=True)
class ScoredMemory:
    memory: Memory
    #: Keyword: raw BM25 relevance, larger is better. Vector: cosine similarity.
    score: float


@dataclass(frozen=True, slots=True)
class MemoryChange:
    """One change applied by `Store.apply_memory_changes`, with its history entry.

    ADD: `memory` is the new memory. UPDATE: `memory` is the memory after the
    change (same id). DELETE: `memory` is the memory as it was.
    `vector` is the new text's embedding (ADD, and UPDATE of the text) or None.
    With `erase_history`, a DELETE removes the memory's history instead of
    recording one.
    """

    event: int
    memory: Memory
    history: HistoryEntry | None
    vector: Sequence[float] | None = None
    erase_history: bool = False


# ExtractionJobState values (same numbers as the proto enum).
JOB_QUEUED = 1
JOB_SUCCEEDED = 2
JOB_FAILED = 3


@dataclass(frozen=True, slots=True)
class ExtractionJob:
    id: str
    user_id: str
    #: The AddMemories call to run, as JSON (`job_payload.encode_request`).
    payload: str
    attempts: int
    next_attempt_time: float
    create_time: float
    last_error: str = ""
    state: int = JOB_QUEUED
    #: When it succeeded or failed for good; 0 while queued.
    finish_time: float = 0.0
    #: Why it failed for good: a stable UPPER_SNAKE reason (EXTRACTION_FAILED, …).
    failure_reason: str = ""
    #: What it changed, as JSON (`job_payload.encode_results`); "" until it succeeded.
    results: str = ""


@dataclass(frozen=True, slots=True)
class MessageVector:
    """What the embedder made of one message (`Store.set_message_vectors`).

    `vector` None: no vector will be made for it in this embedding space (a
    record no route searches, or an input the model refused even shortened);
    the store remembers that, so the message is not handed out again.
    `note`, when set, is written to the message's metadata under
    MESSAGE_EMBEDDING_NOTE (e.g. that only its start was embedded).
    """

    user_id: str
    message_id: str
    vector: Sequence[float] | None
    note: str = ""


#: The message metadata key where the embedder says what it did when it did
#: not embed the whole text.
MESSAGE_EMBEDDING_NOTE = "marie_embedding"


@dataclass(frozen=True, slots=True)
class EmbeddingSpace:
    """The embedding model (as "<provider>/<model>") and dimension vectors were made with."""

    model: str
    dimension: int


# What an AddMemories call asks for (a queued job keeps it as its payload) and
# what it did to each memory.


@dataclass(frozen=True, slots=True)
class SourceMessage:
    role: int
    content: str
    message_id: str = ""


@dataclass(frozen=True, slots=True)
class AddRequest:
    user_id: str
    messages: Sequence[SourceMessage]
    infer: bool = True
    extraction_provider: str = ""
    extraction_model: str = ""
    categories: Sequence[str] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    conversation_id: str = ""
    actor: str = ""
    #: The API key (and its owner) the request was made with, from the
    #: verified identity metadata; extraction's model calls are recorded in
    #: the usage ledger under them. Empty: not recorded.
    key_id: str = ""
    key_owner: str = ""
    #: The key's allowed models as the call carried them (`x-marie-allowed-models`,
    #: as sent); extraction's model calls carry them on, so providers holds
    #: the extraction model to them. Empty: unrestricted.
    allowed_models: str = ""
    #: The caller's idempotency key (see AddMemoriesRequest.request_id); empty: none.
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class AddResult:
    event: int
    memory: Memory
    previous_text: str = ""


@dataclass(frozen=True, slots=True)
class ChangePlan:
    """What an AddMemories call will change, made (model calls, vectors) but not
    yet written: `Store.apply_memory_changes` of `changes` writes it."""

    changes: Sequence[MemoryChange]
    results: Sequence[AddResult]
