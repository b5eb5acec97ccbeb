"""The admin API (`/api/keys`, scope `admin`) over auth's key RPCs, the
`MARIE_ADMIN_KEY` principal, and the new `marie keys` commands."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fakes import FakeOllama
from tests.stack import Stack, start_stack

ADMIN_SECRET = "bootstrap-admin-secret-for-tests-0123456789"


@pytest.fixture(scope="module")
def admin_stack(ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(
        Path(tmp_path_factory.mktemp("admin")), ollama.base_url, MARIE_ADMIN_KEY=ADMIN_SECRET
    )
    yield running
    running.stop()


def call(
    stack: Stack, method: str, path: str, key: str | None = ADMIN_SECRET, body: Any = None
) -> httpx.Response:
    return httpx.request(
        method,
        f"{stack.base_url}{path}",
        headers={"Authorization": f"Bearer {key}"} if key else {},
        json=body,
        timeout=30,
    )


def chat(stack: Stack, key: str) -> httpx.Response:
    return call(
        stack,
        "POST",
        "/v1/chat/completions",
        key,
        {"model": "ollama/llama3.2:latest", "messages": [{"role": "user", "content": "hi"}]},
    )


def test_the_key_lifecycle_through_the_admin_api(admin_stack: Stack) -> None:
    created = call(
        admin_stack,
        "POST",
        "/api/keys",
        body={
            "name": "svc",
            "owner": "team-admin",
            "scopes": ["chat"],
            "limits": {"requests_per_minute": 100, "max_concurrent_requests": 3},
            "labels": {"env": "test"},
        },
    )
    assert created.status_code == 200, created.text
    data = created.json()
    secret = data["key"]
    key = data["api_key"]
    assert key["object"] == "api_key" and key["state"] == "active"
    assert key["limits"] == {
        "requests_per_minute": 100,
        "tokens_per_minute": 0,
        "tokens_per_day": 0,
        "max_concurrent_requests": 3,
    }
    assert key["display"].endswith(secret[-4:])
    assert chat(admin_stack, secret).status_code == 200

    got = call(admin_stack, "GET", f"/api/keys/{key['id']}")
    assert got.status_code == 200
    assert "key" not in got.json() and secret not in got.text
    assert got.json()["owner"] == "team-admin"

    listed = call(admin_stack, "GET", "/api/keys?owner=team-admin").json()
    assert [k["id"] for k in listed["data"]] == [key["id"]]
    assert secret not in orjson.dumps(listed).decode()

    patched = call(
        admin_stack,
        "PATCH",
        f"/api/keys/{key['id']}",
        body={"name": "svc-2", "limits": {"requests_per_minute": 5}},
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["name"] == "svc-2"
    assert patched.json()["limits"]["requests_per_minute"] == 5
    assert patched.json()["scopes"] == ["chat"]  # untouched

    rotated = call(admin_stack, "POST", f"/api/keys/{key['id']}/rotate", body={})
    assert rotated.status_code == 200
    new_secret = rotated.json()["key"]
    assert rotated.json()["previous_id"] == key["id"]
    assert new_secret != secret
    assert chat(admin_stack, new_secret).status_code == 200
    assert chat(admin_stack, secret).status_code == 401

    new_id = rotated.json()["api_key"]["id"]
    revoked = call(admin_stack, "DELETE", f"/api/keys/{new_id}")
    assert revoked.status_code == 200
    assert revoked.json()["state"] == "revoked"
    assert chat(admin_stack, new_secret).status_code == 401


def test_rotation_with_a_grace_period_keeps_the_old_secret_for_a_while(
    admin_stack: Stack,
) -> None:
    created = call(admin_stack, "POST", "/api/keys", body={"name": "graceful"}).json()
    rotated = call(
        admin_stack,
        "POST",
        f"/api/keys/{created['api_key']['id']}/rotate",
        body={"grace_period_seconds": 3600},
    ).json()
    assert chat(admin_stack, created["key"]).status_code == 200
    assert chat(admin_stack, rotated["key"]).status_code == 200
    old = call(admin_stack, "GET", f"/api/keys/{created['api_key']['id']}").json()
    assert old["expires_at"] is not None


def test_admin_routes_are_refused_without_the_admin_scope(admin_stack: Stack) -> None:
    plain = admin_stack.create_key("not-admin")
    for method, path in [
        ("POST", "/api/keys"),
        ("GET", "/api/keys"),
        ("GET", "/api/keys/key_x"),
        ("PATCH", "/api/keys/key_x"),
        ("DELETE", "/api/keys/key_x"),
        ("POST", "/api/keys/key_x/rotate"),
    ]:
        r = call(admin_stack, method, path, plain, body={"name": "x"})
        assert r.status_code == 403, (method, path)
        assert r.json()["error"]["code"] == "permission_denied"
        assert call(admin_stack, method, path, None, body={}).status_code == 401


def test_a_key_created_with_the_admin_scope_is_an_admin(admin_stack: Stack) -> None:
    admin = admin_stack.create_key("local-admin", "--scope", "admin")
    assert call(admin_stack, "GET", "/api/keys", admin).status_code == 200


def test_bad_admin_requests_name_the_field(admin_stack: Stack) -> None:
    r = call(admin_stack, "POST", "/api/keys", body={"name": "x", "scopes": ["root"]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "scopes"
    r = call(admin_stack, "POST", "/api/keys", body={"owner": "nobody"})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "name")
    r = call(admin_stack, "POST", "/api/keys", body={"name": "x", "limits": {"tokens_per_day": -1}})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "limits.tokens_per_day")
    r = call(admin_stack, "GET", "/api/keys/key_nope")
    assert r.status_code == 404
    r = call(admin_stack, "PATCH", "/api/keys/key_nope", body={})
    assert r.status_code == 400


def test_the_admin_key_is_never_logged_and_wrong_admin_keys_fail(admin_stack: Stack) -> None:
    assert call(admin_stack, "GET", "/api/keys", ADMIN_SECRET + "x").status_code == 401
    assert ADMIN_SECRET not in admin_stack.log()


def test_marie_keys_rotate_update_and_usage(admin_stack: Stack) -> None:
    done = admin_stack.marie("keys", "create", "--name", "cli-key", "--json")
    created = orjson.loads(done.stdout)
    updated = admin_stack.marie(
        "keys", "update", created["id"], "--name", "cli-key-2", "--rpm", "7", "--json"
    )
    assert updated.returncode == 0, updated.stderr
    data = orjson.loads(updated.stdout)
    assert data["name"] == "cli-key-2" and data["limits"]["requests_per_minute"] == 7

    assert chat(admin_stack, created["key"]).status_code == 200
    rotated = admin_stack.marie("keys", "rotate", created["id"], "--json")
    assert rotated.returncode == 0, rotated.stderr
    new = orjson.loads(rotated.stdout)
    assert new["previous_id"] == created["id"] and new["key"].startswith("mk-")
    assert chat(admin_stack, created["key"]).status_code == 401
    assert chat(admin_stack, new["key"]).status_code == 200

    for _ in range(50):
        usage = admin_stack.marie("keys", "usage", "--key", created["id"], "--json")
        assert usage.returncode == 0, usage.stderr
        if orjson.loads(usage.stdout)["total"]["requests"] == 1:
            break
    assert orjson.loads(usage.stdout)["total"]["requests"] == 1

    missing = admin_stack.marie("keys", "update", "key_nope", "--name", "x")
    assert missing.returncode == 1 and "KEY_NOT_FOUND" in missing.stderr
