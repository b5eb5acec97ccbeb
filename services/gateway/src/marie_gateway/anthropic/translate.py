"""Translation between Anthropic's Messages API and the providers contract:
a Messages request (or a token count) becomes a `StreamChatCompletionRequest`;
the providers' chunks become a `message`, or its stream of events.

What only Anthropic's own models can do (`thinking`, server tools,
documents, citations, MCP servers, containers) is passed through to an
Anthropic upstream as it was sent (`upstream_extras`); the providers service
refuses it where the route's deployment is of another kind, and the gateway
then answers the 400 naming the field this translation noted (`Passthrough`).
See the gateway README for the whole list."""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from typing import Any

import orjson
from marie.providers.v1 import provider_service_pb2 as pb

from marie_gateway.anthropic.schemas import (
    CountTokensRequest,
    ImageBlock,
    MessageParam,
    MessagesRequest,
    TextBlock,
    ToolChoiceAny,
    ToolChoiceAuto,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolResultBlock,
    ToolUseBlock,
    UnsupportedBlock,
)
from marie_gateway.http.errors import ApiError, bad_request
from marie_gateway.openai.mapping import json_text

_ALPHABET = string.ascii_letters + string.digits
#: Anthropic's stop reasons of the providers' finish reasons.
STOP_REASONS: dict[int, str] = {
    pb.FINISH_REASON_UNSPECIFIED: "end_turn",
    pb.FINISH_REASON_STOP: "end_turn",
    pb.FINISH_REASON_LENGTH: "max_tokens",
    pb.FINISH_REASON_TOOL_CALLS: "tool_use",
    pb.FINISH_REASON_CONTENT_FILTER: "refusal",
    pb.FINISH_REASON_PAUSE_TURN: "pause_turn",
}
#: Prefixed to the text of a `tool_result` with `is_error`: the chat contract
#: has no such flag, and the model must still learn the tool failed.
TOOL_ERROR_PREFIX = "Error: "
#: `thinking` types a model that never thinks honours as it is: `adaptive`
#: leaves it to the model whether to think (Claude Code sends it by default).
THINKING_ACCEPTED = frozenset({"adaptive", "disabled"})
#: The upstream kind that takes the fields passed through.
PASSTHROUGH_KIND = "anthropic"
#: The providers' reason for a pass-through the route cannot serve.
PASSTHROUGH_REFUSED = "UPSTREAM_EXTRAS_UNSUPPORTED"


@dataclass
class Passthrough:
    """What a request asks that only an Anthropic upstream can do: the
    top-level fields to send it as they were sent, and the 400 naming the
    first such field for any other upstream."""

    fields: set[str] = field(default_factory=set)
    refusals: list[ApiError] = field(default_factory=list)

    def need(self, name: str, refusal: ApiError) -> None:
        self.fields.add(name)
        self.refusals.append(refusal)

    @property
    def refusal(self) -> ApiError | None:
        return self.refusals[0] if self.refusals else None


def new_id(prefix: str) -> str:
    """An id in Anthropic's form: `msg_01…`, `toolu_01…` (24 base62 characters)."""
    return f"{prefix}_01" + "".join(secrets.choice(_ALPHABET) for _ in range(22))


def unsupported(path: str, what: str) -> ApiError:
    return bad_request(f"{path}: {what}", path)


def _image_part(block: ImageBlock) -> pb.ContentPart:
    source = block.source
    if source.type == "base64":
        url = f"data:{source.media_type};base64,{source.data}"
    else:
        url = source.url
    return pb.ContentPart(image_url=pb.ImageUrl(url=url))


def _text_of(blocks: list[TextBlock], path: str) -> str:
    for i, block in enumerate(blocks):
        if block.citations:
            raise unsupported(f"{path}.{i}.citations", "citations are not supported here.")
    return "\n".join(b.text for b in blocks)


def _tool_result(
    block: ToolResultBlock, path: str, passing: Passthrough
) -> tuple[pb.ChatMessage, list[pb.ContentPart]]:
    """The tool message of a result, and the images it held (they follow in a
    user message: tool messages carry text only upstream)."""
    images: list[pb.ContentPart] = []
    if isinstance(block.content, str) or block.content is None:
        text = block.content or ""
    else:
        texts = []
        for i, part in enumerate(block.content):
            if isinstance(part, TextBlock):
                if part.citations:
                    passing.need(
                        "messages",
                        unsupported(
                            f"{path}.content.{i}.citations", "citations are not supported here."
                        ),
                    )
                texts.append(part.text)
            else:
                images.append(_image_part(part))
        text = "\n".join(texts)
    if block.is_error:
        text = TOOL_ERROR_PREFIX + text
    return pb.ChatMessage(role=pb.ROLE_TOOL, content=text, tool_call_id=block.tool_use_id), images


def _blocked(block: UnsupportedBlock, path: str) -> ApiError:
    kind = block.type
    if kind in ("thinking", "redacted_thinking"):
        what = "thinking blocks are not supported: only Anthropic's models read them."
    elif kind in {"document", "search_result"}:
        what = (
            f"{kind} blocks are not supported by this model (only Anthropic's);"
            " send the text as a text block."
        )
    else:
        what = f"{kind} blocks belong to Anthropic's server tools, which only its models have."
    return unsupported(f"{path}.type", what)


def _messages(param: MessageParam, path: str, passing: Passthrough) -> list[pb.ChatMessage]:
    """The chat messages of one Anthropic message: a user turn's tool results
    first (each a tool message), then its text and images; an assistant turn's
    text and tool calls as one message. Blocks only Anthropic reads are left
    out of them and noted in `passing` (the messages then go to Anthropic as
    they were sent)."""
    role = pb.ROLE_USER if param.role == "user" else pb.ROLE_ASSISTANT
    if isinstance(param.content, str):
        return [pb.ChatMessage(role=role, content=param.content)] if param.content else []
    out: list[pb.ChatMessage] = []
    turn = pb.ChatMessage(role=role)
    texts: list[str] = []
    has_image = False
    for i, block in enumerate(param.content):
        where = f"{path}.content.{i}"
        if isinstance(block, UnsupportedBlock):
            passing.need("messages", _blocked(block, where))
            continue
        if isinstance(block, TextBlock):
            if block.citations:
                cited = unsupported(f"{where}.citations", "citations are not supported here.")
                passing.need("messages", cited)
            texts.append(block.text)
            turn.parts.add(text=block.text)
        elif isinstance(block, ImageBlock):
            if role != pb.ROLE_USER:
                raise unsupported(f"{where}.type", "images are sent in user messages.")
            has_image = True
            turn.parts.append(_image_part(block))
        elif isinstance(block, ToolUseBlock):
            if role != pb.ROLE_ASSISTANT:
                raise unsupported(
                    f"{where}.type", "tool_use blocks are sent in assistant messages."
                )
            turn.tool_calls.add(
                id=block.id,
                type="function",
                function=pb.FunctionCall(name=block.name, arguments=json_text(block.input)),
            )
        else:
            if role != pb.ROLE_USER:
                raise unsupported(f"{where}.type", "tool_result blocks are sent in user messages.")
            tool, images = _tool_result(block, where, passing)
            out.append(tool)
            if images:
                out.append(pb.ChatMessage(role=pb.ROLE_USER, parts=images))
    if not has_image:
        # Text only: one string, as every upstream takes it.
        del turn.parts[:]
        turn.content = "\n".join(texts) if len(texts) != 1 else texts[0]
    if texts or has_image or turn.tool_calls:
        out.append(turn)
    return out


def _anthropic_only(body: MessagesRequest | CountTokensRequest, passing: Passthrough) -> None:
    """Note the top-level fields only an Anthropic upstream takes."""
    counting = isinstance(body, CountTokensRequest)
    # A count ignores `thinking`: it changes what is generated, not the prompt.
    if (
        not counting
        and body.thinking is not None
        # A type that is no string (`{}`) is refused as any other, not a 500.
        and not (isinstance(kind := body.thinking.get("type"), str) and kind in THINKING_ACCEPTED)
    ):
        passing.need(
            "thinking",
            unsupported(
                "thinking",
                "extended thinking is not supported: only Anthropic's models think on request"
                " (send none, or type 'adaptive' or 'disabled').",
            ),
        )
    if body.mcp_servers:
        passing.need(
            "mcp_servers", unsupported("mcp_servers", "MCP servers are not supported here.")
        )
    if isinstance(body, MessagesRequest) and body.container is not None:
        passing.need(
            "container",
            unsupported("container", "code-execution containers are not supported here."),
        )
    for i, tool in enumerate(body.tools or ()):
        if tool.type not in (None, "custom"):
            passing.need(
                "tools",
                unsupported(
                    f"tools.{i}.type",
                    f"'{tool.type}' is one of Anthropic's server tools, which only Anthropic's"
                    " models have; define a client tool with name, description and"
                    " input_schema.",
                ),
            )
        elif tool.input_schema is None:
            raise bad_request(f"tools.{i}.input_schema: Field required", f"tools.{i}.input_schema")


def _upstream_extras(
    chat: pb.StreamChatCompletionRequest,
    body: MessagesRequest | CountTokensRequest,
    passing: Passthrough,
    raw: bytes,
    beta: str | None,
) -> None:
    """The fields noted in `passing`, as the caller sent them, on `chat`."""
    values: dict[str, Any] = {}
    if body.thinking is not None:
        # Every thinking type goes to Anthropic; `adaptive` and `disabled` alone
        # are hints (no `fields`), which other upstreams serve without. A
        # count's thinking is always one: Anthropic counts it, others ignore it.
        values["thinking"] = body.thinking
    names = set(passing.fields) - {"thinking"}
    if "tools" in names and body.tool_choice is not None:
        names.add("tool_choice")
    if names:
        # The body as sent (its blocks and server tools whole), read again only here.
        sent = orjson.loads(raw)
        values.update((n, sent[n]) for n in sorted(names) if n in sent)
    extras = chat.upstream_extras
    extras.kind = PASSTHROUGH_KIND
    extras.request_json = orjson.dumps(values).decode()
    extras.fields.extend(e.param or "" for e in passing.refusals)
    if beta:
        extras.headers["anthropic-beta"] = beta


def _tool_choice(
    chat: pb.StreamChatCompletionRequest, body: MessagesRequest | CountTokensRequest
) -> None:
    """`tool_choice` in the chat contract's terms, where it concerns client
    tools (one naming a server tool goes to Anthropic with the tools)."""
    choice = body.tool_choice
    client_tools = {t.function.name for t in chat.tools}
    if isinstance(choice, ToolChoiceTool):
        if choice.name not in {t.name for t in body.tools or ()}:
            raise bad_request(
                "tool_choice.name: names a tool that is not in tools", "tool_choice.name"
            )
        if choice.name in client_tools:
            chat.tool_choice.mode = pb.TOOL_CHOICE_MODE_FUNCTION
            chat.tool_choice.function_name = choice.name
        # A server tool's name: the choice goes to Anthropic with the tools.
    elif isinstance(choice, ToolChoiceAny):
        if client_tools or not body.tools:
            chat.tool_choice.mode = pb.TOOL_CHOICE_MODE_REQUIRED
    elif isinstance(choice, ToolChoiceNone):
        chat.tool_choice.mode = pb.TOOL_CHOICE_MODE_NONE
    elif isinstance(choice, ToolChoiceAuto):
        chat.tool_choice.mode = pb.TOOL_CHOICE_MODE_AUTO


def to_chat(
    body: MessagesRequest | CountTokensRequest,
    message_id: str,
    *,
    aggregate: bool,
    max_tokens: int | None = None,
    raw: bytes = b"",
    beta: str | None = None,
) -> tuple[pb.StreamChatCompletionRequest, ApiError | None]:
    """The providers request for a Messages request (a token count passes
    `max_tokens`, having none of its own), and the 400 to answer should its
    route not be Anthropic's when it carries what only Anthropic takes (`raw`
    is the body as sent, `beta` its `anthropic-beta`)."""
    passing = Passthrough()
    _anthropic_only(body, passing)
    if not body.messages:
        raise bad_request("messages: at least one message is required", "messages")
    chat = pb.StreamChatCompletionRequest(
        model=body.model, completion_id=message_id, aggregate=aggregate
    )
    if isinstance(body.system, str):
        if body.system:
            chat.messages.add(role=pb.ROLE_SYSTEM, content=body.system)
    elif body.system:
        chat.messages.add(role=pb.ROLE_SYSTEM, content=_text_of(body.system, "system"))
    last = len(body.messages) - 1
    for i, param in enumerate(body.messages):
        turn = _messages(param, f"messages.{i}", passing)
        if not turn and passing.fields:
            # Its blocks go to Anthropic as sent; the contract keeps the turn.
            role = pb.ROLE_USER if param.role == "user" else pb.ROLE_ASSISTANT
            turn = [pb.ChatMessage(role=role)]
        if not turn and not (i == last and param.role == "assistant"):
            raise bad_request(
                f"messages.{i}: all messages must have non-empty content except for the"
                " optional final assistant message",
                f"messages.{i}",
            )
        chat.messages.extend(turn)
    for tool in body.tools or ():
        if tool.type not in (None, "custom"):
            continue
        chat.tools.add(
            type="function",
            function=pb.FunctionDefinition(
                name=tool.name,
                description=tool.description or "",
                parameters_json=json_text(tool.input_schema or {}),
            ),
        )
    _tool_choice(chat, body)
    output = body.output_config.format if body.output_config else None
    if output is not None:
        chat.response_format.type = pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
        chat.response_format.name = "output"
        chat.response_format.json_schema_json = json_text(output.schema_)
        chat.response_format.strict = True
    s = chat.sampling
    if isinstance(body, MessagesRequest):
        s.max_tokens = body.max_tokens
        if body.temperature is not None:
            s.temperature = body.temperature
        if body.top_p is not None:
            s.top_p = body.top_p
        if body.top_k:
            s.top_k = body.top_k
        if body.stop_sequences:
            s.stop.extend(body.stop_sequences)
            # Anthropic's answer names the sequence that matched, whatever the upstream.
            chat.report_stop_sequence = True
        if body.metadata is not None and body.metadata.user_id:
            chat.user = body.metadata.user_id
    elif max_tokens is not None:
        s.max_tokens = max_tokens
        chat.count_only = True
    if passing.fields or body.thinking is not None:
        _upstream_extras(chat, body, passing, raw, beta)
    return chat, passing.refusal


def single_tool_call(body: MessagesRequest) -> bool:
    """Whether the answer keeps only the first tool call (`disable_parallel_tool_use`)."""
    choice = body.tool_choice
    return not isinstance(choice, ToolChoiceNone | None) and bool(choice.disable_parallel_tool_use)


# -- answers --------------------------------------------------------------------


def usage(
    input_tokens: int, output_tokens: int, server_tools: dict[str, int] | None = None
) -> dict[str, Any]:
    """Anthropic's `usage`; `server_tool_use` only when server tools ran, as Anthropic's."""
    out: dict[str, Any] = {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
    }
    if server_tools:
        out["server_tool_use"] = server_tools
    return out


class MessageBuilder:
    """Folds the providers' chunks into Anthropic's content blocks, as the
    events of a stream (`add` returns them) and as the whole `message`."""

    def __init__(self, message_id: str, model: str, *, single_tool: bool) -> None:
        self.message_id = message_id
        self.model = model
        self._single_tool = single_tool
        self.blocks: list[dict[str, Any]] = []
        # The open block: its index in `blocks`, and for a tool call its
        # upstream index and the JSON text of its input so far.
        self._open: int | None = None
        self._tool_index: int | None = None
        self._json: dict[int, list[str]] = {}
        self._tools: dict[int, int] = {}  # upstream tool index -> block index
        self._skipped: set[int] = set()
        # The upstream's number of the open block (`chunk.block`), 0 when unsaid.
        self._upstream_block = 0
        self.finish = pb.FINISH_REASON_UNSPECIFIED
        #: The stop sequence that ended the reply, when one did.
        self.stop_sequence: str | None = None
        self.input_tokens = 0
        self.output_tokens = 0
        self.server_tools: dict[str, int] = {}

    def start(self) -> list[dict[str, Any]]:
        """The stream's first event."""
        message = self.message(stop_reason=None)
        return [{"type": "message_start", "message": message}]

    def _close(self) -> list[dict[str, Any]]:
        if self._open is None:
            return []
        index, self._open = self._open, None
        return [{"type": "content_block_stop", "index": index}]

    def _begin(
        self, block: dict[str, Any], shown: dict[str, Any] | None = None, upstream: int = 0
    ) -> list[dict[str, Any]]:
        """Open `block` (its `content_block_start` shows `shown`, or the block
        as it is when it starts empty)."""
        events = self._close()
        self.blocks.append(block)
        self._open = len(self.blocks) - 1
        self._upstream_block = upstream
        events.append(
            {
                "type": "content_block_start",
                "index": self._open,
                "content_block": dict(block) if shown is None else shown,
            }
        )
        if self._open == 0:
            events.append({"type": "ping"})
        return events

    def _opened(self, kind: str, upstream: int) -> bool:
        """Whether the open block is of `kind` and the upstream's same block."""
        return (
            self._open is not None
            and self.blocks[self._open]["type"] == kind
            and (not upstream or upstream == self._upstream_block)
        )

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self._open, "delta": delta}

    def _reasoning(self, reasoning: pb.Reasoning, upstream: int) -> list[dict[str, Any]]:
        """Thinking: a `thinking` block growing by `thinking_delta`, ended by its
        `signature_delta`; or a whole `redacted_thinking` block."""
        if reasoning.redacted:
            block = {"type": "redacted_thinking", "data": reasoning.redacted}
            return self._begin(block, upstream=upstream)
        events: list[dict[str, Any]] = []
        if not self._opened("thinking", upstream) or (
            reasoning.text and self.blocks[self._open or 0]["signature"]
        ):
            events += self._begin(
                {"type": "thinking", "thinking": "", "signature": ""}, upstream=upstream
            )
        assert self._open is not None
        block = self.blocks[self._open]
        if reasoning.text:
            block["thinking"] += reasoning.text
            events.append(self._delta({"type": "thinking_delta", "thinking": reasoning.text}))
        if reasoning.signature:
            block["signature"] += reasoning.signature
            events.append(
                self._delta({"type": "signature_delta", "signature": reasoning.signature})
            )
        return events

    def _upstream(self, text: str, upstream: int) -> list[dict[str, Any]]:
        """A block of Anthropic's own (server tool use and results, …) as it
        starts: a tool use's input follows in `upstream_input_json` fragments
        (or, given whole, goes out as one `input_json_delta`)."""
        block = orjson.loads(text)
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            return []
        tool_input = block.get("input")
        if not block["type"].endswith("tool_use") or not isinstance(tool_input, dict):
            return self._begin(block, upstream=upstream)
        events = self._begin(block, {**block, "input": {}}, upstream)
        assert self._open is not None
        self._json[self._open] = []
        if tool_input:
            events += self._upstream_input(json_text(tool_input), upstream)
        return events

    def _upstream_input(self, fragment: str, upstream: int) -> list[dict[str, Any]]:
        """A fragment of the open server tool use's input, as Anthropic streams it."""
        if (
            self._open is None
            or self._open not in self._json
            or not (not upstream or upstream == self._upstream_block)
        ):
            # No such block open (an upstream out of order): nothing to add it to.
            return []
        self._json[self._open].append(fragment)
        return [self._delta({"type": "input_json_delta", "partial_json": fragment})]

    def _text_block(self, upstream: int) -> list[dict[str, Any]]:
        if self._opened("text", upstream):
            return []
        return self._begin({"type": "text", "text": ""}, upstream=upstream)

    def add(self, chunk: pb.StreamChatCompletionResponse) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        upstream = chunk.block
        if chunk.HasField("reasoning"):
            events += self._reasoning(chunk.reasoning, upstream)
        if chunk.upstream_block_json:
            events += self._upstream(chunk.upstream_block_json, upstream)
        if chunk.upstream_input_json:
            events += self._upstream_input(chunk.upstream_input_json, upstream)
        if chunk.citations_json:
            events += self._text_block(upstream)
            assert self._open is not None
            cited = self.blocks[self._open].setdefault("citations", [])
            for text in chunk.citations_json:
                citation = orjson.loads(text)
                cited.append(citation)
                events.append(self._delta({"type": "citations_delta", "citation": citation}))
        if chunk.content:
            events += self._text_block(upstream)
            assert self._open is not None
            self.blocks[self._open]["text"] += chunk.content
            events.append(
                {
                    "type": "content_block_delta",
                    "index": self._open,
                    "delta": {"type": "text_delta", "text": chunk.content},
                }
            )
        for call in chunk.tool_calls:
            events += self._tool_delta(call)
        if chunk.finish_reason:
            self.finish = chunk.finish_reason
            self.stop_sequence = chunk.stop_sequence or None
        if chunk.HasField("usage"):
            self.input_tokens = chunk.usage.prompt_tokens
            self.output_tokens = chunk.usage.completion_tokens
            self.server_tools = dict(chunk.usage.server_tool_requests)
        return events

    def _tool_delta(self, call: pb.ToolCallDelta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if call.index in self._skipped:
            return events
        block_index = self._tools.get(call.index)
        if block_index is None:
            if self._single_tool and self._tools:
                self._skipped.add(call.index)
                return events
            events += self._begin(
                {"type": "tool_use", "id": new_id("toolu"), "name": call.name, "input": {}}
            )
            assert self._open is not None
            block_index = self._tools[call.index] = self._open
            self._json[block_index] = []
        elif call.name and not self.blocks[block_index]["name"]:
            self.blocks[block_index]["name"] = call.name
        if call.arguments:
            self._json[block_index].append(call.arguments)
            if self._open != block_index:
                # Interleaved calls (rare): Anthropic's blocks do not interleave,
                # so a late fragment reopens nothing and joins its block's input.
                return events
            events.append(
                {
                    "type": "content_block_delta",
                    "index": block_index,
                    "delta": {"type": "input_json_delta", "partial_json": call.arguments},
                }
            )
        return events

    def stop_reason(self) -> str:
        if self.finish == pb.FINISH_REASON_STOP and self.stop_sequence is not None:
            return "stop_sequence"
        if self._tools and self.finish in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_UNSPECIFIED):
            return "tool_use"
        return STOP_REASONS.get(self.finish, "end_turn")

    def _stop_sequence(self) -> str | None:
        return self.stop_sequence if self.stop_reason() == "stop_sequence" else None

    def finish_events(self) -> list[dict[str, Any]]:
        """The stream's last events: the open block closed, the stop reason
        and usage, `message_stop`."""
        events = self._close()
        events.append(
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": self.stop_reason(),
                    "stop_sequence": self._stop_sequence(),
                },
                "usage": usage(self.input_tokens, self.output_tokens, self.server_tools),
            }
        )
        events.append({"type": "message_stop"})
        return events

    def _content(self) -> list[dict[str, Any]]:
        out = []
        for index, block in enumerate(self.blocks):
            if index in self._json:
                out.append({**block, "input": _tool_input(self._json[index])})
            else:
                out.append(block)
        return out

    def message(self, *, stop_reason: str | None = "") -> dict[str, Any]:
        """The `message` object: whole (by default), or as `message_start` shows it."""
        final = stop_reason == ""
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": self._content() if final else [],
            "stop_reason": self.stop_reason() if final else None,
            "stop_sequence": self._stop_sequence() if final else None,
            "usage": usage(self.input_tokens, self.output_tokens, self.server_tools),
        }


def _tool_input(fragments: list[str]) -> dict[str, Any]:
    """A tool call's input object from its JSON text; a model that wrote no
    arguments called it with `{}`, and text that is not a JSON object is kept
    whole under `"input"` rather than lost."""
    text = "".join(fragments).strip()
    if not text:
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {"input": text}
    return value if isinstance(value, dict) else {"input": value}
