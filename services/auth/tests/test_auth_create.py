"""CreateApiKey and GetApiKey: the plaintext is shown once; settings are checked."""

from __future__ import annotations

import grpc
import pytest
from auth_testkit import AuthStub, CreateKey, rpc_error
from google.protobuf.timestamp_pb2 import Timestamp
from marie.auth.v1 import auth_service_pb2 as pb
from marie_kit.apikeys import display_form, is_well_formed


async def test_create_returns_a_well_formed_key_and_its_metadata(create: CreateKey) -> None:
    created = await create(name="ci-bot", owner="team-a", scopes=["chat"])

    assert is_well_formed(created.key)
    assert created.api_key.id.startswith("key_")
    assert created.api_key.name == "ci-bot"
    assert created.api_key.owner == "team-a"
    assert list(created.api_key.scopes) == ["chat"]
    assert created.api_key.display == display_form(created.key)
    assert created.api_key.state == pb.API_KEY_STATE_ACTIVE
    assert created.api_key.HasField("create_time")
    assert not created.api_key.HasField("expire_time")


async def test_create_issues_a_different_key_every_time(create: CreateKey) -> None:
    first, second = await create(), await create()

    assert first.key != second.key
    assert first.api_key.id != second.api_key.id


async def test_get_and_list_never_return_the_plaintext(create: CreateKey, stub: AuthStub) -> None:
    created = await create()

    got = await stub.GetApiKey(pb.GetApiKeyRequest(id=created.api_key.id))
    listed = await stub.ListApiKeys(pb.ListApiKeysRequest())

    assert got.api_key == created.api_key
    assert [k.id for k in listed.api_keys] == [created.api_key.id]
    for response in (got, listed):
        assert created.key.encode() not in response.SerializeToString()
        assert created.key[3:].encode() not in response.SerializeToString()


async def test_get_of_an_unknown_id_is_key_not_found(stub: AuthStub) -> None:
    error = await rpc_error(stub.GetApiKey(pb.GetApiKeyRequest(id="key_NOPE")))

    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "KEY_NOT_FOUND"
    assert error.domain == "marie.auth"


async def test_scopes_are_deduplicated_in_a_stable_order(create: CreateKey) -> None:
    created = await create(scopes=["memory", "chat", "memory"])

    assert list(created.api_key.scopes) == ["chat", "memory"]


def _past() -> Timestamp:
    return Timestamp(seconds=1)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "two\nlines"}, "name"),
        ({"scopes": ["chat", "sudo"]}, "scopes"),
        ({"allowed_models": ["ollama/*/latest"]}, "allowed_models"),
        ({"allowed_models": [""]}, "allowed_models"),
        # Patterns that could never match a model id "provider/model".
        ({"allowed_models": ["llama3.2"]}, "allowed_models"),
        ({"allowed_models": ["ollama/llama*"]}, "allowed_models"),
        ({"allowed_models": ["*"]}, "allowed_models"),
        ({"allowed_models": ["ollama/"]}, "allowed_models"),
        ({"allowed_models": ["/llama3.2"]}, "allowed_models"),
        # Values a caller sends are echoed in the error: they must not make
        # it too large for gRPC's trailers (it would arrive as RESOURCE_EXHAUSTED).
        ({"allowed_models": ["ollama/" + "a" * 5000]}, "allowed_models"),
        ({"scopes": ["x" * 5000]}, "scopes"),
        # The allowed models travel as metadata with every call the key makes.
        ({"allowed_models": [f"ollama/m{i}-" + "a" * 200 for i in range(12)]}, "allowed_models"),
        # So does the owner (percent-encoded UTF-8).
        ({"owner": "\U0001f600" * 100}, "owner"),
        ({"limits": pb.KeyLimits(requests_per_minute=-1)}, "limits.requests_per_minute"),
        ({"limits": pb.KeyLimits(tokens_per_day=-5)}, "limits.tokens_per_day"),
        (
            {"limits": pb.KeyLimits(max_concurrent_requests=-1)},
            "limits.max_concurrent_requests",
        ),
        ({"expire_time": _past()}, "expire_time"),
        ({"labels": {"has space": "v"}}, "labels"),
    ],
)
async def test_bad_settings_are_invalid_argument_naming_the_field(
    stub: AuthStub, fields: dict[str, object], field: str
) -> None:
    request = pb.CreateApiKeyRequest(name="ok")
    for name, value in fields.items():
        if isinstance(value, (pb.KeyLimits, Timestamp)):
            getattr(request, name).CopyFrom(value)
        elif isinstance(value, dict):
            getattr(request, name).update(value)
        elif isinstance(value, list):
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)

    error = await rpc_error(stub.CreateApiKey(request))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_ARGUMENT"
    assert error.domain == "marie.auth"
    assert error.metadata == {"field": field}


async def test_model_ids_and_trailing_star_patterns_are_accepted(create: CreateKey) -> None:
    created = await create(allowed_models=["ollama/llama3.2:latest", "openai/*", "hf/a/b:groq"])

    assert list(created.api_key.allowed_models) == [
        "ollama/llama3.2:latest",
        "openai/*",
        "hf/a/b:groq",
    ]


async def test_get_of_a_very_long_id_is_key_not_found_with_the_id_clipped(stub: AuthStub) -> None:
    error = await rpc_error(stub.GetApiKey(pb.GetApiKeyRequest(id="k" * 5000)))

    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "KEY_NOT_FOUND")
    assert len(error.message) < 600


async def test_the_longest_accepted_settings_fit_in_call_metadata(create: CreateKey) -> None:
    created = await create(
        owner="é" * 170,
        allowed_models=[f"ollama/model-{i}-" + "a" * 200 for i in range(9)],
    )

    assert len(created.api_key.allowed_models) == 9
