"""ProvidersSettings read from the environment, and the process entry point."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from marie.providers.v1 import provider_service_pb2 as pb
from marie.providers.v1 import provider_service_pb2_grpc as pb_grpc
from marie_kit.channels import insecure_channel, wait_until_serving
from marie_kit.settings import ServiceSettings, load_settings
from marie_providers.settings import ProvidersSettings
from providers_testkit import free_port

from tests.fakes.ollama import FakeOllama

SERVICE_NAME = "marie.providers.v1.ProviderService"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("MARIE_") or name == "OLLAMA_BASE_URL":
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = ProvidersSettings()

    assert (settings.host, settings.port) == ("127.0.0.1", 50051)
    assert settings.ollama_base_url == "http://localhost:11434"
    assert settings.ollama_enabled
    assert settings.model_cache_ttl_seconds == 300
    assert settings.connect_timeout_seconds == 5
    assert settings.read_timeout_seconds == 300
    assert settings.health_timeout_seconds == 2


def test_every_providers_setting_is_described() -> None:
    own = set(ProvidersSettings.model_fields) - set(ServiceSettings.model_fields) | {"port"}

    assert all(ProvidersSettings.model_fields[name].description for name in own)


def test_settings_come_from_prefixed_variables_and_ollama_base_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MARIE_PROVIDERS_PORT", "6001")
    monkeypatch.setenv("MARIE_PROVIDERS_OLLAMA_ENABLED", "false")
    monkeypatch.setenv("MARIE_PROVIDERS_MODEL_CACHE_TTL_SECONDS", "30")
    monkeypatch.setenv("OLLAMA_BASE_URL", "https://gpu-box.internal:11434/")

    settings = ProvidersSettings()

    assert settings.port == 6001
    assert not settings.ollama_enabled
    assert settings.model_cache_ttl_seconds == 30
    assert settings.ollama_base_url == "https://gpu-box.internal:11434"


def test_the_cache_file_follows_the_data_dir_unless_named(tmp_path: Path) -> None:
    default = ProvidersSettings()
    assert default.cache_file == default.data_dir / "providers_cache.sqlite3"
    moved = default.model_copy(update={"data_dir": tmp_path})
    assert moved.cache_file == tmp_path / "providers_cache.sqlite3"
    named = ProvidersSettings(data_dir=tmp_path, cache_path=tmp_path / "elsewhere.db")
    assert named.model_copy(update={"data_dir": Path("/x")}).cache_file == tmp_path / "elsewhere.db"


@pytest.mark.parametrize("url", ["ftp://gpu-box:11434", "localhost:11434", "http://", "::"])
def test_a_bad_ollama_url_stops_the_process_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    monkeypatch.setenv("OLLAMA_BASE_URL", url)

    with pytest.raises(SystemExit) as exit_info:
        load_settings(ProvidersSettings)

    assert exit_info.value.code == 2
    [message] = capsys.readouterr().err.splitlines()
    assert message.startswith("invalid settings: ")
    assert "OLLAMA_BASE_URL: " in message
    assert repr(url) in message


async def test_the_entry_point_serves_until_sigterm(fake: FakeOllama, tmp_path: Path) -> None:
    target_port = free_port()
    env = {
        **os.environ,
        "MARIE_DATA_DIR": str(tmp_path),
        "MARIE_PROVIDERS_PORT": str(target_port),
        "OLLAMA_BASE_URL": fake.base_url,
    }
    with subprocess.Popen(  # noqa: ASYNC220 - a child process, reaped below
        [sys.executable, "-m", "marie_providers"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as process:
        try:
            target = f"127.0.0.1:{target_port}"
            await wait_until_serving(target, SERVICE_NAME, timeout=20)
            async with insecure_channel(target) as channel:
                reply = await pb_grpc.ProviderServiceStub(channel).ListProviders(
                    pb.ListProvidersRequest()
                )
            process.send_signal(signal.SIGTERM)
            output, _ = await asyncio.to_thread(process.communicate, timeout=15)
        finally:
            if process.poll() is None:
                process.kill()

    assert [p.base_url for p in reply.providers] == [fake.base_url]
    assert process.returncode == 0
    assert b'"message":"serving"' in output


def test_auth_and_limits_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # The suite's shared MARIE_AUTH_PORT names auth unless an address is given.
    for name in ("MARIE_PROVIDERS_AUTH_ADDR", "MARIE_PROVIDERS_LIMITS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MARIE_AUTH_PORT", "50999")
    assert ProvidersSettings().auth_addr == "127.0.0.1:50999"
    assert ProvidersSettings().limits == "local"
    monkeypatch.setenv("MARIE_PROVIDERS_AUTH_ADDR", "auth:50053")
    monkeypatch.setenv("MARIE_PROVIDERS_LIMITS", "auth")
    settings = ProvidersSettings()
    assert (settings.auth_addr, settings.limits) == ("auth:50053", "auth")
