"""The bodies of OpenAI's Responses API: the requests `POST /v1/responses`
accepts (input items and parts, function tools, text formats), and the
response objects and stream events it answers with (described; built as dicts
by `items.py`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from marie_gateway.openai.schemas import (
    FUNCTION_NAME_PATTERN,
    JsonObject,
    ModelId,
    NoLogprobs,
    PositiveInt32,
    _Body,
)

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


#: The schema of a field Marie refuses: absent or null.
_ABSENT = WithJsonSchema(
    {"type": "null", "description": "Not supported by Marie: a set value is a 400."}
)


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


def _required_url(schema: dict[str, Any]) -> None:
    """The image's URL as `_url_present` takes it: a string, no default."""
    schema.pop("anyOf", None)
    schema.pop("default", None)
    schema.update({"type": "string", "minLength": 1})


class InputImagePart(_Body):
    model_config = ConfigDict(json_schema_extra={"required": ["type", "image_url"]})

    type: Literal["input_image"]
    # Required (`_url_present`): the schema says so.
    image_url: str | None = Field(default=None, min_length=1, json_schema_extra=_required_url)
    detail: Literal["auto", "low", "high"] | None = None
    file_id: Annotated[
        str | None, _refused("file ids are; send the image as image_url is"), _ABSENT
    ] = None

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

    type: Annotated[
        str, AfterValidator(_function_tool_type), WithJsonSchema({"enum": ["function"]})
    ]
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None


class NamedFunctionChoice(_Body):
    type: Literal["function"]
    name: str = Field(min_length=1)


class TextFormatBody(_Body):
    # `_schema_present` as JSON Schema.
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"type": {"const": "json_schema"}}},
            "then": {
                "required": ["name", "schema"],
                "properties": {"name": {"type": "string"}, "schema": {"type": "object"}},
            },
        }
    )

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, min_length=1, max_length=64)
    description: str | None = None
    schema_: JsonObject | None = Field(
        default=None, alias="schema", json_schema_extra={"minProperties": 1}
    )
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> TextFormatBody:
        if self.type == "json_schema" and (self.name is None or not self.schema_):
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
        WithJsonSchema({"enum": ["none", None], "description": "Only none: no model reasons."}),
    ] = None
    summary: Annotated[
        Literal["auto", "concise", "detailed"] | None, AfterValidator(_no_reasoning), _ABSENT
    ] = None
    generate_summary: Annotated[
        Literal["auto", "concise", "detailed"] | None, AfterValidator(_no_reasoning), _ABSENT
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
    # At least one item (checked by the handler, naming `input`).
    input: (
        str
        | Annotated[
            list[InputItem], Field(max_length=MAX_INPUT_ITEMS, json_schema_extra={"minItems": 1})
        ]
    )
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
    include: Annotated[
        list[str] | None,
        AfterValidator(_includes),
        Field(json_schema_extra={"items": {"enum": sorted(HARMLESS_INCLUDES)}}),
    ] = None
    reasoning: ReasoningBody | None = None
    # Hints OpenAI documents; nothing here acts on them.
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Built-in tools only, which Marie has none of.
    max_tool_calls: PositiveInt32 | None = None
    top_logprobs: Annotated[
        NoLogprobs | None, Field(description="Log probabilities are not supported yet.")
    ] = None
    background: Annotated[
        bool | None,
        AfterValidator(lambda b: _not_true(b, "background")),
        WithJsonSchema({"enum": [False, None], "description": "Background responses are refused."}),
    ] = None
    conversation: Annotated[
        Any,
        _refused("conversations are not supported by Marie: use previous_response_id"),
        _ABSENT,
    ] = None
    prompt: Annotated[Any, _refused("prompt templates are not supported by Marie"), _ABSENT] = None

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


# -- answers (described; built as dicts) ------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class OutputText(_Out):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[Any] | None = None


class OutputMessage(_Out):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class FunctionCallOut(_Out):
    id: str
    type: Literal["function_call"]
    status: Literal["in_progress", "completed", "incomplete"]
    call_id: str
    name: str
    arguments: str = Field(description="The arguments as JSON text.")


class ResponseUsage(_Out):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponseError(_Out):
    code: str
    message: str


class IncompleteDetails(_Out):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(_Out):
    """A response (`object: "response"`), as OpenAI shapes it; the request's
    settings are echoed with OpenAI's defaults."""

    model_config = ConfigDict(frozen=True, extra="allow")

    id: str = Field(description="resp_…; for a stored response, its id in the memory service.")
    object: Literal["response"]
    created_at: int
    completed_at: int | None = None
    status: Literal["in_progress", "completed", "incomplete", "failed", "cancelled"]
    model: str
    output: list[OutputMessage | FunctionCallOut]
    usage: ResponseUsage | None
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    previous_response_id: str | None
    store: bool
    parallel_tool_calls: bool
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    metadata: dict[str, str]


class ResponseStreamEvent(_Out):
    """One event of a streamed response: `event: <type>` then a `data:` line
    with this object. In order: response.created, response.in_progress, then
    per output item output_item.added, (content_part.added,
    output_text.delta…, output_text.done, content_part.done) or
    (function_call_arguments.delta…, function_call_arguments.done),
    output_item.done; last response.completed, response.incomplete (cut
    short), or error and response.failed."""

    model_config = ConfigDict(frozen=True, extra="allow")

    type: str
    sequence_number: int


class InputItemList(_Out):
    object: Literal["list"]
    data: list[dict[str, Any]] = Field(description="Input items, each with an id.")
    first_id: str | None
    last_id: str | None
    has_more: bool


class ResponseDeleted(_Out):
    id: str
    object: Literal["response.deleted"]
    deleted: Literal[True]
