"""The compose profile's collector config is valid for a real OpenTelemetry
Collector (tests/otel_collector.py), and that collector, running it, accepts
what Marie's tracing exports over both OTLP transports and passes it on.
tests/test_e2e_traces.py runs the whole suite and Envoy through it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.otel_collector import CONFIG, Collector, validate
from tests.otlp_receiver import OtlpReceiver


def test_the_compose_profile_collector_config_is_valid(otelcol: Path) -> None:
    done = validate(otelcol, CONFIG)
    assert done.returncode == 0, done.stderr


def test_validate_refuses_a_pipeline_naming_an_undeclared_processor(
    otelcol: Path, tmp_path: Path
) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    config["service"]["pipelines"]["traces"]["processors"].append("tail_sampling")
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(config))
    done = validate(otelcol, broken)
    assert done.returncode != 0
    assert "tail_sampling" in done.stderr


PROBE = """
import sys
from marie_kit import tracing

assert tracing.setup_tracing("probe")
with tracing.span("probe.work", {"marie.transport": sys.argv[1]}):
    pass
tracing.shutdown()
"""


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_the_collector_passes_on_what_the_kit_exports_over_either_transport(
    protocol: str, collector: Collector, receiver: OtlpReceiver
) -> None:
    endpoint = collector.grpc_endpoint if protocol == "grpc" else collector.http_endpoint
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, protocol],
        env={
            **clean,
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    spans = receiver.wait_for(
        lambda spans: any(s.attributes.get("marie.transport") == protocol for s in spans)
    )
    span = next(s for s in spans if s.attributes.get("marie.transport") == protocol)
    assert (span.service, span.name, span.parent_id) == ("marie-probe", "probe.work", "")
