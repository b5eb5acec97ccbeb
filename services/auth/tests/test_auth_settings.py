"""AuthSettings: MARIE_AUTH_* variables, defaults, and one clear line for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
from marie_auth.settings import AuthSettings
from marie_kit.settings import load_settings

_VARIABLES = (
    "MARIE_DATA_DIR",
    "MARIE_AUTH_HOST",
    "MARIE_AUTH_PORT",
    "MARIE_AUTH_PEPPER",
    "MARIE_AUTH_VALIDATION_CACHE_TTL_SECONDS",
    "MARIE_AUTH_STORE",
    "MARIE_AUTH_DB_PATH",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_defaults_serve_localhost_on_50053_with_the_database_in_the_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MARIE_DATA_DIR", str(tmp_path))

    settings = AuthSettings()

    assert (settings.host, settings.port) == ("127.0.0.1", 50053)
    assert settings.db_path == tmp_path / "auth.sqlite3"
    assert settings.store == "sqlite"
    assert settings.validation_cache_ttl_seconds == 60
    assert settings.pepper is None
    assert settings.pepper_bytes == b""


def test_values_come_from_marie_auth_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARIE_AUTH_PORT", "6000")
    monkeypatch.setenv("MARIE_AUTH_PEPPER", "a-long-random-pepper")
    monkeypatch.setenv("MARIE_AUTH_VALIDATION_CACHE_TTL_SECONDS", "5")
    monkeypatch.setenv("MARIE_AUTH_DB_PATH", "/srv/keys.db")

    settings = AuthSettings()

    assert settings.port == 6000
    assert settings.pepper_bytes == b"a-long-random-pepper"
    assert settings.validation_cache_ttl_seconds == 5
    assert settings.db_path == Path("/srv/keys.db")


def test_an_empty_pepper_variable_means_no_pepper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARIE_AUTH_PEPPER", "")

    assert AuthSettings().pepper is None


def test_the_pepper_is_hidden_from_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARIE_AUTH_PEPPER", "a-long-random-pepper")

    settings = AuthSettings()

    assert "a-long-random-pepper" not in repr(settings)
    assert "a-long-random-pepper" not in str(settings.model_dump())


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MARIE_AUTH_PORT", "not-a-port"),
        ("MARIE_AUTH_VALIDATION_CACHE_TTL_SECONDS", "-1"),
        ("MARIE_AUTH_STORE", "redis"),
    ],
)
def test_a_bad_value_stops_with_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(SystemExit) as exit_info:
        load_settings(AuthSettings)

    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert variable in lines[0]


def test_every_auth_setting_is_described() -> None:
    own = AuthSettings.__annotations__.keys() - {"model_config"}
    undescribed = [name for name in own if not AuthSettings.model_fields[name].description]

    assert undescribed == []
