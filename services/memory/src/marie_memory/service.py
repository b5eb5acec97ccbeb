"""The MemoryService gRPC servicer (a thin proto ⇄ core translation) and the
component the kit's server bootstrap runs.

Beyond the proto comments:
- messages are embedded in the background after AppendMessages; until then
  vector search does not see them (`mode_note` says so while some wait);
- hybrid scores (memories and messages) are `w_v * v + w_k * k`, where v
  and k are each side's scores min-max scaled within its candidates
  (fusion.py) and the weights MARIE_MEMORY_VECTOR_WEIGHT / _KEYWORD_WEIGHT
  (normalised to sum to 1); vector scores are `max(0, cosine)`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import grpc
from marie.memory.v1 import memory_service_pb2 as pb
from marie.memory.v1 import memory_service_pb2_grpc as pb_grpc
from marie.providers.v1 import provider_service_pb2_grpc as ppb_grpc
from marie_kit import tracing
from marie_kit.channels import insecure_channel
from marie_kit.identity import allowed_models_from_metadata, identity_from_metadata
from marie_kit.metering import COUNTED, MeteringBackends, MeteringInterceptor
from marie_kit.storage import StorageWatch
from marie_kit.tenancy import TenantInterceptor

from marie_memory import convert
from marie_memory.core import MemoryCore
from marie_memory.embedding import Embeddings
from marie_memory.errors import DOMAIN, store_unavailable
from marie_memory.extraction.extractor import LlmExtractor
from marie_memory.extraction.queue import ExtractionQueue
from marie_memory.settings import MemorySettings
from marie_memory.stores.contract import Store
from marie_memory.stores.sqlite import SqliteStore
from marie_memory.stores.traced import TracedStore

if TYPE_CHECKING:
    from marie.providers.v1.provider_service_pb2_grpc import (
        ProviderServiceAsyncStub as ProvidersStub,
    )
else:
    ProvidersStub = Any

log = logging.getLogger("marie.memory.service")

SERVICE_NAME = "marie.memory.v1.MemoryService"
_SERVICE = pb.DESCRIPTOR.services_by_name["MemoryService"]

Context = grpc.aio.ServicerContext[Any, Any]


def caller_identity(context: Context) -> tuple[str, str]:
    """(key id, owner) of the verified caller, from Envoy's or the gateway's metadata."""
    return identity_from_metadata(context.invocation_metadata())


class StoreUnavailable(Exception):
    """The store could not be opened at start; the message says where and why."""


async def open_store(settings: MemorySettings) -> Store:
    if settings.store == "opensearch":
        from marie_memory.stores.opensearch import OpenSearchStore  # noqa: PLC0415 - optional

        total = settings.vector_weight + settings.keyword_weight
        return await OpenSearchStore.open(
            settings.opensearch_url,
            prefix=settings.opensearch_index_prefix,
            hybrid_weights=(settings.vector_weight / total, settings.keyword_weight / total),
        )
    return await SqliteStore.open(settings.db_path, max_bytes=settings.db_max_bytes)


class MemoryComponent:
    """The memory service as a kit `Component`: opens the store (and the providers
    channel) in `start()`; health says SERVING only once the store is open."""

    service_names: Sequence[str] = (SERVICE_NAME,)
    domain: str = DOMAIN

    def __init__(self, settings: MemorySettings) -> None:
        self.settings = settings
        # Calls through Envoy are requests of the key: counted against its
        # requests per minute and concurrency (none spends tokens here; the
        # model calls extraction makes are metered as its own).
        self.metering = MeteringInterceptor(
            DOMAIN, {f"/{SERVICE_NAME}/{m.name}": COUNTED for m in _SERVICE.methods}
        )
        # They also carry the key's verified tenant: every user_id they name
        # must be one of that tenant's.
        self.interceptors: Sequence[grpc.aio.ServerInterceptor] = (
            self.metering,
            TenantInterceptor(DOMAIN),
        )
        self._core: MemoryCore | None = None
        # A write refused for lack of space makes the service NOT_SERVING
        # until a probe write on the store succeeds (marie_kit.storage).
        self.storage = StorageWatch(self._probe_store)
        self._channel: grpc.aio.Channel | None = None
        self._queue: ExtractionQueue | None = None
        self._metering: MeteringBackends | None = None

    @property
    def core(self) -> MemoryCore:
        if self._core is None:
            raise store_unavailable()
        return self._core

    async def _probe_store(self) -> None:
        await self.core.store.probe_write()

    def register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_MemoryServiceServicer_to_server(MemoryServicer(self), server)

    async def start(self) -> None:
        settings = self.settings
        try:
            store = await open_store(settings)
        except Exception as exc:
            where = settings.opensearch_url if settings.store == "opensearch" else settings.db_path
            raise StoreUnavailable(
                f"cannot open the {settings.store} store at {where}: {exc}"
            ) from exc
        if tracing.STATE.store_calls:
            store = cast(Store, TracedStore(store, settings.store))
        try:
            # A channel connects lazily: it costs nothing until a model is used.
            self._channel = insecure_channel(settings.providers_addr)
            providers: ProvidersStub = ppb_grpc.ProviderServiceStub(self._channel)
            # Extraction's model calls go to auth's usage ledger, in batches,
            # through the recorder that meters calls through Envoy.
            metering = self._metering = MeteringBackends.start(settings)
            self.metering.start(metering.limiter, metering.usage.submit)
            embeddings = Embeddings(
                store,
                providers if settings.embedding_model else None,
                settings.embedding_model,
                settings.embedding_timeout_seconds,
                max_chars=settings.embedding_max_chars,
            )
            await embeddings.check_model(settings.on_model_change == "refuse")
            self._core = MemoryCore(
                store,
                embeddings,
                extractor=LlmExtractor(
                    providers, settings.extraction_timeout_seconds, usage=metering.usage.submit
                ),
                default_extraction_model=settings.extraction_model,
                vector_weight=settings.vector_weight,
                keyword_weight=settings.keyword_weight,
                similar_memories=settings.similar_memories,
                close_similarity=settings.close_memory_similarity,
            )
            self._queue = ExtractionQueue(
                self._core,
                poll_seconds=settings.queue_poll_seconds,
                backoff_seconds=settings.queue_backoff_seconds,
                max_backoff_seconds=settings.queue_max_backoff_seconds,
                max_age_seconds=settings.queue_max_age_seconds,
            )
            self._core.on_enqueue = self._queue.wake
            embeddings.start()
            self._queue.start()
        except BaseException:
            await store.close()
            raise
        log.info(
            "memory store open",
            extra={
                "store": settings.store,
                "embedding_model": settings.embedding_model or None,
                "extraction_model": settings.extraction_model or None,
            },
        )

    async def stopping(self) -> None:
        # A queued job not finished now runs again after the restart.
        if self._queue is not None:
            await self._queue.close()

    async def close(self) -> None:
        if self._queue is not None:
            await self._queue.close()
            self._queue = None
        if self._core is not None:
            core, self._core = self._core, None
            await core.embeddings.close()
            await core.store.close()
        self.metering.stop()
        if self._metering is not None:
            # Extraction has stopped: what it used goes to the ledger now.
            await self._metering.close()
            self._metering = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class MemoryServicer(pb_grpc.MemoryServiceServicer):
    """MemoryService RPCs: each translates its request, calls the core, translates back."""

    def __init__(self, component: MemoryComponent) -> None:
        self._component = component

    @property
    def _core(self) -> MemoryCore:
        return self._component.core

    async def CreateConversation(
        self, request: pb.CreateConversationRequest, context: Context
    ) -> pb.CreateConversationResponse:
        created = await self._core.create_conversation(
            request.user_id,
            request.title,
            request.provider,
            request.model,
            request.metadata,
            request_id=request.request_id,
        )
        return pb.CreateConversationResponse(conversation=convert.conversation_to_proto(created))

    async def GetConversation(
        self, request: pb.GetConversationRequest, context: Context
    ) -> pb.GetConversationResponse:
        found = await self._core.get_conversation(request.user_id, request.conversation_id)
        return pb.GetConversationResponse(conversation=convert.conversation_to_proto(found))

    async def ListConversations(
        self, request: pb.ListConversationsRequest, context: Context
    ) -> pb.ListConversationsResponse:
        items, token = await self._core.list_conversations(
            request.user_id, request.page_size, request.page_token, request.order_by
        )
        return pb.ListConversationsResponse(
            conversations=[convert.conversation_to_proto(c) for c in items],
            next_page_token=token,
        )

    async def UpdateConversation(
        self, request: pb.UpdateConversationRequest, context: Context
    ) -> pb.UpdateConversationResponse:
        updated = await self._core.update_conversation(
            request.user_id,
            request.conversation.id,
            convert.conversation_from_proto(request.conversation),
            list(request.update_mask.paths),
        )
        return pb.UpdateConversationResponse(conversation=convert.conversation_to_proto(updated))

    async def DeleteConversation(
        self, request: pb.DeleteConversationRequest, context: Context
    ) -> pb.DeleteConversationResponse:
        count = await self._core.delete_conversation(request.user_id, request.conversation_id)
        return pb.DeleteConversationResponse(deleted_message_count=count)

    async def AppendMessages(
        self, request: pb.AppendMessagesRequest, context: Context
    ) -> pb.AppendMessagesResponse:
        stored, conversation = await self._core.append_messages(
            request.user_id,
            request.conversation_id,
            [convert.message_from_proto(m) for m in request.messages],
            request.request_id,
        )
        return pb.AppendMessagesResponse(
            messages=[convert.message_to_proto(m) for m in stored],
            conversation=convert.conversation_to_proto(conversation),
        )

    async def ListMessages(
        self, request: pb.ListMessagesRequest, context: Context
    ) -> pb.ListMessagesResponse:
        items, token = await self._core.list_messages(
            request.user_id,
            request.conversation_id,
            request.page_size,
            request.page_token,
            request.order_by,
        )
        return pb.ListMessagesResponse(
            messages=[convert.message_to_proto(m) for m in items], next_page_token=token
        )

    async def SearchMessages(
        self, request: pb.SearchMessagesRequest, context: Context
    ) -> pb.SearchMessagesResponse:
        ranked = await self._core.search_messages(
            request.user_id,
            request.query,
            conversation_id=request.conversation_id,
            size=request.page_size,
            token=request.page_token,
            mode=int(request.mode),
            roles=[int(r) for r in request.roles],
            budget=context.time_remaining(),
        )
        return pb.SearchMessagesResponse(
            hits=[convert.hit_to_proto(h) for h in ranked.hits],
            next_page_token=ranked.next_page_token,
            mode_used=ranked.mode_used,  # type: ignore[arg-type]
            mode_note=ranked.mode_note,
        )

    async def AddMemories(
        self, request: pb.AddMemoriesRequest, context: Context
    ) -> pb.AddMemoriesResponse:
        add = convert.add_request_from_proto(
            request,
            caller_identity(context),
            allowed_models_from_metadata(context.invocation_metadata()),
        )
        if add.infer and request.background:
            job_id = await self._core.enqueue_memories(add)
            return pb.AddMemoriesResponse(
                extraction_model=self._core.extraction_model(add), job_id=job_id
            )
        results, model = await self._core.add_memories(add)
        return pb.AddMemoriesResponse(
            results=[convert.add_result_to_proto(r) for r in results], extraction_model=model
        )

    async def SearchMemories(
        self, request: pb.SearchMemoriesRequest, context: Context
    ) -> pb.SearchMemoriesResponse:
        ranked = await self._core.search_memories(
            request.user_id,
            request.query,
            top_k=request.top_k,
            threshold=request.score_threshold,
            memory_filter=convert.filter_from_proto(request.filter),
            mode=int(request.mode),
            budget=context.time_remaining(),
        )
        return pb.SearchMemoriesResponse(
            results=[convert.scored_to_proto(s) for s in ranked.memories],
            mode_used=ranked.mode_used,  # type: ignore[arg-type]
            mode_note=ranked.mode_note,
        )

    async def GetMemory(
        self, request: pb.GetMemoryRequest, context: Context
    ) -> pb.GetMemoryResponse:
        found = await self._core.get_memory(request.user_id, request.memory_id)
        return pb.GetMemoryResponse(memory=convert.memory_to_proto(found))

    async def ListMemories(
        self, request: pb.ListMemoriesRequest, context: Context
    ) -> pb.ListMemoriesResponse:
        items, token = await self._core.list_memories(
            request.user_id,
            request.page_size,
            request.page_token,
            convert.filter_from_proto(request.filter),
        )
        return pb.ListMemoriesResponse(
            memories=[convert.memory_to_proto(m) for m in items], next_page_token=token
        )

    async def UpdateMemory(
        self, request: pb.UpdateMemoryRequest, context: Context
    ) -> pb.UpdateMemoryResponse:
        updated = await self._core.update_memory(
            request.user_id,
            convert.memory_from_proto(request.memory),
            list(request.update_mask.paths),
            request.actor,
        )
        return pb.UpdateMemoryResponse(memory=convert.memory_to_proto(updated))

    async def DeleteMemory(
        self, request: pb.DeleteMemoryRequest, context: Context
    ) -> pb.DeleteMemoryResponse:
        await self._core.delete_memory(
            request.user_id, request.memory_id, request.erase_history, request.actor
        )
        return pb.DeleteMemoryResponse()

    async def DeleteAllMemories(
        self, request: pb.DeleteAllMemoriesRequest, context: Context
    ) -> pb.DeleteAllMemoriesResponse:
        count = await self._core.delete_all_memories(request.user_id)
        return pb.DeleteAllMemoriesResponse(deleted_count=count)

    async def GetExtractionJob(
        self, request: pb.GetExtractionJobRequest, context: Context
    ) -> pb.GetExtractionJobResponse:
        job = await self._core.get_job(request.user_id, request.job_id)
        return pb.GetExtractionJobResponse(job=convert.job_to_proto(job))

    async def GetMemoryHistory(
        self, request: pb.GetMemoryHistoryRequest, context: Context
    ) -> pb.GetMemoryHistoryResponse:
        entries, token = await self._core.memory_history(
            request.user_id, request.memory_id, request.page_size, request.page_token
        )
        return pb.GetMemoryHistoryResponse(
            entries=[convert.history_to_proto(e) for e in entries], next_page_token=token
        )
