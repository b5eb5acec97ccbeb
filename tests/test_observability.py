"""The `observability` compose profile's dashboard and alert rules query only
metrics the services really serve: every PromQL expression is parsed for the
metric names it reads, and the running suite's /metrics endpoints (gateway,
providers, auth, memory) are scraped for them. The profile's files hang
together with docker-compose.yml and Envoy's tracer. With a real Prometheus
(tests/prometheus.py): promtool accepts the rules and the profile's config,
the alert rules' unit tests (alerts_test.yml) pass, and Prometheus scraping
the running suite finds series for every dashboard query and evaluates
every alert rule without error."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from tests.envoy import connection_manager, load_config
from tests.fakes import FakeOllama
from tests.prometheus import promtool, start_prometheus
from tests.stack import ROOT, Stack, free_ports, start_stack

OBSERVABILITY = ROOT / "deploy" / "observability"
DASHBOARD = OBSERVABILITY / "grafana" / "dashboards" / "marie.json"
ALERTS = OBSERVABILITY / "alerts.yml"
#: Recorded by Prometheus itself for every scrape target, not served by one.
PROMETHEUS_OWN = frozenset({"up"})

_FUNCTIONS = frozenset(
    {
        "abs", "absent", "avg", "avg_over_time", "by", "ceil", "clamp_max", "clamp_min",
        "count", "count_over_time", "delta", "deriv", "floor", "group_left", "group_right",
        "histogram_quantile", "idelta", "ignoring", "increase", "irate", "label_replace",
        "max", "max_over_time", "min", "min_over_time", "offset", "on", "quantile", "rate",
        "round", "scalar", "sort", "sort_desc", "stddev", "sum", "sum_over_time", "time",
        "topk", "bottomk", "vector", "without", "and", "or", "unless", "bool",
    }
)  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings (label values)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    # Grouping clauses name labels, not metrics.
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", text):
        token = match.group(1)
        if token not in _FUNCTIONS and not re.fullmatch(r"\d+[smhdwy]?|e\d+|Inf|NaN", token):
            names.add(token)
    return names


def dashboard_queries() -> list[str]:
    dashboard: dict[str, Any] = orjson.loads(DASHBOARD.read_bytes())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def alert_queries() -> list[str]:
    rules: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_the_parser_finds_metrics_and_only_metrics() -> None:
    assert metric_names(
        'histogram_quantile(0.95, sum by (le, route) (rate(marie_x_bucket{a="b",c=~"5.."}[5m])))'
        ' / clamp_min(sum(rate(marie_y_total[5m])), 1e-9) > 0.05 and up{job="auth"} == 0'
    ) == {"marie_x_bucket", "marie_y_total", "up"}
    assert metric_names("max by (provider) (marie_providers_healthy) == 0") == {
        "marie_providers_healthy"
    }


def _exposed(text: str) -> set[str]:
    """Every sample name an exposition can hold: from its `# TYPE` lines (a
    labelled metric without samples yet has them too) and its samples."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "gauge": ("",),
        "untyped": ("",),
    }
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names |= {name + s for s in suffixes.get(kind, ("",))}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="module")
def metrics_stack(ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    providers, auth, memory = free_ports(3)
    running = start_stack(
        tmp_path_factory.mktemp("marie-metrics"),
        ollama.base_url,
        MARIE_PROVIDERS_METRICS_PORT=str(providers),
        MARIE_AUTH_METRICS_PORT=str(auth),
        MARIE_MEMORY_METRICS_PORT=str(memory),
        MARIE_MEMORY_EXTRACTION_MODEL="ollama/llama3.2:latest",
    )
    yield running
    running.stop()


def _traffic(stack: Stack) -> None:
    """What labelled series need before they are served: a chat (tokens, time
    to first token), an error from a service (an unknown model), a 429, and
    a server error (an upstream that fails)."""
    key = stack.create_key("metrics")
    limited = stack.create_key("limited", "--rpm", "1")
    chat = {"model": "ollama/llama3.2:latest", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=stack.base_url, timeout=30) as client:
        auth = {"authorization": f"Bearer {key}"}
        assert client.post("/v1/chat/completions", json=chat, headers=auth).status_code == 200
        unknown = {**chat, "model": "ollama/no-such-model:latest"}
        assert client.post("/v1/chat/completions", json=unknown, headers=auth).status_code == 404
        once = {"authorization": f"Bearer {limited}"}
        statuses = [client.get("/v1/models", headers=once).status_code for _ in range(2)]
        assert statuses == [200, 429]
        # conftest's BROKEN model fails a whole (non-streamed) answer with 500.
        broken = {**chat, "model": "ollama/broken:latest"}
        failed = client.post("/v1/chat/completions", json=broken, headers=auth)
        assert failed.status_code >= 500, failed.text


def _memory_search(stack: Stack) -> None:
    """A memory search (its latency is a dashboard panel)."""
    key = stack.create_key("searcher", "--scope", "memory")
    reply = httpx.get(
        f"{stack.base_url}/api/memories/search",
        params={"q": "hiking"},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text


def test_every_dashboard_and_alert_query_names_a_served_metric(
    metrics_stack: Stack,
) -> None:
    _traffic(metrics_stack)
    env = metrics_stack.env
    urls = [f"{metrics_stack.base_url}/metrics"] + [
        f"http://127.0.0.1:{env[f'MARIE_{name}_METRICS_PORT']}/metrics"
        for name in ("PROVIDERS", "AUTH", "MEMORY")
    ]
    exposed: set[str] = set()
    for url in urls:
        reply = httpx.get(url, timeout=10)
        assert reply.status_code == 200, url
        exposed |= _exposed(reply.text)
    queries = dashboard_queries() + alert_queries()
    assert len(queries) >= 15
    wanted = set().union(*(metric_names(q) for q in queries))
    # What the issue asks the dashboard and alerts to show is among them.
    assert {
        "marie_http_requests_total",
        "marie_http_request_duration_seconds_bucket",
        "marie_chat_time_to_first_token_seconds_bucket",
        "marie_chat_tokens_total",
        "marie_providers_healthy",
        "marie_providers_circuit_state",
        "marie_rate_limited_requests_total",
        "marie_memory_extraction_queue_depth",
        "marie_memory_extraction_oldest_job_age_seconds",
        "marie_rpc_duration_seconds_bucket",
        "up",
    } <= wanted
    missing = sorted(wanted - exposed - PROMETHEUS_OWN)
    assert missing == [], f"queried but never served: {missing}"


def test_the_profile_hangs_together_with_compose_and_envoy() -> None:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("otel-collector", "jaeger", "prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"], name
        for volume in services[name].get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    # Prometheus scrapes each service where compose serves its metrics.
    for name, prefix in (("providers", "PROVIDERS"), ("auth", "AUTH"), ("memory", "MEMORY")):
        port = services[name]["environment"][f"MARIE_{prefix}_METRICS_PORT"]
        assert port in services[name]["expose"]
        assert port in (OBSERVABILITY / "prometheus.yml").read_text()
    scrape = yaml.safe_load((OBSERVABILITY / "prometheus.yml").read_text())
    assert {job["job_name"] for job in scrape["scrape_configs"]} >= {
        "gateway",
        "providers",
        "auth",
        "memory",
    }
    # Envoy's tracer and the services export to the collector compose runs.
    tracer = connection_manager(load_config(), "public")["tracing"]["provider"]["typed_config"]
    assert tracer["http_service"]["http_uri"]["uri"] == "http://otel-collector:4318/v1/traces"
    collector = next(
        c for c in load_config()["static_resources"]["clusters"] if c["name"] == "otel_collector"
    )
    endpoint = collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {
        "address": "otel-collector",
        "port_value": 4318,
    }
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in compose["x-python-env"]
    assert Path(OBSERVABILITY / "otel-collector.yaml").exists()
    # The collector compose runs is the release the tests run its config with.
    manifest = yaml.safe_load((ROOT / "tests" / "collector" / "manifest.yaml").read_text())
    image = services["otel-collector"]["image"]
    assert image == f"otel/opentelemetry-collector:{manifest['dist']['version']}"


# -- with Prometheus itself (Debian's 2.42: tests/prometheus.py) -------------------


def test_promtool_accepts_the_rules_and_the_profile_config_and_refuses_a_broken_rule(
    tmp_path: Path,
) -> None:
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout
    # The profile's config as Prometheus reads it (its rule file at the
    # container's path, here the repository's).
    config = yaml.safe_load((OBSERVABILITY / "prometheus.yml").read_text())
    config["rule_files"] = [str(ALERTS)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr

    broken = ALERTS.read_text().replace("(marie_providers_circuit_state)", "(marie_providers_")
    (tmp_path / "alerts.yml").write_text(broken)
    refused = promtool("check", "rules", str(tmp_path / "alerts.yml"))
    assert refused.returncode != 0
    assert "MarieCircuitOpen" in refused.stdout + refused.stderr


def test_every_alert_fires_when_it_should_and_only_then(tmp_path: Path) -> None:
    tested = promtool("test", "rules", "alerts_test.yml", cwd=OBSERVABILITY)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # The unit tests bite: a breaker alert that waits for the wrong state fails them.
    shutil.copy(OBSERVABILITY / "alerts_test.yml", tmp_path)
    wrong = ALERTS.read_text().replace("(marie_providers_circuit_state) == 1", "(x) == 2")
    assert wrong != ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(wrong)
    failed = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert failed.returncode != 0
    assert "MarieCircuitOpen" in failed.stdout + failed.stderr


def test_prometheus_scrapes_every_service_and_every_query_has_series(
    metrics_stack: Stack,
) -> None:
    env = metrics_stack.env
    jobs = {"gateway": [f"127.0.0.1:{metrics_stack.gateway_port}"]} | {
        name: [f"127.0.0.1:{env[f'MARIE_{name.upper()}_METRICS_PORT']}"]
        for name in ("providers", "auth", "memory")
    }
    prometheus = start_prometheus(jobs)
    try:
        _traffic(metrics_stack)
        _memory_search(metrics_stack)
        deadline = time.monotonic() + 30
        while True:
            targets = prometheus.api("targets")["activeTargets"]
            health = {t["labels"]["job"]: t["health"] for t in targets}
            if health == dict.fromkeys(jobs, "up"):
                break
            assert time.monotonic() < deadline, targets
            time.sleep(0.2)
        # Rates need two samples of each series after the traffic.
        time.sleep(3)
        empty = [q for q in dashboard_queries() if not prometheus.query(q)]
        assert empty == [], f"dashboard queries with no series: {empty}"
        # Every alert rule is loaded and evaluates without error.
        groups = prometheus.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == len(alert_queries())
        assert [(r["name"], r["health"], r.get("lastError", "")) for r in rules] == [
            (r["name"], "ok", "") for r in rules
        ]
    finally:
        prometheus.stop()
