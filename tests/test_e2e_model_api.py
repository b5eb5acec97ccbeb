"""Marie's own API on the gateway (issue 7): the `/api/models…` catalogue, the
developer API's chat path, comparison, the OpenAPI document, metrics, CORS and
SSE keep-alives. One suite of real processes over its own fake Ollama (these
tests add models to it)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import orjson
import pytest
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import FakeModel, FakeOllama
from tests.stack import Stack, free_ports, start_stack

HF_STYLE = "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"
ORIGIN = "https://console.example"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    fake = FakeOllama()
    fake.add_model(FakeModel(name=HF_STYLE, family="llama", parameter_size="1.2B"))
    fake.add_model(FakeModel(name="sleepy:latest", reply="one two three", chunk_delay=1.2))
    fake.add_model(FakeModel(name="late:latest", reply="finally here", first_byte_delay=1.0))
    fake.add_model(FakeModel(name="broken:latest", reply="one two three four", error_after=2))
    fake.add_model(FakeModel(name="endless:latest", endless=True, chunk_delay=0.02))
    with fake:
        yield fake


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    providers_metrics, auth_metrics = free_ports(2)
    return {"providers": providers_metrics, "auth": auth_metrics}


@pytest.fixture(scope="module")
def stack(
    fake: FakeOllama, ports: dict[str, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    running = start_stack(
        tmp_path_factory.mktemp("api"),
        fake.base_url,
        MARIE_GATEWAY_CORS_ORIGINS=ORIGIN,
        MARIE_GATEWAY_SSE_KEEP_ALIVE_SECONDS="0.5",
        MARIE_PROVIDERS_METRICS_PORT=str(ports["providers"]),
        MARIE_AUTH_METRICS_PORT=str(ports["auth"]),
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def key(stack: Stack) -> str:
    return stack.create_key("api")


def get(stack: Stack, key: str, path: str, **params: str) -> httpx.Response:
    return httpx.get(
        f"{stack.base_url}{path}",
        params=params,
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


@pytest.fixture(scope="module")
def document(stack: Stack) -> dict[str, Any]:
    response = httpx.get(f"{stack.base_url}/openapi.json")
    assert response.status_code == 200
    doc: dict[str, Any] = response.json()
    return doc


def conforms(document: dict[str, Any], schema_name: str, value: Any) -> None:
    """`value` validates against a schema of the served document."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", **document}
    jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)


# -- /api/models… ---------------------------------------------------------------


def test_all_models_grouped_by_provider_field_by_field(
    stack: Stack, key: str, document: dict[str, Any]
) -> None:
    body = get(stack, key, "/api/models").json()
    conforms(document, "ModelsByProvider", body)
    assert list(body["models"]) == ["ollama"]
    assert body["total"] == len(body["models"]["ollama"]) == 9
    assert body["errors"] == []
    llama = next(m for m in body["models"]["ollama"] if m["id"] == "llama3.2:latest")
    assert llama["name"] == "llama3.2:latest"
    assert llama["provider"] == "ollama"
    assert llama["full_id"] == "ollama/llama3.2:latest"
    assert llama["parameters"] == "3.2B"
    assert llama["quantization"] == "Q4_K_M"
    assert llama["size"] == "2.0GB"
    assert llama["size_bytes"] == 2_019_393_189
    assert llama["metadata"]["family"] == "llama"


def test_one_providers_models(stack: Stack, key: str, document: dict[str, Any]) -> None:
    body = get(stack, key, "/api/models/ollama").json()
    conforms(document, "ProviderModels", body)
    assert body["provider"] == "ollama"
    assert body["total"] == len(body["models"]) == 9


def test_an_unknown_provider_is_404(stack: Stack, key: str) -> None:
    response = get(stack, key, "/api/models/nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("name", ["llama3.2:latest", "llama3.2", HF_STYLE])
def test_one_model_whose_name_has_slashes_and_colons(
    stack: Stack, key: str, document: dict[str, Any], name: str
) -> None:
    response = get(stack, key, f"/api/models/ollama/{name}")
    assert response.status_code == 200, response.text
    body = response.json()
    conforms(document, "MarieModel", body)
    assert body["full_id"] == f"ollama/{body['id']}"
    assert body["context_length"] == 131_072
    assert "chat" in body["capabilities"] or "completion" in body["capabilities"]


def test_an_unknown_model_is_404(stack: Stack, key: str) -> None:
    assert get(stack, key, "/api/models/ollama/nope:1b").status_code == 404


def test_search_ranks_and_filters(stack: Stack, key: str, document: dict[str, Any]) -> None:
    body = get(stack, key, "/api/models/search", q="llama").json()
    conforms(document, "ModelSearchResults", body)
    assert body["query"] == "llama"
    ids = [m["full_id"] for m in body["models"]]
    # Exact and prefix matches before mere substrings.
    assert ids[0] == "ollama/llama3.2:latest"
    assert f"ollama/{HF_STYLE}" in ids
    tools = get(stack, key, "/api/models/search", q="q", capability="tools").json()
    assert [m["id"] for m in tools["models"]] == ["qwen2.5:0.5b"]
    embed = get(stack, key, "/api/models/search", q="nomic", capability="embeddings").json()
    assert [m["id"] for m in embed["models"]] == ["nomic-embed-text:latest"]
    assert get(stack, key, "/api/models/search", q="llama", provider="nope").status_code == 404


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({}, "q"),
        ({"q": "x", "capability": "telepathy"}, "capability"),
        ({"q": "x", "limit": "0"}, "limit"),
    ],
)
def test_bad_search_parameters_are_400(
    stack: Stack, key: str, params: dict[str, str], param: str
) -> None:
    response = get(stack, key, "/api/models/search", **params)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_refresh_lists_a_model_pulled_since(stack: Stack, key: str, fake: FakeOllama) -> None:
    get(stack, key, "/api/models")  # cached now
    fake.add_model(FakeModel(name="fresh:1b"))
    try:
        cached = get(stack, key, "/api/models").json()
        assert "fresh:1b" not in [m["id"] for m in cached["models"]["ollama"]]
        refreshed = get(stack, key, "/api/models", refresh="true").json()
        assert "fresh:1b" in [m["id"] for m in refreshed["models"]["ollama"]]
    finally:
        fake.remove_model("fresh:1b")
        get(stack, key, "/api/models", refresh="true")


def test_providers_and_their_health(stack: Stack, key: str, document: dict[str, Any]) -> None:
    providers = get(stack, key, "/api/models/providers").json()
    conforms(document, "ProvidersList", providers)
    [ollama] = providers["providers"]
    assert ollama == {
        "name": "ollama",
        "type": "ollama",
        "available": True,
        "supports_streaming": True,
        "supports_embeddings": True,
        "default_model": None,
        "models_count": 9,
    }
    health = get(stack, key, "/api/models/providers/health").json()
    conforms(document, "ProvidersHealth", health)
    assert health["ollama"]["status"] == "healthy"
    assert health["ollama"]["available"] is True
    assert health["ollama"]["models_count"] == 9
    assert health["ollama"]["latency_ms"] > 0
    assert health["ollama"]["error"] is None


def test_the_model_api_needs_a_key_and_the_scope(stack: Stack) -> None:
    assert httpx.get(f"{stack.base_url}/api/models").status_code == 401
    chat_only = stack.create_key("chat-only", "--scope", "chat")
    response = get(stack, chat_only, "/api/models/providers")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"


def test_a_restricted_key_sees_only_its_models(stack: Stack) -> None:
    narrow = stack.create_key("narrow", "--model", "ollama/qwen2.5:0.5b")
    body = get(stack, narrow, "/api/models").json()
    assert [m["full_id"] for m in body["models"]["ollama"]] == ["ollama/qwen2.5:0.5b"]
    assert get(stack, narrow, "/api/models/ollama/llama3.2:latest").status_code == 404


def test_the_developer_api_path_chats(stack: Stack, key: str, document: dict[str, Any]) -> None:
    response = httpx.post(
        f"{stack.base_url}/api/v1/chat/completions",
        json={"model": "ollama/llama3.2:latest", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert response.status_code == 200
    conforms(document, "ChatCompletion", response.json())
    assert "You said: hi" in response.json()["choices"][0]["message"]["content"]


# -- comparison -------------------------------------------------------------------


def compare_events(stack: Stack, key: str, models: list[str]) -> list[dict[str, Any]]:
    response = httpx.post(
        f"{stack.base_url}/api/compare",
        json={"models": models, "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [orjson.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_compare_streams_every_model_and_survives_a_failing_one(
    stack: Stack, key: str, document: dict[str, Any]
) -> None:
    models = ["ollama/llama3.2:latest", "ollama/broken:latest", "ollama/late:latest"]
    events = compare_events(stack, key, models)
    for e in events:
        conforms(document, "CompareEvent", e)
    by_model = {m: [e for e in events if e["model"] == m] for m in models}
    # The good ones: deltas that make the reply, then one "done" with figures.
    for model, reply in [
        (models[0], "Hello from llama3.2:latest! You said: hi"),
        (models[2], "finally here"),
    ]:
        *deltas, done = by_model[model]
        assert "".join(d["delta"].get("content", "") for d in deltas) == reply
        assert done["type"] == "done"
        assert done["resolved_model"] == model
        assert done["finish_reason"] == "stop"
        assert done["usage"]["completion_tokens"] > 0
        assert 0 < done["latency"]["first_token_ms"] <= done["latency"]["total_ms"]
    # The slow one's first token came after its delay, and did not hold the others back.
    late_done = by_model[models[2]][-1]
    assert late_done["latency"]["first_token_ms"] >= 1000
    assert by_model[models[0]][-1]["latency"]["total_ms"] < 1000
    # The failing one ends with its error, after what it sent.
    assert by_model[models[1]][-1]["type"] == "error"
    assert by_model[models[1]][-1]["error"]["code"]


def test_compare_runs_the_same_model_twice_as_two_arms_told_apart_by_index(
    stack: Stack, key: str, document: dict[str, Any]
) -> None:
    # Sampling variance is a real question: the same model, twice, side by side.
    model = "ollama/llama3.2:latest"
    events = compare_events(stack, key, [model, model])

    for e in events:
        conforms(document, "CompareEvent", e)
    assert {e["model"] for e in events} == {model}
    for index in (0, 1):
        *deltas, done = [e for e in events if e["index"] == index]
        assert "".join(d["delta"].get("content", "") for d in deltas) == (
            "Hello from llama3.2:latest! You said: hi"
        )
        assert done["type"] == "done" and done["usage"]["completion_tokens"] > 0


def test_compare_refuses_bad_requests(stack: Stack, key: str) -> None:
    for body, param in [
        ({"models": ["ollama/llama3.2:latest"]}, "models"),
        ({"models": ["a"] * 9}, "models"),
    ]:
        response = httpx.post(
            f"{stack.base_url}/api/compare",
            json={**body, "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {key}"},
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == param


def test_a_client_leaving_a_comparison_cancels_every_model(
    stack: Stack, key: str, fake: FakeOllama
) -> None:
    before = fake.disconnects
    with httpx.stream(
        "POST",
        f"{stack.base_url}/api/compare",
        json={
            "models": ["ollama/endless:latest", "ollama/sleepy:latest"],
            "messages": [{"role": "user", "content": "go"}],
        },
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    ) as response:
        lines = response.iter_lines()  # held: dropping it would close the stream
        next(lines)
        # Leave only once both upstream streams are open: else there is
        # nothing to cancel yet for the slower one.
        assert fake.wait_for_active_streams(2, timeout=10)
    assert fake.wait_for_disconnect(timeout=10, count=before + 2)


# -- SSE keep-alive ------------------------------------------------------------------


def test_a_slow_stream_gets_keep_alive_comments(stack: Stack, key: str) -> None:
    with httpx.stream(
        "POST",
        f"{stack.base_url}/v1/chat/completions",
        json={
            "model": "ollama/sleepy:latest",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        },
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    ) as response:
        raw = b"".join(response.iter_bytes())
    assert b": keep-alive\n\n" in raw
    assert raw.endswith(b"data: [DONE]\n\n")


# -- OpenAPI ---------------------------------------------------------------------


def test_the_openapi_document_is_valid_and_matches_the_routes(
    stack: Stack, document: dict[str, Any]
) -> None:
    from marie_gateway.app import create_app  # noqa: PLC0415
    from marie_gateway.http.openapi import openapi_path  # noqa: PLC0415
    from marie_gateway.ops.docs import INTERNAL_PATHS  # noqa: PLC0415
    from marie_gateway.settings import GatewaySettings  # noqa: PLC0415
    from starlette.routing import Mount, Route  # noqa: PLC0415

    validate(document)
    assert document["openapi"] == "3.1.0"
    app = create_app(GatewaySettings())
    served: set[tuple[str, str]] = set()
    for route in app.app.routes:  # type: ignore[attr-defined]
        if route.path in INTERNAL_PATHS:
            continue
        assert isinstance(route, Route) and not isinstance(route, Mount)
        for method in route.methods or ():
            if method != "HEAD":
                served.add((openapi_path(route.path), method.lower()))
    documented = {(path, m) for path, ops in document["paths"].items() for m in ops}
    assert served == documented
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert {"bearerAuth", "apiKeyHeader"} <= set(document["components"]["securitySchemes"])


def test_the_docs_page_is_served_without_a_cdn(stack: Stack) -> None:
    page = httpx.get(f"{stack.base_url}/docs")
    assert page.status_code == 200
    assert "https://" not in page.text
    script = httpx.get(f"{stack.base_url}/docs/static/swagger-ui-bundle.js")
    assert script.status_code == 200
    assert len(script.content) > 100_000


def test_error_answers_match_the_documented_envelope(
    stack: Stack, document: dict[str, Any]
) -> None:
    conforms(document, "ErrorEnvelope", httpx.get(f"{stack.base_url}/api/models").json())


# -- metrics ---------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_gateway_metrics_move_after_requests(stack: Stack, key: str) -> None:
    before = samples(httpx.get(f"{stack.base_url}/metrics").text)
    secret_prompt = "a prompt that must never become a label"
    response = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json={
            "model": "ollama/llama3.2:latest",
            "messages": [{"role": "user", "content": secret_prompt}],
        },
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert response.status_code == 200
    httpx.get(f"{stack.base_url}/no/such/{secret_prompt.replace(' ', '-')}")
    text = httpx.get(f"{stack.base_url}/metrics").text
    after = samples(text)
    route = {"route": "/v1/chat/completions", "method": "POST", "status": "200"}
    assert (
        value(after, "marie_http_requests_total", **route)
        == value(before, "marie_http_requests_total", **route) + 1
    )
    model = {"provider": "ollama", "model": "ollama/llama3.2:latest"}
    ttft = "marie_chat_time_to_first_token_seconds_count"
    assert value(after, ttft, **model) == value(before, ttft, **model) + 1
    tokens = "marie_chat_tokens_total"
    assert value(after, tokens, **model, direction="out") > value(
        before, tokens, **model, direction="out"
    )
    lookups = "marie_key_cache_lookups_total"
    assert value(after, lookups, result="hit") + value(after, lookups, result="miss") > value(
        before, lookups, result="hit"
    ) + value(before, lookups, result="miss")
    assert value(after, "marie_http_requests_total", route="unmatched", method="GET", status="404")
    # Nothing a client chose or holds is in any label.
    assert key not in text and secret_prompt not in text and "no/such" not in text


def test_each_service_serves_its_own_metrics(stack: Stack, key: str, ports: dict[str, int]) -> None:
    get(stack, key, "/v1/models")
    found = samples(httpx.get(f"http://127.0.0.1:{ports['providers']}/metrics").text)
    calls = value(
        found,
        "marie_rpc_calls_total",
        method="/marie.providers.v1.ProviderService/ListModels",
        code="OK",
    )
    assert calls >= 1
    assert (
        value(
            found,
            "marie_rpc_duration_seconds_count",
            method="/marie.providers.v1.ProviderService/ListModels",
        )
        >= 1
    )
    auth = samples(httpx.get(f"http://127.0.0.1:{ports['auth']}/metrics").text)
    assert any(name == "marie_rpc_calls_total" for name, _ in auth)


def test_streams_in_flight_are_counted(stack: Stack, key: str) -> None:
    seen: list[float] = []

    def stream() -> None:
        with httpx.stream(
            "POST",
            f"{stack.base_url}/v1/chat/completions",
            json={
                "model": "ollama/sleepy:latest",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
            },
            headers={"authorization": f"Bearer {key}"},
            timeout=30,
        ) as response:
            for _ in response.iter_bytes():
                pass

    thread = threading.Thread(target=stream)
    thread.start()
    time.sleep(0.8)
    seen.append(
        value(samples(httpx.get(f"{stack.base_url}/metrics").text), "marie_http_streams_in_flight")
    )
    thread.join(30)
    seen.append(
        value(samples(httpx.get(f"{stack.base_url}/metrics").text), "marie_http_streams_in_flight")
    )
    assert seen == [1.0, 0.0]


# -- CORS ------------------------------------------------------------------------


def test_cors_preflight_from_a_configured_origin(stack: Stack) -> None:
    response = httpx.options(
        f"{stack.base_url}/v1/chat/completions",
        headers={
            "origin": ORIGIN,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "authorization" in response.headers["access-control-allow-headers"].lower()
    other = httpx.options(
        f"{stack.base_url}/v1/chat/completions",
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )
    assert "access-control-allow-origin" not in other.headers


def test_cors_lets_browsers_use_the_anthropic_surface(stack: Stack) -> None:
    """Anthropic's browser SDK sends its own headers and reads request-id and
    the anthropic-ratelimit-* headers."""
    preflight = httpx.options(
        f"{stack.base_url}/v1/messages",
        headers={
            "origin": ORIGIN,
            "access-control-request-method": "POST",
            "access-control-request-headers": "x-api-key, anthropic-version, anthropic-beta",
        },
    )
    assert preflight.status_code == 200
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert {"x-api-key", "anthropic-version", "anthropic-beta"} <= {
        h.strip() for h in allowed.split(",")
    }
    answer = httpx.post(
        f"{stack.base_url}/v1/messages", headers={"origin": ORIGIN, "x-api-key": "nope"}
    )
    exposed = {h.strip() for h in answer.headers["access-control-expose-headers"].split(",")}
    assert {"request-id", "anthropic-ratelimit-requests-remaining"} <= exposed


def test_no_cors_unless_configured() -> None:
    from marie_gateway.app import create_app  # noqa: PLC0415
    from marie_gateway.settings import GatewaySettings  # noqa: PLC0415

    app = create_app(GatewaySettings())
    assert app.app.user_middleware == []  # type: ignore[attr-defined]


def test_a_failing_provider_is_left_out_and_named_in_errors(
    fake: FakeOllama, tmp_path_factory: pytest.TempPathFactory
) -> None:
    (dead,) = free_ports(1)
    data = tmp_path_factory.mktemp("two")
    config = data / "marie.yaml"
    config.write_text(
        "providers:\n"
        f"  ollama: {{type: ollama, base_url: '{fake.base_url}'}}\n"
        f"  spare: {{type: ollama, base_url: 'http://127.0.0.1:{dead}'}}\n"
    )
    two = start_stack(data / "suite", fake.base_url, MARIE_CONFIG=str(config))
    try:
        key = two.create_key("two")
        body = get(two, key, "/api/models").json()
        assert list(body["models"]) == ["ollama"]
        assert body["total"] == len(body["models"]["ollama"]) > 0
        [error] = body["errors"]
        assert error["provider"] == "spare"
        assert error["reason"] == "PROVIDER_UNAVAILABLE"
        assert str(dead) not in error["message"]
        health = get(two, key, "/api/models/providers/health").json()
        assert health["ollama"]["status"] == "healthy"
        assert health["spare"]["available"] is False
        assert health["spare"]["status"] in ("unhealthy", "error")
        assert get(two, key, "/api/models/spare").status_code == 503
    finally:
        two.stop()
