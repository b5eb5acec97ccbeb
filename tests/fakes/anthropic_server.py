"""A fake Anthropic Messages API speaking the real wire protocol: `x-api-key` and
`anthropic-version` required, `/v1/models` (paged shape), `/v1/models/{id}`,
streamed `/v1/messages` as typed SSE events (`message_start`,
`content_block_start`/`_delta`/`_stop` with `text_delta` and
`input_json_delta`, `message_delta` with the stop reason and usage,
`message_stop`, `ping`), errors as `{"type": "error", "error": {...}}`.
Failures on cue: see `upstream.py`.

Extended thinking as the real API streams it: with `thinking` enabled a
`thinking` block first (`thinking_delta`s, then one `signature_delta`), and a
`redacted_thinking` block when the model has one; thinking blocks sent back
in a later turn must carry the signature this fake gave them (else 400, as
Anthropic refuses a tampered block). With the `web_search` server tool in
`tools`: a `server_tool_use` block (its input as `input_json_delta`), a
`web_search_tool_result` block, then the answer as text blocks, the cited one
starting with a `citations_delta`, and `usage.server_tool_use` counting the
search. `stop_sequences` cut the reply as the real API does: before the
first found, with `stop_reason` "stop_sequence" and `stop_sequence` naming it.
"""

from __future__ import annotations

import base64
import hashlib
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
    # What the model thinks before answering, when the request enables thinking.
    thinking: str = "Let me think about this step by step."
    # The data of a redacted_thinking block sent after the thinking, if any.
    redacted_thinking: str | None = None
    # Seconds between the fragments of a server tool's input (a search's
    # query being written), so that a test sees them arrive apart.
    input_pause: float = 0.0


def signature(thinking: str) -> str:
    """The signature this fake gives a thinking text (the real one is opaque)."""
    return base64.b64encode(hashlib.sha256(thinking.encode()).digest()).decode()


#: What the web search server tool finds, and the citation of it.
SEARCH_RESULT: JSONObject = {
    "type": "web_search_result",
    "url": "https://example.com/weather",
    "title": "Weather in Paris",
    "encrypted_content": "EqgfCioIARgBIiQ3YTAwMjY1Mi1mZjM5LTQ1NGUtODgxNC1kNjNjNTk1ZWI3Y2ESDN",
    "page_age": "April 30, 2025",
}
CITATION: JSONObject = {
    "type": "web_search_result_location",
    "url": "https://example.com/weather",
    "title": "Weather in Paris",
    "encrypted_index": "Eo8BCioIAhgBIiQyYjQ0OWJmZi1lNm",
    "cited_text": "Sunny, 24 degrees.",
}


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
            Route("/v1/messages/count_tokens", self._count, methods=["POST"]),
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
        if (refused := _check_thinking(body)) is not None:
            return json_response(400, error_body(400, refused))
        return StreamedResponse(self, _Stream(model, body, cue).run)

    async def _count(self, request: Request) -> Response:
        """`count_tokens` as Anthropic's: the body a Messages request would
        have less `max_tokens` and sampling (any of them is a 400); the count
        of `count_tokens(body)`, thinking included."""
        body = await self.record(request)
        if (denied := self._check_headers(request)) is not None:
            return denied
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return json_response(400, error_body(400, "messages: Field required"))
        for name in ("max_tokens", "stream", "temperature", "stop_sequences", "metadata"):
            if name in body:
                return json_response(
                    400, error_body(400, f"{name}: Extra inputs are not permitted")
                )
        if body.get("model") not in self.models:
            return json_response(404, error_body(404, f"model: {body.get('model')}"))
        return json_response(200, {"input_tokens": count_tokens(body)})


def count_tokens(body: JSONObject) -> int:
    """The fake's count of a prompt: a token a word of its JSON, system, tools
    and messages; enabled thinking adds its own few (as Anthropic's does)."""
    words = sum(len(json.dumps(body.get(k) or "").split()) for k in ("system", "tools", "messages"))
    thinking = body.get("thinking")
    return words + (
        THINKING_TOKENS if isinstance(thinking, dict) and thinking.get("type") == "enabled" else 0
    )


#: What enabled thinking adds to the fake's count of a prompt.
THINKING_TOKENS = 7


def _check_thinking(body: JSONObject) -> str | None:
    """Anthropic's checks of thinking: a budget of at least 1024 below
    `max_tokens`, and thinking blocks sent back as they were given."""
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or budget < 1024:
            return "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
        if budget >= body["max_tokens"]:
            return "`max_tokens` must be greater than `thinking.budget_tokens`"
    for i, message in enumerate(body.get("messages", [])):
        content = message.get("content")
        for j, block in enumerate(content if isinstance(content, list) else []):
            if block.get("type") == "thinking" and block.get("signature") != signature(
                str(block.get("thinking"))
            ):
                return f"messages.{i}.content.{j}: Invalid `signature` in `thinking` block"
    return None


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
        # Anthropic ends the reply before the earliest stop sequence and names it.
        self.matched: str | None = None
        found = [
            (reply.find(stop), stop)
            for stop in body.get("stop_sequences") or []
            if isinstance(stop, str) and stop and stop in reply
        ]
        if found:
            at, self.matched = min(found, key=lambda f: f[0])
            reply = reply[:at]
        self.pieces = words(reply)
        self.searched = False

    async def _write(self, writer: EventWriter, kind: str, data: JSONObject) -> None:
        await writer.write(_event(kind, {"type": kind, **data}))

    async def _thinking(self, writer: EventWriter, index: int) -> int:
        """The thinking blocks, when the request enables thinking; the next index."""
        thinking = self.body.get("thinking")
        if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "adaptive"):
            return index
        start = {"type": "thinking", "thinking": "", "signature": ""}
        await self._write(writer, "content_block_start", {"index": index, "content_block": start})
        for piece in words(self.model.thinking):
            delta = {"type": "thinking_delta", "thinking": piece}
            await self._write(writer, "content_block_delta", {"index": index, "delta": delta})
        delta = {"type": "signature_delta", "signature": signature(self.model.thinking)}
        await self._write(writer, "content_block_delta", {"index": index, "delta": delta})
        await self._write(writer, "content_block_stop", {"index": index})
        index += 1
        if self.model.redacted_thinking is not None:
            block = {"type": "redacted_thinking", "data": self.model.redacted_thinking}
            await self._write(
                writer, "content_block_start", {"index": index, "content_block": block}
            )
            await self._write(writer, "content_block_stop", {"index": index})
            index += 1
        return index

    async def _web_search(self, writer: EventWriter, index: int) -> int | None:
        """A web search and the answer citing it, when the request offers the
        server tool; the next index (None when it does not)."""
        tools = self.body.get("tools") or []
        if not any(str(t.get("type", "")).startswith("web_search_") for t in tools):
            return None
        self.searched = True
        use = {"type": "server_tool_use", "id": "srvtoolu_fake1", "name": "web_search", "input": {}}
        await self._write(writer, "content_block_start", {"index": index, "content_block": use})
        query = json.dumps({"query": _last_user_text(self.body["messages"])})
        for position, fragment in enumerate((query[: len(query) // 2], query[len(query) // 2 :])):
            if position and self.model.input_pause:
                await writer.pause(self.model.input_pause)
            delta = {"type": "input_json_delta", "partial_json": fragment}
            await self._write(writer, "content_block_delta", {"index": index, "delta": delta})
        await self._write(writer, "content_block_stop", {"index": index})
        result = {
            "type": "web_search_tool_result",
            "tool_use_id": "srvtoolu_fake1",
            "content": [SEARCH_RESULT],
        }
        await self._write(
            writer, "content_block_start", {"index": index + 1, "content_block": result}
        )
        await self._write(writer, "content_block_stop", {"index": index + 1})
        index += 2
        for text, cited in (("It is ", False), ("sunny in Paris", True), (" today.", False)):
            start = {"type": "text", "text": ""}
            await self._write(
                writer, "content_block_start", {"index": index, "content_block": start}
            )
            deltas: list[JSONObject] = [{"type": "text_delta", "text": text}]
            if cited:
                deltas.insert(0, {"type": "citations_delta", "citation": CITATION})
            for delta in deltas:
                await self._write(writer, "content_block_delta", {"index": index, "delta": delta})
            await self._write(writer, "content_block_stop", {"index": index})
            index += 1
        return index

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
        index = await self._thinking(writer, 0)
        sent = 0
        searched = await self._web_search(writer, index)
        if searched is not None:
            index = searched
        elif self.pieces or self.model.endless:
            await writer.write(
                _event(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
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
                            "index": index,
                            "delta": {"type": "text_delta", "text": piece},
                        },
                    )
                )
                sent += 1
            await writer.write(
                _event("content_block_stop", {"type": "content_block_stop", "index": index})
            )
            index += 1
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
        if self.matched is not None:
            stop = "stop_sequence"
        usage: JSONObject = {"output_tokens": sent + 1}
        if self.searched:
            usage["server_tool_use"] = {"web_search_requests": 1}
        await writer.write(
            _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": self.matched},
                    "usage": usage,
                },
            )
        )
        await writer.write(_event("message_stop", {"type": "message_stop"}))
