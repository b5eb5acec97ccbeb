"""A full store seen through the gateway (issue 20, item 11): writes answer
507 with Retry-After in the OpenAI envelope instead of a 500, and `/readyz`
says so. The stores are real SQLite files capped by MARIE_*_DB_MAX_BYTES,
which fail with SQLite's own SQLITE_FULL, as a full disk does."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.fakes import FakeOllama
from tests.stack import Stack, start_stack

ADMIN = "admin-secret-of-the-storage-tests"


@pytest.fixture(scope="module")
def small(ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(
        tmp_path_factory.mktemp("small"),
        ollama.base_url,
        MARIE_MEMORY_DB_MAX_BYTES=str(2 * 1024 * 1024),
        MARIE_AUTH_DB_MAX_BYTES=str(1024 * 1024),
        MARIE_ADMIN_KEY=ADMIN,
    )
    yield running
    running.stop()


def _refused(response: httpx.Response) -> None:
    assert response.status_code == 507, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "insufficient_storage"
    assert error["type"] == "server_error"
    assert "sqlite" not in error["message"].lower()
    assert response.headers["retry-after"] == "30"


def test_a_full_memory_store_is_507_and_reported_by_readyz(small: Stack) -> None:
    key = small.create_key("writer")
    headers = {"authorization": f"Bearer {key}"}
    for round_ in range(20):
        # Memories are kept once per text: every one is new.
        body = {
            "messages": [
                {"role": "user", "content": f"{round_}-{i} " + "x" * 8000} for i in range(100)
            ],
            "infer": False,
        }
        response = httpx.post(
            f"{small.base_url}/api/memories", json=body, headers=headers, timeout=60
        )
        if response.status_code != 200:
            break
    _refused(response)
    ready = httpx.get(f"{small.base_url}/readyz", timeout=10)
    # Chats go on without memory: the gateway stays in its load balancer.
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "degraded",
        "checks": {"providers": True, "auth": True, "memory": False},
    }


def test_a_full_auth_store_is_507_and_the_gateway_not_ready(small: Stack) -> None:
    headers = {"authorization": f"Bearer {ADMIN}"}
    labels = {f"label-{i}": "v" * 256 for i in range(64)}
    for i in range(200):
        response = httpx.post(
            f"{small.base_url}/api/keys",
            json={"name": f"k{i}", "labels": labels},
            headers=headers,
            timeout=30,
        )
        if response.status_code != 200:
            break
    _refused(response)
    ready = httpx.get(f"{small.base_url}/readyz", timeout=10)
    assert ready.status_code == 503
    assert ready.json()["checks"]["auth"] is False
