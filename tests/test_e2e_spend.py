"""Spend in money and budgets through the running suite (real processes).

The suite runs with a MARIE_CONFIG whose `prices` price the fake's models,
a second gateway beside `marie up`'s (same auth), and real Envoy in front
for gRPC (tests/envoy.py). Every ledger row carries its cost; `/api/usage`
totals it; budgets per key and per owner refuse requests once spent, across
both gateways and gRPC, with the overspend bounded by one lease (the
top README's "Budgets"), on auth's SQLite store and (that test again) on its
OpenSearch store.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from marie.auth.v1 import auth_service_pb2 as auth_pb
from marie.auth.v1 import auth_service_pb2_grpc as auth_grpc
from marie.providers.v1 import provider_service_pb2 as pb
from marie.providers.v1 import provider_service_pb2_grpc as pb_grpc
from marie_auth.opensearch_store import index_prefix

from tests.envoy import Envoy, call_error_info, start_envoy
from tests.fakes import FakeModel, FakeOllama
from tests.stack import Stack, free_ports, start_stack
from tests.test_e2e_replicas import STARTUP_SECONDS, Proc, spawn, wait_for

# Every answer costs 10 prompt + 20 completion tokens; at 1000 and 2000 USD
# per million tokens that is 0.01 + 0.04 = 0.05 USD.
PRICED = FakeModel(name="spend-priced:latest", reply="one two", prompt_eval_count=10, eval_count=20)
UNPRICED = FakeModel(name="spend-free:latest", reply="three", prompt_eval_count=10, eval_count=20)
MODEL = "ollama/spend-priced:latest"
EMBEDDER = "ollama/llama3.2:latest"
COST = Decimal("0.05")
PICO = 10**12
CONFIG = """\
providers:
  ollama: {{type: ollama, base_url: '{url}'}}
prices:
  'ollama/spend-priced:latest': {{input: 1000, output: 2000}}
  'ollama/llama3.2:latest': {{input: 0.5, output: 0}}
"""
HELLO = [{"role": "user", "content": "hi"}]


@dataclass
class Spend:
    stack: Stack
    gateways: list[str]
    envoy: Envoy
    providers: pb_grpc.ProviderServiceStub
    admin: auth_grpc.AuthServiceStub
    data_dir: Path

    def key(self, name: str, owner: str = "") -> tuple[str, str]:
        reply = self.admin.CreateApiKey(
            auth_pb.CreateApiKeyRequest(
                name=name, owner=owner or f"team-{name}", scopes=["chat", "embeddings"]
            ),
            timeout=10,
        )
        return reply.key, reply.api_key.id

    def budget(self, **fields: str) -> auth_pb.Budget:
        return self.admin.UpdateBudget(
            auth_pb.UpdateBudgetRequest(budget=auth_pb.Budget(**fields)),  # type: ignore[arg-type]
            timeout=10,
        ).budget

    def post(
        self,
        key: str,
        path: str,
        body: dict[str, Any],
        gateway: int = 0,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        return httpx.post(
            f"{self.gateways[gateway]}{path}",
            headers={"Authorization": f"Bearer {key}", **(headers or {})},
            json=body,
            timeout=30,
        )

    def chat(self, key: str, gateway: int = 0, model: str = MODEL, **extra: Any) -> httpx.Response:
        return self.post(
            key, "/v1/chat/completions", {"model": model, "messages": HELLO, **extra}, gateway
        )

    def grpc_chat(self, key: str) -> list[pb.StreamChatCompletionResponse]:
        return list(
            self.providers.StreamChatCompletion(
                pb.StreamChatCompletionRequest(
                    model=MODEL, messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi")]
                ),
                metadata=(("authorization", f"Bearer {key}"),),
                timeout=30,
            )
        )

    def rows(self, key_id: str) -> list[dict[str, Any]]:
        db = sqlite3.connect(f"file:{self.data_dir / 'auth.sqlite3'}?mode=ro", uri=True)
        try:
            db.row_factory = sqlite3.Row
            found = db.execute(
                "SELECT * FROM usage_records WHERE key_id = ? ORDER BY time", (key_id,)
            ).fetchall()
        finally:
            db.close()
        return [dict(row) for row in found]

    def rows_when(self, key_id: str, count: int, settle: float = 0.0) -> list[dict[str, Any]]:
        """The key's ledger rows once there are `count` (recorders send every
        second); with `settle`, once no new row came for that long."""
        deadline = time.monotonic() + 15
        seen, quiet_since = -1, time.monotonic()
        while True:
            rows = self.rows(key_id)
            if len(rows) != seen:
                seen, quiet_since = len(rows), time.monotonic()
            enough = len(rows) >= count and time.monotonic() - quiet_since >= settle
            if enough or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)

    def ledger_when(self, key_id: str, count: int, settle: float) -> tuple[int, Decimal]:
        """The key's requests and cost as auth's QueryUsage totals them (any
        store), once there are `count` and no new one came for `settle` s."""
        deadline = time.monotonic() + 15
        seen, quiet_since = -1, time.monotonic()
        while True:
            start, end = Timestamp(), Timestamp()
            start.FromSeconds(int(time.time()) - 86_400)
            end.FromSeconds(int(time.time()) + 60)
            totals = self.admin.QueryUsage(
                auth_pb.QueryUsageRequest(start_time=start, end_time=end, key_id=key_id),
                timeout=10,
            ).total
            if totals.requests != seen:
                seen, quiet_since = totals.requests, time.monotonic()
            enough = seen >= count and time.monotonic() - quiet_since >= settle
            if enough or time.monotonic() > deadline:
                return seen, Decimal(totals.cost)
            time.sleep(0.1)

    def usage(self, key: str, **params: str) -> dict[str, Any]:
        r = httpx.get(
            f"{self.gateways[0]}/api/usage",
            headers={"Authorization": f"Bearer {key}"},
            params=params,
            timeout=10,
        )
        assert r.status_code == 200, r.text
        report: dict[str, Any] = r.json()
        return report


@pytest.fixture(scope="module")
def spend(ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spend]:
    with running_spend(ollama, tmp_path_factory, "spend") as running:
        yield running


@pytest.fixture(scope="module")
def spend_on_opensearch(
    ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory, osmem_server: Any
) -> Iterator[Spend]:
    """The same suite with auth on OpenSearch (MARIE_AUTH_STORE=opensearch, as
    compose and Helm run it): the osmem-server emulator, or OPENSEARCH_URL."""
    url = os.environ.get("OPENSEARCH_URL", "")
    clone = None if url else osmem_server.clone()
    if clone is not None:
        url = str(clone.url)
    try:
        with running_spend(
            ollama,
            tmp_path_factory,
            "spend-os",
            MARIE_AUTH_STORE="opensearch",
            OPENSEARCH_URL=url,
            MARIE_AUTH_OPENSEARCH_INDEX_PREFIX=index_prefix(str(tmp_path_factory.getbasetemp())),
        ) as running:
            yield running
    finally:
        if clone is not None:
            clone.close()


@contextlib.contextmanager
def running_spend(
    ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory, name: str, **env: str
) -> Iterator[Spend]:
    ollama.add_model(PRICED)
    ollama.add_model(UNPRICED)
    data = tmp_path_factory.mktemp(name)
    config = data / "marie.yaml"
    config.write_text(CONFIG.format(url=ollama.base_url))
    stack = start_stack(data / "suite", ollama.base_url, MARIE_CONFIG=str(config), **env)
    extra: list[Proc] = []
    envoy: Envoy | None = None
    try:
        (gateway_2,) = free_ports(1)
        extra.append(
            spawn(
                "gateway-2",
                "marie-gateway",
                {**stack.env, "MARIE_GATEWAY_PORT": str(gateway_2)},
                gateway_2,
                data,
            )
        )
        second = f"http://127.0.0.1:{gateway_2}"
        wait_for(lambda: httpx.get(f"{second}/readyz").status_code == 200, STARTUP_SECONDS)
        envoy = start_envoy(
            tmp_path_factory.mktemp(f"{name}-envoy"),
            {
                "gateway": stack.gateway_port,
                "providers": stack.providers_port,
                "auth": stack.auth_port,
                "memory": stack.memory_port,
            },
        )
        with (
            grpc.insecure_channel(envoy.target) as edge_channel,
            grpc.insecure_channel(f"127.0.0.1:{stack.auth_port}") as auth_channel,
        ):
            yield Spend(
                stack,
                [stack.base_url, second],
                envoy,
                pb_grpc.ProviderServiceStub(edge_channel),
                auth_grpc.AuthServiceStub(auth_channel),
                data / "suite",
            )
    finally:
        if envoy is not None:
            envoy.stop()
        for proc in extra:
            proc.stop()
        stack.stop()


def usd(text: str) -> Decimal:
    return Decimal(text)


# -- cost --------------------------------------------------------------------------


def test_every_ledger_row_carries_its_cost_and_usage_totals_it(spend: Spend) -> None:
    key, key_id = spend.key("costs")
    assert spend.chat(key).status_code == 200
    streamed = spend.chat(key, stream=True)
    assert streamed.status_code == 200
    embedded = spend.post(key, "/v1/embeddings", {"model": EMBEDDER, "input": "one two three"})
    assert embedded.status_code == 200, embedded.text
    embed_tokens = embedded.json()["usage"]["prompt_tokens"]
    assert spend.chat(key, model="ollama/spend-free:latest").status_code == 200
    # One more through Envoy's gRPC route: metered by providers, priced the same way.
    spend.grpc_chat(key)

    rows = spend.rows_when(key_id, 5)
    by_model: dict[str, list[int]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row["cost_picodollars"])
    assert by_model[MODEL] == [int(COST * PICO)] * 3
    # 0.5 USD per million prompt tokens.
    assert by_model[EMBEDDER] == [embed_tokens * 500_000]
    assert by_model["ollama/spend-free:latest"] == [0]
    assert {r["model"]: r["priced"] for r in rows}["ollama/spend-free:latest"] == 0

    report = spend.usage(key, group_by="model")
    assert report["currency"] == "USD"
    groups = {g["group"]: g for g in report["groups"]}
    assert groups[MODEL]["cost"] == "0.15"
    assert groups["ollama/spend-free:latest"]["cost"] == "0"
    assert groups["ollama/spend-free:latest"]["unpriced_requests"] == 1
    expected = COST * 3 + Decimal(embed_tokens) * Decimal("0.0000005")
    assert usd(report["total"]["cost"]) == expected
    assert report["total"]["unpriced_requests"] == 1


# -- budgets -------------------------------------------------------------------------


def test_a_key_past_its_budget_is_refused_with_budget_exceeded_and_its_reset(
    spend: Spend,
) -> None:
    key, key_id = spend.key("daily")
    spend.budget(key_id=key_id, daily_usd="0.2")  # four answers
    answers = [spend.chat(key, gateway=0) for _ in range(6)]
    statuses = [r.status_code for r in answers]
    assert statuses == [200, 200, 200, 200, 429, 429], statuses
    remaining = [usd(r.headers["x-marie-budget-remaining"]) for r in answers[:4]]
    assert remaining == sorted(remaining, reverse=True) and remaining[0] <= Decimal("0.2")
    refused = answers[-1]
    error = refused.json()["error"]
    assert (error["code"], error["type"]) == ("budget_exceeded", "insufficient_quota")
    assert "daily budget of 0.2 USD" in error["message"]
    midnight = (time.time() // 86_400 + 1) * 86_400
    assert abs(int(refused.headers["retry-after"]) - (midnight - time.time())) < 5
    assert refused.headers["x-marie-budget-reset"].endswith("T00:00:00Z")
    assert refused.headers["x-marie-budget-remaining"] == "0"
    # The Anthropic surface is held to the same budget, in its own envelope.
    messages = spend.post(
        key,
        "/v1/messages",
        {"model": MODEL, "max_tokens": 10, "messages": HELLO},
        headers={"anthropic-version": "2023-06-01"},
    )
    assert messages.status_code == 429
    assert messages.json()["error"]["type"] == "rate_limit_error"
    assert "budget" in messages.json()["error"]["message"].lower()
    # Requests that spend nothing still pass: the key can read its usage.
    assert len(spend.rows_when(key_id, 4)) == 4
    assert usd(spend.usage(key)["total"]["cost"]) == Decimal("0.2")


def test_a_stream_that_crosses_the_budget_finishes_and_is_counted_in_full(
    spend: Spend,
) -> None:
    key, key_id = spend.key("crossing")
    spend.budget(key_id=key_id, monthly_usd="0.03")  # less than one answer
    streamed = spend.chat(key, stream=True, stream_options={"include_usage": True})
    assert streamed.status_code == 200
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert '"completion_tokens":20' in streamed.text
    assert spend.chat(key).status_code == 429
    [row] = spend.rows_when(key_id, 1)
    assert row["cost_picodollars"] == int(COST * PICO)


def test_an_owner_budget_holds_all_its_keys_together(spend: Spend) -> None:
    first, _ = spend.key("owned-1", owner="team-shared")
    second, _ = spend.key("owned-2", owner="team-shared")
    spend.budget(owner="team-shared", daily_usd="0.1")  # two answers in all
    assert spend.chat(first).status_code == 200
    assert spend.chat(second, gateway=1).status_code == 200
    refused = spend.chat(first)
    assert refused.status_code == 429
    assert "its owner's daily budget" in refused.json()["error"]["message"]
    assert spend.chat(second, gateway=1).status_code == 429


def test_a_budget_raised_applies_at_once(spend: Spend) -> None:
    key, key_id = spend.key("raised")
    spend.budget(key_id=key_id, daily_usd="0.05")
    assert spend.chat(key).status_code == 200
    assert spend.chat(key).status_code == 429
    spend.budget(key_id=key_id, daily_usd="1")
    time.sleep(1.1)  # a refusal is remembered for a second
    assert spend.chat(key).status_code == 200


def test_two_gateways_and_grpc_spending_one_budget_overspend_by_at_most_one_lease(
    spend: Spend,
) -> None:
    """Three holders of budget leases (two gateways for HTTP, providers for
    gRPC through Envoy), two clients each, spend one key's budget at once.
    Counted alone, each would spend the whole budget; together they stop
    within one lease (5% of the budget) of it."""
    spend_one_budget_at_once(spend, from_sqlite=True)


def test_on_opensearch_two_gateways_and_grpc_overspend_by_at_most_one_lease(
    spend_on_opensearch: Spend,
) -> None:
    """The same with auth's budgets and ledger in OpenSearch, under a key
    budget and its owner's (two documents per lease)."""
    spend_one_budget_at_once(spend_on_opensearch, from_sqlite=False)


def spend_one_budget_at_once(spend: Spend, *, from_sqlite: bool) -> None:
    key, key_id = spend.key("concurrent", owner="team-concurrent")
    if not from_sqlite:  # an owner's budget too, looser than the key's
        spend.budget(owner="team-concurrent", monthly_usd="5")
    budget = Decimal(1)  # 20 answers
    lease = budget / 20
    spend.budget(key_id=key_id, daily_usd=str(budget))
    outcomes: dict[str, list[str]] = {}
    lock = threading.Lock()

    def http_worker(name: str, gateway: int) -> None:
        for _ in range(25):
            r = spend.chat(key, gateway=gateway)
            code = "ok" if r.status_code == 200 else r.json()["error"]["code"]
            with lock:
                outcomes.setdefault(name, []).append(code)

    def grpc_worker(name: str) -> None:
        for _ in range(25):
            try:
                spend.grpc_chat(key)
                code = "ok"
            except grpc.RpcError as exc:
                code = call_error_info(exc).reason
            with lock:
                outcomes.setdefault(name, []).append(code)

    threads = [
        *(
            threading.Thread(target=http_worker, args=(f"gw{g}-{c}", g))
            for g in (0, 1)
            for c in (0, 1)
        ),
        *(threading.Thread(target=grpc_worker, args=(f"grpc-{c}",)) for c in (0, 1)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    admitted = sum(codes.count("ok") for codes in outcomes.values())
    if from_sqlite:
        rows = spend.rows_when(key_id, admitted, settle=2.0)
        assert len(rows) == admitted
        spent = Decimal(sum(r["cost_picodollars"] for r in rows)) / PICO
    else:
        requests, spent = spend.ledger_when(key_id, admitted, settle=2.0)
        assert requests == admitted
    assert spent <= budget + lease, (spent, outcomes)
    # Nor far under it: at most one answer's worth per holder is left unspent.
    assert spent >= budget - 3 * COST, (spent, outcomes)
    # Every holder refused with its surface's budget error.
    for name, codes in outcomes.items():
        expected = "BUDGET_EXCEEDED" if name.startswith("grpc") else "budget_exceeded"
        assert set(codes) <= {"ok", expected}, (name, codes)
        assert codes[-1] == expected, (name, codes)


# -- the CLI -----------------------------------------------------------------------


def test_marie_keys_create_and_update_set_a_keys_budget(spend: Spend) -> None:
    created = spend.stack.marie(
        "keys", "create", "--name", "cli-budget", "--budget-day", "0.05", "--json"
    )
    assert created.returncode == 0, created.stderr
    made = orjson.loads(created.stdout)
    assert made["budget"]["daily_usd"] == "0.05"
    assert spend.chat(made["key"]).status_code == 200
    assert spend.chat(made["key"]).status_code == 429
    updated = spend.stack.marie(
        "keys", "update", made["id"], "--budget-day", "0", "--budget-month", "12.5", "--json"
    )
    assert updated.returncode == 0, updated.stderr
    budget = orjson.loads(updated.stdout)["budget"]
    assert (budget["daily_usd"], budget["monthly_usd"]) == (None, "12.5")


def test_marie_owners_budget_sets_shows_and_lists(spend: Spend) -> None:
    key, _ = spend.key("cli-owner", owner="team-cli")
    assert spend.chat(key).status_code == 200
    set_ = spend.stack.marie("owners", "budget", "team-cli", "--budget-month", "3")
    assert set_.returncode == 0, set_.stderr
    assert "owner team-cli" in set_.stdout and "3 USD" in set_.stdout
    deadline = time.monotonic() + 10
    while True:
        shown = orjson.loads(spend.stack.marie("owners", "budget", "team-cli", "--json").stdout)
        if shown["spent_this_month_usd"] == "0.05" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (shown["monthly_usd"], shown["spent_this_month_usd"]) == ("3", "0.05")
    listed = orjson.loads(spend.stack.marie("owners", "list", "--json").stdout)
    assert "team-cli" in [b["owner"] for b in listed["budgets"]]


def test_marie_keys_usage_shows_money_beside_tokens(spend: Spend) -> None:
    key, key_id = spend.key("cli-usage")
    assert spend.chat(key).status_code == 200
    assert spend.chat(key, model="ollama/spend-free:latest").status_code == 200
    spend.rows_when(key_id, 2)
    done = spend.stack.marie("keys", "usage", "--key", key_id, "--group-by", "model")
    assert done.returncode == 0, done.stderr
    assert "0.05 USD" in done.stdout
    assert "1 request(s) on models without a price" in done.stdout
    as_json = orjson.loads(
        spend.stack.marie("keys", "usage", "--key", key_id, "--group-by", "owner", "--json").stdout
    )
    assert as_json["currency"] == "USD"
    assert [(g["group"], g["cost"]) for g in as_json["groups"]] == [("team-cli-usage", "0.05")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["keys", "create", "--name", "x", "--budget-day", "ten"],
            "--budget-day: 'ten' is not a number",
        ),
        (
            ["keys", "create", "--name", "x", "--budget-month", "-1"],
            "--budget-month: must be a finite",
        ),
        (["owners", "budget", "t", "--budget-day", "0.0000001"], "at most 6 decimal places"),
    ],
)
def test_bad_budget_options_are_refused_before_anything_changes(
    spend: Spend, args: list[str], message: str
) -> None:
    done = spend.stack.marie(*args)
    assert done.returncode == 1
    assert message in done.stderr
    listed = orjson.loads(spend.stack.marie("keys", "list", "--json").stdout)
    assert "x" not in [k["name"] for k in listed["keys"]]


# -- the HTTP budgets API ------------------------------------------------------------


def test_admins_set_and_read_budgets_over_http_and_a_key_reads_its_own(spend: Spend) -> None:
    admin = spend.stack.create_key("budget-admin", "--scope", "admin")
    key, key_id = spend.key("http-budget", owner="team-http")
    base = spend.gateways[0]
    auth = {"Authorization": f"Bearer {admin}"}

    set_key = httpx.patch(
        f"{base}/api/budgets/keys/{key_id}", headers=auth, json={"daily_usd": "0.5"}, timeout=10
    )
    assert set_key.status_code == 200, set_key.text
    assert set_key.json()["daily_usd"] == "0.5"
    assert set_key.json()["monthly_usd"] is None
    set_owner = httpx.patch(
        f"{base}/api/budgets/owners/team-http", headers=auth, json={"monthly_usd": "7"}, timeout=10
    )
    assert (set_owner.status_code, set_owner.json()["owner"]) == (200, "team-http")

    assert spend.chat(key).status_code == 200
    spend.rows_when(key_id, 1)
    own = httpx.get(
        f"{base}/api/budgets/keys/{key_id}", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert own.status_code == 200
    assert (own.json()["spent_today_usd"], own.json()["currency"]) == ("0.05", "USD")
    other, _ = spend.key("http-other")
    refused = httpx.get(
        f"{base}/api/budgets/keys/{key_id}",
        headers={"Authorization": f"Bearer {other}"},
        timeout=10,
    )
    assert refused.status_code == 403
    listed = httpx.get(f"{base}/api/budgets", headers=auth, params={"page_size": 500}, timeout=10)
    subjects = [(b["key_id"], b["owner"]) for b in listed.json()["data"]]
    assert (key_id, None) in subjects and (None, "team-http") in subjects

    cleared = httpx.patch(
        f"{base}/api/budgets/keys/{key_id}", headers=auth, json={"daily_usd": None}, timeout=10
    )
    assert cleared.json()["daily_usd"] is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"daily_usd": "ten"}, "daily_usd"),
        ({"daily_usd": 5}, "daily_usd"),
        ({"monthly_usd": "1.0000001"}, "monthly_usd"),
        ({"weekly_usd": "1"}, "weekly_usd"),
        ({}, None),
    ],
)
def test_bad_budget_bodies_are_400_naming_the_field(
    spend: Spend, body: dict[str, Any], param: str | None
) -> None:
    admin = spend.stack.create_key("budget-admin-bad", "--scope", "admin")
    _, key_id = spend.key("http-bad")
    r = httpx.patch(
        f"{spend.gateways[0]}/api/budgets/keys/{key_id}",
        headers={"Authorization": f"Bearer {admin}"},
        json=body,
        timeout=10,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    unknown = httpx.patch(
        f"{spend.gateways[0]}/api/budgets/keys/key_nope",
        headers={"Authorization": f"Bearer {admin}"},
        json={"daily_usd": "1"},
        timeout=10,
    )
    assert unknown.status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "param"),
    [
        ("get", "/api/budgets?page_size=100000", "page_size"),
        ("get", "/api/budgets?page_token=" + "x" * 5000, "page_token"),
        ("get", "/api/budgets?page_token=nonsense", "page_token"),
        ("get", "/api/budgets/keys/" + "k" * 300, "key_id"),
        ("patch", "/api/budgets/owners/" + "o" * 300, "owner"),
    ],
)
def test_budget_routes_refuse_values_out_of_range_naming_them(
    spend: Spend, method: str, path: str, param: str
) -> None:
    admin = spend.stack.create_key("budget-admin-bounds", "--scope", "admin")
    r = httpx.request(
        method,
        f"{spend.gateways[0]}{path}",
        headers={"Authorization": f"Bearer {admin}"},
        json={"daily_usd": "1"},
        timeout=10,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_an_owner_with_a_slash_has_a_budget_over_http(spend: Spend) -> None:
    admin = spend.stack.create_key("budget-admin-slash", "--scope", "admin")
    r = httpx.patch(
        f"{spend.gateways[0]}/api/budgets/owners/org/team-a",
        headers={"Authorization": f"Bearer {admin}"},
        json={"monthly_usd": "2"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.json()["owner"] == "org/team-a"
