"""Fixtures: one fake Ollama for the session (reset per test), a fresh providers server per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

# `providers_testkit` is importable through the pytest `pythonpath` setting; it is
# uniquely named so it clashes with no other service's helpers.
from marie_providers.settings import ProvidersSettings
from providers_testkit import Service, running_service

from tests.fakes.ollama import FakeOllama

# Variables that would configure providers (or a config file) from the machine running the tests.
PROVIDER_VARIABLES = (
    "MARIE_CONFIG",
    "HF_TOKEN",
    "HUGGINGFACE_API_KEY",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
)


@pytest.fixture(autouse=True)
def no_provider_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests configure providers themselves; none leak in from the environment."""
    for name in PROVIDER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def ollama_server() -> Iterator[FakeOllama]:
    with FakeOllama() as fake:
        yield fake


@pytest.fixture
def fake(ollama_server: FakeOllama) -> FakeOllama:
    """The fake Ollama with its default models and no recorded requests."""
    ollama_server.reset(models=True)
    return ollama_server


@pytest.fixture
def settings(fake: FakeOllama, tmp_path: Path) -> ProvidersSettings:
    # Explicit values win over whatever MARIE_* variables the environment holds.
    return ProvidersSettings(
        data_dir=tmp_path,
        ollama_base_url=fake.base_url,
        ollama_enabled=True,
        port=0,
        model_cache_ttl_seconds=300,
        connect_timeout_seconds=2,
        read_timeout_seconds=5,
        health_timeout_seconds=2,
    )


@pytest.fixture
async def service(settings: ProvidersSettings, fake: FakeOllama) -> AsyncIterator[Service]:
    async with running_service(settings) as running:
        # The service's first health round (at start) has run: the fake
        # records only what the test itself causes.
        fake.reset()
        yield running
