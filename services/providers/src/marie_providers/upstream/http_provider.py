"""What every HTTP API provider shares: one pooled client, credentials read from the
environment, JSON requests whose failures all become ServiceErrors, health probes.

Ollama predates this and keeps its own; the cloud providers (OpenAI-compatible,
Hugging Face, Anthropic) build on it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any, Self

import grpc
import httpx
import orjson
from google.protobuf import timestamp_pb2
from marie.providers.v1 import provider_service_pb2 as pb
from marie_kit.errors import ServiceError

from marie_providers.config import ProviderConfig
from marie_providers.errors import (
    DOMAIN,
    UpstreamProtocolError,
    UpstreamStatusError,
    parse_retry_after,
    upstream_error,
)
from marie_providers.settings import ProvidersSettings
from marie_providers.upstream.provider import Provider
from marie_providers.upstream.transport import UpstreamClient

MAX_CONNECTIONS = 256
MAX_KEEPALIVE_CONNECTIONS = 32
JSON_HEADERS = {"content-type": "application/json"}


def public_url(url: str) -> str:
    """`url` without user info, so it can be shown in listings and logs."""
    parsed = httpx.URL(url)
    if not parsed.userinfo:
        return url
    return str(parsed.copy_with(username=None, password=None))


def error_message(body: bytes) -> tuple[str, str]:
    """The message and blamed parameter of an upstream error body.

    Understands OpenAI's `{"error": {"message", "param"}}`, Anthropic's
    `{"type": "error", "error": {"message"}}`, `{"error": "…"}` and
    `{"message": "…"}`; anything else is the body itself.
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace"), ""
    if isinstance(value, dict):
        error = value.get("error", value)
        if isinstance(error, str):
            return error, ""
        if isinstance(error, dict):
            message = error.get("message")
            param = error.get("param")
            if isinstance(message, str):
                return message, param if isinstance(param, str) else ""
    return body.decode("utf-8", "replace"), ""


def status_error(response: httpx.Response, body: bytes) -> UpstreamStatusError:
    """The UpstreamStatusError an error response stands for, Retry-After included."""
    message, param = error_message(body)
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    if retry_after is None:
        # OpenAI also sends the wait in milliseconds.
        millis = response.headers.get("retry-after-ms")
        try:
            retry_after = float(millis) / 1000 if millis else None
        except ValueError:
            retry_after = None
    return UpstreamStatusError(response.status_code, message, retry_after=retry_after, param=param)


async def fetch_json(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    *,
    body: dict[str, Any] | None = None,
    timeout: float | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    """One request with a JSON answer (`headers` added to the JSON ones).
    Raises what the network did (httpx), an error status (UpstreamStatusError)
    or a body that is not JSON (UpstreamProtocolError), for the provider to
    map with `upstream_error`."""
    extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    if body is None:
        response = await client.request(method, path, **extra)
    else:
        response = await client.request(
            method,
            path,
            content=orjson.dumps(body),
            headers={**JSON_HEADERS, **headers} if headers else JSON_HEADERS,
            **extra,
        )
    if response.status_code >= 400:
        raise status_error(response, response.content)
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise UpstreamProtocolError(f"{path} answered with invalid JSON") from exc


def now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


class HttpProvider(Provider):
    """An upstream reached over HTTP(S) with an optional API key from the environment.

    `api_key_env` names the variable holding the key: the key itself is never
    in the configuration, a log line or an error. `transport` replaces the
    network in tests that need broken answers.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        api_key_env: str = "",
        environ: Mapping[str, str] | None = None,
        allowed_models: frozenset[str] | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 300.0,
        health_timeout: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.allowed_models = allowed_models
        self._base_url = public_url(base_url.rstrip("/"))
        self._health_timeout = health_timeout
        self.api_key_env = api_key_env
        env = os.environ if environ is None else environ
        self._api_key = env.get(api_key_env, "").strip() if api_key_env else ""
        self._upstream = UpstreamClient(
            base_url.rstrip("/") + "/",
            headers=self.auth_headers(self._api_key),
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_connections=MAX_CONNECTIONS,
            max_keepalive_connections=MAX_KEEPALIVE_CONNECTIONS,
            transport=transport,
        )
        self._client = self._upstream.http

    #: Where the upstream is when the configuration does not say.
    default_base_url: str = ""
    #: The variable holding the key when the configuration does not name one.
    default_api_key_env: str = ""

    @classmethod
    def from_config(cls, name: str, config: ProviderConfig, settings: ProvidersSettings) -> Self:
        """The provider as one entry of the configuration describes it."""
        base_url = config.base_url or cls.default_base_url
        if not base_url:
            raise ValueError(f"provider {name!r} of type {config.type!r} needs a base_url")
        return cls(
            name,
            base_url,
            api_key_env=config.api_key_env or cls.default_api_key_env,
            allowed_models=frozenset(config.models) if config.models is not None else None,
            connect_timeout=settings.connect_timeout_seconds,
            read_timeout=settings.read_timeout_seconds,
            health_timeout=settings.health_timeout_seconds,
        )

    # -- to override -------------------------------------------------------

    def auth_headers(self, api_key: str) -> dict[str, str]:
        """Headers carrying the key (and whatever else every request needs)."""
        return {"authorization": f"Bearer {api_key}"} if api_key else {}

    def missing_credentials(self) -> str:
        """Why calls cannot work for want of a key; empty when nothing is missing."""
        if self.api_key_env and not self._api_key:
            return f"{self.name} has no API key: set the environment variable {self.api_key_env}"
        return ""

    # -- shared ------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self._base_url

    def _error(self, exc: Exception, model: str = "", *, quiet: bool = False) -> ServiceError:
        return upstream_error(
            exc, provider=self.name, url=self._base_url, model=model, log_failure=not quiet
        )

    def require_credentials(self) -> None:
        """UNAVAILABLE (UPSTREAM_AUTH_FAILED) when a call could only fail for want of a key."""
        if reason := self.missing_credentials():
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                "UPSTREAM_AUTH_FAILED",
                reason,
                domain=DOMAIN,
                # The variable's name (never its value): what an operator must set.
                metadata={
                    "provider": self.name,
                    "api_key_env": self.api_key_env or self.default_api_key_env,
                },
            )

    async def request_json(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        model: str = "",
        timeout: float | None = None,
        quiet: bool = False,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """One request with a JSON answer; every failure comes back as a ServiceError."""
        try:
            return await fetch_json(
                self._client, method, path, body=body, timeout=timeout, headers=headers
            )
        except (httpx.HTTPError, UpstreamStatusError, UpstreamProtocolError) as exc:
            raise self._error(exc, model, quiet=quiet) from exc

    def new_health(self) -> pb.ProviderHealth:
        return pb.ProviderHealth(
            provider=self.name,
            supports_streaming=self.supports_streaming,
            supports_embeddings=self.supports_embeddings,
            default_model=self.default_model,
        )

    async def probe_path(self, path: str) -> pb.ProviderHealth:
        """Health from one GET of `path`: HEALTHY when it answers 2xx with JSON."""
        health = self.new_health()
        started = time.perf_counter()
        if reason := self.missing_credentials():
            health.status = pb.HEALTH_STATUS_UNHEALTHY
            health.error = reason
        else:
            try:
                await self.request_json("GET", path, timeout=self._health_timeout, quiet=True)
            except ServiceError as exc:
                unreachable = exc.reason in ("PROVIDER_UNAVAILABLE", "UPSTREAM_TIMEOUT")
                health.status = (
                    pb.HEALTH_STATUS_ERROR if unreachable else pb.HEALTH_STATUS_UNHEALTHY
                )
                health.error = exc.message
            else:
                health.status = pb.HEALTH_STATUS_HEALTHY
                health.available = True
        health.latency_ms = (time.perf_counter() - started) * 1000
        health.check_time.CopyFrom(now())
        return health

    async def aclose(self) -> None:
        await self._client.aclose()
