"""The usage ledger through the running suite: every finished chat,
embeddings and compare request is recorded off the response path, and
`GET /api/usage` totals it for the caller's key, or any key with `admin`,
also after the suite restarts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes import FakeModel, FakeOllama
from tests.stack import Stack, start_stack

# Every chat answer of these models costs exactly 10 + 20 tokens.
COUNTED = FakeModel(name="counted:latest", reply="one two", prompt_eval_count=10, eval_count=20)
TWIN = FakeModel(name="twin:latest", reply="three", prompt_eval_count=10, eval_count=20)
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module", autouse=True)
def counted_models(ollama: FakeOllama) -> None:
    ollama.add_model(COUNTED)
    ollama.add_model(TWIN)


def post(stack: Stack, key: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}{path}",
        headers={"Authorization": f"Bearer {key}"},
        json=body,
        timeout=30,
    )


def usage(stack: Stack, key: str, **params: str) -> httpx.Response:
    return httpx.get(
        f"{stack.base_url}/api/usage",
        headers={"Authorization": f"Bearer {key}"},
        params=params,
        timeout=10,
    )


def usage_when(stack: Stack, key: str, requests: int, **params: str) -> dict[str, Any]:
    """The usage report once it counts `requests` (records arrive within ~1 s)."""
    deadline = time.monotonic() + 10
    while True:
        r = usage(stack, key, **params)
        assert r.status_code == 200, r.text
        report: dict[str, Any] = r.json()
        if report["total"]["requests"] >= requests or time.monotonic() > deadline:
            return report
        time.sleep(0.1)


def make_traffic(stack: Stack, key: str) -> None:
    """Six ledger records: chat, stream, embeddings, an upstream failure, a
    two-model comparison."""
    assert (
        post(
            stack,
            key,
            "/v1/chat/completions",
            {"model": "ollama/counted:latest", "messages": HELLO},
        ).status_code
        == 200
    )
    streamed = post(
        stack,
        key,
        "/v1/chat/completions",
        {"model": "ollama/counted:latest", "messages": HELLO, "stream": True},
    )
    assert streamed.status_code == 200
    emb = post(
        stack, key, "/v1/embeddings", {"model": "ollama/llama3.2:latest", "input": "one two three"}
    )
    assert emb.status_code == 200
    failed = post(
        stack, key, "/v1/chat/completions", {"model": "ollama/broken:latest", "messages": HELLO}
    )
    assert failed.status_code == 502
    compared = post(
        stack,
        key,
        "/api/compare",
        {"models": ["ollama/counted:latest", "ollama/twin:latest"], "messages": HELLO},
    )
    assert compared.status_code == 200


def test_usage_totals_after_a_mix_of_requests(stack: Stack) -> None:
    key = stack.create_key("usage-mix", "--owner", "team-usage")
    make_traffic(stack, key)
    report = usage_when(stack, key, 6, group_by="model")
    total = report["total"]
    assert total["requests"] == 6
    assert total["prompt_tokens"] == 10 + 10 + 3 + 0 + 10 + 10
    assert total["completion_tokens"] == 20 + 20 + 0 + 0 + 20 + 20
    assert total["total_tokens"] == total["prompt_tokens"] + total["completion_tokens"]
    assert total["errors"] == 1
    assert 0 < total["latency_p50_ms"] <= total["latency_p95_ms"]
    assert report["group_by"] == "model"
    assert report["key_id"]
    groups = {g["group"]: g for g in report["groups"]}
    assert groups["ollama/counted:latest"]["requests"] == 3
    assert groups["ollama/twin:latest"]["requests"] == 1
    assert groups["ollama/llama3.2:latest"]["prompt_tokens"] == 3
    assert groups["ollama/broken:latest"]["errors"] == 1

    by_day = usage(stack, key, group_by="day").json()
    assert [g["group"] for g in by_day["groups"]] == [time.strftime("%Y-%m-%d", time.gmtime())]
    # A window that ends before the requests holds none of them.
    before = usage(stack, key, to="2000-01-01", **{"from": "1999-01-01"}).json()
    assert before["total"]["requests"] == 0


def test_a_request_refused_before_any_model_answers_writes_no_usage_row(stack: Stack) -> None:
    key = stack.create_key("usage-refused")
    refused: list[tuple[str, dict[str, Any], int]] = [
        # A bad body, an unknown model, a bad comparison, bad embeddings input.
        ("/v1/chat/completions", {"model": "ollama/counted:latest", "messages": "hi"}, 400),
        ("/v1/chat/completions", {"model": "ollama/nope:latest", "messages": HELLO}, 404),
        ("/v1/completions", {"model": "ollama/counted:latest", "prompt": ""}, 400),
        ("/api/compare", {"models": ["ollama/counted:latest"], "messages": HELLO}, 400),
        ("/v1/embeddings", {"model": "ollama/nope:latest", "input": "x"}, 404),
        ("/v1/responses", {"model": "ollama/counted:latest", "input": []}, 400),
    ]
    for path, body, status in refused:
        assert post(stack, key, path, body).status_code == status, path
    # One answered request after them: once its row is in, every earlier one would be.
    answered = post(
        stack, key, "/v1/chat/completions", {"model": "ollama/counted:latest", "messages": HELLO}
    )
    assert answered.status_code == 200
    report = usage_when(stack, key, 1, group_by="model")
    time.sleep(1.5)  # a flush period more: rows of the refused requests would be in by now
    report = usage(stack, key, group_by="model").json()

    assert report["total"]["requests"] == 1
    assert report["total"]["errors"] == 0
    assert [g["group"] for g in report["groups"]] == ["ollama/counted:latest"]


def test_a_key_sees_only_its_own_usage_and_admin_sees_any(stack: Stack) -> None:
    mine = stack.create_key("usage-mine", "--owner", "team-x")
    other = stack.create_key("usage-other", "--owner", "team-y")
    admin = stack.create_key("usage-admin", "--scope", "admin")
    assert (
        post(
            stack,
            other,
            "/v1/chat/completions",
            {"model": "ollama/counted:latest", "messages": HELLO},
        ).status_code
        == 200
    )
    other_id = usage_when(stack, other, 1)["key_id"]

    assert usage(stack, mine).json()["total"]["requests"] == 0
    refused = usage(stack, mine, key_id=other_id)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "permission_denied"
    assert usage(stack, mine, owner="team-y").status_code == 403

    by_admin = usage(stack, admin, key_id=other_id).json()
    assert by_admin["total"]["requests"] == 1
    by_owner = usage(stack, admin, owner="team-y", group_by="key").json()
    assert [g["group"] for g in by_owner["groups"]] == [other_id]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"group_by": "week"}, "group_by"),
        ({"from": "yesterday"}, "from"),
        ({"from": "2026-12-02", "to": "2026-12-01"}, "to"),
    ],
)
def test_bad_usage_queries_are_400_naming_the_parameter(
    stack: Stack, api_key: str, params: dict[str, str], param: str
) -> None:
    r = usage(stack, api_key, **params)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param


def test_usage_needs_a_key(stack: Stack) -> None:
    assert httpx.get(f"{stack.base_url}/api/usage").status_code == 401


def test_recorded_usage_survives_a_restart(ollama: FakeOllama, tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = start_stack(data, ollama.base_url)
    try:
        key = first.create_key("durable-usage")
        make_traffic(first, key)
        before = usage_when(first, key, 6)["total"]
        assert before["requests"] == 6
    finally:
        assert first.stop() == 0
    second = start_stack(data, ollama.base_url)
    try:
        after = usage(second, key).json()["total"]
    finally:
        second.stop()
    assert after == before


def test_a_conversation_turn_is_limited_and_counted_like_a_chat(stack: Stack) -> None:
    # Two requests a minute: creating the conversation is one (every request
    # counts), the first turn the other.
    key = stack.create_key("turns", "--rpm", "2")
    created = post(
        stack, key, "/api/conversations", {"title": "t", "model": "ollama/counted:latest"}
    )
    assert created.status_code == 201, created.text
    path = f"/api/conversations/{created.json()['id']}/messages"
    first = post(stack, key, path, {"content": "hello", "stream": False})
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "0"
    second = post(stack, key, path, {"content": "again", "stream": False})
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "rate_limit_exceeded"
    # Only the turn reached a model: the ledger has it alone.
    report = usage_when(stack, key, 1, group_by="model")
    assert report["total"]["requests"] == 1
    assert report["total"]["prompt_tokens"] == 10
    assert report["total"]["completion_tokens"] == 20
    assert [g["group"] for g in report["groups"]] == ["ollama/counted:latest"]
