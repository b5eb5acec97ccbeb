"""Helpers shared by the memory service's tests (uniquely named module)."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pytest
from marie_kit.server import RunningServer
from marie_memory.records import (
    EVENT_ADD,
    Conversation,
    HistoryEntry,
    Memory,
    MemoryChange,
    Message,
)
from marie_memory.settings import MemorySettings

EMBEDDING_MODEL = "ollama/nomic-embed-text:latest"
#: Why a contract test cannot run on osmem-server; the test is skipped saying so.
NO_KNN = "osmem-server has no knn query (knn bodies are checked in test_memory_opensearch.py)"
EXTRACTION_MODEL = "ollama/llama3.2:latest"

__all__ = [
    "EMBEDDING_MODEL",
    "EXTRACTION_MODEL",
    "NO_KNN",
    "MemoryStub",
    "StartMemory",
    "add",
    "conversation",
    "memory",
    "message",
    "new_id",
    "opensearch_target",
]


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def conversation(user: str, title: str = "", at: float | None = None) -> Conversation:
    now = time.time() if at is None else at
    return Conversation(
        id=new_id("conv"), user_id=user, title=title, create_time=now, update_time=now
    )


def message(role: int, content: str) -> Message:
    return Message(id=new_id("msg"), conversation_id="", role=role, content=content)


def memory(
    user: str,
    text: str,
    *,
    at: float | None = None,
    categories: Sequence[str] = (),
    metadata: Mapping[str, str] | None = None,
    source: str = "",
) -> Memory:
    now = time.time() if at is None else at
    return Memory(
        id=new_id("mem"),
        user_id=user,
        text=text,
        hash=hashlib.sha256(text.encode()).hexdigest(),
        categories=tuple(categories),
        metadata=dict(metadata or {}),
        source_conversation_id=source,
        create_time=now,
        update_time=now,
    )


def add(mem: Memory, vector: Sequence[float] | None = None) -> MemoryChange:
    entry = HistoryEntry(
        new_id("hist"), mem.id, EVENT_ADD, "", mem.text, mem.create_time, mem.user_id, False
    )
    return MemoryChange(EVENT_ADD, mem, entry, vector)


if TYPE_CHECKING:
    from marie.memory.v1.memory_service_pb2_grpc import MemoryServiceAsyncStub as MemoryStub
else:
    MemoryStub = Any

#: The `start_memory` fixture: starts a memory server over the given settings.
StartMemory = Callable[[MemorySettings], Awaitable[RunningServer]]


def opensearch_target(request: pytest.FixtureRequest, kind: str) -> str:
    """The URL of an OpenSearch store of `kind` (osmem or opensearch)."""
    if kind == "osmem":
        url: str = request.getfixturevalue("osmem_clone").url
        return url
    url = request.getfixturevalue("opensearch_url")
    return url
