"""Settings of the providers service, read from `MARIE_PROVIDERS_*` (and `OLLAMA_BASE_URL`,
`MARIE_CONFIG`); providers, aliases and routing come from `config.py`."""

from __future__ import annotations

from pathlib import Path

import httpx
from marie_kit.settings import AuthClientSettings
from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import SettingsConfigDict

DEFAULT_PORT = 50051
DEFAULT_OLLAMA_BASE_URL = "http://localhost:11434"


class ProvidersSettings(AuthClientSettings):
    """What the providers service is configured with."""

    model_config = SettingsConfigDict(env_prefix="MARIE_PROVIDERS_")

    port: int = Field(
        default=DEFAULT_PORT, ge=0, le=65535, description="gRPC port; 0 picks a free one."
    )
    ollama_base_url: str = Field(
        default=DEFAULT_OLLAMA_BASE_URL,
        # The un-prefixed name is the one Ollama's own tools and docs use.
        validation_alias=AliasChoices("OLLAMA_BASE_URL", "ollama_base_url"),
        description="Base URL of the Ollama server (http or https).",
    )
    config: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("MARIE_CONFIG", "config"),
        description=(
            "YAML file of providers, aliases, splits and routing; without it, environment"
            " shortcuts (OLLAMA_BASE_URL, HF_TOKEN, OPENAI_API_KEY, ANTHROPIC_API_KEY) apply."
        ),
    )
    ollama_enabled: bool = Field(
        default=True, description="Whether the Ollama provider is configured at all."
    )
    model_cache_ttl_seconds: float = Field(
        default=300.0,
        ge=0,
        description="How long a provider's model list is served from cache; 0 disables it.",
    )
    connect_timeout_seconds: float = Field(
        default=5.0, gt=0, description="Time allowed to open a connection to an upstream."
    )
    read_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        description=(
            "Longest gap allowed between two reads from an upstream (not the whole "
            "response): a model may think for a while before its first token."
        ),
    )
    health_timeout_seconds: float = Field(
        default=2.0, gt=0, description="Time allowed for one provider health probe."
    )

    @field_validator("ollama_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            url = httpx.URL(value.strip())
        except httpx.InvalidURL as exc:
            raise ValueError(f"not a URL: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http:// or https:// URL with a host")
        # Paths are joined onto the base ("/api/chat"), so a trailing slash would double up.
        return str(url).rstrip("/")
