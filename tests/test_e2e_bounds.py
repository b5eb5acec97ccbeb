"""Numbers out of range and values longer than any real one, on every route
that reads them: a 400 naming the parameter, never a 500, and never a
429 made up by a gRPC metadata overflow (issue 20, items 4 and 5)."""

from __future__ import annotations

import httpx
import pytest

from tests.fakes import FakeOllama
from tests.stack import Stack

ADMIN_KEY = "admin-secret-for-bounds-tests"
LONG = "a" * 5000
HUGE = "99999999999999999999"


def _short(value: object) -> str:
    return str(value)[:48]


@pytest.fixture(scope="module")
def admin(stack: Stack) -> str:
    return stack.create_key("bounds-admin", "--scope", "admin")


def get(stack: Stack, key: str, path: str) -> httpx.Response:
    return httpx.get(
        f"{stack.base_url}{path}", headers={"authorization": f"Bearer {key}"}, timeout=30
    )


def assert_400_naming(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["code"] == "invalid_value"
    assert "retry-after" not in response.headers


@pytest.mark.parametrize(
    ("path", "param"),
    [
        (f"/api/conversations?limit={HUGE}", "limit"),
        ("/api/conversations?limit=-1", "limit"),
        ("/api/conversations?limit=2147483648", "limit"),
        ("/api/conversations?limit=%C2%B2", "limit"),  # "²" is a digit to str.isdigit
        (f"/api/memories?limit={HUGE}", "limit"),
        (f"/api/conversations/c/messages?limit={HUGE}", "limit"),
        (f"/api/search?q=x&limit={HUGE}", "limit"),
        (f"/api/memories/search?q=x&top_k={HUGE}", "top_k"),
        ("/api/memories/search?q=x&threshold=nan", "threshold"),
        ("/api/memories/search?q=x&threshold=inf", "threshold"),
        (f"/api/memories/m/history?limit={HUGE}", "limit"),
        ("/api/usage?from=-99999999999999", "from"),
        ("/api/usage?from=nan", "from"),
        ("/api/usage?to=inf", "to"),
        ("/api/usage?to=1e300", "to"),
        ("/api/usage?from=99999999999999", "from"),
        (f"/api/models/search?q=x&limit={HUGE}", "limit"),
        ("/api/models/search?q=x&limit=%C2%B2", "limit"),
        (f"/v1/responses/resp_x/input_items?limit={HUGE}", "limit"),
        ("/v1/responses/resp_x/input_items?limit=%C2%B2", "limit"),
    ],
    ids=_short,
)
def test_numbers_out_of_range_are_400_naming_them(
    stack: Stack, api_key: str, path: str, param: str
) -> None:
    assert_400_naming(get(stack, api_key, path), param)


@pytest.mark.parametrize(
    ("path", "param"),
    [
        (f"/api/keys?page_size={HUGE}", "page_size"),
        ("/api/keys?page_size=%C2%B2", "page_size"),
        (f"/api/keys/{LONG}", "key_id"),
        (f"/api/keys?owner={LONG}", "owner"),
        (f"/api/usage?key_id={LONG}", "key_id"),
    ],
    ids=_short,
)
def test_admin_numbers_and_sizes_out_of_range_are_400_naming_them(
    stack: Stack, admin: str, path: str, param: str
) -> None:
    assert_400_naming(get(stack, admin, path), param)


@pytest.mark.parametrize(
    ("path", "param"),
    [
        (f"/api/conversations/{LONG}", "id"),
        (f"/api/conversations/{LONG}/messages", "id"),
        (f"/api/memories/{LONG}", "id"),
        (f"/api/memories/{LONG}/history", "id"),
        (f"/api/memories?conversation_id={LONG}", "conversation_id"),
        (f"/api/memories?category={LONG}", "category"),
        (f"/api/search?q=x&conversation_id={LONG}", "conversation_id"),
        (f"/api/conversations?tenant={LONG}", "tenant"),
        (f"/v1/responses/{LONG}", "response_id"),
        (f"/v1/responses/{LONG}/input_items", "response_id"),
        (f"/v1/models/{LONG}", "model_id"),
        (f"/api/models/{LONG}", "provider"),
        (f"/api/models/ollama/{LONG}", "model"),
        (f"/api/models/search?q=x&provider={LONG}", "provider"),
    ],
    ids=_short,
)
def test_values_longer_than_any_real_one_are_400_naming_them(
    stack: Stack, api_key: str, path: str, param: str
) -> None:
    assert_400_naming(get(stack, api_key, path), param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "x", "allowed_models": ["ollama/" + LONG]}, "allowed_models[0]"),
        ({"name": "x", "scopes": [LONG]}, "scopes[0]"),
        ({"name": LONG}, "name"),
        ({"name": "x", "owner": LONG}, "owner"),
        ({"name": "x", "labels": {"k": LONG}}, "labels.k"),
    ],
    ids=_short,
)
def test_long_key_settings_are_400_naming_them(
    stack: Stack, admin: str, body: dict[str, object], param: str
) -> None:
    response = httpx.post(
        f"{stack.base_url}/api/keys",
        json=body,
        headers={"authorization": f"Bearer {admin}"},
        timeout=30,
    )
    assert_400_naming(response, param)


def test_a_long_id_in_a_patch_and_delete_is_400_not_429(stack: Stack, api_key: str) -> None:
    headers = {"authorization": f"Bearer {api_key}"}
    for method in ("PATCH", "DELETE"):
        for path, body in (
            (f"/api/conversations/{LONG}", {"title": "t"}),
            (f"/api/memories/{LONG}", {"text": "t"}),
        ):
            response = httpx.request(
                method, f"{stack.base_url}{path}", json=body, headers=headers, timeout=30
            )
            assert_400_naming(response, "id")


@pytest.mark.parametrize(
    "content", ["a" * (1_048_576 + 1), "é" * (524_288 + 1)], ids=["ascii", "utf8"]
)
def test_a_turn_larger_than_what_is_stored_is_refused_before_the_model(
    stack: Stack, api_key: str, ollama: FakeOllama, content: str
) -> None:
    headers = {"authorization": f"Bearer {api_key}"}
    made = httpx.post(
        f"{stack.base_url}/api/conversations",
        json={"title": "big", "model": "ollama/llama3.2:latest"},
        headers=headers,
        timeout=30,
    )
    before = len(ollama.chat_requests)

    response = httpx.post(
        f"{stack.base_url}/api/conversations/{made.json()['id']}/messages",
        json={"content": content, "stream": False},
        headers=headers,
        timeout=60,
    )

    assert_400_naming(response, "content")
    assert len(ollama.chat_requests) == before  # the model was never asked
    messages = httpx.get(
        f"{stack.base_url}/api/conversations/{made.json()['id']}/messages",
        headers=headers,
        timeout=30,
    ).json()["data"]
    assert messages == []
