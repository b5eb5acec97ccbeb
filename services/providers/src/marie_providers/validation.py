"""Request checks every provider relies on; each failure is INVALID_ARGUMENT naming its field.

What only one upstream cannot take (Ollama and image links) is checked where
that upstream's request is built.
"""

from __future__ import annotations

from marie.providers.v1 import provider_service_pb2 as pb

from marie_providers.errors import bad_request
from marie_providers.upstream.structs import parse_json_object

MAX_STOP_SEQUENCES = 4
MAX_EMBEDDING_INPUTS = 2048
# OpenAI's bounds: chat reports up to 20 alternatives a token, text completions 5.
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
DEFAULT_SEARCH_LIMIT = 50
MAX_SEARCH_LIMIT = 500

KNOWN_ROLES = frozenset(pb.Role.values()) - {pb.ROLE_UNSPECIFIED}


# Hub ids with a provider prefix and a routing suffix stay far below this; a
# longer "model" is a mistake, and echoing it in errors would overflow gRPC's
# metadata limit.
MAX_MODEL_LENGTH = 512


def _require_model(model: str) -> None:
    if not model.strip():
        raise bad_request("model", "model is required")
    if len(model) > MAX_MODEL_LENGTH:
        raise bad_request("model", f"model must be at most {MAX_MODEL_LENGTH} characters")


def _check_range(sampling: pb.SamplingParameters, field: str, low: float, high: float) -> None:
    if sampling.HasField(field):
        value = getattr(sampling, field)
        # Written so NaN fails too: every comparison with NaN is false.
        if not low <= value <= high:
            raise bad_request(f"sampling.{field}", f"{field} must be between {low:g} and {high:g}")


def _check_sampling(sampling: pb.SamplingParameters) -> None:
    _check_range(sampling, "temperature", 0, 2)
    _check_range(sampling, "top_p", 0, 1)
    _check_range(sampling, "presence_penalty", -2, 2)
    _check_range(sampling, "frequency_penalty", -2, 2)
    if sampling.HasField("top_k") and sampling.top_k < 1:
        raise bad_request("sampling.top_k", "top_k must be at least 1")
    if sampling.HasField("max_tokens") and sampling.max_tokens < 1:
        raise bad_request("sampling.max_tokens", "max_tokens must be at least 1")
    if len(sampling.stop) > MAX_STOP_SEQUENCES:
        raise bad_request("sampling.stop", f"at most {MAX_STOP_SEQUENCES} stop sequences")
    for index, stop in enumerate(sampling.stop):
        if not stop:
            raise bad_request(f"sampling.stop[{index}]", "stop sequences must not be empty")


def _check_messages(messages: list[pb.ChatMessage]) -> None:
    if not messages:
        raise bad_request("messages", "at least one message is required")
    for index, message in enumerate(messages):
        if message.role not in KNOWN_ROLES:
            raise bad_request(f"messages[{index}].role", "role is required")
        if message.role == pb.ROLE_TOOL and not message.tool_call_id:
            raise bad_request(
                f"messages[{index}].tool_call_id", "a tool message needs the id of its call"
            )
        for position, call in enumerate(message.tool_calls):
            if not call.function.name:
                raise bad_request(
                    f"messages[{index}].tool_calls[{position}].function.name",
                    "a tool call needs a function name",
                )


def _check_tools(request: pb.StreamChatCompletionRequest) -> None:
    names = set()
    for index, tool in enumerate(request.tools):
        if tool.type not in ("", "function"):
            raise bad_request(f"tools[{index}].type", "only function tools are supported")
        if not tool.function.name:
            raise bad_request(f"tools[{index}].function.name", "a tool needs a function name")
        text = tool.function.parameters_json
        if text and parse_json_object(text) is None:
            raise bad_request(
                f"tools[{index}].function.parameters_json", "parameters must be a JSON object"
            )
        names.add(tool.function.name)
    mode = request.tool_choice.mode
    if mode in (pb.TOOL_CHOICE_MODE_REQUIRED, pb.TOOL_CHOICE_MODE_FUNCTION) and not names:
        raise bad_request("tool_choice", "tool_choice requires tools")
    if mode == pb.TOOL_CHOICE_MODE_FUNCTION and request.tool_choice.function_name not in names:
        raise bad_request(
            "tool_choice.function_name", "tool_choice names a function that is not among tools"
        )


def check_chat_request(request: pb.StreamChatCompletionRequest) -> None:
    """Reject a chat request no provider could serve."""
    _require_model(request.model)
    _check_messages(list(request.messages))
    _check_sampling(request.sampling)
    _check_tools(request)
    _check_extras(request.upstream_extras)
    if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
        raise bad_request("top_logprobs", f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
    if request.top_logprobs and not request.logprobs:
        raise bad_request("top_logprobs", "top_logprobs needs logprobs")
    response_format = request.response_format
    if response_format.json_schema_json:
        if not parse_json_object(response_format.json_schema_json):
            raise bad_request(
                "response_format.json_schema_json", "the schema must be a non-empty JSON object"
            )
    elif response_format.type == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA and not (
        response_format.HasField("json_schema") and response_format.json_schema.fields
    ):
        raise bad_request("response_format.json_schema", "a json_schema response needs a schema")


def _check_extras(extras: pb.UpstreamExtras) -> None:
    """The shape of `upstream_extras`; what each kind takes is its translator's check."""
    if not extras.kind:
        if extras.request_json or extras.headers or extras.fields:
            raise bad_request("upstream_extras.kind", "upstream_extras needs the upstream kind")
        return
    if extras.request_json and parse_json_object(extras.request_json) is None:
        raise bad_request("upstream_extras.request_json", "must be a JSON object")


def check_completion_request(request: pb.StreamCompletionRequest) -> None:
    """Reject a text completion request no provider could serve."""
    _require_model(request.model)
    if not request.prompt:
        raise bad_request("prompt", "prompt is required")
    _check_sampling(request.sampling)
    if request.HasField("logprobs") and not 0 <= request.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise bad_request("logprobs", f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}")


def check_embeddings_request(request: pb.CreateEmbeddingsRequest) -> None:
    """Reject an embeddings request no provider could serve."""
    _require_model(request.model)
    if request.inputs and request.token_inputs:
        raise bad_request("token_inputs", "give inputs or token_inputs, not both")
    field = "token_inputs" if request.token_inputs else "inputs"
    count = len(request.token_inputs) or len(request.inputs)
    if not count:
        raise bad_request("inputs", "at least one input is required")
    if count > MAX_EMBEDDING_INPUTS:
        raise bad_request(field, f"at most {MAX_EMBEDDING_INPUTS} inputs")
    for index, text in enumerate(request.inputs):
        if not text:
            raise bad_request(f"inputs[{index}]", "inputs must not be empty")
    for index, tokens in enumerate(request.token_inputs):
        if not tokens.ids:
            raise bad_request(f"token_inputs[{index}]", "token inputs must not be empty")
        if min(tokens.ids) < 0:
            raise bad_request(f"token_inputs[{index}]", "token ids must not be negative")
    if request.dimensions < 0:
        raise bad_request("dimensions", "dimensions must not be negative")
    if request.input_type not in pb.EmbeddingInputType.values():
        raise bad_request("input_type", "input_type is unspecified, query or document")


def check_get_model_request(request: pb.GetModelRequest) -> None:
    """Reject a GetModel request without a model."""
    _require_model(request.model)


def check_search_request(request: pb.SearchModelsRequest) -> int:
    """Reject a search without a query; return the result limit to use.

    0 means the default; more than the maximum is capped rather than refused (AIP-158).
    """
    if not request.query.strip():
        raise bad_request("query", "query is required")
    if request.limit < 0:
        raise bad_request("limit", "limit must not be negative")
    return min(request.limit or DEFAULT_SEARCH_LIMIT, MAX_SEARCH_LIMIT)
