"""The gateway's Prometheus metrics, served at `/metrics`.

Labels are route templates, methods, status codes, provider and model ids
(as the providers service resolved them: a bounded set) and error reasons:
never a key, a prompt, a completion or a raw path a client chose.
"""

from __future__ import annotations

from marie_kit.metrics import LATENCY_BUCKETS, Children
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

HTTP_REQUESTS = Counter(
    "marie_http_requests",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "marie_http_request_duration_seconds",
    "Time from a request's arrival to the end of its response (whole stream included).",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "marie_chat_time_to_first_token_seconds",
    "Time from a chat request's call to its first chunk from the provider.",
    ["provider", "model"],
    buckets=LATENCY_BUCKETS,
)
TOKENS = Counter(
    "marie_chat_tokens",
    "Tokens of chat completions as the provider reported them, in (prompt) and out.",
    ["provider", "model", "direction"],
)
UPSTREAM_ERRORS = Counter(
    "marie_upstream_errors",
    "Errors from the services behind the gateway, by ErrorInfo reason.",
    ["reason"],
)
STREAMS_IN_FLIGHT = Gauge("marie_http_streams_in_flight", "SSE streams currently open.")
KEY_CACHE = Counter(
    "marie_key_cache_lookups",
    "API-key validations, answered from the cache (hit) or by the auth service (miss).",
    ["result"],
)
http_requests = Children(HTTP_REQUESTS)
http_duration = Children(HTTP_DURATION)
time_to_first_token = Children(TIME_TO_FIRST_TOKEN)
tokens = Children(TOKENS)
upstream_errors = Children(UPSTREAM_ERRORS)
KEY_CACHE_HIT = KEY_CACHE.labels("hit")
RATE_LIMITED = Counter(
    "marie_rate_limited_requests",
    "Requests refused with 429 by the gateway, by the limit that refused them "
    "(requests, tokens, tokens_per_day, concurrency, invalid_keys, budget_key_daily, "
    "budget_key_monthly, budget_owner_daily, budget_owner_monthly).",
    ["limit"],
)
KEY_CACHE_MISS = KEY_CACHE.labels("miss")
# Auth unreachable: a cached validation answered instead.
KEY_CACHE_STALE = KEY_CACHE.labels("stale")

#: The route label of a request that matched no route.
UNMATCHED = "unmatched"


def provider_of(model_id: str) -> tuple[str, str]:
    """("ollama", "ollama/llama3.2:latest") for a resolved model id."""
    provider, slash, _ = model_id.partition("/")
    return (provider if slash else ""), model_id


def routes() -> list[BaseRoute]:
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(), headers={"content-type": CONTENT_TYPE_LATEST})

    return [Route("/metrics", metrics, methods=["GET"])]
