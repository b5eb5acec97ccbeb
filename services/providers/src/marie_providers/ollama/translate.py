"""Translation between Ollama's JSON API and Marie's protobuf messages.

Pure functions and one small stateful stream translator, no I/O: `client.py`
does the HTTP, this module decides what goes on the wire and what comes back.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
from google.protobuf import timestamp_pb2
from marie.providers.v1 import provider_service_pb2 as pb

from marie_providers.errors import UpstreamProtocolError, UpstreamStatusError, bad_request
from marie_providers.upstream.logprobs import token_logprob
from marie_providers.upstream.model_facts import human_size
from marie_providers.upstream.structs import float32, schema_value

# Ollama has no developer role; OpenAI defines developer as the newer system.
ROLE_NAMES: Mapping[int, str] = {
    pb.ROLE_SYSTEM: "system",
    pb.ROLE_DEVELOPER: "system",
    pb.ROLE_USER: "user",
    pb.ROLE_ASSISTANT: "assistant",
    pb.ROLE_TOOL: "tool",
}

# Ollama's capability names (from /api/show); a model that completes text also chats.
CAPABILITIES: Mapping[str, tuple[pb.ModelCapability, ...]] = {
    "completion": (pb.MODEL_CAPABILITY_CHAT, pb.MODEL_CAPABILITY_COMPLETION),
    "tools": (pb.MODEL_CAPABILITY_TOOLS,),
    "vision": (pb.MODEL_CAPABILITY_VISION,),
    "embedding": (pb.MODEL_CAPABILITY_EMBEDDINGS,),
}

FINISH_REASONS: Mapping[str, pb.FinishReason] = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
}

# Tool-call ids Marie makes up for Ollama, which issues none: "call_" + 96 random bits.
TOOL_CALL_ID_BYTES = 12


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def _text(mapping: Mapping[str, Any], key: str) -> str:
    value = mapping.get(key)
    return value if isinstance(value, str) else ""


def _timestamp(value: Any) -> timestamp_pb2.Timestamp | None:
    if not isinstance(value, str) or not value:
        return None
    stamp = timestamp_pb2.Timestamp()
    try:
        stamp.FromJsonString(value)
    except ValueError:
        return None
    return stamp


def _apply_details(info: pb.ModelInfo, details: Any) -> None:
    """Fill the fields both /api/tags and /api/show carry in their `details` object."""
    if not isinstance(details, dict):
        return
    info.parameters = _text(details, "parameter_size")
    info.quantization = _text(details, "quantization_level")
    info.family = _text(details, "family")
    info.format = _text(details, "format")
    families = details.get("families")
    if isinstance(families, list) and families:
        info.metadata["families"] = ",".join(str(f) for f in families)
    if parent := _text(details, "parent_model"):
        info.metadata["parent_model"] = parent


def _apply_modified(info: pb.ModelInfo, modified_at: Any) -> None:
    stamp = _timestamp(modified_at)
    if stamp is not None:
        info.modified_time.CopyFrom(stamp)
        info.metadata["modified_at"] = str(modified_at)


def model_from_listing(entry: Any, provider: str) -> pb.ModelInfo | None:
    """One `/api/tags` entry as a ModelInfo; None for an entry without a name."""
    if not isinstance(entry, dict):
        return None
    name = _text(entry, "name") or _text(entry, "model")
    if not name:
        return None
    size = entry.get("size")
    size_bytes = size if isinstance(size, int) and size > 0 else 0
    info = pb.ModelInfo(
        id=f"{provider}/{name}",
        name=name,
        provider=provider,
        size_bytes=size_bytes,
        size_label=human_size(size_bytes),
    )
    _apply_details(info, entry.get("details"))
    if digest := _text(entry, "digest"):
        info.metadata["digest"] = digest
    _apply_modified(info, entry.get("modified_at"))
    return info


def models_from_listing(body: Any, provider: str) -> list[pb.ModelInfo]:
    """The `/api/tags` answer as ModelInfos, sorted by name."""
    if not isinstance(body, dict) or not isinstance(body.get("models"), list):
        raise UpstreamProtocolError("/api/tags answer has no 'models' list")
    models = [m for m in (model_from_listing(e, provider) for e in body["models"]) if m]
    models.sort(key=lambda m: m.name)
    return models


def capabilities(names: Iterable[Any]) -> list[pb.ModelCapability]:
    """Ollama capability names as ModelCapabilities, deduplicated, in a stable order."""
    found: set[pb.ModelCapability] = set()
    for name in names:
        found.update(CAPABILITIES.get(str(name), ()))
    return sorted(found)


def model_from_show(body: Any, name: str, provider: str) -> pb.ModelInfo:
    """The `/api/show` answer for `name` as a ModelInfo with details loaded."""
    if not isinstance(body, dict):
        raise UpstreamProtocolError("/api/show answer is not a JSON object")
    info = pb.ModelInfo(id=f"{provider}/{name}", name=name, provider=provider, details_loaded=True)
    _apply_details(info, body.get("details"))
    _apply_modified(info, body.get("modified_at"))
    model_info = body.get("model_info")
    if isinstance(model_info, dict):
        architecture = model_info.get("general.architecture")
        context = model_info.get(f"{architecture}.context_length")
        if isinstance(context, int) and 0 < context < 2**31:
            info.context_length = context
    names = body.get("capabilities")
    if isinstance(names, list):
        info.capabilities.extend(capabilities(names))
    return info


# ---------------------------------------------------------------------------
# Chat requests
# ---------------------------------------------------------------------------


def _image(url: str, field: str) -> str:
    """The base64 payload of a data URL; Ollama takes images as bytes, never as links."""
    if url.startswith(("http://", "https://")):
        raise bad_request(
            field, "ollama needs image bytes: send the image as a base64 data URL, not a link"
        )
    header, comma, data = url.partition(",")
    if not url.startswith("data:") or not comma or not header.endswith(";base64") or not data:
        raise bad_request(field, "must be a base64 data URL (data:image/png;base64,…)")
    return data


def _content(message: pb.ChatMessage, field: str) -> tuple[str, list[str]]:
    if not message.parts:
        return message.content, []
    texts: list[str] = []
    images: list[str] = []
    for index, part in enumerate(message.parts):
        kind = part.WhichOneof("part")
        if kind == "text":
            texts.append(part.text)
        elif kind == "image_url":
            images.append(_image(part.image_url.url, f"{field}.parts[{index}].image_url.url"))
    return "\n".join(texts), images


def _arguments(text: str, field: str) -> dict[str, Any]:
    """OpenAI sends arguments as a JSON string; Ollama wants the object itself."""
    if not text.strip():
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise bad_request(field, "must be a JSON object serialized to a string")
    return value


def _messages(messages: Sequence[pb.ChatMessage]) -> list[dict[str, Any]]:
    # Ollama matches a tool result to its call by function name, not by id.
    tool_names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        text, images = _content(message, field)
        entry: dict[str, Any] = {"role": ROLE_NAMES[message.role], "content": text}
        if images:
            entry["images"] = images
        if message.tool_calls:
            calls = []
            for position, call in enumerate(message.tool_calls):
                if call.id:
                    tool_names[call.id] = call.function.name
                arguments = _arguments(
                    call.function.arguments, f"{field}.tool_calls[{position}].function.arguments"
                )
                calls.append({"function": {"name": call.function.name, "arguments": arguments}})
            entry["tool_calls"] = calls
        if message.role == pb.ROLE_TOOL and message.tool_call_id in tool_names:
            entry["tool_name"] = tool_names[message.tool_call_id]
        out.append(entry)
    return out


def _options(sampling: pb.SamplingParameters) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if sampling.HasField("temperature"):
        options["temperature"] = float32(sampling.temperature)
    if sampling.HasField("top_p"):
        options["top_p"] = float32(sampling.top_p)
    if sampling.HasField("top_k"):
        options["top_k"] = sampling.top_k
    if sampling.HasField("max_tokens"):
        options["num_predict"] = sampling.max_tokens
    if sampling.stop:
        options["stop"] = list(sampling.stop)
    if sampling.HasField("seed"):
        options["seed"] = sampling.seed
    if sampling.HasField("presence_penalty"):
        options["presence_penalty"] = float32(sampling.presence_penalty)
    if sampling.HasField("frequency_penalty"):
        options["frequency_penalty"] = float32(sampling.frequency_penalty)
    return options


def _format(response_format: pb.ResponseFormat) -> Any:
    if response_format.type == pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
        return "json"
    if response_format.type == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        return schema_value(response_format.json_schema_json, response_format.json_schema)
    return None


def _tools(tools: Sequence[pb.Tool], choice: pb.ToolChoice) -> list[dict[str, Any]]:
    """The tools to offer: none for NONE, only the named one for FUNCTION.

    Ollama cannot force a tool call, so REQUIRED offers every tool and relies on
    the prompt; that is the closest it gets.
    """
    if choice.mode == pb.TOOL_CHOICE_MODE_NONE:
        return []
    selected: Iterable[pb.Tool] = tools
    if choice.mode == pb.TOOL_CHOICE_MODE_FUNCTION:
        selected = [t for t in tools if t.function.name == choice.function_name]
    out = []
    for tool in selected:
        function: dict[str, Any] = {"name": tool.function.name}
        if tool.function.description:
            function["description"] = tool.function.description
        # Templates render the parameters; an absent schema means "no parameters".
        fn = tool.function
        function["parameters"] = (
            schema_value(fn.parameters_json, fn.parameters)
            if fn.parameters_json or fn.HasField("parameters")
            else {"type": "object", "properties": {}}
        )
        out.append({"type": "function", "function": function})
    return out


def chat_payload(request: pb.StreamChatCompletionRequest, model_name: str) -> dict[str, Any]:
    """The `/api/chat` body for a validated request; INVALID_ARGUMENT for what Ollama can't take."""
    payload: dict[str, Any] = {
        "model": model_name,
        "messages": _messages(request.messages),
        "stream": True,
    }
    if options := _options(request.sampling):
        payload["options"] = options
    if (response_format := _format(request.response_format)) is not None:
        payload["format"] = response_format
    if tools := _tools(request.tools, request.tool_choice):
        payload["tools"] = tools
    if request.logprobs:
        _ask_logprobs(payload, request.top_logprobs)
    return payload


def _ask_logprobs(payload: dict[str, Any], top: int) -> None:
    payload["logprobs"] = True
    if top:
        payload["top_logprobs"] = top


def generate_payload(request: pb.StreamCompletionRequest, model_name: str) -> dict[str, Any]:
    """The `/api/generate` body for a validated text completion request."""
    payload: dict[str, Any] = {"model": model_name, "prompt": request.prompt, "stream": True}
    if request.suffix:
        # Fill-in-the-middle needs the model's template to place prompt and suffix;
        # Ollama refuses a suffix for models without one ("does not support insert").
        payload["suffix"] = request.suffix
    else:
        # The prompt is text to continue as it is, not a user turn for the chat template.
        payload["raw"] = True
    if options := _options(request.sampling):
        payload["options"] = options
    if request.HasField("logprobs"):
        _ask_logprobs(payload, request.logprobs)
    return payload


# ---------------------------------------------------------------------------
# Chat streams
# ---------------------------------------------------------------------------


class ChatStreamTranslator:
    """Turns `/api/chat` NDJSON objects into chunks, one line at a time.

    Keeps what a stream needs across lines: whether the role was sent, how many
    tool calls were emitted (their index), whether the last line arrived.
    """

    def __init__(self, *, completion_id: str, model_id: str, provider: str, created: int) -> None:
        self._completion_id = completion_id
        self._model_id = model_id
        self._provider = provider
        self._created = created
        self._role_sent = False
        self._tool_calls = 0
        self.finished = False

    def translate(self, line: Mapping[str, Any]) -> pb.StreamChatCompletionResponse | None:
        """The chunk for one line, or None when the line carries nothing to send.

        Raises `UpstreamStatusError` for an error line (the HTTP status was 200
        already) and `UpstreamProtocolError` for a line of the wrong shape.
        """
        if "error" in line:
            raise UpstreamStatusError(200, str(line["error"]))
        message = self._message(line)
        if not isinstance(message, dict):
            raise UpstreamProtocolError("chat line has a 'message' that is not an object")
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise UpstreamProtocolError("chat line has a 'content' that is not a string")
        raw_calls = message.get("tool_calls") or []
        if not isinstance(raw_calls, list):
            raise UpstreamProtocolError("chat line has 'tool_calls' that is not a list")
        done = bool(line.get("done"))
        logprobs = line.get("logprobs")
        if not (content or raw_calls or done or logprobs or not self._role_sent):
            return None
        chunk = pb.StreamChatCompletionResponse(
            id=self._completion_id,
            model=self._model_id,
            provider=self._provider,
            created=self._created,
            content=content,
        )
        if not self._role_sent:
            chunk.role = pb.ROLE_ASSISTANT
            self._role_sent = True
        for call in raw_calls:
            chunk.tool_calls.append(self._tool_call(call))
        if isinstance(logprobs, list):
            chunk.logprobs.extend(token_logprob(entry) for entry in logprobs)
        if done:
            self._finish(chunk, line)
        return chunk

    def _message(self, line: Mapping[str, Any]) -> Any:
        """The part of a line that holds the reply's content (and tool calls)."""
        return line.get("message") or {}

    def _tool_call(self, call: Any) -> pb.ToolCallDelta:
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(function, dict) or not isinstance(name, str) or not name:
            raise UpstreamProtocolError("tool call without a function name")
        arguments = function.get("arguments")
        if arguments is None:
            arguments = {}
        # Ollama sends an object; the API promises a JSON string (OpenAI's convention).
        text = arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()
        # Ollama sends each call whole, so one fragment carries id, name and all arguments.
        delta = pb.ToolCallDelta(
            index=self._tool_calls,
            id=f"call_{secrets.token_hex(TOOL_CALL_ID_BYTES)}",
            type="function",
            name=name,
            arguments=text,
        )
        self._tool_calls += 1
        return delta

    def _finish(self, chunk: pb.StreamChatCompletionResponse, line: Mapping[str, Any]) -> None:
        self.finished = True
        if self._tool_calls:
            chunk.finish_reason = pb.FINISH_REASON_TOOL_CALLS
        else:
            reason = line.get("done_reason")
            chunk.finish_reason = FINISH_REASONS.get(str(reason), pb.FINISH_REASON_STOP)
        prompt, completion = line.get("prompt_eval_count"), line.get("eval_count")
        if isinstance(prompt, int) or isinstance(completion, int):
            prompt = prompt if isinstance(prompt, int) else 0
            completion = completion if isinstance(completion, int) else 0
            chunk.usage.CopyFrom(
                pb.Usage(
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    total_tokens=prompt + completion,
                )
            )


class GenerateStreamTranslator(ChatStreamTranslator):
    """Turns `/api/generate` NDJSON objects into chunks: the text is in `response`
    (the last line also carries `context`, which Marie does not keep)."""

    def _message(self, line: Mapping[str, Any]) -> Any:
        return {"content": line.get("response") or ""}
