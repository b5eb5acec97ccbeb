"""Settings of the providers service, read from `MARIE_PROVIDERS_*` (and `OLLAMA_BASE_URL`,
`MARIE_CONFIG`); providers, aliases and routing come from `config.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import httpx
from marie_kit.settings import AuthClientSettings
from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import SettingsConfigDict

DEFAULT_PORT = 50051
DEFAULT_OLLAMA_BASE_URL = "http://localhost:11434"
CACHE_FILE_NAME = "providers_cache.sqlite3"
DEFAULT_CACHE_TTL_SECONDS = 3600.0
DEFAULT_CACHE_MAX_BYTES = 512 * 1024 * 1024
DEFAULT_CACHE_MAX_ENTRY_BYTES = 4 * 1024 * 1024


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

    cache_store: Literal["sqlite", "opensearch", "off"] = Field(
        default="sqlite",
        description="Where the response cache keeps answers: the embedded SQLite file"
        " (cache_path), OpenSearch (OPENSEARCH_URL; shared by every replica), or off"
        " (no call is answered from or stored in a cache).",
    )
    cache_path: Path | None = Field(
        default=None,
        description=f"The cache's SQLite file; defaults to <MARIE_DATA_DIR>/{CACHE_FILE_NAME}.",
    )
    opensearch_url: str = Field(
        default="http://localhost:9200",
        validation_alias=AliasChoices("OPENSEARCH_URL", "opensearch_url"),
        description="The OpenSearch cluster of the opensearch cache store.",
    )
    opensearch_index_prefix: str = Field(
        default="marie",
        pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
        description="Prefix of the cache's index name (<prefix>_providers_cache).",
    )
    cache_ttl_seconds: float = Field(
        default=DEFAULT_CACHE_TTL_SECONDS,
        gt=0,
        description="How long a stored answer may be replayed; a caller's max-age can only"
        " shorten it.",
    )
    cache_max_bytes: int = Field(
        default=DEFAULT_CACHE_MAX_BYTES,
        gt=0,
        description="Total size of the stored answers; past it the oldest are evicted.",
    )
    cache_max_entry_bytes: int = Field(
        default=DEFAULT_CACHE_MAX_ENTRY_BYTES,
        gt=0,
        description="Largest answer stored (serialized); larger ones are not cached.",
    )
    cache_lookup_timeout_seconds: float = Field(
        default=0.5,
        gt=0,
        description="Longest a cache lookup may take; a slower one (a store down or"
        " overloaded) is a miss, so the cache never delays an answer by more.",
    )
    cache_chat_by_default: bool = Field(
        default=False,
        description="Cache chat and text completions the caller did not ask about too, when"
        " they sample at temperature 0 (never at a temperature above 0 unless asked).",
    )

    @property
    def cache_file(self) -> Path:
        """The cache's SQLite file: `cache_path`, else in the data directory
        (derived when read, so a copy with another `data_dir` follows it)."""
        return self.cache_path or self.data_dir / CACHE_FILE_NAME

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
