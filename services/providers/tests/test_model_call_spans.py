"""Model-call spans (marie_providers.upstream.telemetry) in a process of its
own with tracing on: GenAI attributes from the request and the chunks, the
content only with MARIE_TRACE_CONTENT, and a failed call marked so."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.otlp_receiver import CLIENT, OtlpReceiver, start_receiver

PROBE = """
import asyncio
from types import SimpleNamespace
import grpc
from marie.providers.v1 import provider_service_pb2 as pb
from marie_kit import tracing
from marie_kit.errors import ServiceError
from marie_providers.upstream import telemetry

assert tracing.setup_tracing("providers")
provider = SimpleNamespace(kind="openai", name="oai")
request = pb.StreamChatCompletionRequest(
    model="oai/m",
    messages=[pb.ChatMessage(role=pb.ROLE_USER, content="what is two plus two")],
    sampling=pb.SamplingParameters(max_tokens=7, temperature=0.25),
)

async def chunks(fail):
    yield pb.StreamChatCompletionResponse(id="chatcmpl-1", model="oai/m-2024", content="fo")
    if fail:
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, "UPSTREAM_ERROR", "gone", domain="d")
    yield pb.StreamChatCompletionResponse(
        id="chatcmpl-1", model="oai/m-2024", content="ur",
        finish_reason=pb.FINISH_REASON_STOP,
        usage=pb.Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7),
    )

async def main():
    got = [c.content async for c in telemetry.traced_stream(provider, "m", request, chunks(False))]
    assert got == ["fo", "ur"]
    try:
        async for _ in telemetry.traced_stream(provider, "m", request, chunks(True)):
            pass
    except ServiceError:
        pass
    else:
        raise AssertionError("no error")

asyncio.run(main())
tracing.shutdown()
"""


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    running = start_receiver()
    yield running
    running.close()


def _run(receiver: OtlpReceiver, **env: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MARIE_TRACE"))}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_a_model_call_span_has_the_genai_attributes_and_no_content_by_default(
    receiver: OtlpReceiver,
) -> None:
    _run(receiver)
    ok, failed = receiver.wait_for(lambda spans: len(spans) == 2)
    assert (ok.name, ok.kind, ok.service) == ("chat m", CLIENT, "marie-providers")
    assert ok.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "m",
        "gen_ai.request.max_tokens": 7,
        "gen_ai.request.temperature": 0.25,
        "marie.provider": "oai",
        "gen_ai.response.id": "chatcmpl-1",
        "gen_ai.response.model": "m-2024",
        "gen_ai.usage.input_tokens": 5,
        "gen_ai.usage.output_tokens": 2,
        "gen_ai.response.finish_reasons": ["stop"],
    }
    assert [e.name for e in ok.events] == ["gen_ai.first_token"]
    assert ok.status_code == 0
    # A call that fails after its first chunk: marked failed, with the reason only.
    assert failed.status_code == 2  # STATUS_CODE_ERROR
    assert failed.attributes["error.type"] == "UPSTREAM_ERROR"
    assert "gen_ai.response.finish_reasons" not in failed.attributes
    for body in receiver.raw:
        assert b"two plus two" not in body and b"four" not in body


def test_with_marie_trace_content_the_messages_are_recorded(receiver: OtlpReceiver) -> None:
    _run(receiver, MARIE_TRACE_CONTENT="true")
    ok, _ = receiver.wait_for(lambda spans: len(spans) == 2)
    assert ok.attributes["gen_ai.input.messages"] == (
        '[{"role":"user","parts":[{"type":"text","content":"what is two plus two"}]}]'
    )
    assert ok.attributes["gen_ai.output.messages"] == (
        '[{"role":"assistant","parts":[{"type":"text","content":"four"}]}]'
    )
