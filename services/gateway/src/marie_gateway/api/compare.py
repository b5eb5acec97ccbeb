"""`POST /api/compare`: one prompt on 2 to 8 models at once, streamed as one SSE
stream of events tagged with the model and its arm's index (scope `chat`); a
model named twice runs twice.

Each model runs in its own task feeding one bounded queue (so a slow reader
slows the models down rather than piling chunks up). A model failing or being
slow never stops the others: its error is one event. A client that leaves
cancels every call.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from marie.providers.v1 import provider_service_pb2 as pb
from starlette.requests import Request
from starlette.routing import BaseRoute, Route

from marie_gateway.access.keys import SCOPE_CHAT, Principal
from marie_gateway.access.tally import Tally
from marie_gateway.api.schemas import CompareRequest
from marie_gateway.core import Gateway
from marie_gateway.http.bodies import parse_body
from marie_gateway.http.context import current_request_id
from marie_gateway.http.errors import ApiError, from_rpc_error
from marie_gateway.http.sse import DONE, EventStreamResponse, event
from marie_gateway.openai.mapping import (
    FINISH_REASONS,
    chat_request_to_proto,
    chunk_delta,
    usage_dict,
)

log = logging.getLogger("marie.gateway.compare")

# Events waiting for the client, across all models; a full queue makes the
# models wait.
QUEUE_SIZE = 64


@dataclass(frozen=True, slots=True)
class Arm:
    """One model of a comparison: its position, the name asked for, and who asks."""

    index: int
    model: str
    principal: Principal
    request_id: str
    tally: Tally


class CompareRoutes:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def routes(self) -> list[BaseRoute]:
        return [Route("/api/compare", self.compare, methods=["POST"])]

    async def compare(self, request: Request) -> EventStreamResponse:
        principal = await self.gw.authorize(request, SCOPE_CHAT)
        tally = await self.gw.admit(request, principal, "compare")
        body = parse_body(CompareRequest, await self.gw.read_body(request))
        rid = current_request_id()
        return EventStreamResponse(
            self._events(body, principal, rid, tally),
            [(b"x-request-id", rid.encode())],
            keep_alive_seconds=self.gw.settings.sse_keep_alive_seconds,
        )

    async def _events(
        self, body: CompareRequest, principal: Principal, rid: str, tally: Tally
    ) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_SIZE)
        tasks = [
            asyncio.create_task(self._run(Arm(index, model, principal, rid, tally), body, queue))
            for index, model in enumerate(body.models)
        ]
        try:
            running = len(tasks)
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                else:
                    yield item
            yield DONE
        finally:
            # Normal end, or the client left: nothing keeps generating.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(
        self, arm: Arm, body: CompareRequest, queue: asyncio.Queue[bytes | None]
    ) -> None:
        model, principal, rid = arm.model, arm.principal, arm.request_id
        tag: dict[str, Any] = {"index": arm.index, "model": model}
        started = time.perf_counter()
        first_token: float | None = None
        resolved: str | None = None
        finish: str | None = None
        usage: pb.Usage | None = None
        call = self.gw.backends().providers.StreamChatCompletion(
            chat_request_to_proto(
                body, "chatcmpl-" + secrets.token_hex(12), model=model, aggregate=False
            ),
            timeout=self.gw.settings.request_timeout_seconds,
            metadata=principal.call_metadata(),
        )
        try:
            async for chunk in call:
                if first_token is None:
                    first_token = time.perf_counter() - started
                    resolved = chunk.model
                if chunk.HasField("usage"):
                    usage = chunk.usage
                if chunk.finish_reason:
                    finish = FINISH_REASONS.get(chunk.finish_reason)
                if delta := chunk_delta(chunk):
                    await queue.put(event({"type": "delta", **tag, "delta": delta}))
            total = time.perf_counter() - started
            if usage is not None:
                arm.tally.add(resolved or model, usage)
            done: dict[str, Any] = {
                "type": "done",
                **tag,
                "resolved_model": resolved,
                "finish_reason": finish or "stop",
                "usage": usage_dict(usage) if usage is not None else None,
                "latency": {
                    "first_token_ms": round(first_token * 1000, 3) if first_token else None,
                    "total_ms": round(total * 1000, 3),
                },
            }
            await queue.put(event(done))
        except grpc.aio.AioRpcError as exc:
            arm.tally.add_failure(resolved or model)
            error: ApiError = from_rpc_error(exc, rid)
            await queue.put(event({"type": "error", **tag, **error.envelope()}))
        except Exception:
            # A bug here must not leave the reader waiting for this model.
            log.exception("comparison of %s failed", model)
            arm.tally.add_failure(resolved or model)
            error = ApiError(500, f"The comparison of this model failed (request id {rid}).")
            await queue.put(event({"type": "error", **tag, **error.envelope()}))
        finally:
            call.cancel()
        # This model is done (not reached when cancelled: the reader is gone).
        await queue.put(None)
