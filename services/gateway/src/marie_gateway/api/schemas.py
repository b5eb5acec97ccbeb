"""The bodies of Marie's own `/api`: the answers, built through these models so
that the OpenAPI document (generated from them) describes exactly what is
sent, and the comparison's request."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from marie_gateway.http.errors import ErrorDetail
from marie_gateway.openai.schemas import ChatParameters, ModelId

Capability = Literal["chat", "completion", "embeddings", "tools", "vision"]
HealthStatus = Literal["healthy", "degraded", "unhealthy", "error", "unknown"]
CircuitState = Literal["closed", "open", "half_open", "unknown"]
Operation = Literal["chat", "completions", "embeddings", "unknown"]


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


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


class DeploymentState(_Out):
    """The routing state of one operation of one model."""

    model: str = Field(description="'<provider>/<model>'.")
    operation: Operation = Field(description="Each operation has a circuit breaker of its own.")
    circuit: CircuitState = Field(
        description="closed: requests flow; open: refused until `retry_at`; half_open: one"
        " user's request probes it (background work waits)."
    )
    retry_at: str | None = Field(
        description="When an open circuit lets a probe through (RFC 3339, UTC); null unless open."
    )
    consecutive_failures: int
    in_flight: int = Field(description="Users' requests being served by this model now.")
    max_concurrency: int = Field(description="Most users' requests at once; 0: no limit.")
    background_in_flight: int = Field(
        description="Background calls (memory extraction, message embeddings) being served."
    )
    max_background_concurrency: int


class ProviderHealthInfo(_Out):
    status: HealthStatus = Field(
        description="degraded: the provider answers its probe, but requests to one of its"
        " models are refused (a circuit breaker is open; see `deployments`)."
    )
    available: bool
    models_count: int
    supports_streaming: bool
    supports_embeddings: bool
    default_model: str | None
    latency_ms: float | None
    error: str | None
    deployments: list[DeploymentState] = Field(
        default_factory=list,
        description="Each operation asked of each of its models since the service started.",
    )


class ProvidersHealth(RootModel[dict[str, ProviderHealthInfo]]):
    """`GET /api/models/providers/health`: provider name → its health."""


# -- comparison -------------------------------------------------------------------


#: How many models one comparison may run at once.
MAX_COMPARE_MODELS = 8


class CompareRequest(ChatParameters):
    """`POST /api/compare`: one prompt, run on several models at once. A model
    may appear more than once (the same model twice shows sampling variance):
    each arm's events carry its position, `index`."""

    models: list[ModelId] = Field(min_length=2, max_length=MAX_COMPARE_MODELS)


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


# -- usage ------------------------------------------------------------------------


class UsageTotals(_Out):
    group: str | None = Field(
        description="The UTC day (YYYY-MM-DD), model id, key id or owner; null for the "
        "overall totals."
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
    cached_requests: int = Field(
        description="Requests answered from the response cache (in `requests` too; no"
        " upstream call, no tokens counted)."
    )
    cached_prompt_tokens: int = Field(
        description="Of prompt_tokens, those the upstream read from its prompt cache."
    )
    cost: str = Field(
        description="What the requests cost, in the report's currency, as exact decimal text "
        '(e.g. "0.0315"; "0" for none): the sum of the ledger rows\' costs, each computed '
        "when its request ended from the price of its model as resolved.",
        examples=["0.0315"],
    )
    unpriced_requests: int = Field(
        description="Requests whose model had no price in MARIE_CONFIG `prices` (they cost 0)."
    )


class UsageReport(_Out):
    """`GET /api/usage`: totals over [from, to)."""

    object: Literal["usage"]
    start: str = Field(serialization_alias="from", description="ISO 8601, inclusive.")
    end: str = Field(serialization_alias="to", description="ISO 8601, exclusive.")
    group_by: Literal["day", "model", "key", "owner"] | None
    currency: Literal["USD"] = Field(description="The currency of every cost.")
    key_id: str | None = Field(description="Only this key's usage; null for every key.")
    owner: str | None = Field(description="Only this owner's keys; null for every owner.")
    total: UsageTotals
    groups: list[UsageTotals] = Field(description="One entry per group, in order.")


# -- budgets -------------------------------------------------------------------------


class BudgetOut(_Out):
    """A key's or an owner's spend limits, and what it spent (from the usage ledger)."""

    object: Literal["budget"]
    key_id: str | None = Field(description="The key, for a key's budget.")
    owner: str | None = Field(description="The owner, for an owner's budget (all its keys).")
    currency: Literal["USD"]
    daily_usd: str | None = Field(description="Most spent per UTC day; null: no limit.")
    monthly_usd: str | None = Field(description="Most spent per UTC month; null: no limit.")
    spent_today_usd: str = Field(description="Spent this UTC day, exact decimal text.")
    spent_this_month_usd: str = Field(description="Spent this UTC month, exact decimal text.")
    updated_at: str | None = Field(description="When the limits last changed (ISO 8601).")


class BudgetList(_Out):
    object: Literal["list"]
    data: list[BudgetOut] = Field(description="Keys' budgets, then owners', each by id.")
    next_page_token: str | None = Field(description="Pass as page_token for the next page.")


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


# -- conversations and memories ---------------------------------------------------


class ConversationOut(_Out):
    id: str
    object: Literal["conversation"]
    title: str
    provider: str
    model: str
    message_count: int
    metadata: dict[str, str]
    created_at: int
    updated_at: int


class ConversationList(_Out):
    object: Literal["list"]
    data: list[ConversationOut]
    next_page_token: str


class ConversationDeleted(_Out):
    id: str
    object: Literal["conversation.deleted"]
    deleted: bool
    deleted_messages: int


class ToolCallOut(_Out):
    id: str
    type: Literal["function"]
    function: dict[str, str]


class MessageOut(_Out):
    id: str
    object: Literal["conversation.message"]
    conversation_id: str
    position: int
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    provider: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    #: `latency_ms`, `finish_reason`, `request_id`; `partial` = "true" for an
    #: answer cut short by the client leaving.
    metadata: dict[str, str]
    created_at: int
    name: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    tool_call_id: str | None = None


class MessageList(_Out):
    object: Literal["list"]
    data: list[MessageOut]
    next_page_token: str


class MessageHitOut(MessageOut):
    conversation_title: str
    score: float
    #: The best fragment, `<mark>`-highlighted and otherwise HTML-escaped.
    snippet: str
    snippets: list[str]


class MessageSearchResults(_Out):
    object: Literal["list"]
    data: list[MessageHitOut]
    next_page_token: str
    mode: Literal["hybrid", "vector", "keyword"]
    mode_note: str


class MemoryOut(_Out):
    id: str
    object: Literal["memory"]
    text: str
    categories: list[str]
    metadata: dict[str, str]
    source_conversation_id: str
    source_message_ids: list[str]
    hash: str
    created_at: int
    updated_at: int


class MemoryList(_Out):
    object: Literal["list"]
    data: list[MemoryOut]
    next_page_token: str


class MemoryChangeOut(MemoryOut):
    event: Literal["ADD", "UPDATE", "DELETE", "NONE"]
    previous_text: str


class MemoriesAdded(_Out):
    object: Literal["list"]
    data: list[MemoryChangeOut]
    extraction_model: str
    #: Set when `background` queued the extraction instead of running it.
    job_id: str


class ExtractionJobOut(_Out):
    """A background extraction (`POST /api/memories` with `background`)."""

    id: str
    object: Literal["memory.extraction_job"]
    #: queued: waiting for its turn, or for the model or the store to come back
    #: (retried by time, never dropped before the age limit); succeeded: `data`
    #: holds its changes; failed: `failure_reason` says why.
    status: Literal["queued", "succeeded", "failed"]
    attempts: int
    last_error: str
    failure_reason: str | None
    created_at: int
    next_attempt_at: int | None
    finished_at: int | None
    data: list[MemoryChangeOut]


class ScoredMemoryOut(MemoryOut):
    score: float


class MemorySearchResults(_Out):
    object: Literal["list"]
    data: list[ScoredMemoryOut]
    mode: Literal["hybrid", "vector", "keyword"]
    mode_note: str


class MemoryDeleted(_Out):
    id: str
    object: Literal["memory.deleted"]
    deleted: bool


class MemoriesErased(_Out):
    object: Literal["memory.deleted"]
    deleted: int


class HistoryEntryOut(_Out):
    id: str
    memory_id: str
    event: Literal["ADD", "UPDATE", "DELETE"]
    old_text: str
    new_text: str
    actor: str
    inferred: bool
    created_at: int


class HistoryList(_Out):
    object: Literal["list"]
    data: list[HistoryEntryOut]
    next_page_token: str
