"""Pydantic models of the OpenAI request bodies the gateway accepts.

Lenient to unknown fields (SDKs send vendor extras), strict about the ones we
use: a bad value is a 400 naming the field, never a silent default. Strict
also about JSON types, as OpenAI is: `"stream": "yes"` and `"max_tokens": "10"`
are mistakes, not values to convert.

Every whole number that travels on in a protobuf field is bounded by that
field's range here (`Int32`, `PositiveInt32`, `Int64`), so that a number too
large is a 400 naming the field rather than a failed conversion later; a test
checks that no integer field of any request model goes unbounded.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
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
PositiveInt32 = Annotated[int, Field(ge=1, le=INT32_MAX)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]


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


class ChatMessage(_Body):
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
    schema_: JsonObject = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormatBody(_Body):
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


ModelId = Annotated[str, Field(min_length=1, max_length=MAX_MODEL_LENGTH)]
#: How many models one comparison may run at once.
MAX_COMPARE_MODELS = 8


class ChatParameters(_Body):
    """What a chat request says besides its model: messages, sampling, tools."""

    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: PositiveInt32 | None = None
    max_tokens: PositiveInt32 | None = None
    max_completion_tokens: PositiveInt32 | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
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

    model: ModelId
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="Only one choice per request is supported.")
    logprobs: bool | None = Field(
        default=None,
        description="Log probabilities of the reply's tokens, where the provider reports them"
        " (a 400 naming `logprobs` where it does not).",
    )
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        # `logprobs` is declared (so validated) before `top_logprobs`.
        if top and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return top


class CompareRequest(ChatParameters):
    """`POST /api/compare`: one prompt, run on several models at once."""

    models: list[ModelId] = Field(min_length=2, max_length=MAX_COMPARE_MODELS)

    @field_validator("models")
    @classmethod
    def _distinct(cls, models: list[str]) -> list[str]:
        if len(set(models)) != len(models):
            raise ValueError("each model may appear once")
        return models


TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class EmbeddingsRequest(_Body):
    """`POST /v1/embeddings`: `input` is text, texts, token ids (one input) or lists
    of token ids (what OpenAI's clients send after tokenizing)."""

    model: ModelId
    input: NonEmptyStr | list[NonEmptyStr] | TokenIds | list[TokenIds] = Field(
        min_length=1, max_length=2048
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt32 | None = None
    user: str | None = Field(default=None, max_length=256)


class CompletionRequest(_Body):
    """`POST /v1/completions` (OpenAI's legacy text completions)."""

    model: ModelId
    prompt: NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)]
    suffix: str | None = None
    max_tokens: PositiveInt32 | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: Int64 | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    n: int = Field(default=1, ge=1, le=MAX_COMPLETION_CHOICES)
    best_of: int | None = Field(
        default=None, ge=1, le=1, description="Only best_of 1 (the default) is supported."
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


# --------------------------------------------------------------------------
# The Responses API (`POST /v1/responses`), in OpenAI's shapes
# --------------------------------------------------------------------------

#: OpenAI's limits on a response's `metadata`.
MAX_METADATA_ENTRIES = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
#: The tags of the item and part unions, which are no field names.
RESPONSE_ITEM_TAGS = frozenset(
    {"message", "function_call", "function_call_output", "input_text", "input_image"}
    | {"output_text", "refusal"}
)
#: Items a request's `input` may carry.
MAX_INPUT_ITEMS = 2048
#: What `include` may ask for here: encrypted reasoning is asked by clients
#: that do not store responses (LangChain); there is none to include.
HARMLESS_INCLUDES = frozenset({"reasoning.encrypted_content"})


def _refused(message: str) -> AfterValidator:
    """A field Marie does not support: a set value is a 400 naming it."""

    def check(value: Any) -> Any:
        if value is not None:
            raise ValueError(message)
        return value

    return AfterValidator(check)


class InputTextPart(_Body):
    type: Literal["input_text"]
    text: str


class InputImagePart(_Body):
    type: Literal["input_image"]
    image_url: str | None = Field(default=None, min_length=1)
    detail: Literal["auto", "low", "high"] | None = None
    file_id: Annotated[str | None, _refused("file ids are; send the image as image_url is")] = None

    @model_validator(mode="after")
    def _url_present(self) -> InputImagePart:
        if self.image_url is None:
            raise ValueError("input_image needs image_url (a URL or a data: URL)")
        return self


class OutputTextPart(_Body):
    """An earlier answer's text, sent back as input (assistant messages)."""

    type: Literal["output_text"]
    text: str


class RefusalPart(_Body):
    type: Literal["refusal"]
    refusal: str


InputContentPart = Annotated[
    InputTextPart | InputImagePart | OutputTextPart | RefusalPart, Field(discriminator="type")
]


class InputMessageItem(_Body):
    """A message: `{"role", "content"}` with or without `"type": "message"`."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputContentPart]
    id: str | None = Field(default=None, max_length=128)


class FunctionCallItem(_Body):
    """A function call the model made, sent back as input."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    arguments: str
    id: str | None = Field(default=None, max_length=128)


class FunctionCallOutputItem(_Body):
    """The result of a function call, for the model."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[InputTextPart]
    id: str | None = Field(default=None, max_length=128)


def _item_type(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("type", "message"))
    return str(getattr(value, "type", "message"))


InputItem = Annotated[
    Annotated[InputMessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(
        _item_type,
        custom_error_type="unsupported_item",
        custom_error_message="Marie supports input items of type message, function_call "
        "and function_call_output",
    ),
]


def _function_tool_type(value: str) -> str:
    if value != "function":
        raise ValueError(f"'{value}' tools are not supported by Marie: only 'function' tools")
    return value


class FunctionToolBody(_Body):
    """A function tool, flat as the Responses API has it."""

    type: Annotated[str, AfterValidator(_function_tool_type)]
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None


class NamedFunctionChoice(_Body):
    type: Literal["function"]
    name: str = Field(min_length=1)


class TextFormatBody(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, min_length=1, max_length=64)
    description: str | None = None
    schema_: JsonObject | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> TextFormatBody:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a json_schema format needs name and schema")
        return self


class TextConfigBody(_Body):
    format: TextFormatBody | None = None
    # A hint about answer length: models here have no such setting.
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningBody(_Body):
    effort: Annotated[
        Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None,
        AfterValidator(lambda e: _no_reasoning(e, ("none",))),
    ] = None
    summary: Annotated[
        Literal["auto", "concise", "detailed"] | None, AfterValidator(_no_reasoning)
    ] = None
    generate_summary: Annotated[
        Literal["auto", "concise", "detailed"] | None, AfterValidator(_no_reasoning)
    ] = None


def _no_reasoning(value: str | None, allowed: tuple[str, ...] = ()) -> str | None:
    if value is not None and value not in allowed:
        raise ValueError("reasoning options are not supported by Marie's models")
    return value


def _metadata(value: dict[str, str]) -> dict[str, str]:
    if len(value) > MAX_METADATA_ENTRIES:
        raise ValueError(f"at most {MAX_METADATA_ENTRIES} entries")
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY or len(item) > MAX_METADATA_VALUE:
            raise ValueError(
                f"keys are at most {MAX_METADATA_KEY} characters, "
                f"values at most {MAX_METADATA_VALUE}"
            )
    return value


def _includes(value: list[str] | None) -> list[str] | None:
    for what in value or ():
        if what not in HARMLESS_INCLUDES:
            raise ValueError(f"'{what}' cannot be included by Marie")
    return value


class ResponseStreamOptions(_Body):
    include_obfuscation: bool | None = None


class ResponsesRequest(_Body):
    """`POST /v1/responses`."""

    model: ModelId
    input: str | Annotated[list[InputItem], Field(max_length=MAX_INPUT_ITEMS)]
    instructions: str | None = None
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=128)
    store: bool = True
    stream: bool = False
    stream_options: ResponseStreamOptions | None = None
    max_output_tokens: PositiveInt32 | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    text: TextConfigBody | None = None
    tools: list[FunctionToolBody] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = Field(default=None, max_length=256)
    metadata: Annotated[dict[str, str], AfterValidator(_metadata)] | None = None
    include: Annotated[list[str] | None, AfterValidator(_includes)] = None
    reasoning: ReasoningBody | None = None
    # Hints OpenAI documents; nothing here acts on them.
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Built-in tools only, which Marie has none of.
    max_tool_calls: PositiveInt32 | None = None
    top_logprobs: Annotated[
        int | None, Field(ge=0, le=0, description="Log probabilities are not supported yet.")
    ] = None
    background: Annotated[bool | None, AfterValidator(lambda b: _not_true(b, "background"))] = None
    conversation: Annotated[
        Any, _refused("conversations are not supported by Marie: use previous_response_id")
    ] = None
    prompt: Annotated[Any, _refused("prompt templates are not supported by Marie")] = None

    @field_validator("tool_choice")
    @classmethod
    def _named_tool_exists(cls, choice: Any, info: ValidationInfo) -> Any:
        if isinstance(choice, NamedFunctionChoice):
            names = {t.name for t in info.data.get("tools") or ()}
            if choice.name not in names:
                raise ValueError("tool_choice names a function that is not in tools")
        return choice


def _not_true(value: bool | None, what: str) -> bool | None:
    if value:
        raise ValueError(f"{what} responses are not supported by Marie")
    return value
