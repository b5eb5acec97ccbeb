"""The HTTP surface's manners (issue 20): every allowed method in `Allow`,
the documentation page locked down like the console, and `user` read from
the query and the body alike."""

from __future__ import annotations

import httpx
import orjson
import pytest

from tests.stack import Stack


def _methods(header: str) -> set[str]:
    return {m.strip() for m in header.split(",")}


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/api/conversations/x", {"GET", "HEAD", "PATCH", "DELETE"}),
        ("PUT", "/api/conversations", {"GET", "HEAD", "POST"}),
        ("PUT", "/api/conversations/x/messages", {"GET", "HEAD", "POST"}),
        ("PUT", "/api/memories/x", {"GET", "HEAD", "PATCH", "DELETE"}),
        ("PUT", "/api/memories", {"GET", "HEAD", "POST", "DELETE"}),
        ("POST", "/v1/responses/x", {"GET", "HEAD", "DELETE"}),
        ("PUT", "/api/keys/x", {"GET", "HEAD", "PATCH", "DELETE"}),
        ("DELETE", "/api/keys", {"GET", "HEAD", "POST"}),
        ("POST", "/api/models/search", {"GET", "HEAD"}),
        # A path named as it is by one route is not an id of another's.
        ("PATCH", "/api/memories/search", {"GET", "HEAD"}),
        ("DELETE", "/api/memories/search", {"GET", "HEAD"}),
    ],
)
def test_405_lists_every_method_the_path_allows(
    stack: Stack, api_key: str, method: str, path: str, allowed: set[str]
) -> None:
    response = httpx.request(
        method, f"{stack.base_url}{path}", headers={"authorization": f"Bearer {api_key}"}
    )

    assert response.status_code == 405
    assert _methods(response.headers["allow"]) == allowed
    assert response.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("path", ["/docs", "/docs/init.js", "/docs/static/swagger-ui-bundle.js"])
def test_the_documentation_page_allows_only_its_own_scripts_and_no_framing(
    stack: Stack, path: str
) -> None:
    response = httpx.get(f"{stack.base_url}{path}")

    assert response.status_code == 200
    policy = {
        directive.split()[0]: directive.split()[1:]
        for directive in response.headers["content-security-policy"].split(";")
    }
    assert policy["script-src"] == ["'self'"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["object-src"] == ["'none'"]
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"


def test_the_documentation_page_has_no_inline_script(stack: Stack) -> None:
    page = httpx.get(f"{stack.base_url}/docs").text

    assert "<script>" not in page
    assert '<script src="/docs/init.js"></script>' in page


def test_the_openapi_document_is_inert(stack: Stack) -> None:
    response = httpx.get(f"{stack.base_url}/openapi.json")

    assert response.headers["content-security-policy"] == (
        "default-src 'none'; frame-ancestors 'none'"
    )
    assert response.headers["x-content-type-options"] == "nosniff"


# -- `user` in the query or the body ------------------------------------------


def _api(stack: Stack, key: str, method: str, path: str, **kwargs: object) -> httpx.Response:
    return httpx.request(
        method,
        f"{stack.base_url}{path}",
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
        **kwargs,  # type: ignore[arg-type]
    )


def test_a_patch_reads_user_from_the_query_too(stack: Stack, api_key: str) -> None:
    made = _api(stack, api_key, "POST", "/api/conversations", json={"user": "alice", "title": "a"})
    conversation = made.json()["id"]

    patched = _api(
        stack,
        api_key,
        "PATCH",
        f"/api/conversations/{conversation}?user=alice",
        json={"title": "b"},
    )

    assert patched.status_code == 200, patched.text
    assert patched.json()["title"] == "b"
    assert (
        _api(stack, api_key, "GET", f"/api/conversations/{conversation}?user=alice").json()["title"]
        == "b"
    )


def test_every_route_with_a_body_reads_user_from_the_query(stack: Stack, api_key: str) -> None:
    made = _api(stack, api_key, "POST", "/api/conversations?user=bea", json={"title": "q"})
    assert made.status_code == 201, made.text
    listed = _api(stack, api_key, "GET", "/api/conversations?user=bea").json()["data"]
    assert [c["id"] for c in listed] == [made.json()["id"]]

    added = _api(
        stack,
        api_key,
        "POST",
        "/api/memories?user=bea",
        json={"messages": [{"role": "user", "content": "I like tea"}], "infer": False},
    )
    assert added.status_code == 200, added.text
    memory = added.json()["data"][0]["id"]
    patched = _api(stack, api_key, "PATCH", f"/api/memories/{memory}?user=bea", json={"text": "x"})
    assert patched.status_code == 200, patched.text
    assert _api(stack, api_key, "GET", f"/api/memories/{memory}?user=bea").json()["text"] == "x"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/conversations", {"title": "t"}),
        ("PATCH", "/api/conversations/conv_x", {"title": "t"}),
        ("POST", "/api/conversations/conv_x/messages", {"content": "hi"}),
        (
            "POST",
            "/api/memories",
            {"messages": [{"role": "user", "content": "hi"}], "infer": False},
        ),
        ("PATCH", "/api/memories/mem_x", {"text": "t"}),
    ],
)
def test_user_in_the_query_and_the_body_must_agree(
    stack: Stack, api_key: str, method: str, path: str, body: dict[str, object]
) -> None:
    response = _api(stack, api_key, method, f"{path}?user=alice", json={**body, "user": "bob"})

    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "user"
    same = _api(stack, api_key, method, f"{path}?user=alice", json={**body, "user": "alice"})
    assert same.status_code != 400, same.text


# -- what a caller named, named back ---------------------------------------------


@pytest.mark.parametrize("model", ["ollama/nope:latest", "ollama/nope", "nope", "nope:latest"])
def test_an_unknown_model_is_named_as_the_caller_wrote_it(
    stack: Stack, api_key: str, model: str
) -> None:
    hi = [{"role": "user", "content": "hi"}]
    answers = [
        _api(stack, api_key, "POST", "/v1/chat/completions", json={"model": model, "messages": hi}),
        _api(
            stack,
            api_key,
            "POST",
            "/v1/chat/completions",
            json={"model": model, "messages": hi, "stream": True},
        ),
        _api(stack, api_key, "GET", f"/v1/models/{model}"),
        _api(stack, api_key, "POST", "/v1/embeddings", json={"model": model, "input": "hi"}),
        _api(stack, api_key, "POST", "/v1/completions", json={"model": model, "prompt": "hi"}),
    ]
    for answer in answers:
        assert answer.status_code == 404, answer.text
        error = answer.json()["error"]
        assert error["code"] == "model_not_found"
        assert f"'{model}'" in error["message"], error["message"]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def test_tool_choice_required_is_refused_for_ollama_not_dropped(stack: Stack, api_key: str) -> None:
    answer = _api(
        stack,
        api_key,
        "POST",
        "/v1/chat/completions",
        json={
            "model": "ollama/tooly:latest",
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [WEATHER_TOOL],
            "tool_choice": "required",
        },
    )

    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "tool_choice"


def test_streamed_tool_calls_carry_content_null_as_openai_sends(stack: Stack, api_key: str) -> None:
    answer = _api(
        stack,
        api_key,
        "POST",
        "/v1/chat/completions",
        json={
            "model": "ollama/tooly:latest",
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [WEATHER_TOOL],
            "stream": True,
        },
    )
    deltas = [
        orjson.loads(line[6:])["choices"][0]["delta"]
        for line in answer.text.splitlines()
        if line.startswith("data: {") and '"choices":[{' in line
    ]
    with_calls = [d for d in deltas if "tool_calls" in d]
    assert with_calls, deltas
    # The first delta of a tool-call answer: role, content null, the call.
    assert with_calls[0]["role"] == "assistant"
    assert with_calls[0]["content"] is None
    assert all(d.get("content") is None for d in with_calls)
