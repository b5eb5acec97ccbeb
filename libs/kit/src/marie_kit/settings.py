"""Settings from the environment, validated at start.

Each service subclasses `ServiceSettings` with its own prefix
(`MARIE_PROVIDERS_`, `MARIE_AUTH_`, …). A bad value stops the process with
one clear line naming the variable, not a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Self, TypeVar

from pydantic import (
    AliasChoices,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = "./.marie"
DEFAULT_GRACE_SECONDS = 10.0
DEFAULT_MAX_CONNECTION_AGE_SECONDS = 300.0

#: A directory that may be left unset (an empty variable counts as unset).
OptionalDir = Annotated[Path | None, BeforeValidator(lambda v: None if v == "" else v)]


def usage_spool_field() -> Any:
    """The usage spool's setting, the same in every service that records
    usage (the gateway, and providers and memory for their metered calls)."""
    return Field(
        default=None,
        validation_alias=AliasChoices("MARIE_USAGE_SPOOL_DIR", "usage_spool_dir"),
        description="Directory where usage records wait on disk until auth's ledger has "
        "them, so a killed process loses none; the next process started on it sends "
        "them (several processes may share it). Unset: records wait in memory only.",
    )


DEFAULT_AUTH_PORT = 50053
DRAIN_DELAY_DESCRIPTION = (
    "After SIGTERM, how long the service goes on taking new calls while it reports "
    "NOT_SERVING, before it stops listening: a load balancer that polls health (Envoy: "
    "every 5 s) then stops sending calls in time, instead of having them refused. "
    "0: stop listening at once (clients that watch health need no delay)."
)

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"]


class ServiceSettings(BaseSettings):
    """What every gRPC service is configured with."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    host: str = Field(default="127.0.0.1", description="Interface the gRPC server binds to.")
    port: int = Field(default=0, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    log_level: LogLevel = Field(
        default="INFO",
        validation_alias=AliasChoices("MARIE_LOG_LEVEL", "log_level"),
        description="Least severe log level written to stdout.",
    )
    data_dir: Path = Field(
        default=Path(DEFAULT_DATA_DIR),
        validation_alias=AliasChoices("MARIE_DATA_DIR", "data_dir"),
        description="Where embedded stores keep their files.",
    )
    grace_seconds: float = Field(
        default=DEFAULT_GRACE_SECONDS,
        ge=0,
        le=600,
        validation_alias=AliasChoices("MARIE_GRACE_SECONDS", "grace_seconds"),
        description="How long in-flight calls may run on after SIGTERM.",
    )
    drain_delay_seconds: float = Field(
        default=0.0,
        ge=0,
        le=60,
        validation_alias=AliasChoices("MARIE_DRAIN_DELAY_SECONDS", "drain_delay_seconds"),
        description=DRAIN_DELAY_DESCRIPTION,
    )
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the Prometheus /metrics endpoint (on `host`); 0: no endpoint.",
    )
    max_connection_age_seconds: float = Field(
        default=DEFAULT_MAX_CONNECTION_AGE_SECONDS,
        ge=0,
        validation_alias=AliasChoices(
            "MARIE_MAX_CONNECTION_AGE_SECONDS", "max_connection_age_seconds"
        ),
        description="After this long (±10 %) a client connection is asked to move on "
        "(HTTP/2 GOAWAY; calls in flight finish): clients resolve the service's name "
        "again and reach replicas added since. 0: connections live for ever.",
    )


class AuthClientSettings(ServiceSettings):
    """A service that calls auth (the usage ledger, shared limits)."""

    limits: Literal["local", "auth"] = Field(
        default="local",
        description="Where the per-key limits of gRPC calls through Envoy are counted: "
        "'local' in this process, 'auth' in auth's store, leased in small shares and "
        "shared with the gateways' HTTP API (as MARIE_GATEWAY_LIMITS).",
    )

    auth_addr: str = Field(
        default="",
        description="host:port of the auth service; default 127.0.0.1:$MARIE_AUTH_PORT.",
    )
    usage_spool_dir: OptionalDir = usage_spool_field()
    auth_port: int = Field(
        default=DEFAULT_AUTH_PORT,
        ge=1,
        le=65535,
        validation_alias=AliasChoices("MARIE_AUTH_PORT", "auth_port"),
        description="auth's port on this host, when auth_addr is not set.",
    )

    @model_validator(mode="after")
    def _derive_auth_addr(self) -> Self:
        if not self.auth_addr:
            # Frozen model: the derived default is filled once, at construction.
            object.__setattr__(self, "auth_addr", f"127.0.0.1:{self.auth_port}")
        return self


S = TypeVar("S", bound=BaseSettings)


def _aliases(alias: object) -> list[str]:
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    if isinstance(alias, str):
        return [alias]
    return []


def describe_error(error: ValidationError, prefix: str, settings_cls: type[BaseSettings]) -> str:
    """One line naming each bad variable and why it is bad."""
    parts = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else "?"
        info = settings_cls.model_fields.get(field)
        if info is None:
            # pydantic reports a field read through an alias by the alias itself.
            info = next(
                (
                    f
                    for f in settings_cls.model_fields.values()
                    if _aliases(f.validation_alias) and field in _aliases(f.validation_alias)
                ),
                None,
            )
            name = field.upper()
        else:
            aliases = _aliases(info.validation_alias)
            name = aliases[0] if aliases else f"{prefix}{field}"
        name = name.upper()
        got = item.get("input")
        secret = info is not None and info.annotation in (SecretStr, SecretStr | None)
        shown = "" if isinstance(got, dict) or secret else f" (got {got!r})"
        parts.append(f"{name}: {item['msg']}{shown}")
    return "invalid settings: " + "; ".join(parts)


def fail(message: str) -> NoReturn:
    """Stop the process with one line on stderr and exit code 2."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def load_settings(settings_cls: type[S], **overrides: Any) -> S:
    """Read and validate settings; exit with one clear line when they are bad."""
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        prefix = str(settings_cls.model_config.get("env_prefix", ""))
        fail(describe_error(exc, prefix, settings_cls))


def opensearch_hosts(url: str) -> list[str]:
    """The nodes of `OPENSEARCH_URL`: one URL, or several separated by commas
    (the client spreads requests over them and moves on from a dead one)."""
    hosts = [part.strip() for part in url.split(",") if part.strip()]
    if not hosts:
        raise ValueError("OPENSEARCH_URL names no node")
    return hosts
