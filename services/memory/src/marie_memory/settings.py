"""The memory service's settings, read from `MARIE_MEMORY_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from marie_kit.settings import DEFAULT_DATA_DIR, AuthClientSettings
from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

DEFAULT_PORT = 50052
DEFAULT_PROVIDERS_PORT = 50051
DB_FILE_NAME = "memory.sqlite3"


class MemorySettings(AuthClientSettings):
    """How the memory service is configured."""

    model_config = SettingsConfigDict(env_prefix="MARIE_MEMORY_", env_ignore_empty=True)

    host: str = Field(default="127.0.0.1", description="Interface the gRPC server binds to.")
    port: int = Field(
        default=DEFAULT_PORT, ge=0, le=65535, description="gRPC port; 0 picks a free one."
    )
    store: Literal["sqlite", "opensearch"] = Field(
        default="sqlite",
        description="Storage backend: the embedded SQLite store, or OpenSearch (OPENSEARCH_URL).",
    )
    opensearch_url: str = Field(
        default="http://localhost:9200",
        validation_alias=AliasChoices("OPENSEARCH_URL", "opensearch_url"),
        description="The OpenSearch cluster of the opensearch store.",
    )
    opensearch_index_prefix: str = Field(
        default="marie",
        pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
        description="Prefix of the store's index names (<prefix>_memory, …).",
    )
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
    providers_addr: str = Field(
        default="",
        description="host:port of the providers service; default 127.0.0.1:$MARIE_PROVIDERS_PORT.",
    )
    providers_port: int = Field(
        default=DEFAULT_PROVIDERS_PORT,
        ge=1,
        le=65535,
        validation_alias=AliasChoices("MARIE_PROVIDERS_PORT", "providers_port"),
    )
    embedding_model: str = Field(
        default="",
        max_length=256,
        description='Embedding model, e.g. "ollama/nomic-embed-text"; empty: keyword search only.',
    )
    extraction_model: str = Field(
        default="",
        max_length=256,
        description='Default fact extraction model, e.g. "ollama/llama3.2"; empty: none.',
    )
    on_model_change: Literal["reembed", "refuse"] = Field(
        default="reembed",
        description=(
            "What to do at start when the store holds vectors of another embedding model: "
            "drop them and re-embed every memory in the background, or refuse to start."
        ),
    )
    vector_weight: float = Field(
        default=0.35,
        ge=0,
        le=1,
        description="Weight of vector similarity (min-max scaled) in hybrid scores.",
    )
    keyword_weight: float = Field(
        default=0.65,
        ge=0,
        le=1,
        description="Weight of BM25 relevance (min-max scaled) in hybrid scores.",
    )
    embedding_timeout_seconds: float = Field(
        default=10.0, gt=0, le=600, description="Deadline of one embedding call."
    )
    extraction_timeout_seconds: float = Field(
        default=120.0, gt=0, le=3600, description="Deadline of one extraction model call."
    )
    similar_memories: int = Field(
        default=5, ge=1, le=50, description="Stored memories an extracted fact is compared with."
    )
    queue_poll_seconds: float = Field(
        default=1.0, gt=0, le=3600, description="How often the extraction queue is checked."
    )
    queue_backoff_seconds: float = Field(
        default=2.0,
        gt=0,
        le=3600,
        description="First retry delay of a queued job; doubles on each attempt.",
    )
    queue_max_backoff_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Longest wait between two attempts of a queued job (unless providers "
        "asks for a longer one).",
    )
    queue_max_age_seconds: float = Field(
        default=86_400.0,
        gt=0,
        le=365 * 86_400,
        description="Age after which a queued job that has never succeeded (the model or "
        "the store away all that time) is marked failed.",
    )
    embedding_max_chars: int = Field(
        default=2000,
        ge=16,
        le=1_048_576,
        description="Longest text sent to the embedding model; longer texts are cut to their "
        "start (a message then says so in its metadata).",
    )
    close_memory_similarity: float = Field(
        default=0.88,
        ge=0,
        le=1,
        description="Cosine similarity from which a stored memory is close enough to an "
        "extracted fact for the model to decide between them (a shared keyword also is).",
    )

    @model_validator(mode="after")
    def _derive(self) -> Self:
        # Frozen model: derived defaults are filled once, at construction.
        if "db_path" not in self.model_fields_set:
            object.__setattr__(self, "db_path", self.data_dir / DB_FILE_NAME)
        if not self.providers_addr:
            object.__setattr__(self, "providers_addr", f"127.0.0.1:{self.providers_port}")
        if self.vector_weight + self.keyword_weight <= 0:
            raise ValueError(
                "MARIE_MEMORY_VECTOR_WEIGHT and MARIE_MEMORY_KEYWORD_WEIGHT cannot both be 0"
            )
        return self
