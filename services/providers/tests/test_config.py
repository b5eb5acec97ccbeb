"""The configuration file and the environment shortcuts: what they configure, and the one
line a bad file is reported with."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from marie_providers.config import (
    ConfigError,
    MarieConfig,
    config_from_environment,
    load_config_file,
    parse_config,
)

# The issue's example (one long line split for the line length, not for YAML).
EXAMPLE = """\
providers:
  ollama:   {type: ollama, base_url: http://localhost:11434}
  hf:       {type: huggingface, api_key_env: HF_TOKEN}
  groq:     {type: openai, base_url: https://api.groq.com/openai/v1, api_key_env: GROQ_API_KEY, \
models: [llama-3.1-8b-instant]}
  claude:   {type: anthropic, api_key_env: ANTHROPIC_API_KEY}
aliases:
  fast:     [groq/llama-3.1-8b-instant, ollama/llama3.2:latest]     # tried in order
splits:
  ab-test:  {ollama/llama3.2:latest: 90, hf/meta-llama/Llama-3.1-8B-Instruct: 10}
"""


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "marie.yaml")
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_the_issue_example_parses() -> None:
    config = parse_config(EXAMPLE, "marie.yaml")

    assert list(config.providers) == ["ollama", "hf", "groq", "claude"]
    assert config.providers["groq"].models == ("llama-3.1-8b-instant",)
    assert config.providers["claude"].base_url is None
    assert config.aliases["fast"] == ("groq/llama-3.1-8b-instant", "ollama/llama3.2:latest")
    assert config.splits["ab-test"] == {
        "ollama/llama3.2:latest": 90,
        "hf/meta-llama/Llama-3.1-8B-Instruct": 10,
    }
    assert config.routing.retries == 2


def test_an_empty_file_configures_nothing() -> None:
    assert parse_config("", "marie.yaml") == MarieConfig()


def test_an_unknown_provider_type_names_the_line() -> None:
    text = "providers:\n  ollama: {type: ollama}\n  x:\n    type: gemini\n"

    assert error_of(text) == (
        "marie.yaml, line 4: providers.x.type: unknown provider type 'gemini'"
        " (known: ollama, openai, huggingface, anthropic)"
    )


def test_an_inline_secret_is_refused() -> None:
    text = "providers:\n  groq:\n    type: openai\n    api_key: sk-live-123\n"

    message = error_of(text)
    assert message.startswith("marie.yaml, line 2: providers.groq: 'api_key' would put a secret")
    assert "api_key_env" in message
    assert "sk-live-123" not in message


def test_a_bad_url_names_its_line() -> None:
    text = "providers:\n  a:\n    type: openai\n    base_url: ftp://x\n"

    assert error_of(text) == (
        "marie.yaml, line 4: providers.a.base_url: must be an http:// or https:// URL with a host"
    )


def test_an_unknown_key_names_its_line() -> None:
    text = "providers:\n  a: {type: openai, base_url: 'http://x'}\nroutnig:\n  retries: 1\n"

    assert error_of(text) == "marie.yaml, line 3: routnig: Extra inputs are not permitted"


def test_embedding_input_handling_parses() -> None:
    config = parse_config(
        "providers:\n"
        "  e5: {type: openai, base_url: 'http://x/v1', embedding_input_type: true}\n"
        "  nomic:\n"
        "    type: ollama\n"
        "    embedding_prefixes: {query: 'search_query: ', document: 'search_document: '}\n",
        "marie.yaml",
    )

    assert config.providers["e5"].embedding_input_type is True
    prefixes = config.providers["nomic"].embedding_prefixes
    assert prefixes is not None and prefixes.query == "search_query: "
    assert prefixes.document == "search_document: "


def test_embedding_input_type_on_a_provider_that_takes_none_is_refused() -> None:
    message = error_of("providers:\n  o:\n    type: ollama\n    embedding_input_type: true\n")

    assert message.startswith("marie.yaml, line 2: providers.o: ")
    assert "takes none (use embedding_prefixes)" in message


def test_embedding_input_type_and_prefixes_together_are_refused() -> None:
    message = error_of(
        "providers:\n  a:\n    type: openai\n    embedding_input_type: true\n"
        "    embedding_prefixes: {query: 'q: ', document: 'd: '}\n"
    )

    assert "exclude each other" in message


def test_embedding_prefixes_need_both_prefixes() -> None:
    message = error_of(
        "providers:\n  a:\n    type: openai\n    embedding_prefixes: {query: 'q: '}\n"
    )

    assert "providers.a.embedding_prefixes.document" in message


def test_an_alias_to_an_unconfigured_provider_names_its_line() -> None:
    text = (
        "providers:\n  a: {type: openai, base_url: 'http://x'}\naliases:\n  fast: [a/m, nope/m]\n"
    )

    assert error_of(text) == (
        "marie.yaml, line 4: aliases.fast[1]:"
        " 'nope/m' names provider 'nope', which is not configured"
    )


def test_an_alias_to_a_model_outside_the_allow_list_is_refused() -> None:
    text = (
        "providers:\n  a: {type: openai, base_url: 'http://x', models: [m]}\n"
        "aliases:\n  fast: [a/n]\n"
    )

    assert "is not among the models allowed for 'a'" in error_of(text)


def test_a_split_weight_must_be_positive() -> None:
    text = "providers:\n  a: {type: ollama}\nsplits:\n  ab:\n    a/x: 1\n    a/y: 0\n"

    assert error_of(text) == "marie.yaml, line 6: splits.ab.a/y: weights must be positive"


def test_a_duplicate_key_is_an_error() -> None:
    text = "providers:\n  a: {type: ollama}\n  a: {type: openai}\n"

    assert error_of(text) == "marie.yaml, line 3: duplicate key 'a'"


def test_yaml_syntax_errors_name_the_line() -> None:
    text = "providers:\n  a: {type: ollama\n  b: 1\n"

    assert error_of(text).startswith("marie.yaml, line 3: ")


def test_a_non_mapping_file_is_refused() -> None:
    assert error_of("- a\n- b\n") == (
        "marie.yaml, line 1: the file must be a mapping (providers:, aliases:, …)"
    )


def test_a_bad_api_key_env_name_is_refused() -> None:
    text = "providers:\n  a: {type: openai, base_url: 'http://x', api_key_env: 'sk-123'}\n"

    assert "must be the name of an environment variable" in error_of(text)


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_file(tmp_path / "nope.yaml")

    assert (
        str(caught.value) == f"{tmp_path / 'nope.yaml'}: cannot be read: No such file or directory"
    )


def test_environment_shortcuts_configure_the_usual_providers() -> None:
    config = config_from_environment(
        {
            "HUGGINGFACE_API_KEY": "hf_x",
            "OPENAI_API_KEY": "sk-x",
            "OPENAI_BASE_URL": "http://localhost:8080/v1",
            "ANTHROPIC_API_KEY": "sk-ant-x",
        },
        ollama_base_url="http://localhost:11434",
    )

    assert {name: entry.type for name, entry in config.providers.items()} == {
        "ollama": "ollama",
        "huggingface": "huggingface",
        "openai": "openai",
        "anthropic": "anthropic",
    }
    assert config.providers["huggingface"].api_key_env == "HUGGINGFACE_API_KEY"
    assert config.providers["openai"].base_url == "http://localhost:8080/v1"
    # Only variable names are kept, never the keys.
    assert "sk-x" not in config.model_dump_json()


def test_without_keys_only_ollama_is_configured() -> None:
    config = config_from_environment({}, ollama_base_url="http://localhost:11434")

    assert list(config.providers) == ["ollama"]


def test_a_bad_openai_base_url_variable_is_named() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_environment({"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "nope"})

    assert str(caught.value).startswith("OPENAI_BASE_URL: must be an http:// or https:// URL")


def test_the_service_stops_with_one_line_on_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "marie.yaml"
    path.write_text("providers:\n  a:\n    type: openai\n    base_url: nope\n")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MARIE_")},
        "MARIE_CONFIG": str(path),
        "MARIE_PROVIDERS_PORT": "0",
    }

    done = subprocess.run(
        [sys.executable, "-m", "marie_providers"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"invalid configuration: {path}, line 4: providers.a.base_url:"
        " must be an http:// or https:// URL with a host"
    ]
