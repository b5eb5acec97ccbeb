"""`GET /api/usage`: the usage ledger's totals and their cost, of the caller's
own key, or with `admin` of any key or owner, grouped by day, model, key or
owner."""

from __future__ import annotations

import datetime as dt
import math
from time import time as unix_time
from typing import Literal

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from marie.auth.v1 import auth_service_pb2 as auth_pb
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from marie_gateway.access.keys import SCOPE_ADMIN
from marie_gateway.api.schemas import UsageReport, UsageTotals
from marie_gateway.core import Gateway
from marie_gateway.http.bodies import JSONResponse
from marie_gateway.http.context import current_request_id
from marie_gateway.http.errors import bad_request, from_rpc_error, permission_denied
from marie_gateway.http.params import MAX_ID_LENGTH, text_query

_GROUP_BY = {
    "": auth_pb.USAGE_GROUP_BY_UNSPECIFIED,
    "day": auth_pb.USAGE_GROUP_BY_DAY,
    "model": auth_pb.USAGE_GROUP_BY_MODEL,
    "key": auth_pb.USAGE_GROUP_BY_KEY,
    "owner": auth_pb.USAGE_GROUP_BY_OWNER,
}


_GROUP_NAMES: dict[str, Literal["day", "model", "key", "owner"] | None] = {
    "": None,
    "day": "day",
    "model": "model",
    "key": "key",
    "owner": "owner",
}


DEFAULT_DAYS = 30
#: The times a usage query may name: 1970-01-01 to 9999-12-31 (UTC).
LATEST = 253_402_300_799
#: The longest owner (auth's limit).
MAX_OWNER = 256


def parse_time(value: str, param: str) -> float:
    """Unix seconds from an ISO 8601 date or date-time (UTC unless it says
    otherwise) or a number of unix seconds; 400 naming `param` otherwise."""
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise bad_request(
                f"'{param}' must be an ISO 8601 date or time, or unix seconds.", param
            ) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        seconds = parsed.timestamp()
    if not math.isfinite(seconds) or not 0 <= seconds <= LATEST:
        raise bad_request(f"'{param}' must be a time from 1970 to 9999.", param)
    return seconds


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
        cached_requests=t.cached_requests,
        cached_prompt_tokens=t.cached_prompt_tokens,
        cost=t.cost or "0",
        unpriced_requests=t.unpriced_requests,
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
            raise bad_request("'group_by' must be day, model, key or owner.", "group_by")
        now = unix_time()
        end = parse_time(q["to"], "to") if q.get("to") else now
        if q.get("from"):
            start = parse_time(q["from"], "from")
        else:
            start = max(0.0, end - DEFAULT_DAYS * 86_400)
        # Auth's ledger reads a start of 0 as none given: the epoch's first
        # second holds no usage anyway.
        start = max(start, 1.0)
        if end <= start:
            raise bad_request("'to' must be after 'from'.", "to")
        key_id = text_query(request, "key_id", MAX_ID_LENGTH)
        owner = text_query(request, "owner", MAX_OWNER)
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
            currency="USD",
            key_id=key_id or None,
            owner=owner or None,
            total=_totals(reply.total),
            groups=[_totals(g) for g in reply.groups],
        )
        return JSONResponse(report.model_dump(mode="json", by_alias=True))
