"""What an adversarial run of the suite found (issue 10), kept fixed: bad input
that must be a client error, authorization before any work, and request ids
that cannot break the call. Slow and broken clients are in
test_e2e_slow_clients.py."""

from __future__ import annotations

import json
import time
import typing
from typing import Any

import httpx
import orjson
import pytest
from marie_gateway.api import schemas as api_schemas
from marie_gateway.openai import schemas as openai_schemas
from marie_gateway.openai.responses import schemas as responses_schemas
from pydantic import BaseModel

from tests.conftest import SLOW_START
from tests.fakes import FakeOllama
from tests.stack import Stack

MODEL = "ollama/llama3.2:latest"
HELLO = [{"role": "user", "content": "hi"}]


def post(stack: Stack, key: str, path: str, body: Any, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}{path}",
        # The standard encoder: some bodies hold integers beyond 64 bits.
        content=json.dumps(body),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json", **headers},
        timeout=30,
    )


def chat(stack: Stack, key: str, **fields: Any) -> httpx.Response:
    return post(stack, key, "/v1/chat/completions", {"model": MODEL, "messages": HELLO, **fields})


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.text
    error: dict[str, Any] = response.json()["error"]
    return error


# -- integers beyond their protobuf field, wrong JSON types -------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 2**31),
        ("max_completion_tokens", 2**31),
        ("top_k", 2**31),
        ("seed", 2**63),
        ("seed", -(2**63) - 1),
        ("max_tokens", 0),
    ],
)
def test_integers_beyond_their_field_are_400_naming_it(
    stack: Stack, api_key: str, field: str, value: int
) -> None:
    response = chat(stack, api_key, **{field: value})
    assert response.status_code == 400
    assert error_of(response)["param"] == field


def test_embedding_dimensions_beyond_int32_are_400(stack: Stack, api_key: str) -> None:
    response = post(
        stack,
        api_key,
        "/v1/embeddings",
        {"model": "ollama/nomic-embed-text:latest", "input": "x", "dimensions": 2**31},
    )
    assert response.status_code == 400
    assert error_of(response)["param"] == "dimensions"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stream", "yes"),
        ("max_tokens", "10"),
        ("max_tokens", "2147483648"),
        ("temperature", "1.5"),
        ("top_k", 10.5),
        ("seed", "1"),
        ("user", 7),
        ("stream_options", {"include_usage": "true"}),
    ],
)
def test_wrong_json_types_are_400_not_converted(
    stack: Stack, api_key: str, field: str, value: Any
) -> None:
    response = chat(stack, api_key, **{field: value})
    assert response.status_code == 400, response.text
    assert error_of(response)["param"].startswith(field)


def test_whole_numbers_are_accepted_where_numbers_are_expected(
    stack: Stack, api_key: str, ollama: FakeOllama
) -> None:
    response = chat(stack, api_key, temperature=1, top_p=1)
    assert response.status_code == 200, response.text
    assert ollama.chat_requests[-1].body["options"]["temperature"] == 1


def _int_fields(model: type[BaseModel], seen: set[type[BaseModel]]) -> list[str]:
    """`Model.field` for every int-typed field of `model` and the models it holds
    that has no upper bound."""
    if model in seen:
        return []
    seen.add(model)
    out = []
    for name, info in model.model_fields.items():
        for arg, metadata in _leaf_types(info.annotation, tuple(info.metadata)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                out += _int_fields(arg, seen)
            elif arg is int and not any(_upper_bound(m) is not None for m in metadata):
                out.append(f"{model.__name__}.{name}")
    return out


def _upper_bound(constraint: Any) -> Any:
    if getattr(constraint, "le", None) is not None:
        return constraint.le
    for inner in getattr(constraint, "metadata", ()):  # a FieldInfo inside Annotated
        if getattr(inner, "le", None) is not None:
            return inner.le
    return None


def _leaf_types(annotation: Any, metadata: tuple[Any, ...]) -> list[tuple[Any, tuple[Any, ...]]]:
    """Every type inside `annotation` (unions, lists, Annotated) with its constraints."""
    args = typing.get_args(annotation)
    if not args:
        return [(annotation, metadata)]
    if typing.get_origin(annotation) is typing.Annotated:
        return _leaf_types(args[0], metadata + tuple(args[1:]))
    return [leaf for arg in args for leaf in _leaf_types(arg, metadata)]


def test_every_integer_of_every_request_model_is_bounded() -> None:
    """A new integer field must say its protobuf range, or a large value gives 500."""
    # The request bodies of the OpenAI surface, the Responses API and comparison.
    models = [
        m
        for module in (openai_schemas, responses_schemas, api_schemas)
        for m in vars(module).values()
        if isinstance(m, type)
        and issubclass(m, openai_schemas._Body)
        and m.__module__ == module.__name__
    ]
    assert openai_schemas.ChatCompletionRequest in models
    assert responses_schemas.ResponsesRequest in models
    assert api_schemas.CompareRequest in models
    unbounded: list[str] = []
    seen: set[type[BaseModel]] = set()
    for model in models:
        unbounded += _int_fields(model, seen)
    assert unbounded == []


# -- free-form JSON (schemas) passes through unchanged ------------------------

SCHEMA_TEXT = (
    b'{"type":"object","properties":{"zeta":{"type":"integer","maximum":1e20},'
    b'"alpha":{"type":"integer","minimum":-100000000000000000000000},'
    b'"mid":{"type":"number","multipleOf":0.1}},"required":["zeta","alpha"]}'
)


def _raw_chat(stack: Stack, key: str, extra: bytes) -> httpx.Response:
    body = b'{"model":"' + MODEL.encode() + b'","messages":[{"role":"user","content":"x"}],'
    return httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        content=body + extra + b"}",
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        timeout=30,
    )


def test_a_json_schema_reaches_ollama_unchanged(
    stack: Stack, api_key: str, ollama: FakeOllama
) -> None:
    extra = b'"response_format":{"type":"json_schema","json_schema":{"name":"s","schema":'
    response = _raw_chat(stack, api_key, extra + SCHEMA_TEXT + b"}}")
    assert response.status_code == 200, response.text
    sent = json.loads(ollama.chat_requests[-1].raw_body)["format"]
    # Same keys in the same order (a constrained model generates in that
    # order), the same numbers, beyond 64 bits included.
    assert json.dumps(sent) == json.dumps(json.loads(SCHEMA_TEXT))


def test_tool_parameters_reach_ollama_unchanged(
    stack: Stack, api_key: str, ollama: FakeOllama
) -> None:
    extra = b'"tools":[{"type":"function","function":{"name":"f","parameters":'
    response = _raw_chat(stack, api_key, extra + SCHEMA_TEXT + b"}}]")
    assert response.status_code == 200, response.text
    tool = ollama.chat_requests[-1].body["tools"][0]["function"]
    assert list(tool["parameters"]["properties"]) == ["zeta", "alpha", "mid"]
    assert tool["parameters"]["properties"]["zeta"]["maximum"] == 1e20
    assert tool["parameters"]["properties"]["alpha"]["minimum"] == -(10**23)


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        (b'{"type":"object","maximum":1e400}', "finite"),
        (b'{"a":' * 70 + b"1" + b"}" * 70, "deeper"),
    ],
)
def test_schemas_that_cannot_travel_are_400(
    stack: Stack, api_key: str, schema: bytes, says: str
) -> None:
    extra = b'"tools":[{"type":"function","function":{"name":"f","parameters":'
    response = _raw_chat(stack, api_key, extra + schema + b"}}]")
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == "tools[0].function.parameters"
    assert says in error["message"]


# -- request ids ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/chat/completions", {"model": MODEL, "messages": HELLO}),
        ("GET", "/v1/models", None),
        ("POST", "/v1/embeddings", {"model": "ollama/nomic-embed-text:latest", "input": "x"}),
        ("GET", "/readyz", None),
        ("GET", "/nowhere", None),
    ],
)
def test_a_request_id_that_cannot_be_metadata_is_replaced(
    stack: Stack, api_key: str, method: str, path: str, body: Any
) -> None:
    response = httpx.request(
        method,
        f"{stack.base_url}{path}",
        content=orjson.dumps(body) if body is not None else None,
        headers=[
            (b"authorization", f"Bearer {api_key}".encode()),
            (b"x-request-id", "café".encode()),
        ],
        timeout=30,
    )
    assert response.status_code < 500, response.text
    rid = response.headers["x-request-id"]
    assert rid != "café" and rid.isascii() and len(rid) == 24


def test_a_usable_request_id_is_kept(stack: Stack, api_key: str) -> None:
    response = httpx.get(
        f"{stack.base_url}/v1/models",
        headers={"authorization": f"Bearer {api_key}", "x-request-id": "req-42:a/b"},
    )
    assert response.headers["x-request-id"] == "req-42:a/b"


# -- authorization before any work ---------------------------------------------


def test_a_restricted_key_is_refused_before_a_slow_upstream_generates(
    stack: Stack, ollama: FakeOllama
) -> None:
    key = stack.create_key("only-qwen", "--model", "ollama/qwen2.5:0.5b")
    before = len(ollama.chat_requests), len(ollama.embed_requests)
    started = time.monotonic()
    # A bare name of a model outside the key's allowance, whose upstream takes
    # 30 s to its first token: the answer must not wait for it.
    response = post(stack, key, "/v1/chat/completions", {"model": "slowstart", "messages": HELLO})
    assert response.status_code == 403
    assert time.monotonic() - started < SLOW_START.first_byte_delay
    embed = post(stack, key, "/v1/embeddings", {"model": "nomic-embed-text", "input": "x"})
    assert embed.status_code == 403
    # Nothing reached the upstream for either.
    assert (len(ollama.chat_requests), len(ollama.embed_requests)) == before


@pytest.mark.parametrize(
    "model",
    ["ollama/gemma3:1b", "ollama/does-not-exist:1b", "gemma3:1b", "does-not-exist", "nope/x"],
)
def test_a_restricted_key_cannot_tell_missing_models_from_forbidden_ones(
    stack: Stack, model: str
) -> None:
    key = stack.create_key("only-qwen2", "--model", "ollama/qwen2.5:0.5b")
    response = post(stack, key, "/v1/chat/completions", {"model": model, "messages": HELLO})
    # The same status and code whether the model exists or not.
    assert response.status_code in (403, 404), response.text
    if model != "nope/x":
        assert response.status_code == 403
        assert error_of(response)["code"] == "permission_denied"


def test_allowed_models_match_the_way_ollama_names_models(stack: Stack) -> None:
    key = stack.create_key("untagged", "--model", "ollama/llama3.2")
    for model in ("ollama/llama3.2", "ollama/llama3.2:latest", "llama3.2", "llama3.2:latest"):
        response = post(stack, key, "/v1/chat/completions", {"model": model, "messages": HELLO})
        assert response.status_code == 200, (model, response.text)
    listed = httpx.get(f"{stack.base_url}/v1/models", headers={"authorization": f"Bearer {key}"})
    assert [m["id"] for m in listed.json()["data"]] == [MODEL]
    forbidden = post(
        stack, key, "/v1/chat/completions", {"model": "qwen2.5:0.5b", "messages": HELLO}
    )
    assert forbidden.status_code == 403


@pytest.mark.parametrize("pattern", ["llama3.2", "ollama/llama*", "*", "ollama/"])
def test_marie_keys_refuses_patterns_that_can_never_match(stack: Stack, pattern: str) -> None:
    done = stack.marie("keys", "create", "--name", "bad", "--model", pattern)
    assert done.returncode != 0
    assert "provider/model" in done.stderr
