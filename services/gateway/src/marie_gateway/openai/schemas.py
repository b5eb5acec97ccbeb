"""The bodies of the OpenAI surface (chat, legacy completions, embeddings,
models): the requests the gateway accepts, and the answers it sends.

Requests are lenient to unknown fields (SDKs send vendor extras), strict about the ones we
use: a bad value is a 400 naming the field, never a silent default. Strict
also about JSON types, as OpenAI is: `"stream": "yes"` and `"max_tokens": "10"`
are mistakes, not values to convert.

Every whole number that travels on in a protobuf field is bounded by that
field's range here (`Int32`, `PositiveInt32`, `Int64`), so that a number too
large is a 400 naming the field rather than a failed conversion later; a test
checks that no integer field of any request model goes unbounded.

Answers are built as plain dicts on the hot path; their models here describe
them for the OpenAPI document, and the tests check live answers against it.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_STOP_SEQUENCES = 4
# OpenAI's bounds for reported alternatives per token: chat 20, legacy completions 5.
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
# Choices one legacy completion request may ask for (prompts times n): each is an
# upstream generation of its own.
MAX_COMPLETION_CHOICES = 16
# Longest model id accepted (providers refuses longer ones too).
MAX_MODEL_LENGTH = 512
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Token ids are int64 in the contract; real vocabularies stay far below this.
MAX_TOKEN_ID = INT32_MAX
# OpenAI's rule for function names.
FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
# Deepest nesting of a free-form JSON value (a JSON Schema): far beyond any
# real schema, well within every parser and encoder on the way.
MAX_JSON_DEPTH = 64

NonEmptyStr = Annotated[str, Field(min_length=1)]
# Whole numbers by the protobuf field they end up in.


def _whole(value: object) -> object:
    """A whole number written as a float (`14.0`) is the integer JSON Schema
    says it is; strict mode would refuse it."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: Before an integer field's own checks: accept `14.0` as 14.
Whole = BeforeValidator(_whole)
WholeInt = Annotated[int, Whole]


#: Integers bounded as their fields are, `14.0` read as 14 (the bounds stay
#: `minimum`/`maximum` in the schema: the validator comes after them).
NoLogprobs = Annotated[int, Field(ge=0, le=0), Whole]
ChatTopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), Whole]
CompletionLogprobs = Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS), Whole]
OnlyOne = Annotated[int, Field(ge=1, le=1), Whole]


PositiveInt32 = Annotated[int, Field(ge=1, le=INT32_MAX), Whole]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX), Whole]


def _plain_json(value: Any, depth: int = 0) -> None:
    """Refuse what is not plain JSON once parsed: numbers that overflowed to
    infinity (`1e400`) and nesting too deep to pass on."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, dict):
        for item in value.values():
            _plain_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _plain_json(item, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError("numbers must be finite")


def _json_object(value: dict[str, Any]) -> dict[str, Any]:
    _plain_json(value)
    return value


#: A free-form JSON object (a JSON Schema) passed on to the upstream as written.
JsonObject = Annotated[dict[str, Any], AfterValidator(_json_object)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageUrlBody(_Body):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageUrlBody


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCallBody(_Body):
    name: str = Field(min_length=1)
    arguments: str = ""


class ToolCallBody(_Body):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCallBody


#: `ChatMessage._check_role_fields` as JSON Schema: a tool message names its
#: call, and only an assistant message with tool calls may leave out content.
_ROLE_RULES: dict[str, Any] = {
    "allOf": [
        {
            "if": {"properties": {"role": {"const": "tool"}}},
            "then": {
                "required": ["tool_call_id"],
                "properties": {"tool_call_id": {"type": "string", "minLength": 1}},
            },
        },
        {
            "if": {
                "not": {
                    "required": ["role", "tool_calls"],
                    "properties": {
                        "role": {"const": "assistant"},
                        "tool_calls": {"type": "array", "minItems": 1},
                    },
                }
            },
            "then": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        },
    ]
}


class ChatMessage(_Body):
    model_config = ConfigDict(json_schema_extra=_ROLE_RULES)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallBody] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _check_role_fields(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool messages need a tool_call_id")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"{self.role} messages need content")
        return self


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaBody(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # Required, and not empty: every upstream needs one (and providers refuses
    # `{}`), so a request without one is refused here, before any arm of a
    # comparison starts.
    schema_: JsonObject = Field(alias="schema", min_length=1)
    strict: bool | None = None


class ResponseFormatBody(_Body):
    # `_schema_present` as JSON Schema.
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"type": {"const": "json_schema"}}},
            "then": {
                "required": ["json_schema"],
                "properties": {"json_schema": {"not": {"type": "null"}}},
            },
        }
    )

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaBody | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormatBody:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema")
        return self


class FunctionDefinitionBody(_Body):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None


class ToolBody(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinitionBody


class NamedFunction(_Body):
    name: str = Field(min_length=1)


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice | None


# Not blank: a model name has a character other than whitespace.
ModelId = Annotated[str, Field(min_length=1, max_length=MAX_MODEL_LENGTH, pattern=r"\S")]
#: OpenAI's `metadata`: up to 16 pairs, keys up to 64 characters, values up to 512.
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
    Field(max_length=16),
]


class ChatParameters(_Body):
    """What a chat request says besides its model: messages, sampling, tools."""

    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: PositiveInt32 | None = None
    max_tokens: PositiveInt32 | None = None
    max_completion_tokens: PositiveInt32 | None = None
    stop: (
        NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP_SEQUENCES)] | None
    ) = None
    seed: Int64 | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    response_format: ResponseFormatBody | None = None
    tools: list[ToolBody] | None = None
    tool_choice: ToolChoice = None
    user: str | None = Field(default=None, max_length=256)

    @field_validator("tool_choice")
    @classmethod
    def _named_tool_exists(cls, choice: ToolChoice, info: ValidationInfo) -> ToolChoice:
        # `tools` is declared (so validated) before `tool_choice`.
        if isinstance(choice, NamedToolChoice):
            names = {t.function.name for t in info.data.get("tools") or ()}
            if choice.function.name not in names:
                raise ValueError("tool_choice names a function that is not in tools")
        return choice


class ChatCompletionRequest(ChatParameters):
    """`POST /v1/chat/completions`."""

    # `_needs_logprobs` as JSON Schema.
    model_config = ConfigDict(
        json_schema_extra={
            "if": {
                "required": ["top_logprobs"],
                "properties": {"top_logprobs": {"type": "integer"}},
            },
            "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
        }
    )

    model: ModelId
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: WholeInt = Field(
        default=1, ge=1, le=1, description="Only one choice per request is supported."
    )
    logprobs: bool | None = Field(
        default=None,
        description="Log probabilities of the reply's tokens, where the provider reports them"
        " (a 400 naming `logprobs` where it does not).",
    )
    top_logprobs: ChatTopLogprobs | None = None
    metadata: Metadata | None = Field(
        default=None,
        description="Kept with nothing but `cache`: Marie's response cache, as Cache-Control"
        " directives ('max-age=300', 'no-cache', 'no-store') or 'true'/'false'.",
    )

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        # `logprobs` is declared (so validated) before `top_logprobs`.
        if top and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return top


TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID), Whole]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


#: Inputs one embeddings request may carry (OpenAI's limit).
MAX_EMBEDDING_INPUTS = 2048


class EmbeddingsRequest(_Body):
    """`POST /v1/embeddings`: `input` is text, texts, token ids (one input) or lists
    of token ids (what OpenAI's clients send after tokenizing)."""

    model: ModelId
    input: (
        NonEmptyStr
        | Annotated[list[NonEmptyStr], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt32 | None = None
    user: str | None = Field(default=None, max_length=256)
    # What the texts are for (instruction-tuned embedders): vLLM/NVIDIA and
    # Cohere spellings of the two that retrieval uses.
    input_type: (
        Literal["query", "search_query", "document", "passage", "search_document"] | None
    ) = None

    @field_validator("input", mode="before")
    @classmethod
    def _count(cls, value: object) -> object:
        # At most 2048 inputs, as OpenAI; the bound is on the list of inputs,
        # not on one text's length nor on one input's token ids (the model's).
        if isinstance(value, list):
            if not value:
                raise ValueError("at least one input is needed")
            if len(value) > MAX_EMBEDDING_INPUTS and not all(isinstance(v, int) for v in value):
                raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs in one request")
        return value


class CompletionRequest(_Body):
    """`POST /v1/completions` (OpenAI's legacy text completions)."""

    model: ModelId
    # Prompts times n are at most MAX_COMPLETION_CHOICES (`_choices_within_bounds`).
    prompt: (
        NonEmptyStr
        | Annotated[
            list[NonEmptyStr],
            Field(min_length=1, json_schema_extra={"maxItems": MAX_COMPLETION_CHOICES}),
        ]
    )
    suffix: str | None = None
    max_tokens: PositiveInt32 | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: (
        NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP_SEQUENCES)] | None
    ) = None
    seed: Int64 | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    echo: bool = False
    logprobs: CompletionLogprobs | None = None
    n: WholeInt = Field(default=1, ge=1, le=MAX_COMPLETION_CHOICES)
    best_of: OnlyOne | None = Field(
        default=None, description="Only best_of 1 (the default) is supported."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)

    @field_validator("n")
    @classmethod
    def _choices_within_bounds(cls, n: int, info: ValidationInfo) -> int:
        prompt = info.data.get("prompt")
        prompts = len(prompt) if isinstance(prompt, list) else 1
        if prompts * n > MAX_COMPLETION_CHOICES:
            raise ValueError(
                f"at most {MAX_COMPLETION_CHOICES} choices per request (prompts times n)"
            )
        return n


# -- answers (described; built as dicts on the hot path) ------------------------


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ToolCallFunction(_Out):
    name: str
    arguments: str


class ToolCall(_Out):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Out):
    """A chat choice's log probabilities (when the request set `logprobs`)."""

    content: list[TokenLogprob] | None
    refusal: None = None


class Choice(_Out):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"]
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class ChunkChoice(_Out):
    index: int
    delta: dict[str, Any]
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletionChunk(_Out):
    """One `data:` event of a streamed chat completion; the stream ends with
    `data: [DONE]`, and an error after the first event is an ErrorEnvelope event."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class TextLogprobs(_Out):
    """A legacy completion choice's log probabilities, as parallel lists."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TextChoice(_Out):
    text: str
    index: int = Field(description="The prompt's position times n, plus the choice's.")
    logprobs: TextLogprobs | None = None
    finish_reason: Literal["stop", "length", "content_filter"] | None


class TextCompletion(_Out):
    """`POST /v1/completions` (also each `data:` event of its stream, which ends
    with `data: [DONE]`; with `stream_options.include_usage`, the last event has
    no choices and the usage)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


class OpenAIModel(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    routes_to: list[str] | None = Field(
        default=None,
        description='For an alias or split (owned_by "marie"): the models it routes to.',
    )


class OpenAIModelList(_Out):
    object: Literal["list"]
    data: list[OpenAIModel]


class Embedding(_Out):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of float32 values.")


class EmbeddingUsage(_Out):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Out):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
