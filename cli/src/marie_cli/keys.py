"""`marie keys …` and `marie owners …`: API keys and budgets through the auth
service's gRPC API.

When no auth service is running, the command starts the auth component
in-process on an ephemeral port over the same data directory, so the exact
same code path (and validation) serves both cases.
"""

from __future__ import annotations

import argparse
import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp
from marie.auth.v1 import auth_service_pb2 as pb
from marie.auth.v1 import auth_service_pb2_grpc as pb_grpc
from marie_kit.channels import insecure_channel, is_serving
from marie_kit.errors import ServiceError
from marie_kit.prices import PriceError, parse_budget
from marie_kit.server import start_server
from marie_kit.settings import load_settings

if TYPE_CHECKING:
    from marie.auth.v1.auth_service_pb2_grpc import AuthServiceAsyncStub

CONTROL_TIMEOUT_SECONDS = 10.0


class CliError(Exception):
    """A failure to report in one line."""


@dataclass
class Result:
    """What a command prints: `text` for people, `data` for --json."""

    text: str
    data: dict[str, Any]
    note: str = field(default="")


def _key_dict(key: pb.ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "owner": key.owner,
        "display": key.display,
        "state": pb.ApiKeyState.Name(key.state).removeprefix("API_KEY_STATE_").lower(),
        "scopes": list(key.scopes),
        "allowed_models": list(key.allowed_models),
        "limits": {
            "requests_per_minute": key.limits.requests_per_minute,
            "tokens_per_minute": key.limits.tokens_per_minute,
            "tokens_per_day": key.limits.tokens_per_day,
            "max_concurrent_requests": key.limits.max_concurrent_requests,
        },
        "create_time": key.create_time.ToJsonString() if key.HasField("create_time") else None,
        "expire_time": key.expire_time.ToJsonString() if key.HasField("expire_time") else None,
    }


def _timestamp(value: str, option: str) -> Timestamp:
    """An ISO 8601 date or time (UTC unless it says otherwise)."""
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"{option}: expected an ISO 8601 date or time, got {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    ts = Timestamp()
    ts.FromDatetime(parsed)
    return ts


_GROUP_BY = {
    "": pb.USAGE_GROUP_BY_UNSPECIFIED,
    "day": pb.USAGE_GROUP_BY_DAY,
    "model": pb.USAGE_GROUP_BY_MODEL,
    "key": pb.USAGE_GROUP_BY_KEY,
    "owner": pb.USAGE_GROUP_BY_OWNER,
}


def _totals_dict(t: pb.UsageTotals) -> dict[str, Any]:
    return {
        "group": t.group or None,
        "requests": t.requests,
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "total_tokens": t.prompt_tokens + t.completion_tokens,
        "errors": t.errors,
        "latency_p50_ms": round(t.latency_p50_ms, 3),
        "latency_p95_ms": round(t.latency_p95_ms, 3),
        "cached_requests": t.cached_requests,
        "cached_prompt_tokens": t.cached_prompt_tokens,
        "cost": t.cost or "0",
        "unpriced_requests": t.unpriced_requests,
    }


def _budget_dict(b: pb.Budget) -> dict[str, Any]:
    return {
        "key_id": b.key_id or None,
        "owner": b.owner or None,
        "daily_usd": b.daily_usd or None,
        "monthly_usd": b.monthly_usd or None,
        "spent_today_usd": b.spent_today_usd or "0",
        "spent_this_month_usd": b.spent_this_month_usd or "0",
    }


def _budget_text(b: pb.Budget) -> str:
    who = f"key {b.key_id}" if b.key_id else f"owner {b.owner}"
    day = f"{b.spent_today_usd or '0'} / {b.daily_usd or 'no limit'}"
    month = f"{b.spent_this_month_usd or '0'} / {b.monthly_usd or 'no limit'}"
    return f"{who}: today {day} USD, this month {month} USD"


def _budget_changes(args: argparse.Namespace) -> tuple[pb.Budget, list[str]]:
    """The budget fields the options give (checked here, before anything changes)."""
    budget, paths = pb.Budget(), []
    for option, name, field_name in (
        ("budget_day", "--budget-day", "daily_usd"),
        ("budget_month", "--budget-month", "monthly_usd"),
    ):
        value = getattr(args, option, None)
        if value is None:
            continue
        try:
            parse_budget(value, name)
        except PriceError as exc:
            raise CliError(str(exc)) from None
        setattr(budget, field_name, "" if value.strip() in ("", "0") else value.strip())
        paths.append(field_name)
    return budget, paths


async def _set_budget(stub: AuthServiceAsyncStub, budget: pb.Budget, paths: list[str]) -> pb.Budget:
    reply = await stub.UpdateBudget(
        pb.UpdateBudgetRequest(budget=budget, update_mask=FieldMask(paths=paths)),
        timeout=CONTROL_TIMEOUT_SECONDS,
    )
    return reply.budget


async def _owners(stub: AuthServiceAsyncStub, args: argparse.Namespace) -> Result:
    if args.owners_command == "list":
        budgets: list[pb.Budget] = []
        token = ""
        while True:
            page = await stub.ListBudgets(
                pb.ListBudgetsRequest(page_size=500, page_token=token),
                timeout=CONTROL_TIMEOUT_SECONDS,
            )
            budgets.extend(b for b in page.budgets if b.WhichOneof("subject") == "owner")
            token = page.next_page_token
            if not token:
                break
        text = "\n".join(_budget_text(b) for b in budgets) or "(no owner has a budget)"
        return Result(text, {"budgets": [_budget_dict(b) for b in budgets]})
    changes, paths = _budget_changes(args)
    changes.owner = args.owner
    if paths:
        budget = await _set_budget(stub, changes, paths)
    else:
        budget = (
            await stub.GetBudget(
                pb.GetBudgetRequest(owner=args.owner), timeout=CONTROL_TIMEOUT_SECONDS
            )
        ).budget
    return Result(_budget_text(budget), _budget_dict(budget))


async def _update(stub: AuthServiceAsyncStub, args: argparse.Namespace) -> Result:
    key = pb.ApiKey(id=args.id)
    paths: list[str] = []
    if args.name is not None:
        key.name = args.name
        paths.append("name")
    if args.owner is not None:
        key.owner = args.owner
        paths.append("owner")
    if args.scopes is not None:
        key.scopes.extend(args.scopes)
        paths.append("scopes")
    if args.models is not None:
        key.allowed_models.extend(args.models)
        paths.append("allowed_models")
    if any(getattr(args, o) is not None for o in ("rpm", "tpm", "tpd", "max_concurrent")):
        # Limits change as a whole: start from the key's current ones.
        current = await stub.GetApiKey(
            pb.GetApiKeyRequest(id=args.id), timeout=CONTROL_TIMEOUT_SECONDS
        )
        key.limits.CopyFrom(_limits(args, current.api_key.limits))
        paths.append("limits")
    if args.expires is not None:
        if args.expires != "never":
            key.expire_time.CopyFrom(_timestamp(args.expires, "--expires"))
        paths.append("expire_time")
    budget, budget_paths = _budget_changes(args)
    if not paths and not budget_paths:
        raise CliError("nothing to update: give at least one option")
    if paths:
        api_key = (
            await stub.UpdateApiKey(
                pb.UpdateApiKeyRequest(api_key=key, update_mask=FieldMask(paths=paths)),
                timeout=CONTROL_TIMEOUT_SECONDS,
            )
        ).api_key
    else:
        api_key = (
            await stub.GetApiKey(pb.GetApiKeyRequest(id=args.id), timeout=CONTROL_TIMEOUT_SECONDS)
        ).api_key
    data = _key_dict(api_key)
    text = f"updated {api_key.id}"
    if budget_paths:
        budget.key_id = args.id
        set_budget = await _set_budget(stub, budget, budget_paths)
        data["budget"] = _budget_dict(set_budget)
        text += f"\n{_budget_text(set_budget)}"
    return Result(text, data)


async def _usage(stub: AuthServiceAsyncStub, args: argparse.Namespace) -> Result:
    end = _timestamp(args.to, "--to") if args.to else None
    if end is None:
        end = Timestamp()
        end.GetCurrentTime()
    if args.start:
        start = _timestamp(args.start, "--from")
    else:
        start = Timestamp(seconds=end.seconds - 30 * 86_400, nanos=end.nanos)
    reply = await stub.QueryUsage(
        pb.QueryUsageRequest(
            start_time=start,
            end_time=end,
            key_id=args.key,
            owner=args.owner,
            group_by=_GROUP_BY[args.group_by],
        ),
        timeout=CONTROL_TIMEOUT_SECONDS,
    )
    total = _totals_dict(reply.total)
    groups = [_totals_dict(g) for g in reply.groups]
    lines = [
        f"{(g['group'] or 'total'):<40} {g['requests']:>8} req {g['total_tokens']:>10} tok "
        f"{g['cost']:>14} USD{'*' if g['unpriced_requests'] else ' '} "
        f"{g['errors']:>6} err  p50 {g['latency_p50_ms']} ms  p95 {g['latency_p95_ms']} ms"
        for g in [*groups, total]
    ]
    if total["unpriced_requests"]:
        lines.append(
            f"* {total['unpriced_requests']} request(s) on models without a price "
            "(MARIE_CONFIG prices) cost 0"
        )
    data = {
        "from": start.ToJsonString(),
        "to": end.ToJsonString(),
        "group_by": args.group_by or None,
        "currency": reply.currency or "USD",
        "total": total,
        "groups": groups,
    }
    return Result("\n".join(lines), data)


def _limits(args: argparse.Namespace, base: pb.KeyLimits | None = None) -> pb.KeyLimits:
    """The limits the options give, over `base` for those not given."""
    limits = pb.KeyLimits()
    if base is not None:
        limits.CopyFrom(base)
    for option, name in (
        ("rpm", "requests_per_minute"),
        ("tpm", "tokens_per_minute"),
        ("tpd", "tokens_per_day"),
        ("max_concurrent", "max_concurrent_requests"),
    ):
        value = getattr(args, option, None)
        if value is not None:
            setattr(limits, name, value)
    return limits


async def _call(args: argparse.Namespace, channel: grpc.aio.Channel) -> Result:
    stub = pb_grpc.AuthServiceStub(channel)
    t = CONTROL_TIMEOUT_SECONDS
    try:
        if args.command == "owners":
            return await _owners(stub, args)
        if args.keys_command == "create":
            budget, budget_paths = _budget_changes(args)  # checked before the key exists
            created = await stub.CreateApiKey(
                pb.CreateApiKeyRequest(
                    name=args.name,
                    owner=args.owner,
                    scopes=args.scopes,
                    allowed_models=args.models,
                    limits=_limits(args),
                ),
                timeout=t,
            )
            data = {**_key_dict(created.api_key), "key": created.key}
            text = (
                f"{created.key}\n"
                f"(id {created.api_key.id}; store this key now, it is not shown again)"
            )
            note = ""
            if budget_paths:
                budget.key_id = created.api_key.id
                try:
                    data["budget"] = _budget_dict(await _set_budget(stub, budget, budget_paths))
                except grpc.aio.AioRpcError as exc:
                    # The key exists and its secret is shown only now: print it anyway.
                    error = ServiceError.from_rpc_error(exc)
                    note = (
                        f"marie: the key was created but its budget was not set: "
                        f"{error.message} ({error.reason}); set it with `marie keys update`"
                    )
            return Result(text, data, note)
        if args.keys_command == "list":
            keys: list[pb.ApiKey] = []
            token = ""
            while True:
                page = await stub.ListApiKeys(
                    pb.ListApiKeysRequest(
                        owner=args.owner, include_inactive=args.all, page_size=500, page_token=token
                    ),
                    timeout=t,
                )
                keys.extend(page.api_keys)
                token = page.next_page_token
                if not token:
                    break
            rows = [_key_dict(k) for k in keys]
            text = "\n".join(
                f"{r['id']}  {r['display']}  {r['state']:<8} {r['name']}" for r in rows
            )
            return Result(text or "(no keys)", {"keys": rows})
        if args.keys_command == "update":
            return await _update(stub, args)
        if args.keys_command == "rotate":
            rotated = await stub.RotateApiKey(
                pb.RotateApiKeyRequest(id=args.id, grace_period_seconds=args.grace), timeout=t
            )
            data = {
                **_key_dict(rotated.api_key),
                "key": rotated.key,
                "previous_id": rotated.previous_id,
            }
            text = (
                f"{rotated.key}\n(id {rotated.api_key.id}, replaces {rotated.previous_id}; "
                "store this key now, it is not shown again)"
            )
            return Result(text, data)
        if args.keys_command == "usage":
            return await _usage(stub, args)
        if args.keys_command == "revoke":
            revoked = await stub.RevokeApiKey(pb.RevokeApiKeyRequest(id=args.id), timeout=t)
            return Result(f"revoked {revoked.api_key.id}", _key_dict(revoked.api_key))
    except grpc.aio.AioRpcError as exc:
        error = ServiceError.from_rpc_error(exc)
        raise CliError(f"{error.message} ({error.reason})") from None
    raise CliError(f"unknown command {args.keys_command!r}")


async def run(args: argparse.Namespace, env: dict[str, str]) -> Result:
    """Run a keys command against the running auth service, or an embedded one."""
    target = env.get("MARIE_AUTH_ADDR") or f"127.0.0.1:{env.get('MARIE_AUTH_PORT', '50053')}"
    async with insecure_channel(target) as channel:
        if await is_serving(channel, timeout=1.5):
            return await _call(args, channel)

    # No auth service: serve the same component in-process over the same data.
    from marie_auth.service import AuthComponent  # noqa: PLC0415 - only this path needs it
    from marie_auth.settings import AuthSettings  # noqa: PLC0415

    settings = load_settings(AuthSettings, host="127.0.0.1", port=0)
    running = await start_server([AuthComponent(settings)], host="127.0.0.1", port=0)
    try:
        async with insecure_channel(running.target) as channel:
            result = await _call(args, channel)
    finally:
        await running.stop(0)
    result.note = (
        f"marie: no auth service at {target}; used the key store under {settings.data_dir}"
    )
    return result
