"""The response cache as the servicer uses it: a lookup that never fails a
call (a store that cannot answer is a miss), stores that run in the
background (never delaying the answer; a store that fails loses only the
entry), the replay of a stored answer with a fresh id and creation time,
and the hit and miss counters.

What is stored is the whole answer of a call that ended normally: the chat
chunks as they were sent (a cut-short stream, an error or a cancelled call
stores nothing), or the embeddings. A hit replays them with `cache` HIT on
every message; its usage is the original call's (the ledger records a hit
with no tokens: no upstream was called).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from marie.providers.v1 import provider_service_pb2 as pb
from marie_kit.metrics import Children
from prometheus_client import Counter

from marie_providers.cache.keys import BYPASS, Use, chat_default, decide, tenant_of
from marie_providers.cache.store import CacheStore, Entry
from marie_providers.upstream.chunks import ChunkMerger

log = logging.getLogger("marie.providers.cache")

LOOKUPS = Counter(
    "marie_providers_cache_lookups",
    "Response cache lookups by operation (chat, completions, embeddings) and"
    " result: 'hit' (answered from the cache, no upstream call) or 'miss'"
    " (nothing fresh stored, or the call asked to revalidate); a lookup that failed"
    " or timed out is counted 'error' as well as 'miss'.",
    ["operation", "result"],
)
_lookups = Children(LOOKUPS)
STORES = Counter(
    "marie_providers_cache_stores",
    "Answers written to the response cache, by operation and result: 'stored',"
    " 'too_large' (over the entry size limit) or 'failed' (the store could not write).",
    ["operation", "result"],
)
_stores = Children(STORES)

CHAT = "chat"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"
#: How long closing waits for stores still being written.
CLOSE_WAIT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Settings:
    """The cache's settings (from ProvidersSettings)."""

    ttl_seconds: float
    max_entry_bytes: int
    chat_by_default: bool
    #: A lookup that takes longer is a miss: a slow or unreachable store
    #: never holds an answer back by more than this.
    lookup_timeout_seconds: float


class ResponseCache:
    """Lookups and background stores over one `CacheStore`."""

    def __init__(self, store: CacheStore, settings: Settings) -> None:
        self._store = store
        self.settings = settings
        self._writes: set[asyncio.Task[None]] = set()

    def use(
        self,
        operation: str,
        request: pb.StreamChatCompletionRequest
        | pb.StreamCompletionRequest
        | pb.CreateEmbeddingsRequest,
        metadata: Iterable[tuple[str, str | bytes]] | None,
    ) -> tuple[Use, str]:
        """How the call uses the cache, and whose entries it sees ("" for none)."""
        if isinstance(request, pb.CreateEmbeddingsRequest):
            default_on = True
        else:
            default_on = self.settings.chat_by_default and chat_default(request)
        use = decide(request.cache, default_on=default_on, ttl=self.settings.ttl_seconds)
        if not use.store:
            return use, ""
        tenant = tenant_of(metadata)
        return (use, tenant) if tenant else (BYPASS, "")

    async def lookup(self, operation: str, key: str, tenant: str, use: Use) -> bytes | None:
        """The stored answer when one fresh enough is there; counts the hit or miss."""
        body = None
        if use.lookup:
            now = time.time()
            try:
                async with asyncio.timeout(self.settings.lookup_timeout_seconds):
                    entry = await self._store.get(key, tenant, now)
            except Exception as exc:
                _lookups(operation, "error").inc()
                log.warning("response cache lookup failed", extra={"error": repr(exc)})
                entry = None
            if entry is not None and now - entry.stored <= use.max_age:
                body = entry.body
        _lookups(operation, "hit" if body is not None else "miss").inc()
        return body

    def store_later(self, operation: str, key: str, tenant: str, body: bytes) -> None:
        """Write the answer in the background: the call does not wait for it."""
        if len(body) > self.settings.max_entry_bytes:
            _stores(operation, "too_large").inc()
            return
        now = time.time()
        entry = Entry(key, tenant, operation, now, now + self.settings.ttl_seconds, body)
        task = asyncio.get_running_loop().create_task(self._put(entry), name="cache-store")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, entry: Entry) -> None:
        try:
            await self._store.put(entry)
        except Exception as exc:
            _stores(entry.operation, "failed").inc()
            log.warning("response cache store failed", extra={"error": repr(exc)})
            return
        _stores(entry.operation, "stored").inc()

    async def close(self) -> None:
        """Let background writes finish for a while, give up the rest (a
        cache entry is never owed to anyone), then close the store: a write
        left running would reopen the store's client after its close (an
        OpenSearch client's HTTP session, never closed again)."""
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=CLOSE_WAIT_SECONDS)
        if left := list(self._writes):
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)
            log.info("response cache writes given up at shutdown", extra={"writes": len(left)})
        await self._store.close()


def replay_chat(
    body: bytes, completion_id: str, created: int, *, aggregate: bool
) -> list[pb.StreamChatCompletionResponse]:
    """A stored chat answer as chunks of a new completion (merged when the
    caller wants only the whole reply), every one marked HIT; empty for an
    entry that cannot be read (a miss, then)."""
    try:
        stored = pb.CreateChatCompletionResponse.FromString(body).chunks
    except DecodeError:
        log.warning("response cache entry unreadable: treated as a miss")
        return []
    out: Iterable[pb.StreamChatCompletionResponse] = stored
    if aggregate:
        merger = ChunkMerger()
        merged = [ready for chunk in stored if (ready := merger.add(chunk)) is not None]
        if (last := merger.flush()) is not None:
            merged.append(last)
        out = merged
    replay = list(out)
    for chunk in replay:
        chunk.id = completion_id
        chunk.created = created
        chunk.cache = pb.CACHE_RESULT_HIT
    return replay


def replay_embeddings(body: bytes) -> pb.CreateEmbeddingsResponse | None:
    """A stored embeddings answer marked HIT; None for one that cannot be read."""
    try:
        reply = pb.CreateEmbeddingsResponse.FromString(body)
    except DecodeError:
        log.warning("response cache entry unreadable: treated as a miss")
        return None
    reply.cache = pb.CACHE_RESULT_HIT
    return reply


def complete(chunks: Iterable[pb.StreamChatCompletionResponse]) -> bool:
    """Whether the chunks are a whole answer: one of them says why it finished."""
    return any(c.finish_reason != pb.FINISH_REASON_UNSPECIFIED for c in chunks)
