"""Embeddings through the providers service, and the store's embedding space.

`Embeddings` turns texts into vectors with the configured model
(`MARIE_MEMORY_EMBEDDING_MODEL`) through providers' CreateEmbeddings. The
store records which model and dimension its vectors were made with; vectors
of two models never mix:

- at start, when the store's space names another model, the service either
  refuses to start (`on_model_change=refuse`) or drops the old vectors and
  re-embeds every memory in the background (`reembed`, the default);
- the dimension is learned from the first successful embedding call, so the
  service starts (in keyword mode) even while providers are unreachable,
  and switches to vectors as soon as they answer;
- messages are embedded in the background after they are appended, so an
  append never waits for the embedding model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
from marie.providers.v1 import provider_service_pb2 as ppb
from marie_kit.context import outgoing_metadata

from marie_memory.errors import embeddings_not_configured, provider_unavailable
from marie_memory.records import EmbeddingSpace
from marie_memory.stores.contract import Store

if TYPE_CHECKING:
    from marie.providers.v1.provider_service_pb2_grpc import (
        ProviderServiceAsyncStub as ProvidersStub,
    )
else:
    ProvidersStub = Any

log = logging.getLogger("marie.memory.embedding")

BATCH = 64
RETRY_SECONDS = 5.0


class ModelChangeRefused(Exception):
    """The store holds vectors of another model and the settings say refuse."""


class Embeddings:
    """The configured embedding model, its vector space and the background re-embedder."""

    def __init__(
        self, store: Store, providers: ProvidersStub | None, model: str, timeout: float
    ) -> None:
        self._store = store
        self._providers = providers
        self.model = model
        self._timeout = timeout
        self.space: EmbeddingSpace | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: True while memories of the store still lack a vector of this model.
        self.backfilling = False
        #: True while messages still wait for their vectors.
        self.messages_pending = False

    @property
    def configured(self) -> bool:
        return bool(self.model) and self._providers is not None

    async def check_model(self, refuse_change: bool) -> None:
        """At start: compare the store's space with the configured model."""
        stored = await self._store.get_embedding_space()
        if not self.configured or stored is None:
            return
        if stored.model == self.model:
            self.space = stored
            return
        if refuse_change:
            raise ModelChangeRefused(
                f"MARIE_MEMORY_EMBEDDING_MODEL is {self.model!r} but the store holds vectors "
                f"of {stored.model!r} ({stored.dimension} dimensions); set it back, or set "
                "MARIE_MEMORY_ON_MODEL_CHANGE=reembed to re-embed every memory"
            )
        log.warning(
            "embedding model changed: vectors will be rebuilt",
            extra={"previous": stored.model, "model": self.model},
        )

    def start(self) -> None:
        if self.configured:
            self._task = asyncio.create_task(self._maintain())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def wake(self) -> None:
        self._wake.set()

    async def _call(self, texts: Sequence[str]) -> list[list[float]]:
        assert self._providers is not None
        try:
            reply = await self._providers.CreateEmbeddings(
                ppb.CreateEmbeddingsRequest(model=self.model, inputs=list(texts)),
                timeout=self._timeout,
                metadata=outgoing_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            log.warning(
                "embedding failed",
                extra={"model": self.model, "code": exc.code().name, "error": exc.details()},
            )
            raise provider_unavailable("embedding") from exc
        vectors = [list(e.values) for e in sorted(reply.embeddings, key=lambda e: e.index)]
        if len(vectors) != len(texts) or len({len(v) for v in vectors}) > 1 or not vectors[0]:
            raise provider_unavailable("embedding (the model answered malformed vectors)")
        return vectors

    async def _ensure_space(self, dimension: int) -> EmbeddingSpace:
        async with self._lock:
            space = EmbeddingSpace(self.model, dimension)
            if self.space == space:
                return space
            if self.space is not None:
                # Same model name, new dimension (re-pulled, or a new version).
                log.warning("embedding dimension changed", extra={"dimension": dimension})
            await self._store.set_embedding_space(space)
            self.space = space
            self.backfilling = True
            self._wake.set()
            return space

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Vectors for `texts` in the store's space; FAILED_PRECONDITION when no model
        is configured, UNAVAILABLE (PROVIDER_UNAVAILABLE) when providers fail."""
        if not self.configured:
            raise embeddings_not_configured()
        if not texts:
            return []
        vectors = await self._call(texts)
        space = self.space or await self._ensure_space(len(vectors[0]))
        if len(vectors[0]) != space.dimension:
            await self._ensure_space(len(vectors[0]))
        return vectors

    async def _maintain(self) -> None:
        """Learn the space, then give every memory and message lacking a vector one;
        forever. The wake-up is cleared before looking, so a wake() that comes while
        a round runs is never lost."""
        while True:
            self._wake.clear()
            try:
                if self.space is None:
                    await self.embed(["dimension probe"])
                memories = await self._store.memories_without_vectors(BATCH)
                if memories:
                    self.backfilling = True
                    vectors = await self.embed([m.text for m in memories])
                    await self._store.set_vectors(
                        [(m.user_id, m.id, v) for m, v in zip(memories, vectors, strict=True)]
                    )
                    continue
                self.backfilling = False
                # Messages are embedded here, off the append path, as they arrive.
                messages = await self._store.messages_without_vectors(BATCH)
                if messages:
                    self.messages_pending = True
                    vectors = await self.embed([m.content for _, m in messages])
                    await self._store.set_message_vectors(
                        [(u, m.id, v) for (u, m), v in zip(messages, vectors, strict=True)]
                    )
                    continue
                self.messages_pending = False
                await self._wake.wait()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("embedding maintenance failed; will retry", exc_info=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), RETRY_SECONDS)
