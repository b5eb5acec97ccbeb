"""LLM fact extraction (filled in by the extraction step)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from marie_memory.core import AddRequest, AddResult, MemoryCore


class Extractor(Protocol):
    async def run(self, core: MemoryCore, request: AddRequest, model: str) -> list[AddResult]: ...
