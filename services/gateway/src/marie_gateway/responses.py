"""Pydantic models of what the gateway answers.

Marie's own `/api` answers are built through these models, so the OpenAPI
document (generated from them) describes exactly what is sent. The OpenAI
`/v1` answers are built as plain dicts on the hot path; their models here
describe them, and the tests check live answers against the document.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

Capability = Literal["chat", "completion", "embeddings", "tools", "vision"]
HealthStatus = Literal["healthy", "unhealthy", "error", "unknown"]


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


# -- errors -------------------------------------------------------------------


class ErrorDetail(_Out):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, …")
    param: str | None = Field(description="The request field at fault, when one is.")
    code: str | None = Field(description="A stable machine-readable code.")


class ErrorEnvelope(_Out):
    """Every error, on every route: OpenAI's envelope."""

    error: ErrorDetail


# -- Marie's model API ----------------------------------------------------------


class MarieModel(_Out):
    """A model as Marie's own API shows it (the original design's ModelInfo)."""

    id: str = Field(description="The provider's own name, e.g. 'llama3.2:latest'.")
    name: str = Field(description="Display name.")
    provider: str
    full_id: str = Field(description="What /v1 takes: 'ollama/llama3.2:latest'.")
    description: str | None = None
    parameters: str | None = Field(default=None, description="Parameter count, e.g. '3.2B'.")
    quantization: str | None = Field(default=None, description="e.g. 'Q4_K_M'.")
    size: str | None = Field(default=None, description="Human size, e.g. '2.0GB'.")
    size_bytes: int | None = None
    context_length: int | None = None
    max_tokens: int | None = None
    capabilities: list[Capability]
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Provider-specific details (family, format, …)."
    )


class ProviderListingError(_Out):
    provider: str
    reason: str
    message: str


class ModelsByProvider(_Out):
    """`GET /api/models`."""

    models: dict[str, list[MarieModel]]
    total: int
    errors: list[ProviderListingError] = Field(
        default_factory=list,
        description="Providers whose listing failed; their models are left out.",
    )


class ProviderModels(_Out):
    """`GET /api/models/{provider}`."""

    provider: str
    models: list[MarieModel]
    total: int


class ModelSearchResults(_Out):
    """`GET /api/models/search`."""

    query: str
    models: list[MarieModel]
    total: int


class ProviderSummary(_Out):
    name: str
    type: str
    available: bool
    supports_streaming: bool
    supports_embeddings: bool
    default_model: str | None
    models_count: int


class ProvidersList(_Out):
    """`GET /api/models/providers`."""

    providers: list[ProviderSummary]


class ProviderHealthInfo(_Out):
    status: HealthStatus
    available: bool
    models_count: int
    supports_streaming: bool
    supports_embeddings: bool
    default_model: str | None
    latency_ms: float | None
    error: str | None


class ProvidersHealth(RootModel[dict[str, ProviderHealthInfo]]):
    """`GET /api/models/providers/health`: provider name → its health."""


# -- comparison -------------------------------------------------------------------


class CompareLatency(_Out):
    first_token_ms: float | None
    total_ms: float


class CompareUsage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompareEvent(_Out):
    """One `data:` event of `POST /api/compare`; the stream ends with `data: [DONE]`."""

    type: Literal["delta", "done", "error"]
    index: int = Field(description="Position of the model in the request's `models`.")
    model: str = Field(description="The model as the request named it.")
    resolved_model: str | None = Field(default=None, description="The model id that answered.")
    delta: dict[str, Any] | None = Field(
        default=None, description="type delta: an OpenAI chunk delta (role, content, tool_calls)."
    )
    finish_reason: str | None = None
    usage: CompareUsage | None = None
    latency: CompareLatency | None = None
    error: ErrorDetail | None = None


# -- the OpenAI surface (described; built as dicts on the hot path) ------------------


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


# -- the Responses API (described; built as dicts) ------------------------------


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


class Health(_Out):
    status: str
    checks: dict[str, bool] | None = None


# -- usage ------------------------------------------------------------------------


class UsageTotals(_Out):
    group: str | None = Field(
        description="The UTC day (YYYY-MM-DD), model id or key id; null for the overall totals."
    )
    requests: int = Field(description="Requests (a comparison counts once per model).")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    errors: int = Field(
        description="Answers with status 400 or above, and streams that ended with an error."
    )
    latency_p50_ms: float = Field(description="Median latency, admission to the end of the answer.")
    latency_p95_ms: float


class UsageReport(_Out):
    """`GET /api/usage`: totals over [from, to)."""

    object: Literal["usage"]
    start: str = Field(serialization_alias="from", description="ISO 8601, inclusive.")
    end: str = Field(serialization_alias="to", description="ISO 8601, exclusive.")
    group_by: Literal["day", "model", "key"] | None
    key_id: str | None = Field(description="Only this key's usage; null for every key.")
    owner: str | None = Field(description="Only this owner's keys; null for every owner.")
    total: UsageTotals
    groups: list[UsageTotals] = Field(description="One entry per group, in order.")


# -- keys (admin) -------------------------------------------------------------------


class KeyLimitsOut(_Out):
    requests_per_minute: int
    tokens_per_minute: int
    tokens_per_day: int
    max_concurrent_requests: int


class ApiKeyOut(_Out):
    """A key's metadata; never its secret."""

    object: Literal["api_key"]
    id: str
    name: str
    owner: str
    display: str = Field(description="Prefix and last four characters, e.g. 'mk-…a1b2'.")
    state: Literal["active", "revoked", "expired"]
    scopes: list[str] = Field(description="Empty: every scope but admin.")
    allowed_models: list[str] = Field(description="Empty: every model.")
    limits: KeyLimitsOut = Field(description="0 means no limit.")
    labels: dict[str, str]
    created_at: str | None
    updated_at: str | None
    expires_at: str | None
    revoked_at: str | None
    last_used_at: str | None = Field(description="Coarse (about a minute).")


class CreatedApiKey(_Out):
    """A new key (create, rotate): the plaintext is shown this once."""

    key: str = Field(description="The plaintext key; store it now.")
    api_key: ApiKeyOut
    previous_id: str | None = Field(
        default=None, description="Rotate: the replaced key, revoked now or after the grace."
    )


class ApiKeyList(_Out):
    object: Literal["list"]
    data: list[ApiKeyOut] = Field(description="Newest first.")
    next_page_token: str | None = Field(description="Pass as page_token for the next page.")
