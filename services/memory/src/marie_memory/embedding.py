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

Real embedding servers refuse inputs over their batch size and go away for
minutes, so the background rounds (messages, re-embedding) are careful:

- a text longer than `max_chars` is cut to its start before it is sent, and
  the message says so in its metadata (MESSAGE_EMBEDDING_NOTE);
- a batch the model refuses is split in halves until only the inputs it
  refuses alone are left; those are tried shortened (a half, a quarter), and
  one still refused is marked as having no vector, so it is never sent again:
  one poison input never holds back the others;
- a round that fails because the model cannot be reached (a probe with a
  short text fails too, or providers says the circuit is open) waits, with a
  backoff that doubles up to a minute or for the wait providers gives, and
  logs one line; nothing is marked;
- messages of Marie's own reserved users (stored Responses records, which no
  route searches) are never embedded.

Every text is sent with what it is for (providers' `input_type`): stored
memories and messages as documents, searches as queries, which instruction-
tuned embedders (e5, bge, nomic, Cohere) need to rank well. How the provider
applies it (its `embedding_input_type` / `embedding_prefixes`, answered as
`input_handling`) is part of the embedding space: vectors of one handling
never mix with another's, and a change re-embeds every memory as a model
change does.

Query vectors (searches, the gateway's enrichment) are cached per (model,
input type, text), so a repeated query costs no model call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from marie.providers.v1 import provider_service_pb2 as ppb
from marie_kit.errors import ServiceError
from marie_kit.tenancy import is_reserved_user

from marie_memory import lane
from marie_memory.errors import (
    DOMAIN,
    RETRY_AFTER_KEY,
    embeddings_not_configured,
    provider_unavailable,
)
from marie_memory.records import EmbeddingSpace, MessageVector
from marie_memory.stores.contract import Store

if TYPE_CHECKING:
    from marie.providers.v1.provider_service_pb2_grpc import (
        ProviderServiceAsyncStub as ProvidersStub,
    )
else:
    ProvidersStub = Any

log = logging.getLogger("marie.memory.embedding")

BATCH = 64
#: First wait after a background round failed; it doubles up to MAX_RETRY_SECONDS.
RETRY_SECONDS = 5.0
MAX_RETRY_SECONDS = 60.0
#: Default of MARIE_MEMORY_EMBEDDING_MAX_CHARS: about 500 tokens of English,
#: within the 512-token batch of a llama.cpp embedding server and of e5 models.
DEFAULT_MAX_CHARS = 2000
#: Shortened tries of an input the model refuses alone: its half, its quarter.
SHORTENINGS = 2
#: Query vectors kept (per text, for the configured model).
QUERY_CACHE_SIZE = 1024
PROBE_TEXT = "dimension probe"
InputType: TypeAlias = ppb.EmbeddingInputType
QUERY = ppb.EMBEDDING_INPUT_TYPE_QUERY
DOCUMENT = ppb.EMBEDDING_INPUT_TYPE_DOCUMENT


def space_model(model: str, handling: str) -> str:
    """The model an EmbeddingSpace names: the model id, with the provider's
    input handling after a "#" when it has one ("e5/e5-small#input_type")."""
    return f"{model}#{handling}" if handling else model


def base_model(space_model_name: str) -> str:
    """The model id of an EmbeddingSpace's model (its handling left off)."""
    return space_model_name.split("#", 1)[0]


#: Providers' reasons that mean "wait", whatever the input: no probe is needed.
_WAIT_REASONS = frozenset({"CIRCUIT_OPEN", "DEPLOYMENT_BUSY"})


class ModelChangeRefused(Exception):
    """The store holds vectors of another model and the settings say refuse."""


class Outage(Exception):
    """The embedding model cannot be reached now: the round waits, nothing is marked."""

    def __init__(self, error: ServiceError) -> None:
        super().__init__(error.message)
        self.error = error

    @property
    def retry_after(self) -> float | None:
        """The wait providers asked for (an open circuit), in seconds."""
        return retry_after(self.error)


def retry_after(error: ServiceError) -> float | None:
    """The seconds to wait that a providers error names (CIRCUIT_OPEN's), if any."""
    try:
        value = float(error.metadata.get(RETRY_AFTER_KEY, ""))
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def shortened_note(kept: int, total: int) -> str:
    return f"only the first {kept} of {total} characters are embedded"


class Embeddings:
    """The configured embedding model, its vector space and the background embedder."""

    def __init__(
        self,
        store: Store,
        providers: ProvidersStub | None,
        model: str,
        timeout: float,
        *,
        max_chars: int = DEFAULT_MAX_CHARS,
        retry_seconds: float = RETRY_SECONDS,
        max_retry_seconds: float = MAX_RETRY_SECONDS,
    ) -> None:
        self._store = store
        self._providers = providers
        self.model = model
        self._timeout = timeout
        self._max_chars = max_chars
        self._retry_seconds = retry_seconds
        self._max_retry_seconds = max_retry_seconds
        self.space: EmbeddingSpace | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._queries: OrderedDict[tuple[str, InputType, str], list[float]] = OrderedDict()
        # Memories the model refused even shortened (this process only: a
        # memory holds at most 8 KiB, so this stays empty but for a broken model).
        self._unembeddable: set[str] = set()
        #: True while memories of the store still lack a vector of this model.
        self.backfilling = False
        #: True while messages still wait for their vectors.
        self.messages_pending = False
        #: Model calls made, for measurements and tests.
        self.calls = 0

    @property
    def configured(self) -> bool:
        return bool(self.model) and self._providers is not None

    async def check_model(self, refuse_change: bool) -> None:
        """At start: compare the store's space with the configured model."""
        stored = await self._store.get_embedding_space()
        if not self.configured or stored is None:
            return
        if base_model(stored.model) == self.model:
            # Same model; a changed input handling shows at the first call.
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

    def _fit(self, text: str) -> str:
        return text[: self._max_chars]

    async def _call(self, texts: Sequence[str], input_type: InputType) -> list[list[float]]:
        """One CreateEmbeddings call, in the lane of the running task; raises the
        providers service's error as a ServiceError."""
        assert self._providers is not None
        self.calls += 1
        try:
            reply = await self._providers.CreateEmbeddings(
                ppb.CreateEmbeddingsRequest(
                    model=self.model,
                    inputs=list(texts),
                    input_type=input_type,
                ),
                timeout=self._timeout,
                metadata=lane.call_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise ServiceError.from_rpc_error(exc) from exc
        vectors = [list(e.values) for e in sorted(reply.embeddings, key=lambda e: e.index)]
        if len(vectors) != len(texts) or len({len(v) for v in vectors}) > 1 or not vectors[0]:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                "PROVIDER_UNAVAILABLE",
                "the embedding model answered malformed vectors",
                domain=DOMAIN,
            )
        space = EmbeddingSpace(space_model(self.model, reply.input_handling), len(vectors[0]))
        if space != self.space:
            await self._ensure_space(space)
        return vectors

    async def _ensure_space(self, space: EmbeddingSpace) -> EmbeddingSpace:
        async with self._lock:
            if self.space == space:
                return space
            if self.space is not None:
                # Same model name, new dimension (re-pulled, or a new version), or
                # the provider applies input types another way (its configuration).
                log.warning(
                    "embedding space changed: vectors will be rebuilt",
                    extra={
                        "previous": self.space.model,
                        "space": space.model,
                        "dimension": space.dimension,
                    },
                )
            await self._store.set_embedding_space(space)
            self.space = space
            self._queries.clear()
            self.backfilling = True
            self._wake.set()
            return space

    async def embed(
        self, texts: Sequence[str], input_type: InputType = DOCUMENT
    ) -> list[list[float]]:
        """Vectors for `texts` (each cut to `max_chars`) in the store's space, as
        documents unless said otherwise; FAILED_PRECONDITION when no model is
        configured, UNAVAILABLE (PROVIDER_UNAVAILABLE) when providers fail."""
        if not self.configured:
            raise embeddings_not_configured()
        if not texts:
            return []
        try:
            return await self._call([self._fit(t) for t in texts], input_type)
        except ServiceError as exc:
            log.info(
                "embedding failed",
                extra={"model": self.model, "code": exc.code.name, "reason": exc.reason},
            )
            raise provider_unavailable("embedding", cause=exc) from exc

    async def embed_query(self, text: str, input_type: InputType = QUERY) -> list[float]:
        """The vector of a search query (or of a text compared with documents, as
        `input_type` says), from the cache when this text was embedded lately for
        this model; errors as `embed`."""
        key = (self.model, input_type, text)
        cached = self._queries.get(key)
        if cached is not None:
            self._queries.move_to_end(key)
            return cached
        vector = (await self.embed([text], input_type))[0]
        self._queries[key] = vector
        while len(self._queries) > QUERY_CACHE_SIZE:
            self._queries.popitem(last=False)
        return vector

    # --- the background embedder ----------------------------------------

    async def _probe(self) -> None:
        """Raises Outage unless the model embeds a short text now."""
        try:
            await self._call([PROBE_TEXT], DOCUMENT)
        except ServiceError as exc:
            raise Outage(exc) from exc

    async def _each(self, texts: Sequence[str]) -> list[list[float] | None]:
        """Vectors of `texts`, None for those the model refuses alone; a refused
        batch is split in halves. Raises Outage when the model cannot be reached."""
        try:
            return list(await self._call(texts, DOCUMENT))
        except ServiceError as exc:
            if exc.reason in _WAIT_REASONS:
                raise Outage(exc) from exc
            if exc.code != grpc.StatusCode.INVALID_ARGUMENT:
                # A failure that may be the input's or the model's: the input's
                # if a short text still goes through.
                await self._probe()
            log.debug(
                "embedding batch refused; splitting it",
                extra={"inputs": len(texts), "reason": exc.reason},
            )
        if len(texts) == 1:
            return [None]
        middle = len(texts) // 2
        return [*await self._each(texts[:middle]), *await self._each(texts[middle:])]

    async def _embed_fitted(self, texts: Sequence[str]) -> list[tuple[list[float] | None, str]]:
        """(vector, note) per text: the whole text (cut to `max_chars`), or a shorter
        start of it when the model refuses it, or (None, why) when it refuses even that."""
        fitted = [self._fit(t) for t in texts]
        vectors = await self._each(fitted) if fitted else []
        out: list[tuple[list[float] | None, str]] = []
        for text, short, vector in zip(texts, fitted, vectors, strict=True):
            if vector is not None:
                cut = len(short) < len(text)
                out.append((vector, shortened_note(len(short), len(text)) if cut else ""))
                continue
            kept = short
            for _ in range(SHORTENINGS):
                kept = kept[: max(1, len(kept) // 2)]
                (shorter,) = await self._each([kept])
                if shorter is not None:
                    out.append((shorter, shortened_note(len(kept), len(text))))
                    break
            else:
                out.append((None, "not embedded: the embedding model refused it"))
        return out

    async def _messages_round(self, pending: Sequence[tuple[str, Any]]) -> None:
        results: list[MessageVector] = []
        searchable = []
        for user_id, message in pending:
            if is_reserved_user(user_id):
                results.append(MessageVector(user_id, message.id, None))
            else:
                searchable.append((user_id, message))
        made = await self._embed_fitted([m.content for _, m in searchable])
        for (user_id, message), (vector, note) in zip(searchable, made, strict=True):
            if vector is None:
                log.warning(
                    "a message could not be embedded; it is left out of vector search",
                    extra={"message_id": message.id, "characters": len(message.content)},
                )
            results.append(MessageVector(user_id, message.id, vector, note))
        await self._store.set_message_vectors(results)

    async def _memories_round(self) -> bool:
        """One batch of memories without a vector; False when none is left."""
        fetched = await self._store.memories_without_vectors(BATCH + len(self._unembeddable))
        memories = [m for m in fetched if m.id not in self._unembeddable][:BATCH]
        if not memories:
            return False
        self.backfilling = True
        made = await self._embed_fitted([m.text for m in memories])
        done = []
        for memory, (vector, _) in zip(memories, made, strict=True):
            if vector is None:
                self._unembeddable.add(memory.id)
                log.warning(
                    "a memory could not be embedded; it is left out of vector search",
                    extra={"memory_id": memory.id},
                )
            else:
                done.append((memory.user_id, memory.id, vector))
        if done:
            await self._store.set_vectors(done)
        return True

    async def _round(self) -> bool:
        """One round of background work; False when there is nothing left to do."""
        if self.space is None:
            await self._probe()
        if await self._memories_round():
            return True
        self.backfilling = False
        # Messages are embedded here, off the append path, as they arrive.
        messages = await self._store.messages_without_vectors(BATCH)
        if messages:
            self.messages_pending = True
            await self._messages_round(messages)
            return True
        self.messages_pending = False
        return False

    async def _maintain(self) -> None:
        """Learn the space, then give every memory and message lacking a vector one
        (or a mark that it gets none); forever, in the background lane. The wake-up
        is cleared before looking, so a wake() that comes while a round runs is
        never lost. A failed round logs one line (the traceback at debug level)
        and waits; wake-ups do not cut that wait short."""
        lane.enter_background()
        failures = 0
        while True:
            self._wake.clear()
            try:
                more = await self._round()
                failures = 0
                if not more:
                    await self._wake.wait()
                continue
            except asyncio.CancelledError:
                raise
            except Outage as exc:
                failures += 1
                delay = self._backoff(failures, exc.retry_after)
                log.warning(
                    "embedding round failed: the embedding model cannot be reached; will retry",
                    extra={
                        "model": self.model,
                        "code": exc.error.code.name,
                        "reason": exc.error.reason,
                        "error": exc.error.message,
                        "retry_in_seconds": delay,
                    },
                )
            except Exception as exc:
                failures += 1
                delay = self._backoff(failures, None)
                log.warning(
                    "embedding round failed; will retry",
                    extra={"model": self.model, "error": repr(exc), "retry_in_seconds": delay},
                )
                log.debug("embedding round failure", exc_info=True)
            await asyncio.sleep(delay)

    def _backoff(self, failures: int, asked: float | None) -> float:
        if asked is not None:  # an open circuit's wait: at least a second, at most 10 min
            return min(max(asked, min(1.0, self._retry_seconds)), 600.0)
        return min(self._max_retry_seconds, self._retry_seconds * 2.0 ** (failures - 1))
