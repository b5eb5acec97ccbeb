"""The providers configuration that compose mounts (deploy/providers/marie.yaml
as MARIE_CONFIG), checked as the container reads it: the compose file's
wiring, then the file itself loaded and served by a real providers service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from marie.providers.v1 import provider_service_pb2 as pb
from marie_providers.config import load_config_file
from marie_providers.settings import ProvidersSettings
from providers_testkit import running_service

ROOT = Path(__file__).resolve().parents[3]


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return compose


def test_compose_mounts_the_example_config_where_marie_config_points() -> None:
    providers = _compose()["services"]["providers"]
    target = providers["environment"]["MARIE_CONFIG"]
    mounts = {}
    for volume in providers["volumes"]:
        source, mounted, *mode = volume.split(":")
        mounts[mounted] = (source, mode[0] if mode else "rw")
    source, mode = mounts[target]
    assert mode == "ro"
    assert (ROOT / source).is_file()
    # Every key variable the file names is passed through from the host.
    config = load_config_file(ROOT / source)
    named = {p.api_key_env for p in config.providers.values() if p.api_key_env}
    assert named == {"HF_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"}
    assert named <= providers["environment"].keys()
    # The gateway reads the same file (for its prices).
    gateway = _compose()["services"]["gateway"]
    assert gateway["environment"]["MARIE_CONFIG"] == target
    assert f"{source}:{target}:ro" in gateway["volumes"]
    assert len(config.price_table()) == 1
    # Ollama is the compose service of that name.
    assert config.providers["ollama"].base_url == "http://ollama:11434"
    assert "ollama" in _compose()["services"]


async def test_the_example_config_starts_a_service_that_names_missing_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for variable in ("HF_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.setenv(variable, "")  # as compose passes an unset one
    config = load_config_file(ROOT / "deploy" / "providers" / "marie.yaml")
    settings = ProvidersSettings(
        port=0, connect_timeout_seconds=1, read_timeout_seconds=2, health_timeout_seconds=1
    )
    async with running_service(settings, config=config) as service:
        health = await service.stub.GetProviderHealth(pb.GetProviderHealthRequest())
    by_name = {p.provider: p for p in health.providers}
    assert set(by_name) == {"ollama", "huggingface", "openai", "anthropic"}
    for name, variable in (
        ("huggingface", "HF_TOKEN"),
        ("openai", "OPENAI_API_KEY"),
        ("anthropic", "ANTHROPIC_API_KEY"),
    ):
        assert not by_name[name].available
        assert variable in by_name[name].error


def test_compose_gives_every_usage_recorder_a_spool_on_a_volume() -> None:
    compose = _compose()
    for name in ("gateway", "providers", "memory"):
        service = compose["services"][name]
        spool = service["environment"]["MARIE_USAGE_SPOOL_DIR"]
        # On a named volume: it outlives the container (a killed replica's
        # records are sent by its restart), unlike the read-only root or /tmp.
        assert f"usage-spool:{spool}" in service["volumes"], name
    assert "usage-spool" in compose["volumes"]
