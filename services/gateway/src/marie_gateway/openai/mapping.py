"""Translation between the OpenAI surface (pydantic bodies, JSON dicts) and the
providers contract (protobuf), in one place."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import orjson
from marie.providers.v1 import provider_service_pb2 as pb

from marie_gateway.openai.schemas import (
    ChatMessage,
    ChatParameters,
    CompletionRequest,
    NamedToolChoice,
    TextPart,
)

_ROLES = {
    "system": pb.ROLE_SYSTEM,
    "developer": pb.ROLE_DEVELOPER,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
}
_TOOL_CHOICE = {
    "none": pb.TOOL_CHOICE_MODE_NONE,
    "auto": pb.TOOL_CHOICE_MODE_AUTO,
    "required": pb.TOOL_CHOICE_MODE_REQUIRED,
}
_RESPONSE_FORMAT = {
    "text": pb.RESPONSE_FORMAT_TYPE_TEXT,
    "json_object": pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
    "json_schema": pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
}
FINISH_REASONS: dict[int, str | None] = {
    pb.FINISH_REASON_UNSPECIFIED: None,
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
    pb.FINISH_REASON_CONTENT_FILTER: "content_filter",
    # OpenAI's contract has no paused turn: the reply stopped, as far as it can say.
    pb.FINISH_REASON_PAUSE_TURN: "stop",
}


def json_text(value: dict[str, Any]) -> str:
    """A free-form JSON object as text, key order and numbers as the client
    wrote them (orjson, or the standard encoder for integers beyond 64 bits)."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _message(msg: ChatMessage) -> pb.ChatMessage:
    out = pb.ChatMessage(role=_ROLES[msg.role], name=msg.name or "")
    if isinstance(msg.content, str):
        out.content = msg.content
    elif msg.content:
        for part in msg.content:
            if isinstance(part, TextPart):
                out.parts.add(text=part.text)
            else:
                out.parts.add(
                    image_url=pb.ImageUrl(
                        url=part.image_url.url, detail=part.image_url.detail or ""
                    )
                )
    for call in msg.tool_calls or ():
        out.tool_calls.add(
            id=call.id,
            type=call.type,
            function=pb.FunctionCall(name=call.function.name, arguments=call.function.arguments),
        )
    if msg.tool_call_id:
        out.tool_call_id = msg.tool_call_id
    return out


def fill_sampling(
    s: pb.SamplingParameters, body: ChatParameters | CompletionRequest, max_tokens: int | None
) -> None:
    """The sampling parameters chat and text completions share, where the body sets them."""
    if body.temperature is not None:
        s.temperature = body.temperature
    if body.top_p is not None:
        s.top_p = body.top_p
    if max_tokens is not None:
        s.max_tokens = max_tokens
    if body.stop is not None:
        s.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    if body.seed is not None:
        s.seed = body.seed
    if body.presence_penalty is not None:
        s.presence_penalty = body.presence_penalty
    if body.frequency_penalty is not None:
        s.frequency_penalty = body.frequency_penalty


def chat_request_to_proto(
    body: ChatParameters, completion_id: str, *, model: str, aggregate: bool
) -> pb.StreamChatCompletionRequest:
    """The providers request for a chat on `model`. `aggregate` when the reply
    is assembled here anyway (non-streaming): providers then sends it in as
    few messages as it can."""
    req = pb.StreamChatCompletionRequest(
        model=model,
        messages=[_message(m) for m in body.messages],
        user=body.user or "",
        completion_id=completion_id,
        aggregate=aggregate,
    )
    fill_sampling(req.sampling, body, body.max_completion_tokens or body.max_tokens)
    if body.top_k is not None:
        req.sampling.top_k = body.top_k
    if body.response_format is not None:
        rf = req.response_format
        rf.type = _RESPONSE_FORMAT[body.response_format.type]
        if body.response_format.json_schema is not None:
            js = body.response_format.json_schema
            rf.name = js.name
            rf.json_schema_json = json_text(js.schema_)
            rf.strict = bool(js.strict)
    for tool in body.tools or ():
        fn = tool.function
        req.tools.add(
            type=tool.type,
            function=pb.FunctionDefinition(
                name=fn.name,
                description=fn.description or "",
                parameters_json=json_text(fn.parameters) if fn.parameters is not None else "",
                strict=bool(fn.strict),
            ),
        )
    if isinstance(body.tool_choice, NamedToolChoice):
        req.tool_choice.mode = pb.TOOL_CHOICE_MODE_FUNCTION
        req.tool_choice.function_name = body.tool_choice.function.name
    elif body.tool_choice is not None:
        req.tool_choice.mode = _TOOL_CHOICE[body.tool_choice]
    return req


def usage_dict(usage: pb.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _top(entry: pb.TopLogprob | pb.TokenLogprob) -> dict[str, Any]:
    return {
        "token": entry.token,
        "logprob": entry.logprob,
        "bytes": list(entry.bytes) if entry.bytes else None,
    }


def chat_logprobs(entries: Sequence[pb.TokenLogprob]) -> dict[str, Any] | None:
    """A chat choice's `logprobs` (`{"content": [...], "refusal": null}`); None without any."""
    if not entries:
        return None
    content = [{**_top(e), "top_logprobs": [_top(t) for t in e.top_logprobs]} for e in entries]
    return {"content": content, "refusal": None}


def text_logprobs(entries: Sequence[pb.TokenLogprob], offset: int) -> dict[str, Any]:
    """A legacy completion choice's `logprobs`: parallel lists, the first token at
    character `offset` of the choice's text."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top_logprobs} for e in entries],
        "text_offset": offsets,
    }


def chunk_payload(
    head: dict[str, Any],
    model: str,
    delta: dict[str, Any],
    finish: str | None,
    logprobs: Sequence[pb.TokenLogprob] = (),
) -> dict[str, Any]:
    """One `chat.completion.chunk` event: `head` (id, object, created), the
    model, and the single choice's delta, log probabilities and finish reason."""
    return {
        **head,
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": chat_logprobs(logprobs),
                "finish_reason": finish,
            }
        ],
    }


def usage_payload(head: dict[str, Any], model: str, usage: pb.Usage) -> dict[str, Any]:
    """The last event of a stream asked for `include_usage`: no choices, the usage."""
    return {**head, "model": model, "choices": [], "usage": usage_dict(usage)}


def chunk_delta(chunk: pb.StreamChatCompletionResponse) -> dict[str, Any]:
    """The OpenAI `delta` of one providers chunk."""
    delta: dict[str, Any] = {}
    if chunk.role == pb.ROLE_ASSISTANT:
        delta["role"] = "assistant"
    if chunk.content:
        delta["content"] = chunk.content
    elif "role" in delta:
        # As OpenAI: the first delta of a tool-call answer has content null.
        delta["content"] = None if chunk.tool_calls else ""
    if chunk.tool_calls:
        calls = []
        for tc in chunk.tool_calls:
            call: dict[str, Any] = {"index": tc.index}
            if tc.id:
                call["id"] = tc.id
                call["type"] = tc.type or "function"
            fn: dict[str, str] = {"arguments": tc.arguments}
            if tc.name:
                fn["name"] = tc.name
            call["function"] = fn
            calls.append(call)
        delta["tool_calls"] = calls
    return delta


class CompletionAggregate:
    """Folds a stream of chunks into one non-streaming `chat.completion`."""

    __slots__ = ("content", "finish_reason", "logprobs", "tool_calls", "usage")

    def __init__(self) -> None:
        self.content: list[str] = []
        self.logprobs: list[pb.TokenLogprob] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: pb.Usage | None = None

    def add(self, chunk: pb.StreamChatCompletionResponse) -> None:
        if chunk.content:
            self.content.append(chunk.content)
        if chunk.logprobs:
            self.logprobs.extend(chunk.logprobs)
        for tc in chunk.tool_calls:
            call = self.tool_calls.setdefault(
                tc.index,
                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
            )
            if tc.id:
                call["id"] = tc.id
            if tc.name:
                call["function"]["name"] = tc.name
            call["function"]["arguments"] += tc.arguments
        if chunk.finish_reason:
            self.finish_reason = FINISH_REASONS.get(chunk.finish_reason)
        if chunk.HasField("usage"):
            self.usage = chunk.usage

    def response(self, completion_id: str, created: int, model: str) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.content) if self.content or not self.tool_calls else None,
        }
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        out: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": self.finish_reason or "stop",
                    "logprobs": chat_logprobs(self.logprobs),
                }
            ],
        }
        if self.usage is not None:
            out["usage"] = usage_dict(self.usage)
        return out
