"""Calls marked by the key check (`x-marie-limits`) are held to the key's
limits and recorded in the usage ledger; unmarked calls (the gateway's own)
pass untouched. A real providers server on the fake Ollama, a real auth
server for the ledger (in-process, its own SQLite file); the marker is sent
as Envoy would add it (no Envoy here: tests/test_e2e_grpc_limits.py runs it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from marie.auth.v1 import auth_service_pb2 as auth_pb
from marie.auth.v1 import auth_service_pb2_grpc as auth_grpc
from marie.providers.v1 import provider_service_pb2 as pb
from marie_auth.service import AuthComponent
from marie_auth.settings import AuthSettings
from marie_kit.channels import insecure_channel
from marie_kit.errors import ServiceError
from marie_kit.limits import LIMITS_HEADER
from marie_kit.server import RunningServer, start_server
from marie_providers.metering import METERED
from marie_providers.settings import ProvidersSettings
from providers_testkit import Service, chat, running_service, stream_outcome

from tests.fakes.ollama import FakeModel, FakeOllama
from tests.stack import free_ports

MODEL = "ollama/counted:latest"
COUNTED = FakeModel(name="counted:latest", reply="one two", prompt_eval_count=10, eval_count=20)
ENDLESS = FakeModel(name="endless:latest", endless=True, chunk_delay=0.02)


@dataclass
class Metered:
    providers: Service
    auth: auth_grpc.AuthServiceAsyncStub

    async def stop_providers(self) -> None:
        """Stop providers: what it queued for the ledger is sent as it closes."""
        await self.providers.server.stop(0.5)

    async def ledger(self, key_id: str) -> auth_pb.QueryUsageResponse:
        end = Timestamp()
        end.GetCurrentTime()
        end.seconds += 60
        return await self.auth.QueryUsage(
            auth_pb.QueryUsageRequest(
                start_time=Timestamp(seconds=end.seconds - 3600),
                end_time=end,
                key_id=key_id,
                group_by=auth_pb.USAGE_GROUP_BY_MODEL,
            ),
            timeout=10,
        )


@pytest.fixture
async def auth_server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    server = await start_server(
        [AuthComponent(AuthSettings(data_dir=tmp_path / "auth", port=0, pepper=None))]
    )
    yield server
    await server.stop(0.5)


@pytest.fixture
async def metered(
    settings: ProvidersSettings, fake: FakeOllama, auth_server: RunningServer
) -> AsyncIterator[Metered]:
    fake.add_model(COUNTED)
    fake.add_model(ENDLESS)
    with_auth = settings.model_copy(update={"auth_addr": auth_server.target})
    async with (
        running_service(with_auth) as running,
        insecure_channel(auth_server.target) as channel,
    ):
        yield Metered(running, auth_grpc.AuthServiceStub(channel))


def marked(
    limits: str, key_id: str = "key-1", owner: str = "team-a"
) -> tuple[tuple[str, str], ...]:
    """The metadata Envoy's key check adds to a metered call."""
    return (
        ("x-marie-key-id", key_id),
        ("x-marie-owner", owner),
        (LIMITS_HEADER, limits),
    )


async def chat_outcome(
    service: Service, metadata: tuple[tuple[str, str], ...], model: str = MODEL
) -> ServiceError | None:
    _, error = await stream_outcome(
        service.stub.StreamChatCompletion(chat(model), metadata=metadata, timeout=10)
    )
    return error


async def test_a_marked_call_beyond_the_requests_per_minute_is_resource_exhausted(
    metered: Metered,
) -> None:
    metadata = marked("rpm=2,tpm=0,tpd=0,concurrent=0")
    assert await chat_outcome(metered.providers, metadata) is None
    assert await chat_outcome(metered.providers, metadata) is None
    call = metered.providers.stub.StreamChatCompletion(chat(MODEL), metadata=metadata, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    error = ServiceError.from_rpc_error(caught.value)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == "RATE_LIMITED"
    assert error.domain == "marie.providers"
    assert error.metadata["limit"] == "requests"
    # One request back takes 30 s at 2 per minute.
    assert 25 <= int(error.metadata["retry_after_seconds"]) <= 30
    trailers = dict(caught.value.trailing_metadata() or ())
    assert trailers["retry-after"] == error.metadata["retry_after_seconds"]


async def test_unmarked_calls_are_neither_limited_nor_recorded(metered: Metered) -> None:
    # The gateway's own calls carry the identity but no marker: it has
    # limited and recorded them already.
    identity = marked("rpm=1")[:2]
    for _ in range(3):
        assert await chat_outcome(metered.providers, identity) is None
    await metered.stop_providers()
    assert (await metered.ledger("key-1")).total.requests == 0


async def test_tokens_are_charged_when_the_answer_reports_them(metered: Metered) -> None:
    # One answer costs 30 tokens, over the 20 of the minute: the next is refused.
    metadata = marked("rpm=0,tpm=20,tpd=0,concurrent=0")
    assert await chat_outcome(metered.providers, metadata) is None
    error = await chat_outcome(metered.providers, metadata)
    assert error is not None and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.metadata["limit"] == "tokens"


async def test_tokens_per_day_refuse_with_their_own_name(metered: Metered) -> None:
    metadata = marked("tpd=25")
    assert await chat_outcome(metered.providers, metadata) is None
    error = await chat_outcome(metered.providers, metadata)
    assert error is not None and error.metadata["limit"] == "tokens_per_day"


async def test_a_concurrency_slot_is_held_until_the_client_cancels(metered: Metered) -> None:
    metadata = marked("concurrent=1")
    stub = metered.providers.stub
    first = stub.StreamChatCompletion(chat("ollama/endless:latest"), metadata=metadata, timeout=30)
    await first.read()  # running
    error = await chat_outcome(metered.providers, metadata)
    assert error is not None and error.metadata["limit"] == "concurrency"
    first.cancel()
    # The handler sees the cancellation a moment later and frees the slot.
    for _ in range(100):
        error = await chat_outcome(metered.providers, metadata)
        if error is None:
            break
        await asyncio.sleep(0.02)
    assert error is None


async def test_every_ended_marked_call_is_in_the_ledger(metered: Metered) -> None:
    metadata = marked("rpm=10", key_id="key-ledger")
    stub = metered.providers.stub
    assert await chat_outcome(metered.providers, metadata) is None
    await stub.CreateEmbeddings(
        pb.CreateEmbeddingsRequest(model="ollama/llama3.2:latest", inputs=["one two three"]),
        metadata=metadata,
        timeout=10,
    )
    missing = await chat_outcome(metered.providers, metadata, "ollama/missing:latest")
    assert missing is not None and missing.code == grpc.StatusCode.NOT_FOUND
    text = stub.StreamCompletion(
        pb.StreamCompletionRequest(model=MODEL, prompt="Once"), metadata=metadata, timeout=10
    )
    assert [chunk async for chunk in text]
    await metered.stop_providers()
    ledger = await metered.ledger("key-ledger")
    assert ledger.total.requests == 4
    assert ledger.total.errors == 1
    by_model = {g.group: g for g in ledger.groups}
    # The chat and the text completion, 10 + 20 tokens each.
    assert by_model[MODEL].requests == 2
    assert by_model[MODEL].prompt_tokens == 20
    assert by_model[MODEL].completion_tokens == 40
    assert by_model["ollama/llama3.2:latest"].prompt_tokens == 3
    assert by_model["ollama/missing:latest"].errors == 1


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("rpm=ten", "not a whole number"),
        ("rpm=-1", "not a whole number"),
        ("rpm=10000000000000000", "not a whole number"),
        ("rpm", "not name=value"),
        ("rpm=1,rpm=2", "given twice"),
    ],
)
async def test_a_malformed_marker_is_refused_not_served_unlimited(
    metered: Metered, value: str, why: str
) -> None:
    error = await chat_outcome(metered.providers, marked(value))
    assert error is not None
    assert error.code == grpc.StatusCode.INTERNAL
    assert error.reason == "BAD_METERING_METADATA"
    assert why in error.message
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await metered.providers.stub.CreateEmbeddings(
            pb.CreateEmbeddingsRequest(model="ollama/llama3.2:latest", inputs=["x"]),
            metadata=marked(value),
            timeout=10,
        )
    assert ServiceError.from_rpc_error(caught.value).reason == "BAD_METERING_METADATA"


async def test_a_marker_without_the_key_id_is_refused(metered: Metered) -> None:
    error = await chat_outcome(metered.providers, ((LIMITS_HEADER, "rpm=5"),))
    assert error is not None and error.reason == "BAD_METERING_METADATA"
    assert "x-marie-key-id" in error.message


async def test_a_marked_lookup_is_counted_but_not_recorded(metered: Metered) -> None:
    metadata = marked("rpm=2,tpm=1,tpd=1", key_id="key-list")
    # Token limits do not hold a lookup back: it spends none.
    for _ in range(2):
        await metered.providers.stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await metered.providers.stub.GetModel(pb.GetModelRequest(model=MODEL), metadata=metadata)
    refused = ServiceError.from_rpc_error(caught.value)
    assert (refused.code, refused.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert refused.metadata["limit"] == "requests"
    await metered.stop_providers()
    assert (await metered.ledger("key-list")).total.requests == 0


async def test_with_auth_unreachable_the_shared_limits_are_counted_here(
    settings: ProvidersSettings, fake: FakeOllama
) -> None:
    # MARIE_PROVIDERS_LIMITS=auth with no auth to lease from: the key is
    # neither refused for want of counters nor let through unlimited.
    fake.add_model(COUNTED)
    (port,) = free_ports(1)
    alone = settings.model_copy(update={"auth_addr": f"127.0.0.1:{port}", "limits": "auth"})
    async with running_service(alone) as running:
        metadata = marked("rpm=1")
        assert await chat_outcome(running, metadata) is None
        error = await chat_outcome(running, metadata)
        assert error is not None and error.metadata["limit"] == "requests"


async def test_a_cache_hit_is_recorded_as_cached_with_no_tokens(metered: Metered) -> None:
    # 30 tokens a call against 40 a minute: the hit, which spends none, is
    # admitted after the first, and a third call from the cache too.
    metadata = marked("rpm=0,tpm=40,tpd=0,concurrent=0")
    cached = chat(MODEL, cache=pb.CachePolicy(mode=pb.CACHE_MODE_USE))
    for _ in range(3):
        chunks, error = await stream_outcome(
            metered.providers.stub.StreamChatCompletion(cached, metadata=metadata, timeout=10)
        )
        assert error is None
        await asyncio.sleep(0.2)  # the answer is stored in the background
    assert chunks[-1].cache == pb.CACHE_RESULT_HIT
    # The replayed answer shows the original call's usage.
    assert chunks[-1].usage.prompt_tokens == 10
    await metered.stop_providers()
    total = (await metered.ledger("key-1")).total
    assert (total.requests, total.cached_requests) == (3, 2)
    assert (total.prompt_tokens, total.completion_tokens) == (10, 20)


def test_a_count_made_without_generating_charges_no_tokens() -> None:
    """Anthropic's count_tokens answer (Usage.counted_only) is the prompt's
    size, not spend; a generated answer's usage is charged as reported."""
    service = "/marie.providers.v1.ProviderService"
    counted = pb.StreamChatCompletionResponse(
        provider="claude",
        model="claude/sonnet",
        usage=pb.Usage(prompt_tokens=40, total_tokens=40, counted_only=True),
    )
    generated = pb.StreamChatCompletionResponse(
        provider="claude", model="claude/sonnet", usage=pb.Usage(prompt_tokens=40)
    )
    stream = METERED[f"{service}/StreamChatCompletion"]
    assert not stream.read(counted).has_usage
    assert stream.read(generated).prompt_tokens == 40
    whole = METERED[f"{service}/CreateChatCompletion"]
    assert whole.read(pb.CreateChatCompletionResponse(chunks=[counted])).prompt_tokens == 0
    assert whole.read(pb.CreateChatCompletionResponse(chunks=[generated])).prompt_tokens == 40
