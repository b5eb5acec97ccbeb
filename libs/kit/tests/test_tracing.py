"""Tracing's switch: off (the default) installs nothing at all; on, spans reach
an OTLP receiver with the service's name and log lines carry their ids.

Each case runs in a process of its own: a tracer provider is set once per
process, and the test session must stay untraced."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from marie_kit import tracing

from tests.otlp_receiver import OtlpReceiver, start_receiver


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    running = start_receiver()
    yield running
    running.close()


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MARIE_TRACE"))}
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"},
            False,
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "false"},
            True,
        ),
    ],
)
def test_traces_are_wanted_only_with_an_endpoint_and_the_sdk_not_disabled(
    env: dict[str, str], expected: bool
) -> None:
    assert tracing.wanted(env) is expected


OFF_PROBE = """
import sys
from marie_kit import tracing
from marie_kit.channels import insecure_channel
from marie_kit.logs import setup_logging
import marie_gateway.app, marie_providers.service, marie_memory.service, marie_auth.service

assert tracing.setup_tracing("probe") is False
channel = insecure_channel('localhost:1')
assert not isinstance(channel, tracing.TracedChannel)
assert tracing.server_span("/a.B/C", ()) is tracing.span("x")
assert tracing.span("a") is tracing.span("b")  # one shared no-op
assert tracing.step("a") is tracing.span("b")
with tracing.span("a") as current:
    assert current is None
setup_logging("probe")
import logging
logging.getLogger("probe").info("hello")
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
print("LOADED", loaded)
"""


def test_off_nothing_of_opentelemetry_is_even_imported() -> None:
    for env in ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_SDK_DISABLED": "true"}):
        done = _run(OFF_PROBE, **env)
        assert done.returncode == 0, done.stderr
        assert "LOADED []" in done.stdout, done.stdout
        assert "trace_id" not in done.stdout


ON_PROBE = """
import logging
from marie_kit import tracing
from marie_kit.logs import setup_logging

setup_logging("probe")
assert tracing.setup_tracing("probe") is True
from marie_kit.channels import insecure_channel
assert isinstance(insecure_channel('localhost:1'), tracing.TracedChannel)
with tracing.span("outer", {"marie.thing": 1}) as outer:
    logging.getLogger("probe").info("inside")
    carrier = {}
    tracing.inject(carrier)
with tracing.linked_root_span("job", carrier):
    pass
logging.getLogger("probe").info("outside")
tracing.shutdown()
"""


def test_on_spans_reach_the_collector_and_log_lines_name_them(receiver: OtlpReceiver) -> None:
    done = _run(
        ON_PROBE,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_TRACES_SAMPLER="always_on",
    )
    assert done.returncode == 0, done.stderr
    spans = receiver.wait_for(lambda spans: len(spans) == 2)
    outer, job = sorted(spans, key=lambda s: s.name != "outer")
    assert (outer.service, outer.name, outer.attributes) == (
        "marie-probe",
        "outer",
        {"marie.thing": 1},
    )
    # The job is a trace of its own, linked to the span that queued it.
    assert job.trace_id != outer.trace_id and job.parent_id == ""
    assert job.links == [(outer.trace_id, outer.span_id)]
    lines = [line for line in done.stdout.splitlines() if '"message":"inside"' in line]
    assert len(lines) == 1
    assert f'"trace_id":"{outer.trace_id}","span_id":"{outer.span_id}"' in lines[0]
    outside = next(line for line in done.stdout.splitlines() if '"message":"outside"' in line)
    assert "trace_id" not in outside


def test_the_sampler_variables_are_honoured(receiver: OtlpReceiver) -> None:
    code = ON_PROBE.replace("len(spans) == 2", "")
    done = _run(
        code,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_TRACES_SAMPLER="always_off",
        OTEL_SERVICE_NAME="custom",
    )
    assert done.returncode == 0, done.stderr
    # Nothing sampled, nothing sent; log lines still name the (unsampled) trace.
    assert receiver.spans == []
    assert '"trace_id":' in done.stdout


STEP_PROBE = """
from marie_kit import tracing

assert tracing.setup_tracing("probe")
with tracing.span("request"):
    with tracing.step("cached", {"marie.operation": "chat"}) as step:
        step.set_attribute("marie.key_id", "k1")
    try:
        with tracing.step("refused"):
            raise ValueError("over the limit")
    except ValueError:
        pass
    with tracing.step("asks_auth", {"marie.operation": "chat"}) as step:
        call, headers = tracing.start_client_span("POST", {"http.request.method": "POST"})
        call.end()
        step.set_attribute("marie.key_id", "k2")
    print("HEADERS", headers["traceparent"])
tracing.shutdown()
"""


def test_a_step_is_an_event_unless_it_calls_out(receiver: OtlpReceiver) -> None:
    done = _run(STEP_PROBE, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
    assert done.returncode == 0, done.stderr
    spans = {s.name: s for s in receiver.wait_for(lambda spans: len(spans) == 3)}
    assert sorted(spans) == ["POST", "asks_auth", "request"]
    request, step, call = spans["request"], spans["asks_auth"], spans["POST"]
    # The step that called out is a span, parent of the call, from the step's start.
    assert step.parent_id == request.span_id and call.parent_id == step.span_id
    assert step.start <= call.start and call.end <= step.end
    assert step.attributes == {"marie.operation": "chat", "marie.key_id": "k2"}
    assert f"-{call.span_id}-" in done.stdout
    # The others are events on the request's span, with duration and outcome.
    cached, refused = request.events
    assert (cached.name, refused.name) == ("cached", "refused")
    assert cached.attributes["marie.key_id"] == "k1"
    assert cached.attributes["marie.operation"] == "chat"
    assert cached.attributes["marie.duration_ms"] >= 0
    assert "error.type" not in cached.attributes
    assert refused.attributes["error.type"] == "ValueError"
    assert refused.attributes["marie.duration_ms"] >= 0
