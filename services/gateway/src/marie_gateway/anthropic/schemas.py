"""The bodies of the Anthropic surface: the Messages API's requests as the
gateway validates them, and its answers as the OpenAPI document describes them
(built as dicts on the hot path).

Like Anthropic's API, a request with a field it does not define is a 400
(`"<path>: Extra inputs are not permitted"`), JSON types are strict
(`"max_tokens": "10"` is a mistake), and `max_tokens` is required. Fields that
Anthropic defines that only an Anthropic upstream honours (`thinking`, server
tools, documents, citations, MCP servers, containers) are declared here so
that the translation passes them through to an Anthropic upstream and
refuses them by name where the model routes elsewhere; hints that change nothing about the
answer (`cache_control`, `service_tier`) are accepted and ignored.

One deliberate difference: a request that carries `anthropic-beta` (Claude
Code and the SDKs' `beta` namespace send one) may hold fields of betas this
gateway does not know; they are ignored rather than refused, since the list of
betas is open-ended and each adds fields (see `extra_fields`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from marie_gateway.openai.schemas import INT32_MAX, JsonObject, ModelId, PositiveInt32, Whole

#: Anthropic's rule for tool names.
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,128}$"
#: Longest `metadata.user_id` Anthropic takes.
MAX_USER_ID = 256
#: Longest `metadata.cache` (Cache-Control directives).
MAX_CACHE_VALUE = 512
#: What `metadata.cache` takes: the directives Marie's cache uses, or a
#: boolean as text. Stricter than the Cache-Control header (which ignores
#: directives it does not use, as HTTP caches do): a body field that names
#: nothing the cache does is a mistake, refused with the field named.
_DIRECTIVE = r"(max-age=[0-9]+|no-cache|no-store)"
CACHE_VALUE_PATTERN = rf"^(true|false|\s*{_DIRECTIVE}(\s*,\s*{_DIRECTIVE})*\s*)$"
#: Stop sequences a request may carry (the providers contract's bound).
MAX_STOP_SEQUENCES = 4

NonNegativeInt32 = Annotated[int, Field(ge=0, le=INT32_MAX), Whole]


class _Body(BaseModel):
    # Unknown fields are kept aside (model_extra) and refused by `extra_fields`
    # unless the request opted into betas.
    # The schema says what a request without betas may hold: no other field.
    model_config = ConfigDict(
        extra="allow",
        frozen=True,
        strict=True,
        json_schema_extra={"additionalProperties": False},
    )


class CacheControl(_Body):
    """A prompt-caching hint: accepted and ignored (no upstream behind Marie
    caches on request; usage reports no cache tokens)."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(_Body):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list[dict[str, Any]] | None = Field(
        default=None, description="Passed through to an Anthropic upstream; refused elsewhere."
    )


class Base64Source(_Body):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str = Field(min_length=1)


class UrlSource(_Body):
    type: Literal["url"]
    url: str = Field(min_length=1)


ImageSource = Annotated[Base64Source | UrlSource, Field(discriminator="type")]


class ImageBlock(_Body):
    type: Literal["image"]
    source: ImageSource
    cache_control: CacheControl | None = None


class ToolUseBlock(_Body):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: JsonObject
    cache_control: CacheControl | None = None


ToolResultPart = Annotated[TextBlock | ImageBlock, Field(discriminator="type")]


class ToolResultBlock(_Body):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[ToolResultPart] | None = None
    is_error: bool | None = None
    cache_control: CacheControl | None = None


class UnsupportedBlock(_Body):
    """Blocks only Anthropic's models read (thinking, documents, server tools'
    use and results, …): the messages holding them go to an Anthropic upstream
    as sent; routed elsewhere they are refused, naming the block."""

    # Each with the fields Anthropic gives it, passed on as they are.
    model_config = ConfigDict(
        extra="allow", frozen=True, strict=True, json_schema_extra={"additionalProperties": True}
    )

    type: Literal[
        "document",
        "search_result",
        "thinking",
        "redacted_thinking",
        "server_tool_use",
        "web_search_tool_result",
        "web_fetch_tool_result",
        "code_execution_tool_result",
        "bash_code_execution_tool_result",
        "text_editor_code_execution_tool_result",
        "mcp_tool_use",
        "mcp_tool_result",
        "container_upload",
    ]


ContentBlock = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | UnsupportedBlock,
    Field(discriminator="type"),
]


def _blocks_not(*types: str) -> dict[str, Any]:
    """A role's content: a string, or blocks none of which is of `types`."""
    return {
        "properties": {
            "content": {
                "anyOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {"properties": {"type": {"not": {"enum": list(types)}}}},
                    },
                ]
            }
        }
    }


class MessageParam(_Body):
    # Images and tool results come from the user, tool calls from the assistant
    # (the translation refuses them elsewhere, in Anthropic's words).
    model_config = ConfigDict(
        json_schema_extra={
            "additionalProperties": False,
            "allOf": [
                {
                    "if": {"properties": {"role": {"const": "user"}}},
                    "then": _blocks_not("tool_use"),
                    "else": _blocks_not("image", "tool_result"),
                }
            ],
        }
    )

    role: Literal["user", "assistant"]
    # Not empty (the translation says so, in Anthropic's words).
    content: str | list[ContentBlock] = Field(json_schema_extra={"not": {"enum": ["", []]}})


class Tool(_Body):
    """A client tool (`type` absent or `custom`); any other `type` names one of
    Anthropic's server tools (web search, code execution, …), passed through
    to an Anthropic upstream as sent (its own fields too) and refused for any
    other."""

    # A client tool needs its input schema (the translation says so).
    model_config = ConfigDict(
        json_schema_extra={
            "additionalProperties": False,
            "if": {"properties": {"type": {"enum": [None, "custom"]}}},
            "then": {
                "required": ["input_schema"],
                "properties": {"input_schema": {"type": "object"}},
            },
        }
    )

    name: str = Field(pattern=TOOL_NAME_PATTERN)
    type: str | None = None
    description: str | None = None
    input_schema: JsonObject | None = None
    cache_control: CacheControl | None = None
    defer_loading: bool | None = Field(
        default=None,
        description="Accepted; the tool is offered to the model like any other"
        " (no server-side tool search here).",
    )


class ToolChoiceAuto(_Body):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(_Body):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(_Body):
    type: Literal["tool"]
    name: str = Field(min_length=1)
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(_Body):
    type: Literal["none"]


ToolChoice = Annotated[
    ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone,
    Field(discriminator="type"),
]


class JsonOutputFormat(_Body):
    type: Literal["json_schema"]
    schema_: JsonObject = Field(alias="schema", min_length=1)


class OutputConfig(_Body):
    """`format` (a JSON schema the answer follows) is honoured where the
    upstream enforces schemas; `effort` is a hint, accepted and ignored."""

    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: JsonOutputFormat | None = None


class Metadata(_Body):
    user_id: str | None = Field(
        default=None,
        max_length=MAX_USER_ID,
        description="The end user: whose memories enrich the chat, when the key asks for it.",
    )
    cache: str | None = Field(
        default=None,
        max_length=MAX_CACHE_VALUE,
        pattern=CACHE_VALUE_PATTERN,
        description="Marie's response cache: Cache-Control directives ('max-age=300',"
        " 'no-cache', 'no-store', comma-separated) or 'true'/'false'.",
    )


class _Prompt(_Body):
    """What both the Messages request and the token count take."""

    model: ModelId
    # At least one: checked by the translation, in Anthropic's words.
    messages: list[MessageParam] = Field(json_schema_extra={"minItems": 1})
    # A system prompt cites nothing (the translation refuses its citations).
    system: str | list[TextBlock] | None = Field(
        default=None,
        json_schema_extra={
            "items": {"properties": {"citations": {"type": ["array", "null"], "maxItems": 0}}}
        },
    )
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: dict[str, Any] | None = Field(
        default=None,
        description="Passed through to an Anthropic upstream; elsewhere `adaptive` and"
        " `disabled` are accepted and ignored, `enabled` refused.",
    )
    output_config: OutputConfig | None = None
    cache_control: CacheControl | None = Field(
        default=None, description="A prompt-caching hint: accepted and ignored."
    )
    speed: Literal["standard", "fast"] | None = Field(
        default=None, description="Accepted and ignored: one speed here."
    )
    user_profile_id: str | None = Field(default=None, description="Accepted and ignored.")
    workspace_id: str | None = Field(default=None, description="Accepted and ignored.")
    mcp_servers: list[dict[str, Any]] | None = Field(
        default=None, description="Passed through to an Anthropic upstream; refused elsewhere."
    )


class MessagesRequest(_Prompt):
    """`POST /v1/messages`."""

    max_tokens: PositiveInt32
    stop_sequences: (
        Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_SEQUENCES)]
        | None
    ) = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: NonNegativeInt32 | None = None
    metadata: Metadata | None = None
    stream: bool = False
    service_tier: Literal["auto", "standard_only"] | None = Field(
        default=None, description="Accepted and ignored: one tier here."
    )
    container: str | dict[str, Any] | None = Field(
        default=None, description="Passed through to an Anthropic upstream; refused elsewhere."
    )
    inference_geo: str | None = Field(default=None, description="Accepted and ignored.")
    diagnostics: dict[str, Any] | None = Field(
        default=None, description="Accepted and ignored: no prompt cache to diagnose."
    )


class CountTokensRequest(_Prompt):
    """`POST /v1/messages/count_tokens`."""


# -- answers (described; built as dicts on the hot path) ------------------------


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class TextOut(_Out):
    type: Literal["text"]
    text: str
    citations: list[dict[str, Any]] | None = Field(
        default=None, description="From an Anthropic upstream: what the text cites, as sent."
    )


class ThinkingOut(_Out):
    """From an Anthropic upstream: the model's thinking, to be sent back as it came."""

    type: Literal["thinking"]
    thinking: str
    signature: str


class RedactedThinkingOut(_Out):
    """From an Anthropic upstream: thinking it encrypted, to be sent back as it came."""

    type: Literal["redacted_thinking"]
    data: str


class ServerBlockOut(_Out):
    """From an Anthropic upstream: a server tool's block (`server_tool_use`,
    `web_search_tool_result`, …), as Anthropic sent it."""

    model_config = ConfigDict(frozen=True, extra="allow")

    type: str


class ToolUseOut(_Out):
    type: Literal["tool_use"]
    id: str = Field(description="`toolu_…`; a `tool_result` names it in `tool_use_id`.")
    name: str
    input: dict[str, Any]


class UsageOut(_Out):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = Field(description="Always 0: no prompt caching here.")
    cache_read_input_tokens: int = Field(description="Always 0: no prompt caching here.")


class Message(_Out):
    """A `message`: the answer of `POST /v1/messages` (and, empty and without a
    stop reason, the `message` of a stream's `message_start` event)."""

    id: str = Field(description="`msg_…`")
    type: Literal["message"]
    role: Literal["assistant"]
    model: str = Field(description="The model that answered (an alias's target).")
    content: list[
        Annotated[
            TextOut | ToolUseOut | ThinkingOut | RedactedThinkingOut,
            Field(discriminator="type"),
        ]
        | ServerBlockOut
    ]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal"] | None
    stop_sequence: str | None = Field(
        description="Always null: upstreams do not say which stop sequence ended a reply,"
        " so such a stop is reported as end_turn."
    )
    usage: UsageOut


class StreamEvent(_Out):
    """One event of a streamed message: `event: <type>` then `data: <JSON>`,
    in order `message_start`, then per content block `content_block_start`,
    `content_block_delta` (`text_delta` or `input_json_delta`; from an
    Anthropic upstream also `thinking_delta`, `signature_delta`,
    `citations_delta`) …,
    `content_block_stop`, then `message_delta` (stop reason, usage) and
    `message_stop`; a `ping` after the first block starts. A failure after the
    first event is an `error` event (an AnthropicError) and the stream ends."""

    type: Literal[
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
        "ping",
        "error",
    ]
    index: int | None = None
    message: Message | None = None
    content_block: dict[str, Any] | None = None
    delta: dict[str, Any] | None = None
    usage: dict[str, int] | None = None


class TokenCount(_Out):
    """The prompt's size in tokens. The header `x-marie-token-count` says how
    it was counted: `upstream` (the model's own count) or `estimate`."""

    input_tokens: int


class AnthropicModel(_Out):
    type: Literal["model"]
    id: str
    display_name: str
    created_at: str = Field(description="RFC 3339; the epoch when unknown.")


class AnthropicModelList(_Out):
    """`GET /v1/models` when the request carries `anthropic-version`."""

    data: list[AnthropicModel]
    has_more: bool
    first_id: str | None
    last_id: str | None


# -- validation -----------------------------------------------------------------


def loc_path(loc: tuple[int | str, ...], raw: Any) -> str:
    """A pydantic error location as Anthropic writes it (`messages.0.content.1.text`):
    the parts that index the JSON as sent, and a missing field's name, without
    pydantic's union labels (`list[…]`, a block's `type` tag)."""
    parts: list[str] = []
    node = raw
    tagged = False  # the object at hand's `type` tag was passed already
    for part in loc:
        listed = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if listed or (isinstance(node, dict) and isinstance(part, str) and part in node):
            node = node[part]
            tagged = False
        elif isinstance(node, dict) and isinstance(part, str) and part.isidentifier():
            if node.get("type") == part and not tagged:
                tagged = True  # the tag of a union's branch, not a field
                continue
            node = None  # a missing field: named, and nothing below it
        else:
            continue  # a union's label
        parts.append(str(part))
    return ".".join(parts)


def extra_fields(value: BaseModel, path: str = "") -> list[str]:
    """The paths of fields the request holds that its models do not define
    (blocks and server tools passed to Anthropic as a whole are not looked
    into: Anthropic checks them)."""
    if isinstance(value, UnsupportedBlock) or (
        isinstance(value, Tool) and value.type not in (None, "custom")
    ):
        return []
    found = [f"{path}{name}" for name in (value.model_extra or {})]
    for name in type(value).model_fields:
        found += _extra_in(getattr(value, name), f"{path}{name}.")
    return found


def _extra_in(item: Any, path: str) -> list[str]:
    if isinstance(item, BaseModel):
        return extra_fields(item, path)
    if isinstance(item, list):
        return [p for i, x in enumerate(item) for p in _extra_in(x, f"{path}{i}.")]
    return []
