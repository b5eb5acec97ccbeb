"""Long-term memories: `/api/memories` (add, list, search, read, update,
delete, erase all) and each memory's history, over the memory service."""

from __future__ import annotations

from typing import Annotated, Literal

from google.protobuf.field_mask_pb2 import FieldMask
from marie.memory.v1 import memory_service_pb2 as mpb
from marie_kit.context import outgoing_metadata
from marie_kit.identity import identity_metadata
from pydantic import ConfigDict, Field, StringConstraints
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from marie_gateway.access.tenancy import user_id_of
from marie_gateway.api.memory_client import (
    MODE_NAMES,
    ROLES,
    MemoryCalls,
    Metadata,
    _Body,
    _UserBody,
    body_user_id,
    change_json,
    float_param,
    history_json,
    idempotency_key,
    int_param,
    job_json,
    memory_json,
    mode_param,
    page_json,
    some_of,
)
from marie_gateway.http.bodies import JSONResponse, parse_body
from marie_gateway.http.errors import bad_request
from marie_gateway.http.params import (
    MAX_ID_LENGTH,
    MAX_PAGE_TOKEN_LENGTH,
    bool_query,
    path_text,
    text_query,
    texts_query,
)

#: The memory service's limit of a category's length.
MAX_CATEGORY_LENGTH = 64
Category = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CATEGORY_LENGTH)]


class SourceMessageBody(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(min_length=1)


class MemoriesCreate(_UserBody):
    messages: list[SourceMessageBody] = Field(min_length=1, max_length=100)
    infer: bool = True
    background: bool = False
    categories: list[Category] = Field(
        default_factory=list, max_length=16, json_schema_extra={"uniqueItems": True}
    )
    metadata: Metadata = Field(default_factory=dict)
    conversation_id: str = Field(default="", max_length=MAX_ID_LENGTH)
    # The memory service keeps the extraction model's name in 256 characters.
    model: str = Field(default="", max_length=256)


class MemoryPatch(_UserBody):
    # At least one thing to change (a null is no change).
    model_config = ConfigDict(json_schema_extra=some_of("text", "categories", "metadata"))

    text: str | None = Field(default=None, min_length=1, max_length=8192)
    categories: list[Category] | None = Field(
        default=None, max_length=16, json_schema_extra={"uniqueItems": True}
    )
    metadata: Metadata | None = None


def _filter(request: Request) -> mpb.MemoryFilter:
    return mpb.MemoryFilter(
        categories=texts_query(request, "category", MAX_CATEGORY_LENGTH),
        source_conversation_id=text_query(request, "conversation_id", MAX_ID_LENGTH),
    )


class MemoryRoutes(MemoryCalls):
    """Handlers of `/api/memories…`."""

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/api/memories", self.add_memories, methods=["POST"]),
            Route("/api/memories", self.list_memories, methods=["GET"]),
            Route("/api/memories", self.delete_all_memories, methods=["DELETE"]),
            Route("/api/memories/search", self.search_memories, methods=["GET"]),
            Route("/api/memories/jobs/{id}", self.get_job, methods=["GET"]),
            Route("/api/memories/{id}", self.get_memory, methods=["GET"]),
            Route("/api/memories/{id}", self.update_memory, methods=["PATCH"]),
            Route("/api/memories/{id}", self.delete_memory, methods=["DELETE"]),
            Route("/api/memories/{id}/history", self.memory_history, methods=["GET"]),
        ]

    async def add_memories(self, request: Request) -> Response:
        principal = await self._principal(request)
        body = parse_body(MemoriesCreate, await self.gw.read_body(request))
        user_id = body_user_id(request, principal, body)
        key = idempotency_key(request)
        reply = await self._call(
            self._memory().AddMemories(
                mpb.AddMemoriesRequest(
                    user_id=user_id,
                    messages=[
                        mpb.SourceMessage(role=ROLES[m.role], content=m.content)
                        for m in body.messages
                    ],
                    infer=body.infer,
                    background=body.background,
                    categories=body.categories,
                    metadata=body.metadata,
                    conversation_id=body.conversation_id,
                    extraction_model=body.model,
                    actor=f"key:{principal.key_id}",
                    request_id=key,
                ),
                # Inference can take seconds: the chat deadline, not the control one.
                timeout=self.gw.settings.request_timeout_seconds,
                # Extraction's model calls are recorded under this key.
                metadata=outgoing_metadata()
                + identity_metadata(principal.key_id, principal.owner)
                + principal.models_metadata,
            )
        )
        return JSONResponse(
            {
                "object": "list",
                "data": [change_json(r) for r in reply.results],
                "extraction_model": reply.extraction_model,
                "job_id": reply.job_id,
            }
        )

    async def list_memories(self, request: Request) -> Response:
        user_id = await self._query_user(request)
        reply = await self._call(
            self._memory().ListMemories(
                mpb.ListMemoriesRequest(
                    user_id=user_id,
                    page_size=int_param(request, "limit"),
                    page_token=text_query(request, "page_token", MAX_PAGE_TOKEN_LENGTH),
                    filter=_filter(request),
                ),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse(
            page_json([memory_json(m) for m in reply.memories], reply.next_page_token)
        )

    async def search_memories(self, request: Request) -> Response:
        user_id = await self._query_user(request)
        params = request.query_params
        reply = await self._call(
            self._memory().SearchMemories(
                mpb.SearchMemoriesRequest(
                    user_id=user_id,
                    query=params.get("q", ""),
                    top_k=int_param(request, "top_k"),
                    score_threshold=float_param(request, "threshold"),
                    mode=mode_param(request),
                    filter=_filter(request),
                ),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse(
            {
                "object": "list",
                "data": [{**memory_json(r.memory), "score": r.score} for r in reply.results],
                "mode": MODE_NAMES.get(reply.mode_used, "keyword"),
                "mode_note": reply.mode_note,
            }
        )

    async def get_job(self, request: Request) -> Response:
        user_id = await self._query_user(request)
        reply = await self._call(
            self._memory().GetExtractionJob(
                mpb.GetExtractionJobRequest(user_id=user_id, job_id=request.path_params["id"]),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse(job_json(reply.job))

    async def get_memory(self, request: Request) -> Response:
        user_id = await self._query_user(request)
        reply = await self._call(
            self._memory().GetMemory(
                mpb.GetMemoryRequest(user_id=user_id, memory_id=path_text(request, "id")),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse(memory_json(reply.memory))

    async def update_memory(self, request: Request) -> Response:
        principal = await self._principal(request)
        body = parse_body(MemoryPatch, await self.gw.read_body(request))
        user_id = body_user_id(request, principal, body)
        paths = [n for n in ("text", "categories", "metadata") if getattr(body, n) is not None]
        if not paths:
            raise bad_request("Nothing to change: give text, categories or metadata.")
        reply = await self._call(
            self._memory().UpdateMemory(
                mpb.UpdateMemoryRequest(
                    user_id=user_id,
                    memory=mpb.Memory(
                        id=path_text(request, "id"),
                        text=body.text or "",
                        categories=body.categories or [],
                        metadata=body.metadata or {},
                    ),
                    update_mask=FieldMask(paths=paths),
                    actor=f"key:{principal.key_id}",
                ),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse(memory_json(reply.memory))

    async def delete_memory(self, request: Request) -> Response:
        principal = await self._principal(request)
        params = request.query_params
        user_id = user_id_of(principal, params.get("user"), params.get("tenant"))
        memory_id = path_text(request, "id")
        await self._call(
            self._memory().DeleteMemory(
                mpb.DeleteMemoryRequest(
                    user_id=user_id,
                    memory_id=memory_id,
                    erase_history=bool_query(request, "erase_history"),
                    actor=f"key:{principal.key_id}",
                ),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse({"id": memory_id, "object": "memory.deleted", "deleted": True})

    async def delete_all_memories(self, request: Request) -> Response:
        user_id = await self._query_user(request)
        reply = await self._call(
            self._memory().DeleteAllMemories(
                mpb.DeleteAllMemoriesRequest(user_id=user_id),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse({"object": "memory.deleted", "deleted": reply.deleted_count})

    async def memory_history(self, request: Request) -> Response:
        user_id = await self._query_user(request)
        reply = await self._call(
            self._memory().GetMemoryHistory(
                mpb.GetMemoryHistoryRequest(
                    user_id=user_id,
                    memory_id=path_text(request, "id"),
                    page_size=int_param(request, "limit"),
                    page_token=text_query(request, "page_token", MAX_PAGE_TOKEN_LENGTH),
                ),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse(
            page_json([history_json(e) for e in reply.entries], reply.next_page_token)
        )
