"""Translation between the OpenAI chat API (as every OpenAI-compatible upstream speaks it)
and Marie's protobuf messages. No I/O: `client.py` does the HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from google.protobuf import timestamp_pb2
from marie.providers.v1 import provider_service_pb2 as pb

from marie_providers.errors import UpstreamProtocolError, UpstreamStatusError
from marie_providers.upstream.logprobs import chat_logprobs, text_logprobs
from marie_providers.upstream.model_facts import human_size, parameter_count
from marie_providers.upstream.structs import float32, schema_value

# "developer" is OpenAI's newer name for system; most compatible servers
# (vLLM, llama.cpp, Groq) know only system, which OpenAI still accepts.
ROLE_NAMES: Mapping[int, str] = {
    pb.ROLE_SYSTEM: "system",
    pb.ROLE_DEVELOPER: "system",
    pb.ROLE_USER: "user",
    pb.ROLE_ASSISTANT: "assistant",
    pb.ROLE_TOOL: "tool",
}

FINISH_REASONS: Mapping[str, pb.FinishReason] = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
    "function_call": pb.FINISH_REASON_TOOL_CALLS,
    "content_filter": pb.FINISH_REASON_CONTENT_FILTER,
    # Some servers (llama.cpp, TGI) say why in their own words.
    "eos": pb.FINISH_REASON_STOP,
    "eos_token": pb.FINISH_REASON_STOP,
    "stop_sequence": pb.FINISH_REASON_STOP,
    "max_tokens": pb.FINISH_REASON_LENGTH,
}

TOOL_CHOICES: Mapping[int, str] = {
    pb.TOOL_CHOICE_MODE_NONE: "none",
    pb.TOOL_CHOICE_MODE_AUTO: "auto",
    pb.TOOL_CHOICE_MODE_REQUIRED: "required",
}


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------


def _content(message: pb.ChatMessage) -> str | list[dict[str, Any]]:
    if not message.parts:
        return message.content
    parts: list[dict[str, Any]] = []
    for part in message.parts:
        kind = part.WhichOneof("part")
        if kind == "text":
            parts.append({"type": "text", "text": part.text})
        elif kind == "image_url":
            image: dict[str, Any] = {"url": part.image_url.url}
            if part.image_url.detail:
                image["detail"] = part.image_url.detail
            parts.append({"type": "image_url", "image_url": image})
    return parts


def message_dict(message: pb.ChatMessage) -> dict[str, Any]:
    """One message in OpenAI's shape."""
    entry: dict[str, Any] = {"role": ROLE_NAMES[message.role], "content": _content(message)}
    if message.name:
        entry["name"] = message.name
    if message.tool_calls:
        entry["tool_calls"] = [
            {
                "id": call.id,
                "type": call.type or "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }
            for call in message.tool_calls
        ]
        if not message.content and not message.parts:
            entry["content"] = None
    if message.role == pb.ROLE_TOOL:
        entry["tool_call_id"] = message.tool_call_id
    return entry


def sampling_dict(sampling: pb.SamplingParameters) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        if sampling.HasField(field):
            out[field] = float32(getattr(sampling, field))
    if sampling.HasField("max_tokens"):
        # max_tokens, not max_completion_tokens: every compatible server knows it.
        out["max_tokens"] = sampling.max_tokens
    if sampling.HasField("top_k"):
        # Not OpenAI's own, but vLLM, llama.cpp and others take it; only sent when asked for.
        out["top_k"] = sampling.top_k
    if sampling.stop:
        out["stop"] = list(sampling.stop)
    if sampling.HasField("seed"):
        out["seed"] = sampling.seed
    return out


def response_format_dict(response_format: pb.ResponseFormat) -> dict[str, Any] | None:
    kind = response_format.type
    if kind == pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
        return {"type": "json_object"}
    if kind == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        schema: dict[str, Any] = {
            "name": response_format.name or "response",
            "schema": schema_value(response_format.json_schema_json, response_format.json_schema),
        }
        if response_format.strict:
            schema["strict"] = True
        return {"type": "json_schema", "json_schema": schema}
    return None


def tools_list(tools: Sequence[pb.Tool]) -> list[dict[str, Any]]:
    out = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool.function.name}
        if tool.function.description:
            function["description"] = tool.function.description
        fn = tool.function
        if fn.parameters_json or fn.HasField("parameters"):
            # The caller's own text when it sent one: key order and numbers kept.
            function["parameters"] = schema_value(fn.parameters_json, fn.parameters)
        if tool.function.strict:
            function["strict"] = True
        out.append({"type": "function", "function": function})
    return out


def tool_choice_value(choice: pb.ToolChoice) -> str | dict[str, Any] | None:
    if choice.mode == pb.TOOL_CHOICE_MODE_FUNCTION:
        return {"type": "function", "function": {"name": choice.function_name}}
    return TOOL_CHOICES.get(choice.mode)


def chat_payload(
    request: pb.StreamChatCompletionRequest, model_name: str, *, stream: bool = True
) -> dict[str, Any]:
    """The `/chat/completions` body for a validated request: streamed with usage, or
    (`stream=False`) whole, which is how servers that stream no usage still report it."""
    payload: dict[str, Any] = {
        "model": model_name,
        "messages": [message_dict(m) for m in request.messages],
        "stream": stream,
    }
    if stream:
        payload["stream_options"] = {"include_usage": True}
    payload.update(sampling_dict(request.sampling))
    if (response_format := response_format_dict(request.response_format)) is not None:
        payload["response_format"] = response_format
    if request.tools:
        payload["tools"] = tools_list(request.tools)
        if (choice := tool_choice_value(request.tool_choice)) is not None:
            payload["tool_choice"] = choice
    if request.user:
        payload["user"] = request.user
    if request.logprobs:
        payload["logprobs"] = True
        if request.top_logprobs:
            payload["top_logprobs"] = request.top_logprobs
    return payload


def completion_payload(
    request: pb.StreamCompletionRequest, model_name: str, *, stream: bool = True
) -> dict[str, Any]:
    """The `/completions` body for a validated text completion request. `echo` is
    not sent: the servicer adds the prompt itself, the same for every provider."""
    payload: dict[str, Any] = {"model": model_name, "prompt": request.prompt, "stream": stream}
    if stream:
        payload["stream_options"] = {"include_usage": True}
    if request.suffix:
        payload["suffix"] = request.suffix
    if request.HasField("logprobs"):
        payload["logprobs"] = request.logprobs
    payload.update(sampling_dict(request.sampling))
    if request.user:
        payload["user"] = request.user
    return payload


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def _timestamp(seconds: Any) -> timestamp_pb2.Timestamp | None:
    if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds <= 0:
        return None
    return timestamp_pb2.Timestamp(seconds=seconds)


def model_from_entry(entry: Any, provider: str) -> pb.ModelInfo | None:
    """One `/models` entry as a ModelInfo; None for an entry without an id."""
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
        return None
    name = entry["id"]
    info = pb.ModelInfo(id=f"{provider}/{name}", name=name, provider=provider)
    if (stamp := _timestamp(entry.get("created"))) is not None:
        info.modified_time.CopyFrom(stamp)
    owner = entry.get("owned_by")
    if isinstance(owner, str) and owner:
        info.metadata["owned_by"] = owner
    # Several servers (vLLM, OpenRouter, Together) add the context window.
    for key in ("context_length", "max_model_len", "context_window"):
        if 0 < (value := _count(entry.get(key))) < 2**31:
            info.context_length = value
            break
    root = entry.get("root")
    if isinstance(root, str) and root and root != name:
        info.metadata["root"] = root  # vLLM: the weights a served name stands for
    meta = entry.get("meta")
    if isinstance(meta, dict):
        _read_llama_cpp_meta(info, meta)
    return info


def _count(value: Any) -> int:
    """`value` when it is a positive whole number a ModelInfo can hold, else 0."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**63:
        return value
    return 0


def _read_llama_cpp_meta(info: pb.ModelInfo, meta: dict[str, Any]) -> None:
    """What llama.cpp's server says of its model in `meta`: `n_ctx` (what one
    request may use on this server, its slot's share of `--ctx-size`),
    `n_ctx_train` (what the model was trained for), `n_params`, `size` (bytes),
    `ftype` (the weights' type, e.g. "Q4_1" or "F16"), `n_embd`, `n_vocab`."""
    # The server's own limit is the one a request meets; the model's is the fallback.
    for key in ("n_ctx", "n_ctx_train"):
        if 0 < (value := _count(meta.get(key))) < 2**31:
            info.context_length = value
            break
    for key in ("n_ctx_train", "n_ctx", "n_embd", "n_vocab"):
        if value := _count(meta.get(key)):
            info.metadata[key] = str(value)
    if params := _count(meta.get("n_params")):
        info.parameters = parameter_count(params)
    if size := _count(meta.get("size")):
        info.size_bytes = size
        info.size_label = human_size(size)
    ftype = meta.get("ftype")
    if isinstance(ftype, str) and ftype:
        info.quantization = ftype
    # llama.cpp serves GGUF files only.
    info.format = "gguf"


def models_from_listing(body: Any, provider: str) -> list[tuple[pb.ModelInfo, dict[str, Any]]]:
    """The `/models` answer as ModelInfos (each beside its raw entry), sorted by name."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise UpstreamProtocolError("/models answer has no 'data' list")
    models = []
    for entry in body["data"]:
        info = model_from_entry(entry, provider)
        if info is not None:
            models.append((info, entry))
    models.sort(key=lambda pair: pair[0].name)
    return models


# ---------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------


def usage_from(value: Any) -> pb.Usage | None:
    if not isinstance(value, dict):
        return None
    prompt = value.get("prompt_tokens")
    completion = value.get("completion_tokens")
    prompt = prompt if isinstance(prompt, int) else 0
    completion = completion if isinstance(completion, int) else 0
    total = value.get("total_tokens")
    total = total if isinstance(total, int) else prompt + completion
    details = value.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    cached = min(cached, prompt) if isinstance(cached, int) and cached > 0 else 0
    return pb.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        cached_prompt_tokens=cached,
    )


#: The keys of a finishing choice that name the stop sequence matched.
STOP_KEYS = ("stop_reason", "matched_stop")


def names_stops(choice: Any) -> bool:
    """Whether an upstream's finishing choice has a field naming the stop
    sequence matched (null when none did): vLLM and SGLang have one, OpenAI's
    own API and llama.cpp's server none."""
    return isinstance(choice, dict) and any(key in choice for key in STOP_KEYS)


def matched_stop(choice: dict[str, Any], finish: int) -> str:
    """The stop sequence a choice says ended it: vLLM's `stop_reason`, SGLang's
    `matched_stop` (a string; a number there is a stop token's id, no
    sequence); "" when it says none (OpenAI, llama.cpp, Ollama say none)."""
    if finish != pb.FINISH_REASON_STOP:
        return ""
    for key in STOP_KEYS:
        value = choice.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


class ChatStreamTranslator:
    """Turns `/chat/completions` stream events into chunks, one event at a time;
    with `text`, `/completions` events (the choice's `text` is the content).

    The chunk with the finish reason is held back until usage (sent after it
    with `include_usage`) or the end arrives, so the last chunk carries both,
    as the API promises.
    """

    def __init__(
        self,
        *,
        completion_id: str,
        model_id: str,
        provider: str,
        created: int,
        text: bool = False,
    ) -> None:
        self._text = text
        self._completion_id = completion_id
        self._model_id = model_id
        self._provider = provider
        self._created = created
        self._role_sent = False
        self._held: pb.StreamChatCompletionResponse | None = None
        self.finished = False
        #: Whether the finishing choice had a field naming the stop matched.
        self.names_stops = False
        self.done = False

    def _chunk(self) -> pb.StreamChatCompletionResponse:
        chunk = pb.StreamChatCompletionResponse(
            id=self._completion_id,
            model=self._model_id,
            provider=self._provider,
            created=self._created,
        )
        if not self._role_sent:
            chunk.role = pb.ROLE_ASSISTANT
            self._role_sent = True
        return chunk

    def translate(self, data: str) -> list[pb.StreamChatCompletionResponse]:
        """The chunks one event's data stands for (often one, sometimes none)."""
        if data.strip() == "[DONE]":
            self.done = True
            return self.flush()
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise UpstreamProtocolError(f"invalid JSON in a stream event: {exc}") from exc
        if not isinstance(event, dict):
            raise UpstreamProtocolError("a stream event is not a JSON object")
        if "error" in event:
            error = event["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise UpstreamStatusError(200, str(message or "error mid-stream"))
        out: list[pb.StreamChatCompletionResponse] = []
        usage = usage_from(event.get("usage"))
        choices = event.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if isinstance(choice, dict):
            chunk = self._from_choice(choice)
            if chunk is not None:
                if self._held is not None:
                    out.extend(self.flush())
                if chunk.finish_reason:
                    self.finished = True
                    self._held = chunk
                else:
                    out.append(chunk)
        if usage is not None:
            if self._held is None:
                # Usage before any finish: keep it for the last chunk.
                self._held = self._chunk()
            self._held.usage.CopyFrom(usage)
            if self.finished:
                out.extend(self.flush())
        return out

    def _from_choice(self, choice: dict[str, Any]) -> pb.StreamChatCompletionResponse | None:
        if self._text:
            delta: dict[str, Any] = {"content": choice.get("text")}
            logprobs = text_logprobs(choice.get("logprobs"))
        else:
            delta = choice.get("delta") or {}
            delta = delta if isinstance(delta, dict) else {}
            logprobs = chat_logprobs(choice.get("logprobs"))
        content = delta.get("content")
        calls = delta.get("tool_calls")
        finish = choice.get("finish_reason")
        has_content = isinstance(content, str) and content != ""
        if (
            not has_content
            and not calls
            and not finish
            and not logprobs
            and not (delta.get("role") and not self._role_sent)
        ):
            # Empty deltas, reasoning traces (not part of the reply): nothing to send.
            return None
        chunk = self._chunk()
        if isinstance(content, str) and content:
            chunk.content = content
        if isinstance(calls, list):
            for call in calls:
                chunk.tool_calls.append(_tool_call_delta(call))
        if isinstance(finish, str) and finish:
            chunk.finish_reason = FINISH_REASONS.get(finish, pb.FINISH_REASON_STOP)
            chunk.stop_sequence = matched_stop(choice, chunk.finish_reason)
            self.names_stops = names_stops(choice)
        chunk.logprobs.extend(logprobs)
        return chunk

    def flush(self) -> list[pb.StreamChatCompletionResponse]:
        """The held-back last chunk, if any."""
        held, self._held = self._held, None
        return [held] if held is not None else []


def chunk_from_completion(
    body: Any, *, completion_id: str, model_id: str, provider: str, created: int, text: bool = False
) -> pb.StreamChatCompletionResponse:
    """A whole (non-streamed) `/chat/completions` answer (with `text`, a `/completions`
    answer) as the one chunk that says it all."""
    if not isinstance(body, dict):
        raise UpstreamProtocolError("the completion answer is not a JSON object")
    if "error" in body:
        error = body["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise UpstreamStatusError(200, str(message or "error"))
    choices = body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    if text and isinstance(choice, dict) and isinstance(choice.get("text"), str):
        choice = {**choice, "message": {"content": choice["text"]}}
    if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
        raise UpstreamProtocolError("the completion answer has no message")
    message = choice["message"]
    chunk = pb.StreamChatCompletionResponse(
        id=completion_id,
        model=model_id,
        provider=provider,
        created=created,
        role=pb.ROLE_ASSISTANT,
    )
    content = message.get("content")
    if isinstance(content, str):
        chunk.content = content
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for index, call in enumerate(calls):
            delta = _tool_call_delta({"index": index, **call} if isinstance(call, dict) else call)
            delta.type = delta.type or "function"
            chunk.tool_calls.append(delta)
    finish = choice.get("finish_reason")
    chunk.finish_reason = FINISH_REASONS.get(str(finish), pb.FINISH_REASON_STOP)
    if chunk.tool_calls and chunk.finish_reason == pb.FINISH_REASON_STOP:
        # Some servers say "stop" after calling tools; OpenAI says "tool_calls".
        chunk.finish_reason = pb.FINISH_REASON_TOOL_CALLS
    chunk.stop_sequence = matched_stop(choice, chunk.finish_reason)
    usage = usage_from(body.get("usage"))
    if usage is not None:
        chunk.usage.CopyFrom(usage)
    logprobs = choice.get("logprobs")
    chunk.logprobs.extend(text_logprobs(logprobs) if text else chat_logprobs(logprobs))
    return chunk


def _tool_call_delta(call: Any) -> pb.ToolCallDelta:
    if not isinstance(call, dict):
        raise UpstreamProtocolError("a tool call delta is not a JSON object")
    index = call.get("index", 0)
    function = call.get("function")
    function = function if isinstance(function, dict) else {}
    arguments = function.get("arguments")
    if isinstance(arguments, dict):
        # A few servers send the object itself; the API promises a JSON string.
        arguments = orjson.dumps(arguments).decode()
    return pb.ToolCallDelta(
        index=index if isinstance(index, int) else 0,
        id=call.get("id") or "",
        type=call.get("type") or ("function" if call.get("id") else ""),
        name=function.get("name") or "",
        arguments=arguments if isinstance(arguments, str) else "",
    )
