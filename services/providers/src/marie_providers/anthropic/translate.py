"""Translation between Anthropic's Messages API and Marie's protobuf messages. No I/O.

Requests: system messages are lifted to the top-level `system`, tool results
become `tool_result` blocks of a user turn, images become image blocks,
`max_tokens` (required there) gets a default. Streams: the typed SSE events
(`message_start`, `content_block_*`, `message_delta`, …) become chunks, tool
input streamed as `input_json_delta` fragments becoming argument fragments.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from marie.providers.v1 import provider_service_pb2 as pb

from marie_providers.errors import UpstreamProtocolError, UpstreamStatusError, bad_request
from marie_providers.upstream.structs import float32, schema_value

# Anthropic requires max_tokens; OpenAI's callers rarely send it.
DEFAULT_MAX_TOKENS = 4096
ANTHROPIC_MAX_TEMPERATURE = 1.0

STOP_REASONS: Mapping[str, pb.FinishReason] = {
    "end_turn": pb.FINISH_REASON_STOP,
    "stop_sequence": pb.FINISH_REASON_STOP,
    "pause_turn": pb.FINISH_REASON_PAUSE_TURN,
    "max_tokens": pb.FINISH_REASON_LENGTH,
    "model_context_window_exceeded": pb.FINISH_REASON_LENGTH,
    "tool_use": pb.FINISH_REASON_TOOL_CALLS,
    "refusal": pb.FINISH_REASON_CONTENT_FILTER,
}

JSON_INSTRUCTION = "Answer with a single JSON object and nothing else."
#: Top-level fields of a Messages request that `upstream_extras` may set,
#: each replacing what the translation sends under that name.
EXTRA_FIELDS = frozenset(
    {
        "thinking",
        "tools",
        "tool_choice",
        "messages",
        "mcp_servers",
        "container",
        "context_management",
    }
)
#: Headers `upstream_extras` may send: the betas a pass-through field needs.
EXTRA_HEADERS = frozenset({"anthropic-beta"})
#: Content blocks the chat contract carries on its own fields.
_OWN_BLOCKS = frozenset({"text", "tool_use", "thinking", "redacted_thinking"})


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------


def _image_block(url: str, field: str) -> dict[str, Any]:
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    header, comma, data = url.partition(",")
    if not url.startswith("data:") or not comma or not header.endswith(";base64") or not data:
        raise bad_request(field, "must be an http(s) URL or a base64 data URL")
    media_type = header.removeprefix("data:").removesuffix(";base64")
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _blocks(message: pb.ChatMessage, field: str) -> list[dict[str, Any]]:
    if not message.parts:
        return [{"type": "text", "text": message.content}] if message.content else []
    blocks = []
    for index, part in enumerate(message.parts):
        kind = part.WhichOneof("part")
        if kind == "text":
            if part.text:
                blocks.append({"type": "text", "text": part.text})
        elif kind == "image_url":
            blocks.append(_image_block(part.image_url.url, f"{field}.parts[{index}].image_url.url"))
    return blocks


def _text_of(message: pb.ChatMessage) -> str:
    if not message.parts:
        return message.content
    return "\n".join(p.text for p in message.parts if p.WhichOneof("part") == "text")


def _tool_input(text: str, field: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise bad_request(field, "must be a JSON object serialized to a string")
    return value


def split_system(messages: Sequence[pb.ChatMessage]) -> tuple[str, list[dict[str, Any]]]:
    """The top-level system text and the user/assistant turns, same-role turns merged."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        if message.role in (pb.ROLE_SYSTEM, pb.ROLE_DEVELOPER):
            system.append(_text_of(message))
            continue
        if message.role == pb.ROLE_TOOL:
            role = "user"
            blocks: list[dict[str, Any]] = [
                {
                    "type": "tool_result",
                    "tool_use_id": message.tool_call_id,
                    "content": _text_of(message),
                }
            ]
        else:
            role = "assistant" if message.role == pb.ROLE_ASSISTANT else "user"
            blocks = _blocks(message, field)
            for position, call in enumerate(message.tool_calls):
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.id,
                        "name": call.function.name,
                        "input": _tool_input(
                            call.function.arguments,
                            f"{field}.tool_calls[{position}].function.arguments",
                        ),
                    }
                )
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return "\n\n".join(s for s in system if s), turns


def _tool_choice(choice: pb.ToolChoice) -> dict[str, Any] | None:
    mode = choice.mode
    if mode == pb.TOOL_CHOICE_MODE_NONE:
        return {"type": "none"}
    if mode == pb.TOOL_CHOICE_MODE_AUTO:
        return {"type": "auto"}
    if mode == pb.TOOL_CHOICE_MODE_REQUIRED:
        return {"type": "any"}
    if mode == pb.TOOL_CHOICE_MODE_FUNCTION:
        return {"type": "tool", "name": choice.function_name}
    return None


def _json_instruction(response_format: pb.ResponseFormat) -> str:
    """The Messages API has no JSON mode; the instruction is the documented way to ask."""
    if response_format.type == pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
        return JSON_INSTRUCTION
    if response_format.type == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        schema = orjson.dumps(
            schema_value(response_format.json_schema_json, response_format.json_schema)
        ).decode()
        return f"{JSON_INSTRUCTION} It must follow this JSON Schema: {schema}"
    return ""


def messages_payload(request: pb.StreamChatCompletionRequest, model_name: str) -> dict[str, Any]:
    """The `/v1/messages` body for a validated request.

    INVALID_ARGUMENT for what Anthropic would refuse.
    """
    system, turns = split_system(request.messages)
    if not turns:
        raise bad_request("messages", "anthropic needs at least one user or assistant message")
    sampling = request.sampling
    payload: dict[str, Any] = {
        "model": model_name,
        "messages": turns,
        "max_tokens": sampling.max_tokens
        if sampling.HasField("max_tokens")
        else DEFAULT_MAX_TOKENS,
        "stream": True,
    }
    if instruction := _json_instruction(request.response_format):
        system = f"{system}\n\n{instruction}" if system else instruction
    if system:
        payload["system"] = system
    if sampling.HasField("temperature"):
        if sampling.temperature > ANTHROPIC_MAX_TEMPERATURE:
            raise bad_request("sampling.temperature", "anthropic takes a temperature of 0 to 1")
        payload["temperature"] = float32(sampling.temperature)
    if sampling.HasField("top_p"):
        payload["top_p"] = float32(sampling.top_p)
    if sampling.HasField("top_k"):
        payload["top_k"] = sampling.top_k
    if sampling.stop:
        payload["stop_sequences"] = list(sampling.stop)
    if request.tools:
        tools = []
        for tool in request.tools:
            fn = tool.function
            entry: dict[str, Any] = {
                "name": fn.name,
                "input_schema": schema_value(fn.parameters_json, fn.parameters)
                if fn.parameters_json or fn.HasField("parameters")
                else {"type": "object", "properties": {}},
            }
            if tool.function.description:
                entry["description"] = tool.function.description
            tools.append(entry)
        payload["tools"] = tools
        if (choice := _tool_choice(request.tool_choice)) is not None:
            payload["tool_choice"] = choice
    if request.user:
        payload["metadata"] = {"user_id": request.user}
    payload.update(extra_fields(request.upstream_extras))
    return payload


#: The fields of a Messages body that `/v1/messages/count_tokens` takes.
COUNT_FIELDS = frozenset(
    {
        "model",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "thinking",
        "mcp_servers",
        "context_management",
    }
)


def count_payload(request: pb.StreamChatCompletionRequest, model_name: str) -> dict[str, Any]:
    """The `/v1/messages/count_tokens` body of a request (its Messages body
    less what a count does not take: `max_tokens`, sampling, `stream`, …)."""
    payload = messages_payload(request, model_name)
    return {name: value for name, value in payload.items() if name in COUNT_FIELDS}


def count_chunk(
    body: Any, *, completion_id: str, model_id: str, provider: str, created: int
) -> pb.StreamChatCompletionResponse:
    """A count_tokens answer as the one chunk a `count_only` request gets."""
    tokens = body.get("input_tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, int) or not 0 <= tokens < 2**31:
        raise UpstreamProtocolError("count_tokens answered without input_tokens")
    return pb.StreamChatCompletionResponse(
        id=completion_id,
        model=model_id,
        provider=provider,
        created=created,
        role=pb.ROLE_ASSISTANT,
        finish_reason=pb.FINISH_REASON_STOP,
        usage=pb.Usage(prompt_tokens=tokens, total_tokens=tokens, counted_only=True),
    )


def extra_fields(extras: pb.UpstreamExtras) -> dict[str, Any]:
    """The request fields `upstream_extras` passes through (INVALID_ARGUMENT
    for one this translation does not let a caller set, like `model`)."""
    if not extras.request_json:
        return {}
    fields = orjson.loads(extras.request_json)
    for name in fields:
        if name not in EXTRA_FIELDS:
            raise bad_request(
                f"upstream_extras.request_json.{name}",
                f"anthropic takes {', '.join(sorted(EXTRA_FIELDS))} as extras",
            )
    return dict(fields)


def extra_headers(extras: pb.UpstreamExtras) -> dict[str, str]:
    """The request headers `upstream_extras` adds (only betas)."""
    for name, value in extras.headers.items():
        if name.lower() not in EXTRA_HEADERS:
            raise bad_request(
                f"upstream_extras.headers.{name}", "anthropic takes anthropic-beta as a header"
            )
        if not value.isascii() or not value.isprintable():
            raise bad_request(f"upstream_extras.headers.{name}", "must be printable ASCII")
    return {name.lower(): value for name, value in extras.headers.items()}


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def model_from_entry(entry: Any, provider: str) -> pb.ModelInfo | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
        return None
    name = entry["id"]
    info = pb.ModelInfo(
        id=f"{provider}/{name}",
        name=name,
        provider=provider,
        family="claude",
        # Every current Claude model chats, calls tools and reads images.
        capabilities=[
            pb.MODEL_CAPABILITY_CHAT,
            pb.MODEL_CAPABILITY_TOOLS,
            pb.MODEL_CAPABILITY_VISION,
        ],
    )
    display = entry.get("display_name")
    if isinstance(display, str) and display:
        info.description = display
    created = entry.get("created_at")
    if isinstance(created, str) and created:
        with contextlib.suppress(ValueError):
            info.modified_time.FromJsonString(created)
    for key in ("max_input_tokens", "context_window"):
        value = entry.get(key)
        if isinstance(value, int) and 0 < value < 2**31:
            info.context_length = value
    max_tokens = entry.get("max_tokens")
    if isinstance(max_tokens, int) and 0 < max_tokens < 2**31:
        info.max_tokens = max_tokens
    return info


# ---------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------


def prompt_tokens_of(usage: Any) -> tuple[int, int]:
    """(prompt tokens, of them read from the prompt cache) of an Anthropic usage.

    Anthropic counts cache reads and cache writes apart from `input_tokens`;
    the prompt is all three (OpenAI's meaning, which the ledger keeps), and
    the cache reads are what a model's `cached_input` price applies to."""
    if not isinstance(usage, dict):
        return 0, 0
    counts = [usage.get(name) for name in _PROMPT_FIELDS]
    prompt = sum(n for n in counts if isinstance(n, int) and n > 0)
    read = usage.get("cache_read_input_tokens")
    return prompt, (read if isinstance(read, int) and read > 0 else 0)


_PROMPT_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


class MessageStreamTranslator:
    """Turns Messages API stream events into chunks, one event at a time."""

    def __init__(self, *, completion_id: str, model_id: str, provider: str, created: int) -> None:
        self._completion_id = completion_id
        self._model_id = model_id
        self._provider = provider
        self._created = created
        self._role_sent = False
        # Content block index → tool call index, for tool_use blocks.
        self._tools: dict[int, int] = {}
        # Blocks the chat contract has no field for (server tools' use and
        # results…), sent as they start; their input streams after them.
        self._other: set[int] = set()
        self._input_tokens = 0
        self._cached_tokens = 0
        self.finished = False

    def _chunk(self, index: object = None) -> pb.StreamChatCompletionResponse:
        chunk = pb.StreamChatCompletionResponse(
            id=self._completion_id,
            model=self._model_id,
            provider=self._provider,
            created=self._created,
        )
        if isinstance(index, int) and 0 <= index < 2**31 - 1:
            chunk.block = index + 1
        if not self._role_sent:
            chunk.role = pb.ROLE_ASSISTANT
            self._role_sent = True
        return chunk

    def translate(self, event_type: str, data: str) -> pb.StreamChatCompletionResponse | None:
        """The chunk one event stands for, or None (pings, block boundaries, …)."""
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise UpstreamProtocolError(f"invalid JSON in a stream event: {exc}") from exc
        if not isinstance(event, dict):
            raise UpstreamProtocolError("a stream event is not a JSON object")
        kind = event.get("type", event_type)
        if kind == "error":
            error = event.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            raise UpstreamStatusError(200, str(message or "error mid-stream"))
        if kind == "message_start":
            usage = (event.get("message") or {}).get("usage") or {}
            self._input_tokens, self._cached_tokens = prompt_tokens_of(usage)
            # The role goes out at once: the caller learns the stream started.
            return self._chunk()
        if kind == "content_block_start":
            return self._block_start(event)
        if kind == "content_block_delta":
            return self._block_delta(event)
        if kind == "message_delta":
            return self._message_delta(event)
        if kind == "message_stop":
            if not self.finished:
                raise UpstreamProtocolError("message_stop before a stop reason")
            return None
        if kind == "content_block_stop":
            self._block_stop(event)
            return None
        # ping, and event types added later.
        return None

    def _block_start(self, event: dict[str, Any]) -> pb.StreamChatCompletionResponse | None:
        block = event.get("content_block")
        index = event.get("index")
        if not isinstance(block, dict) or not isinstance(index, int):
            raise UpstreamProtocolError("content_block_start without a block and index")
        if block.get("type") == "tool_use":
            position = len(self._tools)
            self._tools[index] = position
            chunk = self._chunk(index)
            chunk.tool_calls.append(
                pb.ToolCallDelta(
                    index=position,
                    id=str(block.get("id") or ""),
                    type="function",
                    name=str(block.get("name") or ""),
                    arguments="",
                )
            )
            return chunk
        kind = block.get("type")
        if kind == "thinking":
            chunk = self._chunk(index)
            chunk.reasoning.text = str(block.get("thinking") or "")
            chunk.reasoning.signature = str(block.get("signature") or "")
            return chunk
        if kind == "redacted_thinking":
            chunk = self._chunk(index)
            chunk.reasoning.redacted = str(block.get("data") or "")
            return chunk
        if kind not in _OWN_BLOCKS:
            # At once, as Anthropic streams it: a server tool's use shows its
            # name while its input is still being written.
            self._other.add(index)
            chunk = self._chunk(index)
            chunk.upstream_block_json = orjson.dumps(block).decode()
            return chunk
        text = block.get("text")
        citations = block.get("citations")
        if kind == "text" and ((isinstance(text, str) and text) or citations):
            chunk = self._chunk(index)
            chunk.content = text if isinstance(text, str) else ""
            if isinstance(citations, list):
                chunk.citations_json.extend(orjson.dumps(c).decode() for c in citations)
            return chunk
        return None

    def _block_stop(self, event: dict[str, Any]) -> None:
        index = event.get("index")
        if isinstance(index, int):
            self._other.discard(index)

    def _block_delta(self, event: dict[str, Any]) -> pb.StreamChatCompletionResponse | None:
        delta = event.get("delta")
        if not isinstance(delta, dict):
            raise UpstreamProtocolError("content_block_delta without a delta")
        kind = delta.get("type")
        index = event.get("index")
        if kind == "text_delta":
            text = delta.get("text")
            if not isinstance(text, str) or not text:
                return None
            chunk = self._chunk(index)
            chunk.content = text
            return chunk
        if kind == "input_json_delta":
            fragment = delta.get("partial_json")
            if isinstance(index, int) and index in self._other:
                if not isinstance(fragment, str) or not fragment:
                    return None
                chunk = self._chunk(index)
                chunk.upstream_input_json = fragment
                return chunk
            position = self._tools.get(index) if isinstance(index, int) else None
            if position is None:
                raise UpstreamProtocolError("input_json_delta for a block that is not a tool_use")
            if not isinstance(fragment, str) or not fragment:
                return None
            chunk = self._chunk(index)
            chunk.tool_calls.append(pb.ToolCallDelta(index=position, arguments=fragment))
            return chunk
        if kind in ("thinking_delta", "signature_delta"):
            field, value = ("text", delta.get("thinking"))
            if kind == "signature_delta":
                field, value = ("signature", delta.get("signature"))
            if not isinstance(value, str) or not value:
                return None
            chunk = self._chunk(index)
            setattr(chunk.reasoning, field, value)
            return chunk
        if kind == "citations_delta":
            citation = delta.get("citation")
            if not isinstance(citation, dict):
                return None
            chunk = self._chunk(index)
            chunk.citations_json.append(orjson.dumps(citation).decode())
            return chunk
        # Deltas added later: not part of the reply.
        return None

    def _message_delta(self, event: dict[str, Any]) -> pb.StreamChatCompletionResponse:
        delta = event.get("delta")
        reason = delta.get("stop_reason") if isinstance(delta, dict) else None
        chunk = self._chunk()
        chunk.finish_reason = STOP_REASONS.get(str(reason), pb.FINISH_REASON_STOP)
        matched = delta.get("stop_sequence") if isinstance(delta, dict) else None
        if reason == "stop_sequence" and isinstance(matched, str):
            chunk.stop_sequence = matched
        usage = event.get("usage")
        output = usage.get("output_tokens") if isinstance(usage, dict) else None
        output = output if isinstance(output, int) else 0
        prompt, cached = prompt_tokens_of(usage)
        if not prompt:
            prompt, cached = self._input_tokens, self._cached_tokens
        chunk.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=prompt,
                completion_tokens=output,
                total_tokens=prompt + output,
                cached_prompt_tokens=cached,
            )
        )
        tools = usage.get("server_tool_use") if isinstance(usage, dict) else None
        if isinstance(tools, dict):
            chunk.usage.server_tool_requests.update(
                {k: v for k, v in tools.items() if isinstance(v, int) and 0 < v < 2**31}
            )
        self.finished = True
        return chunk
