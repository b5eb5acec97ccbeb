"""Per-key limits through the running suite: requests and tokens per minute,
tokens per day, the concurrency cap, the `x-ratelimit-*` headers on every
answer of a key's requests, and the slow-down of invalid keys."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from google.rpc import code_pb2
from marie_kit.apikeys import generate_key

from tests.envoy import error_info, refusal_status
from tests.fakes import FakeModel, FakeOllama
from tests.stack import Stack, start_stack

# Every chat answer of this model costs exactly 10 + 20 tokens.
COUNTED = FakeModel(name="counted:latest", reply="one two", prompt_eval_count=10, eval_count=20)
COUNTED_ID = "ollama/counted:latest"
TWIN = FakeModel(name="twin:latest", reply="three", prompt_eval_count=10, eval_count=20)
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module", autouse=True)
def counted_model(ollama: FakeOllama) -> None:
    ollama.add_model(COUNTED)
    ollama.add_model(TWIN)


def limited_key(stack: Stack, name: str, *limits: str) -> str:
    return stack.create_key(name, *limits)


def chat(stack: Stack, key: str, model: str = COUNTED_ID, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "messages": HELLO, **extra},
        timeout=30,
    )


def rate_headers(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.startswith("x-ratelimit-")}


def assert_rate_limited(r: httpx.Response, kind: str) -> None:
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == kind
    assert error["message"].startswith("Rate limit reached") or "concurrent" in error["message"]
    assert int(r.headers["retry-after"]) >= 1


def test_requests_per_minute_exact_at_the_boundary_with_headers(stack: Stack) -> None:
    key = limited_key(stack, "rpm-3", "--rpm", "3")
    answers = [chat(stack, key) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in answers] == ["2", "1", "0"]
    for r in answers:
        assert r.headers["x-ratelimit-limit-requests"] == "3"
        # The bucket refills at 3 a minute: full again within 60 s.
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    # Only request limits: no token headers.
    assert "x-ratelimit-limit-tokens" not in answers[0].headers

    refused = chat(stack, key)
    assert_rate_limited(refused, "requests")
    # One request comes back every 20 s.
    assert 19 <= int(refused.headers["retry-after"]) <= 20
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # The embeddings route shares the key's counters.
    emb = httpx.post(
        f"{stack.base_url}/v1/embeddings",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "ollama/llama3.2:latest", "input": "x"},
    )
    assert_rate_limited(emb, "requests")


def test_tokens_per_minute_count_after_the_answer_and_refuse_the_next(stack: Stack) -> None:
    key = limited_key(stack, "tpm-50", "--tpm", "50")
    first = chat(stack, key)
    assert first.status_code == 200
    assert first.json()["usage"]["total_tokens"] == 30
    assert rate_headers(first) | {"x-ratelimit-reset-tokens": ""} == {
        "x-ratelimit-limit-tokens": "50",
        "x-ratelimit-remaining-tokens": "50",
        "x-ratelimit-reset-tokens": "",
    }
    # A stream is counted when it ends.
    second = chat(stack, key, stream=True)
    assert second.status_code == 200
    assert second.headers["x-ratelimit-remaining-tokens"] == "20"
    assert second.text.rstrip().endswith("data: [DONE]")
    # 60 of 50 used: the next one is refused until 11 tokens have refilled.
    refused = chat(stack, key)
    assert_rate_limited(refused, "tokens")
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert 13 <= int(refused.headers["retry-after"]) <= 14


def test_tokens_per_day(stack: Stack) -> None:
    key = limited_key(stack, "tpd-45", "--tpd", "45")
    assert chat(stack, key).status_code == 200
    second = chat(stack, key)
    assert second.status_code == 200
    assert second.headers["x-ratelimit-limit-tokens"] == "45"
    assert second.headers["x-ratelimit-remaining-tokens"] == "15"
    refused = chat(stack, key)
    assert_rate_limited(refused, "tokens")
    assert "per day" in refused.json()["error"]["message"]
    # Until the next UTC midnight.
    assert 1 <= int(refused.headers["retry-after"]) <= 86_400


def test_concurrency_cap_holds_a_stream_until_it_ends(stack: Stack) -> None:
    key = limited_key(stack, "one-at-a-time", "--max-concurrent", "1")
    with httpx.stream(
        "POST",
        f"{stack.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "ollama/endless:latest", "messages": HELLO, "stream": True},
        timeout=30,
    ) as running:
        assert running.status_code == 200
        # Keep the line iterator: dropping it would close the stream.
        lines = running.iter_lines()
        assert next(lines).startswith("data: ")
        refused = chat(stack, key)
        assert_rate_limited(refused, "requests")
        assert "1 at once" in refused.json()["error"]["message"]
    # The slot comes back once the server has seen the client leave.
    for _ in range(100):
        after = chat(stack, key)
        if after.status_code == 200:
            break
        time.sleep(0.05)
    assert after.status_code == 200


def test_compare_is_one_request_charged_every_models_tokens(stack: Stack) -> None:
    key = limited_key(stack, "compare-tpm", "--tpm", "70", "--rpm", "10")
    r = httpx.post(
        f"{stack.base_url}/api/compare",
        headers={"Authorization": f"Bearer {key}"},
        json={"models": [COUNTED_ID, "ollama/twin:latest"], "messages": HELLO},
        timeout=30,
    )
    assert r.status_code == 200
    assert r.headers["x-ratelimit-remaining-requests"] == "9"
    assert r.headers["x-ratelimit-limit-tokens"] == "70"
    assert r.text.rstrip().endswith("data: [DONE]")
    # 60 tokens used: 10 left, so one more request passes, then none.
    after = chat(stack, key)
    assert after.status_code == 200
    assert after.headers["x-ratelimit-remaining-tokens"] == "10"
    assert after.headers["x-ratelimit-remaining-requests"] == "8"
    assert_rate_limited(chat(stack, key), "tokens")


def test_error_answers_of_limited_routes_carry_the_headers(stack: Stack) -> None:
    key = limited_key(stack, "errors-count", "--rpm", "5")
    bad = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        content=b"{not json",
    )
    assert bad.status_code == 400
    assert bad.headers["x-ratelimit-remaining-requests"] == "4"
    missing = chat(stack, key, model="ollama/no-such-model:latest")
    assert missing.status_code == 404
    assert missing.headers["x-ratelimit-remaining-requests"] == "3"


def get(stack: Stack, key: str, path: str) -> httpx.Response:
    return httpx.get(f"{stack.base_url}{path}", headers={"Authorization": f"Bearer {key}"})


def test_every_request_counts_against_requests_per_minute(stack: Stack) -> None:
    """Lookups, memory and stored-response calls are requests too: counted,
    with the headers, and refused at the limit; only `/api/usage` is not
    counted, so a key at its limits can still see where it stands."""
    key = limited_key(stack, "rpm-lookups", "--rpm", "4")
    answers = [
        get(stack, key, "/v1/models"),
        get(stack, key, "/api/models/providers"),
        get(stack, key, "/api/memories?user=alice"),
    ]
    assert [r.status_code for r in answers] == [200, 200, 200], answers[-1].text
    assert [r.headers["x-ratelimit-remaining-requests"] for r in answers] == ["3", "2", "1"]
    assert all(r.headers["x-ratelimit-limit-requests"] == "4" for r in answers)
    assert chat(stack, key).status_code == 200
    refused = get(stack, key, "/v1/models")
    assert_rate_limited(refused, "requests")
    assert_rate_limited(chat(stack, key), "requests")
    missing = get(stack, key, "/v1/responses/resp_0123456789abcdef")
    assert_rate_limited(missing, "requests")
    usage = get(stack, key, "/api/usage")
    assert usage.status_code == 200, usage.text
    assert "x-ratelimit-remaining-requests" not in usage.headers


def test_a_key_out_of_tokens_can_still_make_requests_that_spend_none(stack: Stack) -> None:
    key = limited_key(stack, "tpm-lookups", "--tpm", "20")
    assert chat(stack, key).status_code == 200  # 30 tokens of 20
    assert_rate_limited(chat(stack, key), "tokens")
    models = get(stack, key, "/v1/models")
    assert models.status_code == 200
    assert models.headers["x-ratelimit-remaining-tokens"] == "0"
    assert get(stack, key, "/api/memories?user=alice").status_code == 200


def test_keys_without_limits_are_not_limited(stack: Stack, api_key: str) -> None:
    answers = [chat(stack, api_key) for _ in range(5)]
    assert all(r.status_code == 200 for r in answers)
    assert rate_headers(answers[-1]) == {}


def test_bad_limits_are_refused_by_the_cli(stack: Stack) -> None:
    done = stack.marie("keys", "create", "--name", "neg", "--max-concurrent", "-1", "--json")
    assert done.returncode == 1
    assert "max_concurrent_requests" in done.stderr


# -- invalid keys --------------------------------------------------------------


@pytest.fixture(scope="module")
def strict(ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A suite that slows an address down after 3 invalid keys in 30 seconds,
    behind a trusted proxy at 127.0.0.2 (connections from there may say who
    the client is in X-Forwarded-For; from elsewhere the header is ignored)."""
    running = start_stack(
        Path(tmp_path_factory.mktemp("strict")),
        ollama.base_url,
        MARIE_GATEWAY_INVALID_KEY_THRESHOLD="3",
        MARIE_GATEWAY_INVALID_KEY_WINDOW_SECONDS="30",
        MARIE_GATEWAY_TRUSTED_PROXIES="127.0.0.2/32",
        # Validations expire at once here: a key in use is asked of auth again
        # while its address is slowed down, as it is every minute by default.
        MARIE_GATEWAY_KEY_CACHE_TTL_SECONDS="0.5",
    )
    yield running
    running.stop()


def models(stack: Stack, key: str) -> httpx.Response:
    return httpx.get(f"{stack.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"})


def test_repeated_invalid_keys_are_slowed_down_without_affecting_valid_keys(
    strict: Stack,
) -> None:
    valid = strict.create_key("in-use")
    assert models(strict, valid).status_code == 200
    # Well formed, but no such keys: three guesses use up the allowance.
    assert [models(strict, generate_key()).status_code for _ in range(3)] == [401, 401, 401]
    wrong = generate_key()
    slowed = models(strict, wrong)
    assert slowed.status_code == 429
    assert slowed.json()["error"]["code"] == "rate_limit_exceeded"
    # One more try comes back every 10 s.
    assert 1 <= int(slowed.headers["retry-after"]) <= 10
    # A key in use keeps working from the same address, also once its
    # cached validation has expired (auth is asked again, not skipped).
    assert models(strict, valid).status_code == 200
    assert chat(strict, valid, model="ollama/llama3.2:latest").status_code == 200
    time.sleep(1.0)
    assert models(strict, valid).status_code == 200
    # Unknown keys stay refused without auth being asked (the refill over
    # time is covered by the limiter's own tests on a fake clock).
    assert models(strict, wrong).status_code == 429
    assert models(strict, generate_key()).status_code == 429


def test_a_revoked_key_in_use_is_refused_while_its_address_is_slowed_down(
    strict: Stack,
) -> None:
    peer = "127.0.0.5"
    made = orjson.loads(strict.marie("keys", "create", "--name", "revoked", "--json").stdout)
    valid, key_id = made["key"], made["id"]
    assert models_from(strict, peer, "", valid) == 200
    for _ in range(4):
        models_from(strict, peer, "", generate_key())
    assert models_from(strict, peer, "", generate_key()) == 429
    assert strict.marie("keys", "revoke", key_id).returncode == 0
    time.sleep(1.0)
    # Seen valid, so not held back by the slow-down; but auth says no.
    assert models_from(strict, peer, "", valid) == 401


def test_the_same_invalid_key_retried_counts_once(strict: Stack) -> None:
    """A misconfigured client retrying its one wrong key does not use up the
    allowance of everyone at its address (a NAT, an office)."""
    peer = "127.0.0.6"
    wrong = generate_key()
    assert {models_from(strict, peer, "", wrong) for _ in range(10)} == {401}
    assert models_from(strict, peer, "", strict.create_key("first-use")) == 200


def models_from(stack: Stack, peer: str, forwarded_for: str, key: str) -> int:
    """GET /v1/models over a connection from `peer` (a loopback address)."""
    transport = httpx.HTTPTransport(local_address=peer)
    with httpx.Client(transport=transport) as client:
        r = client.get(
            f"{stack.base_url}/v1/models",
            headers={"Authorization": f"Bearer {key}", "X-Forwarded-For": forwarded_for},
        )
        return r.status_code


def test_behind_a_trusted_proxy_clients_are_told_apart_by_x_forwarded_for(
    strict: Stack,
) -> None:
    proxy = "127.0.0.2"

    def guess(forwarded_for: str) -> int:
        return models_from(strict, proxy, forwarded_for, generate_key())

    assert [guess("198.51.100.7") for _ in range(3)] == [401] * 3
    assert guess("198.51.100.7") == 429
    # Prepending addresses of its own does not get that client out of it
    # (the rightmost address the proxy did not vouch for is the client)...
    assert guess("9.9.9.9, 198.51.100.7") == 429
    # ...while another client behind the same proxy is not slowed down.
    assert guess("198.51.100.8") == 401


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(strict: Stack) -> None:
    peer = "127.0.0.3"  # not a trusted proxy
    statuses = [models_from(strict, peer, f"203.0.113.{i}", generate_key()) for i in range(4)]
    # Each request claims another client; all count against the peer.
    assert statuses == [401, 401, 401, 429]


def test_a_slowed_down_address_gets_rate_limited_from_envoys_grpc_check(strict: Stack) -> None:
    """The gRPC key check (`/_authz`, asked by Envoy) slows addresses down too,
    and says so in the rich status Envoy hands the gRPC client."""
    transport = httpx.HTTPTransport(local_address="127.0.0.2")  # the trusted proxy
    with httpx.Client(transport=transport) as client:

        def check() -> httpx.Response:
            wrong = generate_key()  # a guess: each one different
            return client.post(
                f"{strict.base_url}/_authz/marie.providers.v1.ProviderService/ListModels",
                headers={"Authorization": f"Bearer {wrong}", "X-Forwarded-For": "198.51.100.9"},
            )

        assert [check().status_code for _ in range(3)] == [401, 401, 401]
        slowed = check()
    assert slowed.status_code == 429
    status = refusal_status(slowed)
    assert status.code == code_pb2.UNAVAILABLE  # what Envoy makes of a 429
    assert status.message == slowed.text
    info = error_info(status)
    assert info.reason == "RATE_LIMITED"
    assert info.metadata["retry_after_seconds"] == slowed.headers["retry-after"]
    assert 1 <= int(slowed.headers["retry-after"]) <= 10
