"""A key's limits across two gateways and two auth replicas (real processes).

The suite runs with `MARIE_GATEWAY_LIMITS=auth` (`marie up`: gateway 1, auth
A, providers); a second auth replica (B, on the same SQLite file) and a
second gateway (on B, the same providers) are started beside it. Requests
alternate between the gateways: together they admit the key's limit within
the bound of docs/decisions.md (G·k, G = 2 gateways, k = the lease size),
where two gateways counting alone would admit twice the limit.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.fakes import FakeModel, FakeOllama
from tests.stack import Stack, free_ports, start_stack
from tests.test_e2e_replicas import STARTUP_SECONDS, Proc, spawn, wait_for

COUNTED = FakeModel(
    name="shared-counted:latest", reply="one two", prompt_eval_count=10, eval_count=20
)
MODEL = "ollama/shared-counted:latest"
GATEWAYS = 2


def lease_size(limit: int) -> int:
    # marie_kit.leased_limits.lease_size, restated: the test states the bound.
    return max(1, limit // 20)


@dataclass
class TwoGateways:
    stack: Stack
    urls: list[str]

    def chat(self, gateway: int, key: str) -> httpx.Response:
        return httpx.post(
            f"{self.urls[gateway]}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )


@pytest.fixture(scope="module")
def two_gateways(
    ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TwoGateways]:
    ollama.add_model(COUNTED)
    data = tmp_path_factory.mktemp("shared-limits")
    stack = start_stack(data, ollama.base_url, MARIE_GATEWAY_LIMITS="auth")
    auth_b, gateway_2 = free_ports(2)
    extra: list[Proc] = []
    try:
        extra.append(
            spawn(
                "auth-b", "marie-auth", {**stack.env, "MARIE_AUTH_PORT": str(auth_b)}, auth_b, data
            )
        )
        extra.append(
            spawn(
                "gateway-2",
                "marie-gateway",
                {**stack.env, "MARIE_GATEWAY_PORT": str(gateway_2), "MARIE_AUTH_PORT": str(auth_b)},
                gateway_2,
                data,
            )
        )
        second = f"http://127.0.0.1:{gateway_2}"
        wait_for(lambda: httpx.get(f"{second}/readyz").status_code == 200, STARTUP_SECONDS)
        yield TwoGateways(stack, [stack.base_url, second])
    finally:
        for proc in extra:
            proc.stop()
        stack.stop()


def test_requests_per_minute_hold_across_two_gateways_and_two_auth_replicas(
    two_gateways: TwoGateways,
) -> None:
    rpm = 10
    key = two_gateways.stack.create_key("shared-rpm", "--rpm", str(rpm))
    started = time.monotonic()
    answers = [two_gateways.chat(i % GATEWAYS, key) for i in range(3 * rpm)]
    refilled = (time.monotonic() - started) * rpm / 60
    statuses = [r.status_code for r in answers]
    assert set(statuses) == {200, 429}, statuses
    admitted = statuses.count(200)
    # Two gateways counting alone would admit 2 x 10.
    assert (
        rpm - GATEWAYS * lease_size(rpm) <= admitted <= rpm + GATEWAYS * lease_size(rpm) + refilled
    )
    # Each gateway admitted some, and refused some with the OpenAI envelope.
    for g in range(GATEWAYS):
        mine = answers[g::GATEWAYS]
        assert any(r.status_code == 200 for r in mine)
        refused = [r for r in mine if r.status_code == 429]
        assert refused
        assert refused[-1].json()["error"]["code"] == "rate_limit_exceeded"
        assert int(refused[-1].headers["retry-after"]) >= 1
        assert refused[-1].headers["x-ratelimit-limit-requests"] == str(rpm)


def test_tokens_per_minute_hold_across_two_gateways(two_gateways: TwoGateways) -> None:
    tpm, per_answer = 100, 30
    key = two_gateways.stack.create_key("shared-tpm", "--tpm", str(tpm))
    answers = [two_gateways.chat(i % GATEWAYS, key) for i in range(12)]
    admitted = [r for r in answers if r.status_code == 200]
    assert all(r.json()["usage"]["total_tokens"] == per_answer for r in admitted)
    used = per_answer * len(admitted)
    # Each gateway may admit one answer on what is left of its lease (k), and
    # that answer may over-run it.
    assert (
        tpm - GATEWAYS * lease_size(tpm) <= used <= tpm + GATEWAYS * (per_answer + lease_size(tpm))
    )
    refused = [r for r in answers if r.status_code == 429]
    assert refused and refused[-1].json()["error"]["type"] == "tokens"
