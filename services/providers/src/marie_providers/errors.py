"""The providers service's error vocabulary and the one mapping of upstream failures to it.

Provider modules raise `UpstreamStatusError` / `UpstreamProtocolError` for what
an upstream answered, let httpx raise what the network did, and hand every one
of them to `upstream_error`, so each provider reports failures alike.
"""

from __future__ import annotations

import email.utils
import logging
import math
import socket
import time
from collections.abc import Iterator

import grpc
import httpx
from marie_kit.errors import ServiceError, invalid_argument

DOMAIN = "marie.providers"

log = logging.getLogger("marie.providers.upstream")

# ErrorInfo metadata key carrying how long the upstream asked us to wait (seconds).
RETRY_AFTER_KEY = "retry_after_seconds"
# A Retry-After longer than this is treated as this: nobody waits an hour in a call.
MAX_RETRY_AFTER_SECONDS = 3600.0

# Upstream error text is relayed to the caller; a runaway body must not be.
MAX_UPSTREAM_MESSAGE = 500

# How upstreams say an input is more than they take at once (llama.cpp answers
# some of these with a 500, vLLM and OpenAI with a 400): the request's
# problem, never the deployment's.
TOO_LARGE_PHRASES = (
    "too large to process",  # llama.cpp: "input (513 tokens) is too large to process. …"
    "physical batch size",  # llama.cpp: "… increase the physical batch size"
    "exceeds the available context size",  # llama.cpp
    "larger than the max context size",  # llama.cpp
    "maximum context length",  # OpenAI, vLLM
    "context_length_exceeded",  # OpenAI's code
    "prompt is too long",  # Anthropic
)
# Statuses an upstream answers a request it cannot do at all with: a server
# without the feature (llama.cpp's /v1/embeddings without --embeddings: 501),
# or without the route.
UNSUPPORTED_STATUSES = frozenset({405, 501})


class UpstreamStatusError(Exception):
    """The upstream answered with an error: an HTTP error status or an error line mid-stream.

    `retry_after` is the wait (seconds) the upstream asked for; `param` the request
    field it blamed, when it named one.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        retry_after: float | None = None,
        param: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.param = param


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or HTTP date); None if absent."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = moment.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def retry_after_of(error: ServiceError) -> float | None:
    """The wait an upstream asked for, as carried by a ServiceError; None when it asked none."""
    value = error.metadata.get(RETRY_AFTER_KEY)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


class UpstreamProtocolError(Exception):
    """The upstream answered something that is not what its API promises."""


def bad_request(field: str, message: str) -> ServiceError:
    """INVALID_ARGUMENT in this service's domain, naming `field`."""
    return invalid_argument(field, message, domain=DOMAIN)


def unsupported(provider: str, field: str, message: str) -> ServiceError:
    """INVALID_ARGUMENT (UNSUPPORTED_BY_PROVIDER): `field` asks for what `provider`'s
    upstream cannot do. Not a deployment failure: no fallback is tried for it."""
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNSUPPORTED_BY_PROVIDER",
        message,
        domain=DOMAIN,
        metadata={"field": field, "provider": provider},
    )


def provider_not_found(name: str, known: list[str]) -> ServiceError:
    """NOT_FOUND for a provider name that is not configured."""
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        "PROVIDER_NOT_FOUND",
        f"provider {name!r} is not configured (configured: {', '.join(known) or 'none'})",
        domain=DOMAIN,
        metadata={"provider": name},
    )


def model_not_found(model: str, provider: str = "") -> ServiceError:
    """NOT_FOUND for a model no provider (or not the named one) serves."""
    where = f"provider {provider!r}" if provider else "any provider"
    metadata = {"model": model}
    if provider:
        metadata["provider"] = provider
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
        f"model {model!r} not found on {where}",
        domain=DOMAIN,
        metadata=metadata,
    )


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _connect_failure(exc: httpx.HTTPError) -> str:
    """Why a connection could not be made, in words an operator recognises."""
    if isinstance(exc, httpx.ConnectTimeout):
        return "connection timed out"
    for cause in _causes(exc):
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return "host name could not be resolved"
    return str(exc) or type(exc).__name__


def _clip(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_UPSTREAM_MESSAGE else text[:MAX_UPSTREAM_MESSAGE] + "…"


def upstream_error(
    exc: Exception, *, provider: str, url: str, model: str = "", log_failure: bool = True
) -> ServiceError:
    """Map any failure talking to an upstream to a ServiceError.

    The caller sees the provider's name and what went wrong in plain words;
    `url` (the provider's public base URL, never one with credentials), which
    an operator needs to fix it, goes to the log line with the request id.
    Background health probes pass `log_failure=False`: the health monitor logs
    changes of health instead of every failed probe.
    """
    if isinstance(exc, ServiceError):
        return exc
    error = _map(exc, provider=provider, model=model)
    if model and error.code != grpc.StatusCode.NOT_FOUND:
        # The caller is told which model failed, not only which provider.
        error.metadata.setdefault("model", f"{provider}/{model}")
    if log_failure and error.code != grpc.StatusCode.NOT_FOUND:
        log.warning(
            "upstream failure",
            extra={
                "provider": provider,
                "url": url,
                "reason": error.reason,
                "detail": _clip(str(exc)) or type(exc).__name__,
            },
        )
    return error


def _map(exc: Exception, *, provider: str, model: str) -> ServiceError:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            "PROVIDER_UNAVAILABLE",
            f"{provider} is not reachable: {_connect_failure(exc)}",
            domain=DOMAIN,
            metadata={"provider": provider},
        )
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return ServiceError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "UPSTREAM_TIMEOUT",
            f"{provider} did not answer in time",
            domain=DOMAIN,
            metadata={"provider": provider},
        )
    if isinstance(exc, UpstreamStatusError):
        return _status_error(exc, provider=provider, model=model)
    if isinstance(exc, UpstreamProtocolError):
        return ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            "UPSTREAM_ERROR",
            f"{provider} sent a malformed response: {_clip(str(exc))}",
            domain=DOMAIN,
            metadata={"provider": provider},
        )
    # Connection dropped mid-response, protocol violations and the like;
    # httpx's own text may hold the URL, so it goes to the log only.
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        "UPSTREAM_ERROR",
        f"{provider} failed while answering ({type(exc).__name__})",
        domain=DOMAIN,
        metadata={"provider": provider},
    )


def _names_model(text: str, model: str) -> bool:
    """Whether an upstream's 404 is about the model (not about the route it was sent to)."""
    lowered = text.lower()
    return "model" in lowered or model.lower() in lowered


def _status_error(exc: UpstreamStatusError, *, provider: str, model: str) -> ServiceError:
    status, text = exc.status, _clip(exc.message)
    metadata = {"provider": provider, "upstream_status": str(status)}
    lowered = text.lower()
    # Ollama answers an unknown model with 404, and some versions with 400 "… not found".
    if model and (
        (status == 404 and _names_model(text, model)) or (status == 400 and "not found" in lowered)
    ):
        return model_not_found(model, provider)
    if status == 413 or (
        status in (400, 422, 500) and any(p in lowered for p in TOO_LARGE_PHRASES)
    ):
        return ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "INPUT_TOO_LARGE",
            f"{provider} cannot take an input this large (HTTP {status}): {text or 'no message'}",
            domain=DOMAIN,
            metadata=metadata,
        )
    if status in UNSUPPORTED_STATUSES or (status == 404 and model):
        # The upstream cannot do this at all (a server started without embeddings,
        # one without /completions): the request's problem, not a failing deployment.
        return ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNSUPPORTED_BY_PROVIDER",
            f"{provider} cannot do this (HTTP {status}): {text or 'no message'}",
            domain=DOMAIN,
            metadata={**metadata, "field": "model"},
        )
    if status in (401, 403):
        # Marie's own credentials for the upstream, never the caller's key:
        # the caller can do nothing about it, an operator can.
        return ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            "UPSTREAM_AUTH_FAILED",
            f"{provider} refused the credentials Marie is configured with (HTTP {status});"
            " an operator must check its API key",
            domain=DOMAIN,
            metadata=metadata,
        )
    if status == 404:
        code, reason = grpc.StatusCode.NOT_FOUND, "UPSTREAM_NOT_FOUND"
    elif status in (400, 422):
        code, reason = grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_BAD_REQUEST"
        if exc.param:
            metadata["field"] = exc.param
    elif status == 429:
        code, reason = grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED"
    elif status in (408, 504):
        code, reason = grpc.StatusCode.DEADLINE_EXCEEDED, "UPSTREAM_TIMEOUT"
    else:
        code, reason = grpc.StatusCode.UNAVAILABLE, "UPSTREAM_ERROR"
    if exc.retry_after is not None:
        metadata[RETRY_AFTER_KEY] = f"{exc.retry_after:g}"
    where = f"HTTP {status}" if status >= 400 else "an error mid-stream"
    return ServiceError(
        code,
        reason,
        f"{provider} answered with {where}: {text or 'no message'}",
        domain=DOMAIN,
        metadata=metadata,
    )
