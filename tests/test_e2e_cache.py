"""The response cache through the running suite (`marie up`: gateway, auth,
providers with its SQLite cache, memory) against the fake Ollama, which
records every upstream request: what a client asks of the cache with
`Cache-Control` or `metadata.cache`, what `x-marie-cache` says, which tenant
sees which answer, and how hits show in the usage ledger."""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson
import pytest

from tests.fakes import FakeModel, FakeOllama
from tests.stack import Stack

CACHED = FakeModel(
    name="cached:latest",
    reply="Paris is the capital.",
    chunk_delay=0.005,
    prompt_eval_count=10,
    eval_count=20,
)
MODEL = "ollama/cached:latest"
ASK_CACHE = {"Cache-Control": "max-age=600"}


@pytest.fixture(scope="module", autouse=True)
def cached_model(ollama: FakeOllama) -> None:
    ollama.add_model(CACHED)


def post(
    stack: Stack, key: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}{path}",
        headers={"Authorization": f"Bearer {key}", **(headers or {})},
        json=body,
        timeout=30,
    )


def chat_body(question: str, **more: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": question}], **more}


def upstream_chats(ollama: FakeOllama, question: str) -> int:
    return sum(
        1
        for r in ollama.chat_requests
        if r.body is not None and r.body["messages"][-1]["content"] == question
    )


def settle() -> None:
    """The answer is stored in the background, just after it is sent."""
    time.sleep(0.3)


def sse_data(response: httpx.Response) -> list[Any]:
    out: list[Any] = []
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(orjson.loads(line[6:]))
    return out


def test_a_chat_asked_with_max_age_is_answered_from_the_cache_the_second_time(
    stack: Stack, ollama: FakeOllama
) -> None:
    key = stack.create_key("cache-chat", "--owner", "team-cache-1")
    body = chat_body("capital of France, once?")

    first = post(stack, key, "/v1/chat/completions", body, ASK_CACHE)
    settle()
    second = post(stack, key, "/v1/chat/completions", body, ASK_CACHE)

    assert (first.status_code, second.status_code) == (200, 200)
    assert first.headers["x-marie-cache"] == "miss"
    assert second.headers["x-marie-cache"] == "hit"
    a, b = first.json(), second.json()
    assert b["choices"] == a["choices"]
    assert (
        b["usage"]
        == a["usage"]
        == {
            "prompt_tokens": 10,
            "completion_tokens": 20,
            "total_tokens": 30,
        }
    )
    # A hit is a new completion: its own id and creation time.
    assert b["id"] != a["id"] and b["id"].startswith("chatcmpl-")
    assert b["created"] >= a["created"]
    assert upstream_chats(ollama, "capital of France, once?") == 1


def test_a_hit_replays_as_a_stream(stack: Stack, ollama: FakeOllama) -> None:
    key = stack.create_key("cache-stream", "--owner", "team-cache-2")
    body = chat_body("stream me twice", stream=True, stream_options={"include_usage": True})

    first = post(stack, key, "/v1/chat/completions", body, ASK_CACHE)
    settle()
    second = post(stack, key, "/v1/chat/completions", body, ASK_CACHE)

    assert first.headers["x-marie-cache"] == "miss"
    assert second.headers["x-marie-cache"] == "hit"
    assert second.headers["content-type"].startswith("text/event-stream")
    assert second.text.rstrip().endswith("data: [DONE]")
    text = [
        "".join(e["choices"][0]["delta"].get("content") or "" for e in sse_data(r) if e["choices"])
        for r in (first, second)
    ]
    assert text[1] == text[0] == "Paris is the capital."
    usage = [e["usage"] for e in sse_data(second) if e.get("usage")]
    assert usage == [{"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}]
    assert upstream_chats(ollama, "stream me twice") == 1


def test_metadata_cache_asks_as_the_header_does(stack: Stack, ollama: FakeOllama) -> None:
    key = stack.create_key("cache-metadata", "--owner", "team-cache-3")
    body = chat_body("asked in the body", metadata={"cache": "max-age=300"})

    post(stack, key, "/v1/chat/completions", body)
    settle()
    again = post(stack, key, "/v1/chat/completions", body)

    assert again.headers["x-marie-cache"] == "hit"
    assert upstream_chats(ollama, "asked in the body") == 1


def test_chat_not_asked_about_is_not_cached(stack: Stack, ollama: FakeOllama) -> None:
    key = stack.create_key("cache-unasked", "--owner", "team-cache-4")
    body = chat_body("never cached")
    for _ in range(2):
        answer = post(stack, key, "/v1/chat/completions", body)
        settle()
        assert "x-marie-cache" not in answer.headers
    assert upstream_chats(ollama, "never cached") == 2


def test_two_owners_asking_the_same_never_share_an_answer(stack: Stack, ollama: FakeOllama) -> None:
    mine = stack.create_key("cache-owner-a", "--owner", "team-cache-a")
    theirs = stack.create_key("cache-owner-b", "--owner", "team-cache-b")
    body = chat_body("the same question from two tenants")

    post(stack, mine, "/v1/chat/completions", body, ASK_CACHE)
    settle()
    other = post(stack, theirs, "/v1/chat/completions", body, ASK_CACHE)

    assert other.headers["x-marie-cache"] == "miss"
    assert upstream_chats(ollama, "the same question from two tenants") == 2
    # Two keys of one owner do share it.
    sibling = stack.create_key("cache-owner-a2", "--owner", "team-cache-a")
    assert (
        post(stack, sibling, "/v1/chat/completions", body, ASK_CACHE).headers["x-marie-cache"]
        == "hit"
    )


def test_no_cache_revalidates_and_no_store_leaves_the_cache_alone(
    stack: Stack, ollama: FakeOllama
) -> None:
    key = stack.create_key("cache-directives", "--owner", "team-cache-5")
    body = chat_body("directives")
    post(stack, key, "/v1/chat/completions", body, ASK_CACHE)
    settle()

    refreshed = post(stack, key, "/v1/chat/completions", body, {"Cache-Control": "no-cache"})
    bypassed = post(stack, key, "/v1/chat/completions", body, {"Cache-Control": "no-store"})
    settle()
    hit = post(stack, key, "/v1/chat/completions", body, ASK_CACHE)

    assert refreshed.headers["x-marie-cache"] == "miss"
    assert "x-marie-cache" not in bypassed.headers
    assert hit.headers["x-marie-cache"] == "hit"
    assert upstream_chats(ollama, "directives") == 3


@pytest.mark.parametrize(
    ("headers", "body_extra", "param"),
    [
        ({"Cache-Control": "max-age=soon"}, {}, "Cache-Control"),
        ({"Cache-Control": "max-age"}, {}, "Cache-Control"),
        ({}, {"metadata": {"cache": "whenever"}}, "metadata.cache"),
        ({}, {"metadata": {"cache": "max-age=-5"}}, "metadata.cache"),
    ],
)
def test_a_malformed_cache_request_is_a_400_naming_it(
    stack: Stack, api_key: str, headers: dict[str, str], body_extra: dict[str, Any], param: str
) -> None:
    answer = post(stack, api_key, "/v1/chat/completions", chat_body("bad", **body_extra), headers)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_directives_marie_does_not_use_are_ignored(stack: Stack, api_key: str) -> None:
    answer = post(
        stack,
        api_key,
        "/v1/chat/completions",
        chat_body("ignored directives"),
        {"Cache-Control": "private, no-transform"},
    )
    assert answer.status_code == 200
    assert "x-marie-cache" not in answer.headers


def test_embeddings_are_cached_by_default_unless_no_store(stack: Stack, ollama: FakeOllama) -> None:
    key = stack.create_key("cache-embed", "--owner", "team-cache-6")
    body = {"model": "ollama/llama3.2:latest", "input": ["cache these words"]}

    def upstream() -> int:
        return sum(
            1
            for r in ollama.embed_requests
            if r.body is not None and r.body.get("input") == ["cache these words"]
        )

    first = post(stack, key, "/v1/embeddings", body)
    settle()
    second = post(stack, key, "/v1/embeddings", body)
    bypass = post(stack, key, "/v1/embeddings", body, {"Cache-Control": "no-store"})

    assert (first.headers["x-marie-cache"], second.headers["x-marie-cache"]) == ("miss", "hit")
    assert second.json()["data"] == first.json()["data"]
    assert second.json()["usage"] == first.json()["usage"]
    assert "x-marie-cache" not in bypass.headers
    assert upstream() == 2


def test_legacy_completions_are_cached_when_asked(stack: Stack, ollama: FakeOllama) -> None:
    key = stack.create_key("cache-legacy", "--owner", "team-cache-7")
    body = {"model": MODEL, "prompt": "legacy prompt to cache", "max_tokens": 5}
    first = post(stack, key, "/v1/completions", body, ASK_CACHE)
    settle()
    second = post(stack, key, "/v1/completions", body, ASK_CACHE)
    assert (first.headers["x-marie-cache"], second.headers["x-marie-cache"]) == ("miss", "hit")
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["id"] != first.json()["id"]


def test_anthropic_messages_are_cached_when_asked(stack: Stack, ollama: FakeOllama) -> None:
    key = stack.create_key("cache-anthropic", "--owner", "team-cache-8")
    body = {
        "model": MODEL,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "anthropic cached"}],
        "metadata": {"cache": "max-age=120"},
    }
    headers = {"anthropic-version": "2023-06-01"}
    first = post(stack, key, "/v1/messages", body, headers)
    settle()
    second = post(stack, key, "/v1/messages", body, headers)
    streamed = post(stack, key, "/v1/messages", {**body, "stream": True}, headers)

    assert (first.status_code, second.status_code) == (200, 200), second.text
    assert (first.headers["x-marie-cache"], second.headers["x-marie-cache"]) == ("miss", "hit")
    assert second.json()["content"] == first.json()["content"]
    assert second.json()["usage"] == first.json()["usage"]
    assert second.json()["id"] != first.json()["id"]
    assert streamed.headers["x-marie-cache"] == "hit"
    assert "event: message_stop" in streamed.text
    assert upstream_chats(ollama, "anthropic cached") == 1


@pytest.mark.parametrize("value", ["whenever", "", "private, no-store", "max-age=soon"])
def test_anthropic_metadata_cache_takes_only_what_the_document_says(
    stack: Stack, api_key: str, value: str
) -> None:
    """The OpenAPI document's pattern for `metadata.cache` is what is taken:
    anything else is Anthropic's 400 naming the field (schemathesis checks the
    other way: every value the pattern allows is accepted)."""
    body = {
        "model": MODEL,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "bad cache value"}],
        "metadata": {"cache": value},
    }
    answer = post(stack, api_key, "/v1/messages", body, {"anthropic-version": "2023-06-01"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "metadata.cache" in error["message"]


def test_a_hit_is_a_cached_usage_row_with_no_tokens(stack: Stack) -> None:
    key = stack.create_key("cache-ledger", "--owner", "team-cache-9")
    body = chat_body("ledger of a hit")
    post(stack, key, "/v1/chat/completions", body, ASK_CACHE)
    settle()
    post(stack, key, "/v1/chat/completions", body, ASK_CACHE)

    deadline = time.monotonic() + 10
    while True:
        report = httpx.get(
            f"{stack.base_url}/api/usage", headers={"Authorization": f"Bearer {key}"}, timeout=10
        ).json()
        if report["total"]["requests"] >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    total = report["total"]
    assert (total["requests"], total["cached_requests"]) == (2, 1)
    # Only the call that reached the model spent tokens.
    assert (total["prompt_tokens"], total["completion_tokens"]) == (10, 20)
