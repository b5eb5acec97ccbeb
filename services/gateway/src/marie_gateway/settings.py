"""Gateway settings, from `MARIE_GATEWAY_*` (and the suite-wide port variables)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from marie_kit.settings import OptionalDir, usage_spool_field
from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from marie_gateway.http.client_address import parse_networks

DEFAULT_PROVIDERS_PORT = 50051
DEFAULT_AUTH_PORT = 50053
DEFAULT_MEMORY_PORT = 50052


class GatewaySettings(BaseSettings):
    """Where the gateway listens and which services it talks to."""

    model_config = SettingsConfigDict(env_prefix="MARIE_GATEWAY_", extra="ignore", frozen=True)

    host: str = Field(default="127.0.0.1", description="Interface the HTTP server binds to.")
    port: int = Field(default=8000, ge=0, le=65535, description="HTTP port.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"] = (
        Field(default="INFO", validation_alias=AliasChoices("MARIE_LOG_LEVEL", "log_level"))
    )
    providers_addr: str = Field(
        default="",
        description="host:port of the providers service; default 127.0.0.1:$MARIE_PROVIDERS_PORT.",
    )
    auth_addr: str = Field(
        default="", description="host:port of the auth service; default 127.0.0.1:$MARIE_AUTH_PORT."
    )
    providers_port: int = Field(
        default=DEFAULT_PROVIDERS_PORT,
        ge=1,
        le=65535,
        validation_alias=AliasChoices("MARIE_PROVIDERS_PORT", "providers_port"),
    )
    auth_port: int = Field(
        default=DEFAULT_AUTH_PORT,
        ge=1,
        le=65535,
        validation_alias=AliasChoices("MARIE_AUTH_PORT", "auth_port"),
    )
    memory_addr: str = Field(
        default="",
        description="host:port of the memory service; default 127.0.0.1:$MARIE_MEMORY_PORT.",
    )
    memory_port: int = Field(
        default=DEFAULT_MEMORY_PORT,
        ge=1,
        le=65535,
        validation_alias=AliasChoices("MARIE_MEMORY_PORT", "memory_port"),
    )
    memory: Literal["off", "conversations", "all"] = Field(
        default="conversations",
        description=(
            "Which chats are enriched with the user's memories: none, conversation turns "
            "(/api/conversations/{id}/messages), or also /v1/chat/completions calls with `user`."
        ),
    )
    memory_timeout_seconds: float = Field(
        default=0.3,
        gt=0,
        le=10,
        description="Deadline of the memory lookup before a chat; after it the chat goes on.",
    )
    memory_top_k: int = Field(
        default=5, ge=1, le=50, description="Memories added to an enriched chat at most."
    )
    key_cache_ttl_seconds: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        description="Longest a key validation is reused without asking auth (0 disables the "
        "cache). Revocations still apply at once through auth's event stream.",
    )
    request_timeout_seconds: float = Field(
        default=600.0, gt=0, description="Deadline of one chat completion, end to end."
    )
    control_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Deadline of model listing, key validation and the like."
    )
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above)."
    )
    max_inflight_body_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Request-body bytes held at once across all requests; more waits "
        "(within the body timeout) for others to finish. At least max_body_bytes.",
    )
    header_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="Time a client has to send a request's headers, from its first byte "
        "(or from connecting); then 408 and the connection closes.",
    )
    body_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Time a client has to send a whole request body; then 408.",
    )
    sse_keep_alive_seconds: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        description="Quiet time after which an open SSE stream gets a comment line.",
    )
    cors_origins: str = Field(
        default="",
        description="Comma-separated origins browsers may call from ('*' for any); "
        "none by default.",
    )
    console_dir: str = Field(
        default="",
        description="Directory of the built web console (index.html, assets/); "
        "default: the checkout's web/dist, built by `make web`.",
    )
    keep_alive_seconds: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="How long an idle keep-alive connection stays open.",
    )
    grace_seconds: float = Field(
        default=10.0,
        ge=0,
        validation_alias=AliasChoices("MARIE_GRACE_SECONDS", "grace_seconds"),
        description="How long in-flight requests may run on after SIGTERM.",
    )
    drain_delay_seconds: float = Field(
        default=0.0,
        ge=0,
        le=60,
        validation_alias=AliasChoices("MARIE_DRAIN_DELAY_SECONDS", "drain_delay_seconds"),
        description="After SIGTERM, how long the gateway goes on taking new requests "
        "while /readyz answers 503, before it stops listening: a load balancer that polls "
        "readiness (Envoy: every 5 s) then stops sending requests in time. 0: at once.",
    )

    invalid_key_threshold: int = Field(
        default=20,
        ge=0,
        description="Invalid API keys one client address may present within "
        "invalid_key_window_seconds before it gets 429 for keys not validated recently "
        "(0 disables the slow-down).",
    )
    invalid_key_window_seconds: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="The window of invalid_key_threshold: the allowance refills over it.",
    )

    trusted_proxies: str = Field(
        default="",
        description="Comma-separated CIDRs of the proxies in front of the gateway (Envoy, "
        "a load balancer) whose X-Forwarded-For is believed, for the client address the "
        "invalid-key slow-down counts by (the rightmost address not in the list). Empty: "
        "the header is ignored and the connection's peer is the client.",
    )
    limits: Literal["local", "auth"] = Field(
        default="local",
        description="Where per-key limits are counted: 'local' in this gateway (exact, for "
        "one gateway), 'auth' in auth's store, leased to each gateway in small shares "
        "(for several gateway replicas; see docs/decisions.md for the bound).",
    )

    config: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("MARIE_CONFIG", "config"),
        description="The suite's YAML configuration file (the providers service's); the "
        "gateway reads its `prices` map, from which every usage record's cost is computed.",
    )

    admin_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("MARIE_ADMIN_KEY", "admin_key"),
        description="A secret accepted as an API key with the admin scope (the first "
        "admin, before any key exists); compared as a digest, never logged. Unset or "
        "empty: none.",
    )
    usage_flush_seconds: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="How often queued usage records are sent to auth's ledger.",
    )
    usage_batch_size: int = Field(
        default=200,
        ge=1,
        le=1000,
        description="Usage records per batch; a full batch is sent at once.",
    )
    usage_spool_dir: OptionalDir = usage_spool_field()
    usage_max_queue: int = Field(
        default=100_000,
        ge=1,
        description="Usage records held while auth is unreachable; beyond, new ones are "
        "dropped (counted in marie_usage_records_dropped_total).",
    )

    @field_validator("config", mode="before")
    @classmethod
    def _no_config(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        parse_networks(value)  # a bad CIDR is refused at start, naming it
        return value

    @model_validator(mode="after")
    def _default_addresses(self) -> GatewaySettings:
        # frozen model: fill derived defaults through object.__setattr__ once, at load.
        if not self.providers_addr:
            object.__setattr__(self, "providers_addr", f"127.0.0.1:{self.providers_port}")
        if not self.auth_addr:
            object.__setattr__(self, "auth_addr", f"127.0.0.1:{self.auth_port}")
        if not self.memory_addr:
            object.__setattr__(self, "memory_addr", f"127.0.0.1:{self.memory_port}")
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise ValueError(
                "MARIE_GATEWAY_MAX_INFLIGHT_BODY_BYTES must be at least "
                "MARIE_GATEWAY_MAX_BODY_BYTES, or the largest body could never be read"
            )
        return self
