"""Translation between the auth protos and the core's dataclasses, in one place."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp
from marie.auth.v1 import auth_service_pb2 as pb
from marie_kit.prices import CURRENCY, PriceError, parse_budget, usd_text

from marie_auth.budgets import KEY, OWNER, BudgetView
from marie_auth.errors import invalid_argument
from marie_auth.events import KeyEvent, KeyEventType
from marie_auth.keys import Principal
from marie_auth.leases import LeaseAsk, LeaseGrant
from marie_auth.store import KeyLimits, KeyRecord, KeySpec, KeyState
from marie_auth.usage import GroupBy, Totals, UsageRecord, UsageReport

_STATES: dict[KeyState, pb.ApiKeyState] = {
    KeyState.ACTIVE: pb.API_KEY_STATE_ACTIVE,
    KeyState.REVOKED: pb.API_KEY_STATE_REVOKED,
    KeyState.EXPIRED: pb.API_KEY_STATE_EXPIRED,
}

_EVENT_TYPES: dict[KeyEventType, pb.KeyEventType] = {
    KeyEventType.SYNC: pb.KEY_EVENT_TYPE_SYNC,
    KeyEventType.REVOKED: pb.KEY_EVENT_TYPE_REVOKED,
    KeyEventType.UPDATED: pb.KEY_EVENT_TYPE_UPDATED,
}


def timestamp(unix_seconds: float | None) -> Timestamp | None:
    """A Timestamp for unix seconds; None stays None (an unset field)."""
    if unix_seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(round(unix_seconds * 1e9))
    return ts


def unix_seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def limits_to_proto(limits: KeyLimits) -> pb.KeyLimits:
    return pb.KeyLimits(
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
        tokens_per_day=limits.tokens_per_day,
        max_concurrent_requests=limits.max_concurrent_requests,
    )


def limits_from_proto(limits: pb.KeyLimits) -> KeyLimits:
    return KeyLimits(
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
        tokens_per_day=limits.tokens_per_day,
        max_concurrent_requests=limits.max_concurrent_requests,
    )


def api_key_to_proto(record: KeyRecord, now: float) -> pb.ApiKey:
    """The metadata of a key as its effective state at `now` shows it; never the secret."""
    spec = record.spec
    return pb.ApiKey(
        id=record.id,
        name=spec.name,
        owner=spec.owner,
        scopes=spec.scopes,
        allowed_models=spec.allowed_models,
        limits=limits_to_proto(spec.limits),
        display=record.display,
        state=_STATES[record.state_at(now)],
        create_time=timestamp(record.create_time),
        update_time=timestamp(record.update_time),
        expire_time=timestamp(spec.expire_time),
        revoke_time=timestamp(record.revoke_time),
        last_used_time=timestamp(record.last_used_time),
        labels=spec.labels,
    )


def spec_from_create(request: pb.CreateApiKeyRequest) -> KeySpec:
    return _spec(request)


def spec_from_api_key(api_key: pb.ApiKey) -> KeySpec:
    """The settings an UpdateApiKey request carries (only the masked ones are used)."""
    return _spec(api_key)


def _spec(message: pb.CreateApiKeyRequest | pb.ApiKey) -> KeySpec:
    # Both messages carry the settings under the same field names.
    return KeySpec(
        name=message.name,
        owner=message.owner,
        scopes=tuple(message.scopes),
        allowed_models=tuple(message.allowed_models),
        limits=limits_from_proto(message.limits),
        expire_time=(
            unix_seconds(message.expire_time) if message.HasField("expire_time") else None
        ),
        labels=dict(message.labels),
    )


def principal_to_proto(principal: Principal) -> pb.Principal:
    return pb.Principal(
        key_id=principal.key_id,
        key_name=principal.key_name,
        owner=principal.owner,
        scopes=principal.scopes,
        allowed_models=principal.allowed_models,
        limits=limits_to_proto(principal.limits),
        expire_time=timestamp(principal.expire_time),
    )


def event_to_proto(event: KeyEvent) -> pb.WatchKeyEventsResponse:
    return pb.WatchKeyEventsResponse(
        type=_EVENT_TYPES[event.type], key_id=event.key_id, event_time=timestamp(event.time)
    )


GROUP_BY: dict[int, GroupBy] = {
    pb.USAGE_GROUP_BY_UNSPECIFIED: GroupBy.NONE,
    pb.USAGE_GROUP_BY_DAY: GroupBy.DAY,
    pb.USAGE_GROUP_BY_MODEL: GroupBy.MODEL,
    pb.USAGE_GROUP_BY_KEY: GroupBy.KEY,
    pb.USAGE_GROUP_BY_OWNER: GroupBy.OWNER,
}


def usage_record_from_proto(record: pb.UsageRecord) -> UsageRecord:
    return UsageRecord(
        id=record.id,
        key_id=record.key_id,
        owner=record.owner,
        provider=record.provider,
        model=record.model,
        operation=record.operation,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        latency_ms=record.latency_ms,
        status=record.status,
        time=unix_seconds(record.time) if record.HasField("time") else 0.0,
        cached=record.cached,
        cached_prompt_tokens=record.cached_prompt_tokens,
        cost_picodollars=record.cost_picodollars,
        priced=record.priced,
    )


def totals_to_proto(totals: Totals) -> pb.UsageTotals:
    return pb.UsageTotals(
        group=totals.group,
        requests=totals.requests,
        prompt_tokens=totals.prompt_tokens,
        completion_tokens=totals.completion_tokens,
        errors=totals.errors,
        latency_p50_ms=totals.latency_p50_ms,
        latency_p95_ms=totals.latency_p95_ms,
        cached_requests=totals.cached_requests,
        cost=usd_text(totals.cost_picodollars),
        cached_prompt_tokens=totals.cached_prompt_tokens,
        unpriced_requests=totals.unpriced_requests,
    )


def usage_report_to_proto(report: UsageReport) -> pb.QueryUsageResponse:
    return pb.QueryUsageResponse(
        total=totals_to_proto(report.total),
        groups=[totals_to_proto(g) for g in report.groups],
        currency=CURRENCY,
    )


def lease_ask_from_proto(request: pb.LeaseCapacityRequest) -> LeaseAsk:
    return LeaseAsk(
        key_id=request.key_id,
        holder=request.holder,
        requests=request.requests,
        tokens=request.tokens,
        returned_requests=request.returned_requests,
        token_balance=request.token_balance,
        slots=request.slots,
    )


def lease_grant_to_proto(grant: LeaseGrant) -> pb.LeaseCapacityResponse:
    return pb.LeaseCapacityResponse(
        requests=grant.requests,
        tokens=grant.tokens,
        slots=grant.slots,
        limits=limits_to_proto(grant.limits),
        requests_remaining=grant.requests_remaining,
        requests_reset_seconds=grant.requests_reset_seconds,
        tokens_remaining=grant.tokens_remaining,
        tokens_reset_seconds=grant.tokens_reset_seconds,
        retry_after_seconds=grant.retry_after_seconds,
        slot_ttl_seconds=grant.slot_ttl_seconds,
    )


def budget_subject(message: pb.Budget | pb.GetBudgetRequest, prefix: str = "") -> tuple[str, str]:
    """("key", id) or ("owner", owner) of a message's `subject`; INVALID_ARGUMENT without one."""
    which = message.WhichOneof("subject")
    if which == "key_id":
        return KEY, message.key_id
    if which == "owner":
        return OWNER, message.owner
    raise invalid_argument(f"{prefix}subject", "a key_id or an owner is required")


_BUDGET_FIELDS = ("daily_usd", "monthly_usd")


def budget_limits_from_proto(request: pb.UpdateBudgetRequest) -> tuple[int | None, int | None]:
    """(daily, monthly) in picodollars of the fields in the mask (None: not changed)."""
    paths = list(request.update_mask.paths) or list(_BUDGET_FIELDS)
    for path in paths:
        if path not in _BUDGET_FIELDS:
            raise invalid_argument(
                "update_mask", f"unknown field {path!r} (known: {', '.join(_BUDGET_FIELDS)})"
            )
    out: list[int | None] = []
    for name in _BUDGET_FIELDS:
        if name not in paths:
            out.append(None)
            continue
        try:
            out.append(parse_budget(getattr(request.budget, name), name))
        except PriceError as exc:
            raise invalid_argument(f"budget.{name}", str(exc)) from None
    return out[0], out[1]


def budget_to_proto(view: BudgetView) -> pb.Budget:
    b = view.budget
    out = pb.Budget(
        daily_usd=usd_text(b.limits.daily) if b.limits.daily else "",
        monthly_usd=usd_text(b.limits.monthly) if b.limits.monthly else "",
        spent_today_usd=usd_text(view.spent_today),
        spent_this_month_usd=usd_text(view.spent_this_month),
    )
    if b.kind == KEY:
        out.key_id = b.subject
    else:
        out.owner = b.subject
    updated = timestamp(b.update_time) if b.update_time else None
    if updated is not None:
        out.update_time.CopyFrom(updated)
    return out
