"""The gateway's ext_authz endpoint, as Envoy calls it before forwarding a gRPC
call: `<method> /_authz/<package.Service>/<Method>` with the caller's key
headers. Real services, no Envoy (deploy/README.md describes the manual check
through Envoy itself)."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from google.rpc import code_pb2
from marie.providers.v1 import provider_service_pb2
from marie_gateway.ops.grpc_authz import METHOD_SCOPES
from marie_kit.apikeys import generate_key

from tests.envoy import error_info, refusal_status
from tests.stack import Stack

LIST_MODELS = "/marie.providers.v1.ProviderService/ListModels"
CHAT = "/marie.providers.v1.ProviderService/StreamChatCompletion"
CREATE_KEY = "/marie.auth.v1.AuthService/CreateApiKey"
SEARCH_MEMORIES = "/marie.memory.v1.MemoryService/SearchMemories"


def check(stack: Stack, method: str, key: str | None = None, **headers: str) -> httpx.Response:
    """Ask as Envoy does: the call's method (POST for gRPC), the prefixed path."""
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    return httpx.post(f"{stack.base_url}/_authz{method}", headers=headers)


def create(stack: Stack, name: str, *extra: str) -> dict[str, Any]:
    """A new key's JSON record (`key`, `id`, `owner`, …)."""
    done = stack.marie("keys", "create", "--name", name, "--json", *extra)
    assert done.returncode == 0, done.stderr
    record: dict[str, Any] = orjson.loads(done.stdout)
    return record


def error_of(response: httpx.Response) -> dict[str, Any]:
    """A refusal as Envoy passes it to the gRPC client: the body (its
    grpc-message) and the rich status, which must agree with it."""
    status = refusal_status(response)
    assert status.message == response.text != ""
    info = error_info(status)
    assert info.domain == "marie"
    return {"message": status.message, "code": status.code, "reason": info.reason}


def test_key_with_the_scope_is_allowed_with_its_identity_for_the_upstream(stack: Stack) -> None:
    record = create(stack, "authz-reader", "--scope", "models:read", "--owner", "team-a")
    r = check(stack, LIST_MODELS, record["key"])
    assert r.status_code == 200
    assert r.headers["x-marie-key-id"] == record["id"]
    assert r.headers["x-marie-owner"] == "team-a"


def test_key_in_x_api_key_header_is_accepted(stack: Stack) -> None:
    key = stack.create_key("authz-x-api-key", "--scope", "models:read")
    assert check(stack, LIST_MODELS, **{"x-api-key": key}).status_code == 200


def test_missing_key_is_401_with_openai_envelope(stack: Stack) -> None:
    r = check(stack, LIST_MODELS)
    assert r.status_code == 401
    error = error_of(r)
    assert (error["code"], error["reason"]) == (code_pb2.UNAUTHENTICATED, "INVALID_API_KEY")
    assert "x-marie-key-id" not in r.headers


def test_malformed_key_is_401(stack: Stack) -> None:
    r = check(stack, LIST_MODELS, "mk-not-a-key")
    assert r.status_code == 401
    assert error_of(r)["reason"] == "INVALID_API_KEY"


def test_unknown_well_formed_key_is_401(stack: Stack) -> None:
    r = check(stack, LIST_MODELS, generate_key())
    assert r.status_code == 401
    assert error_of(r)["reason"] == "INVALID_API_KEY"


def test_key_without_the_methods_scope_is_403(stack: Stack) -> None:
    key = stack.create_key("authz-chat-only", "--scope", "chat")
    r = check(stack, LIST_MODELS, key)
    assert r.status_code == 403
    error = error_of(r)
    assert (error["code"], error["reason"]) == (code_pb2.PERMISSION_DENIED, "PERMISSION_DENIED")
    assert "models:read" in error["message"]


def test_chat_needs_the_chat_scope(stack: Stack) -> None:
    reader = stack.create_key("authz-chat-reader", "--scope", "models:read")
    chatter = stack.create_key("authz-chatter", "--scope", "chat")
    assert check(stack, CHAT, reader).status_code == 403
    assert check(stack, CHAT, chatter).status_code == 200


def test_auth_service_method_with_non_admin_key_is_403(stack: Stack) -> None:
    key = stack.create_key("authz-default")  # every scope but admin
    r = check(stack, CREATE_KEY, key)
    assert r.status_code == 403
    assert "admin" in error_of(r)["message"]


def test_auth_service_method_with_admin_key_is_allowed(stack: Stack) -> None:
    key = stack.create_key("authz-admin", "--scope", "admin")
    assert check(stack, CREATE_KEY, key).status_code == 200


def test_memory_service_methods_need_the_memory_scope(stack: Stack) -> None:
    chatter = stack.create_key("authz-no-memory", "--scope", "chat")
    rememberer = stack.create_key("authz-memory", "--scope", "memory")
    assert check(stack, SEARCH_MEMORIES, chatter).status_code == 403
    assert check(stack, SEARCH_MEMORIES, rememberer).status_code == 200


def test_the_answer_binds_a_keys_tenant_except_for_admin_keys(stack: Stack) -> None:
    owned = create(stack, "authz-tenant-owned", "--scope", "memory", "--owner", "équipe b")
    ownerless = create(stack, "authz-tenant-ownerless", "--scope", "memory")
    admin = create(stack, "authz-tenant-admin", "--scope", "admin", "--owner", "ops")
    # The owner, percent-encoded as gRPC metadata must be printable ASCII.
    answer = check(stack, SEARCH_MEMORIES, owned["key"])
    assert answer.headers["x-marie-tenant"] == "%C3%A9quipe%20b"
    # No owner: the key id is the tenant, as for the REST routes.
    assert (
        check(stack, SEARCH_MEMORIES, ownerless["key"]).headers["x-marie-tenant"]
        == (ownerless["id"])
    )
    # An admin key may name any tenant: nothing binds it.
    answer = check(stack, SEARCH_MEMORIES, admin["key"])
    assert answer.status_code == 200 and "x-marie-tenant" not in answer.headers


@pytest.mark.parametrize(
    "method",
    [
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/marie.providers.v1.ProviderService/NoSuchMethod",
        "/marie.auth.v1.NoSuchService/CreateApiKey",
    ],
)
def test_unknown_method_is_403_even_for_an_admin_key(stack: Stack, method: str) -> None:
    key = stack.create_key("authz-admin-unknown", "--scope", "admin")
    r = check(stack, method, key)
    assert r.status_code == 403
    assert error_of(r)["reason"] == "PERMISSION_DENIED"


def test_revoked_key_is_401_at_once(stack: Stack) -> None:
    record = create(stack, "authz-revoked", "--scope", "models:read")
    # Twice: the second answer comes from the gateway's validation cache.
    assert check(stack, LIST_MODELS, record["key"]).status_code == 200
    assert check(stack, LIST_MODELS, record["key"]).status_code == 200
    assert stack.marie("keys", "revoke", record["id"]).returncode == 0
    r = check(stack, LIST_MODELS, record["key"])
    assert r.status_code == 401
    assert error_of(r)["reason"] == "INVALID_API_KEY"


@pytest.mark.parametrize("http_method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_check_answers_whatever_method_envoy_forwards(stack: Stack, http_method: str) -> None:
    key = stack.create_key("authz-any-method", "--scope", "models:read")
    r = httpx.request(
        http_method,
        f"{stack.base_url}/_authz{LIST_MODELS}",
        headers={"authorization": f"Bearer {key}"},
    )
    assert r.status_code == 200
    assert r.headers["x-marie-key-id"]


def test_non_ascii_owner_is_percent_encoded_for_grpc_metadata(stack: Stack) -> None:
    key = stack.create_key("authz-owner", "--scope", "models:read", "--owner", "Zoë 100%")
    r = check(stack, LIST_MODELS, key)
    assert r.status_code == 200
    assert r.headers["x-marie-owner"] == "Zo%C3%AB%20100%25"


def test_every_provider_service_rpc_has_a_scope() -> None:
    """A new RPC in the contract is refused through Envoy until it is given a
    scope in marie_gateway.grpc_authz.METHOD_SCOPES."""
    service = provider_service_pb2.DESCRIPTOR.services_by_name["ProviderService"]
    methods = {f"/{service.full_name}/{m.name}" for m in service.methods}
    assert methods - METHOD_SCOPES.keys() == set()
