"""Usage: what one limited request (chat, embeddings, compare) used, the
recorder that sends it to auth's ledger off the response path, and
`GET /api/usage`.

A request's `Tally` charges its tokens to the key's limits the moment they
are known and gives its concurrency slot back when the request ends; then it
becomes ledger records (one per model) that the kit's `UsageRecorder`
queues and sends in batches (never blocking the request; see
`marie_kit.usage`).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from time import perf_counter
from time import time as unix_time
from typing import TYPE_CHECKING, Literal

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from marie.auth.v1 import auth_service_pb2 as auth_pb
from marie_kit.limits import Grant, Limiter
from marie_kit.usage import new_record_id, timestamp
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from marie_gateway.access import SCOPE_ADMIN, Principal
from marie_gateway.errors import bad_request, from_rpc_error, permission_denied
from marie_gateway.metrics import provider_of
from marie_gateway.responses import UsageReport, UsageTotals
from marie_gateway.web import JSONResponse, current_request_id

if TYPE_CHECKING:
    from marie_gateway.core import Gateway

log = logging.getLogger("marie.gateway.usage")

#: Status recorded for an answer that failed after it started (an error event).
FAILED_STREAM_STATUS = 502
_RETRY_MAX_SECONDS = 5.0
_CLOSE_SECONDS = 5.0


@dataclass(slots=True)
class ModelUse:
    """Tokens one model used for the request (a comparison has several)."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    failed: bool = False


@dataclass(slots=True)
class Tally:
    """One admitted request's account."""

    principal: Principal
    grant: Grant
    limiter: Limiter
    #: "chat", "embeddings", "compare", … or "request" (spends no tokens).
    operation: str
    #: The model asked for, once the body is read (recorded if no answer came).
    requested: str = ""
    #: Unix time of admission, and the performance counter then.
    time: float = field(default_factory=unix_time)
    started: float = field(default_factory=perf_counter)
    uses: list[ModelUse] = field(default_factory=list)
    #: Whether the request goes into the usage ledger (it reaches a model).
    ledger: bool = True
    #: Set when the answer failed after it started (an error event).
    failed: bool = False
    finished: bool = False

    def add(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Count what `model` used; charged to the key's token limits at once."""
        self.uses.append(ModelUse(model, prompt_tokens, completion_tokens))
        self.limiter.charge(self.grant, prompt_tokens + completion_tokens)

    def add_failure(self, model: str) -> None:
        """`model` failed without reporting usage (one arm of a comparison)."""
        self.uses.append(ModelUse(model, 0, 0, failed=True))

    def finish(self) -> bool:
        """The request ended: free its slot. False when it had already ended."""
        if self.finished:
            return False
        self.finished = True
        self.limiter.release(self.grant)
        return True

    def records(self, status: int) -> list[auth_pb.UsageRecord]:
        """The ledger records of the ended request, one per model."""
        latency_ms = (perf_counter() - self.started) * 1000
        at = timestamp(self.time)
        uses = self.uses or [ModelUse(self.requested, 0, 0)]
        out = []
        for use in uses:
            failed = use.failed or (self.failed and status < 400)
            out.append(
                auth_pb.UsageRecord(
                    id=new_record_id(),
                    key_id=self.principal.key_id,
                    owner=self.principal.owner,
                    provider=provider_of(use.model)[0],
                    model=use.model[:256],
                    operation=self.operation,
                    prompt_tokens=use.prompt_tokens,
                    completion_tokens=use.completion_tokens,
                    latency_ms=latency_ms,
                    status=FAILED_STREAM_STATUS if failed else status,
                    time=at,
                )
            )
        return out


# -- GET /api/usage -------------------------------------------------------------

_GROUP_BY = {
    "": auth_pb.USAGE_GROUP_BY_UNSPECIFIED,
    "day": auth_pb.USAGE_GROUP_BY_DAY,
    "model": auth_pb.USAGE_GROUP_BY_MODEL,
    "key": auth_pb.USAGE_GROUP_BY_KEY,
}
_GROUP_NAMES: dict[str, Literal["day", "model", "key"] | None] = {
    "": None,
    "day": "day",
    "model": "model",
    "key": "key",
}
DEFAULT_DAYS = 30


def parse_time(value: str, param: str) -> float:
    """Unix seconds from an ISO 8601 date or date-time (UTC unless it says
    otherwise) or a number of unix seconds; 400 naming `param` otherwise."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise bad_request(
            f"'{param}' must be an ISO 8601 date or time, or unix seconds.", param
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat().replace("+00:00", "Z")


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _totals(t: auth_pb.UsageTotals) -> UsageTotals:
    return UsageTotals(
        group=t.group or None,
        requests=t.requests,
        prompt_tokens=t.prompt_tokens,
        completion_tokens=t.completion_tokens,
        total_tokens=t.prompt_tokens + t.completion_tokens,
        errors=t.errors,
        latency_p50_ms=round(t.latency_p50_ms, 3),
        latency_p95_ms=round(t.latency_p95_ms, 3),
    )


class UsageRoutes:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def routes(self) -> list[BaseRoute]:
        return [Route("/api/usage", self.usage, methods=["GET"])]

    async def usage(self, request: Request) -> Response:
        """Totals of the caller's own key; with `admin`, of any key or owner."""
        # Not counted against the key's limits (like GitHub's /rate_limit):
        # a key at its limits can still see where it stands.
        principal = await self.gw.authenticate(request)
        q = request.query_params
        group_by = q.get("group_by", "")
        if group_by not in _GROUP_BY:
            raise bad_request("'group_by' must be day, model or key.", "group_by")
        now = unix_time()
        end = parse_time(q["to"], "to") if q.get("to") else now
        start = parse_time(q["from"], "from") if q.get("from") else end - DEFAULT_DAYS * 86_400
        if end <= start:
            raise bad_request("'to' must be after 'from'.", "to")
        key_id, owner = q.get("key_id", ""), q.get("owner", "")
        if SCOPE_ADMIN not in principal.scopes:
            if (key_id and key_id != principal.key_id) or owner:
                raise permission_denied(
                    "Only a key with the 'admin' scope may read other keys' usage."
                )
            key_id = principal.key_id
        try:
            reply = await self.gw.backends().auth.QueryUsage(
                auth_pb.QueryUsageRequest(
                    start_time=_ts(start),
                    end_time=_ts(end),
                    key_id=key_id,
                    owner=owner,
                    group_by=_GROUP_BY[group_by],
                ),
                timeout=self.gw.settings.control_timeout_seconds,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, current_request_id()) from None
        report = UsageReport(
            object="usage",
            start=_iso(start),
            end=_iso(end),
            group_by=_GROUP_NAMES[group_by],
            key_id=key_id or None,
            owner=owner or None,
            total=_totals(reply.total),
            groups=[_totals(g) for g in reply.groups],
        )
        return JSONResponse(report.model_dump(mode="json", by_alias=True))
