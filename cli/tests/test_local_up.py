"""When `marie up` starts local models: only when nothing else could answer."""

from __future__ import annotations

import pytest
from marie_cli import local_up

from tests.fakes import FakeOllama

DEAD = "http://127.0.0.1:9"


async def test_no_provider_and_no_ollama_starts_them_saying_why() -> None:
    reason = await local_up.reason_to_start({"OLLAMA_BASE_URL": DEAD})
    assert reason == f"no provider is configured and no Ollama answers at {DEAD}"


async def test_ollama_disabled_starts_them() -> None:
    env = {"MARIE_PROVIDERS_OLLAMA_ENABLED": "false"}
    assert await local_up.reason_to_start(env) == "no provider is configured (Ollama is disabled)"


@pytest.mark.parametrize(
    "variable", ["MARIE_CONFIG", "OPENAI_API_KEY", "HF_TOKEN", "ANTHROPIC_API_KEY"]
)
async def test_a_configured_provider_means_none(variable: str) -> None:
    assert await local_up.reason_to_start({"OLLAMA_BASE_URL": DEAD, variable: "x"}) is None


async def test_an_ollama_that_answers_means_none() -> None:
    with FakeOllama() as ollama:
        assert await local_up.reason_to_start({"OLLAMA_BASE_URL": ollama.base_url}) is None


async def test_off_means_none() -> None:
    env = {"OLLAMA_BASE_URL": DEAD, "MARIE_LOCAL_MODELS": "OFF"}
    assert await local_up.reason_to_start(env) is None


def test_any_other_value_is_refused_naming_the_variable() -> None:
    with pytest.raises(local_up.SettingError, match="MARIE_LOCAL_MODELS: must be one of auto"):
        local_up.choice({"MARIE_LOCAL_MODELS": "yes please"})
