"""The auth service's settings, read from `MARIE_AUTH_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from marie_kit.settings import DEFAULT_DATA_DIR, ServiceSettings
from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

DEFAULT_PORT = 50053
DEFAULT_VALIDATION_CACHE_TTL_SECONDS = 60
# A validation may be cached by gateways at most this long (revocations still
# reach them at once through WatchKeyEvents).
MAX_VALIDATION_CACHE_TTL_SECONDS = 3600
DB_FILE_NAME = "auth.sqlite3"


class AuthSettings(ServiceSettings):
    """How the auth service is configured."""

    # Empty variables count as unset: compose files pass `MARIE_AUTH_PEPPER=`
    # for "not configured".
    model_config = SettingsConfigDict(env_prefix="MARIE_AUTH_", env_ignore_empty=True)

    host: str = Field(default="127.0.0.1", description="Interface the gRPC server binds to.")
    port: int = Field(
        default=DEFAULT_PORT, ge=0, le=65535, description="gRPC port; 0 picks a free one."
    )
    pepper: SecretStr | None = Field(
        default=None,
        description=(
            "Server-side secret mixed into key digests (use 32+ random characters). When "
            "set, keys are stored as HMAC-SHA256(pepper, key) instead of SHA-256(key), so a "
            "stolen database alone cannot be used to check guessed keys. Changing or "
            "removing it invalidates every existing key."
        ),
    )
    validation_cache_ttl_seconds: int = Field(
        default=DEFAULT_VALIDATION_CACHE_TTL_SECONDS,
        ge=0,
        le=MAX_VALIDATION_CACHE_TTL_SECONDS,
        description=(
            "How long callers may cache a successful validation, returned as "
            "cache_ttl_seconds (never beyond the key's expiry); 0 disables caching."
        ),
    )
    store: Literal["sqlite", "opensearch"] = Field(
        default="sqlite",
        description="Where keys, their events, the usage ledger, the limit counters and the "
        "budgets live: "
        "the embedded SQLite file, or OpenSearch (OPENSEARCH_URL).",
    )
    opensearch_url: str = Field(
        default="http://localhost:9200",
        validation_alias=AliasChoices("OPENSEARCH_URL", "opensearch_url"),
        description="The OpenSearch cluster of the opensearch store.",
    )
    opensearch_index_prefix: str = Field(
        default="marie",
        pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
        description="Prefix of the store's index names (<prefix>_auth_keys, …).",
    )
    # When not given, derived from data_dir (see _derive_db_path); the static
    # default is what that gives for the default data_dir.
    db_path: Path = Field(
        default=Path(DEFAULT_DATA_DIR) / DB_FILE_NAME,
        description=f"SQLite database file; defaults to <MARIE_DATA_DIR>/{DB_FILE_NAME}.",
    )

    db_max_bytes: int = Field(
        default=0,
        ge=0,
        description="Largest size of the SQLite file; a write past it is refused as on a "
        "full disk (507, not ready until space is freed). 0: no limit but the disk's.",
    )

    @model_validator(mode="after")
    def _derive_db_path(self) -> Self:
        if "db_path" not in self.model_fields_set:
            # The model is frozen; this is its own construction, as in a frozen
            # dataclass's __post_init__.
            object.__setattr__(self, "db_path", self.data_dir / DB_FILE_NAME)
        return self

    @property
    def pepper_bytes(self) -> bytes:
        """The pepper as HMAC key bytes; empty when none is configured."""
        return self.pepper.get_secret_value().encode() if self.pepper else b""
