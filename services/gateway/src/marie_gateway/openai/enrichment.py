"""Memory enrichment: the user's most relevant memories, fetched within a tight
deadline and added to a chat as a system message (chat completions, the
Responses API and conversation turns); a slow or absent memory service only
means a chat without them."""

from __future__ import annotations

import logging

import grpc
from marie.memory.v1 import memory_service_pb2 as mpb
from marie.providers.v1 import provider_service_pb2 as ppb
from marie_kit import tracing
from marie_kit.context import outgoing_metadata
from marie_kit.tenancy import RESERVED_USER_PREFIX

from marie_gateway.access.keys import SCOPE_ADMIN, SCOPE_MEMORY, Principal
from marie_gateway.access.tenancy import MAX_USER, user_id_of
from marie_gateway.core import Gateway

log = logging.getLogger("marie.gateway.memory")

MEMORY_PREAMBLE = "Relevant facts about the user, from earlier conversations:"


async def memories_message(gw: Gateway, user_id: str, query: str) -> list[ppb.ChatMessage]:
    """A system message with the user's most relevant memories, or nothing when
    there are none or the memory service does not answer within its deadline."""
    settings = gw.settings
    with tracing.span(
        "gateway.memory_lookup", {"marie.memory.top_k": settings.memory_top_k}
    ) as span:
        try:
            reply = await gw.backends().memory.SearchMemories(
                mpb.SearchMemoriesRequest(
                    user_id=user_id, query=query[:4096], top_k=settings.memory_top_k
                ),
                timeout=settings.memory_timeout_seconds,
                metadata=outgoing_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("chat goes on without memories", extra={"code": exc.code().name})
            return []
        if span is not None:
            span.set_attribute("marie.memory.results", len(reply.results))
    if not reply.results:
        return []
    lines = "\n".join(f"- {r.memory.text}" for r in reply.results)
    return [ppb.ChatMessage(role=ppb.ROLE_SYSTEM, content=f"{MEMORY_PREAMBLE}\n{lines}")]


async def enrich_chat(
    gw: Gateway, principal: Principal, user: str | None, request: ppb.StreamChatCompletionRequest
) -> None:
    """With MARIE_GATEWAY_MEMORY=all, adds the memories of the request's `user` (in the
    key's tenant) to a `/v1/chat/completions` call, for keys with the `memory` scope."""
    if gw.settings.memory != "all" or not user:
        return
    if SCOPE_MEMORY not in principal.scopes and SCOPE_ADMIN not in principal.scopes:
        return
    query = next(
        (m.content for m in reversed(request.messages) if m.role == ppb.ROLE_USER and m.content),
        "",
    )
    if not query or len(user) > MAX_USER or user.startswith(RESERVED_USER_PREFIX):
        return  # no memories to add for a user no memory route can name
    added = await memories_message(gw, user_id_of(principal, user, None), query)
    if added:
        messages = [*added, *request.messages]
        del request.messages[:]
        request.messages.extend(messages)
