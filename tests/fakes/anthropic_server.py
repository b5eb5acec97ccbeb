"""A fake Anthropic Messages API speaking the real wire protocol: `x-api-key` and
`anthropic-version` required, `/v1/models` (paged shape), `/v1/models/{id}`,
streamed `/v1/messages` as typed SSE events (`message_start`,
`content_block_start`/`_delta`/`_stop` with `text_delta` and
`input_json_delta`, `message_delta` with the stop reason and usage,
`message_stop`, `ping`), errors as `{"type": "error", "error": {...}}`.
Failures on cue: see `upstream.py`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .upstream import (
    SSE_HEADERS,
    Cue,
    EventWriter,
    FakeUpstream,
    JSONObject,
    StreamedResponse,
    abort,
    hang,
    json_response,
    words,
)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass
class FakeClaude:
    id: str
    display_name: str = "Claude Fake"
    reply: str | None = None
    # [{"name": ..., "input": {...}}]
    tool_uses: list[JSONObject] = field(default_factory=list)
    stop_reason: str | None = None
    chunk_delay: float = 0.0
    endless: bool = False


def error_body(status: int, message: str) -> JSONObject:
    return {
        "type": "error",
        "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message},
    }


class FakeAnthropic(FakeUpstream):
    def __init__(self, models: Iterable[FakeClaude] = (), *, api_key: str = "test-key") -> None:
        super().__init__(api_key=api_key)
        self.models = {m.id: m for m in models}

    def add(self, model: FakeClaude) -> FakeClaude:
        self.models[model.id] = model
        return model

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self._list, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self._get, methods=["GET"]),
            Route("/v1/messages", self._messages, methods=["POST"]),
        ]

    def _check_headers(self, request: Request) -> Response | None:
        if request.headers.get("x-api-key") != self.api_key:
            return json_response(401, error_body(401, "invalid x-api-key"))
        if not request.headers.get("anthropic-version"):
            return json_response(400, error_body(400, "anthropic-version: header is required"))
        return None

    @staticmethod
    def _entry(model: FakeClaude) -> JSONObject:
        return {
            "type": "model",
            "id": model.id,
            "display_name": model.display_name,
            "created_at": "2025-02-19T00:00:00Z",
        }

    async def _list(self, request: Request) -> Response:
        await self.record(request)
        if (denied := self._check_headers(request)) is not None:
            return denied
        data = [self._entry(m) for m in self.models.values()]
        return json_response(
            200,
            {
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            },
        )

    async def _get(self, request: Request) -> Response:
        await self.record(request)
        if (denied := self._check_headers(request)) is not None:
            return denied
        model = self.models.get(request.path_params["model_id"])
        if model is None:
            return json_response(404, error_body(404, "model not found"))
        return json_response(200, self._entry(model))

    async def _messages(self, request: Request) -> Response:
        body = await self.record(request)
        if (denied := self._check_headers(request)) is not None:
            return denied
        if not isinstance(body, dict) or not isinstance(body.get("max_tokens"), int):
            return json_response(400, error_body(400, "max_tokens: Field required"))
        for message in body.get("messages", []):
            if message.get("role") not in ("user", "assistant"):
                return json_response(
                    400,
                    error_body(400, "messages: roles must be user or assistant"),
                )
        cue = self.next_cue()
        if cue is not None and cue.kind == "status":
            headers = {"retry-after": cue.retry_after} if cue.retry_after else None
            return json_response(
                cue.status, error_body(cue.status, cue.message or "fake failure"), headers
            )
        model = self.models.get(body.get("model", ""))
        if model is None:
            return json_response(404, error_body(404, f"model: {body.get('model')}"))
        return StreamedResponse(self, _Stream(model, body, cue).run)


def _event(kind: str, data: JSONObject) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        return " ".join(b.get("text", "") for b in content if b.get("type") == "text")
    return ""


class _Stream:
    def __init__(self, model: FakeClaude, body: JSONObject, cue: Cue | None) -> None:
        self.model = model
        self.body = body
        self.cue = cue
        reply = model.reply
        if reply is None:
            reply = (
                ""
                if model.tool_uses
                else (f"Hello from {model.id}! You said: {_last_user_text(body['messages'])}")
            )
        self.pieces = words(reply)

    async def run(self, writer: EventWriter) -> None:
        if self.cue is not None and self.cue.kind == "hang":
            await hang(writer)
        if self.cue is not None and self.cue.kind == "slow_first":
            await writer.pause(self.cue.seconds)
        await writer.start(200, SSE_HEADERS)
        input_tokens = sum(len(json.dumps(m).split()) for m in self.body["messages"])
        await writer.write(
            _event(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": "msg_fake",
                        "type": "message",
                        "role": "assistant",
                        "content": [],
                        "model": self.model.id,
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": input_tokens, "output_tokens": 1},
                    },
                },
            )
        )
        await writer.write(_event("ping", {"type": "ping"}))
        index = 0
        sent = 0
        if self.pieces or self.model.endless:
            await writer.write(
                _event(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    },
                )
            )
            pieces = list(self.pieces)
            while pieces or self.model.endless:
                piece = pieces.pop(0) if pieces else " more"
                if (
                    self.cue is not None
                    and self.cue.kind == "die_after"
                    and sent >= self.cue.events
                ):
                    abort()
                if self.model.chunk_delay:
                    await writer.pause(self.model.chunk_delay)
                await writer.write(
                    _event(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": 0,
                            "delta": {"type": "text_delta", "text": piece},
                        },
                    )
                )
                sent += 1
            await writer.write(
                _event("content_block_stop", {"type": "content_block_stop", "index": 0})
            )
            index = 1
        for use in self.model.tool_uses:
            await writer.write(
                _event(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {
                            "type": "tool_use",
                            "id": f"toolu_fake{index}",
                            "name": use["name"],
                            "input": {},
                        },
                    },
                )
            )
            arguments = json.dumps(use.get("input", {}))
            middle = len(arguments) // 2
            for fragment in (arguments[:middle], arguments[middle:]):
                await writer.write(
                    _event(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": fragment},
                        },
                    )
                )
            await writer.write(
                _event("content_block_stop", {"type": "content_block_stop", "index": index})
            )
            index += 1
        stop = self.model.stop_reason or ("tool_use" if self.model.tool_uses else "end_turn")
        await writer.write(
            _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": sent + 1},
                },
            )
        )
        await writer.write(_event("message_stop", {"type": "message_stop"}))
