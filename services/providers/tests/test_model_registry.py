"""The model registry over real Ollama providers (fake upstreams), with a manual clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from marie_kit.errors import ServiceError
from marie_providers.ollama.client import OllamaProvider
from marie_providers.routing.registry import ModelRegistry
from providers_testkit import closed_port_url

from tests.fakes.ollama import FakeModel, FakeOllama

TTL_SECONDS = 60.0


class ManualClock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def registry(fake: FakeOllama, clock: ManualClock) -> AsyncIterator[ModelRegistry]:
    registry = ModelRegistry([OllamaProvider(fake.base_url)], ttl_seconds=TTL_SECONDS, clock=clock)
    yield registry
    await registry.aclose()


def tags_requests(fake: FakeOllama) -> int:
    return len(fake.requests_to("/api/tags"))


async def test_a_listing_is_reused_until_the_ttl_passes(
    registry: ModelRegistry, fake: FakeOllama, clock: ManualClock
) -> None:
    await registry.list_models()
    clock.advance(TTL_SECONDS - 1)
    await registry.list_models()
    assert tags_requests(fake) == 1

    clock.advance(2)
    await registry.list_models()

    assert tags_requests(fake) == 2


async def test_concurrent_listings_share_one_upstream_call(
    registry: ModelRegistry, fake: FakeOllama
) -> None:
    results = await asyncio.gather(*(registry.list_models() for _ in range(10)))

    assert tags_requests(fake) == 1
    assert all(models == results[0][0] for models, _ in results)


async def test_details_are_cached_like_listings(registry: ModelRegistry, fake: FakeOllama) -> None:
    await registry.get_model("ollama/llama3.2:latest")
    await registry.get_model("ollama/llama3.2:latest")

    assert len(fake.requests_to("/api/show")) == 1


async def test_an_explicit_provider_prefix_resolves_without_calling_the_upstream(
    registry: ModelRegistry, fake: FakeOllama
) -> None:
    provider, name = await registry.resolve("ollama/anything:at-all")

    assert (provider.name, name) == ("ollama", "anything:at-all")
    assert fake.requests == []


async def test_a_provider_given_apart_takes_the_model_as_its_own_name(
    registry: ModelRegistry, fake: FakeOllama
) -> None:
    provider, name = await registry.resolve("llama3.2:latest", "ollama")

    assert (provider.name, name) == ("ollama", "llama3.2:latest")
    assert fake.requests == []


async def test_an_unknown_provider_is_provider_not_found(registry: ModelRegistry) -> None:
    with pytest.raises(ServiceError) as info:
        await registry.resolve("llama3.2", "openai")

    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.reason == "PROVIDER_NOT_FOUND"


async def test_a_name_with_slashes_resolves_as_a_bare_name(
    registry: ModelRegistry, fake: FakeOllama
) -> None:
    hub_name = "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"
    fake.add_model(FakeModel(name=hub_name))

    provider, name = await registry.resolve(hub_name)

    assert (provider.name, name) == ("ollama", hub_name)


async def test_a_slash_prefix_that_is_no_provider_is_not_split(registry: ModelRegistry) -> None:
    with pytest.raises(ServiceError) as info:
        await registry.resolve("meta-llama/Llama-3.1-8B-Instruct")

    assert info.value.reason == "MODEL_NOT_FOUND"
    assert "meta-llama/Llama-3.1-8B-Instruct" in info.value.message


async def test_a_model_pulled_after_the_listing_is_found_by_a_refresh(
    registry: ModelRegistry, fake: FakeOllama, clock: ManualClock
) -> None:
    await registry.list_models()
    fake.add_model(FakeModel(name="phi3:mini"))
    clock.advance(10)

    provider, name = await registry.resolve("phi3:mini")

    assert (provider.name, name) == ("ollama", "phi3:mini")
    assert tags_requests(fake) == 2


async def test_repeated_unknown_names_do_not_hammer_the_upstream(
    registry: ModelRegistry, fake: FakeOllama
) -> None:
    for _ in range(3):
        with pytest.raises(ServiceError):
            await registry.resolve("typo-model")

    assert tags_requests(fake) == 1


async def test_a_bare_name_with_its_provider_down_is_unavailable(clock: ManualClock) -> None:
    registry = ModelRegistry(
        [OllamaProvider(closed_port_url())], ttl_seconds=TTL_SECONDS, clock=clock
    )
    try:
        with pytest.raises(ServiceError) as info:
            await registry.resolve("llama3.2")
    finally:
        await registry.aclose()

    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.reason == "PROVIDER_UNAVAILABLE"


async def test_providers_must_have_distinct_names(fake: FakeOllama) -> None:
    providers = [OllamaProvider(fake.base_url), OllamaProvider(fake.base_url)]
    try:
        with pytest.raises(ValueError, match="ollama"):
            ModelRegistry(providers, ttl_seconds=TTL_SECONDS)
    finally:
        for provider in providers:
            await provider.aclose()
