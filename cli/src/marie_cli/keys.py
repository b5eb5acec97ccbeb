"""`marie keys …`: API-key management through the auth service's gRPC API.

When no auth service is running, the command starts the auth component
in-process on an ephemeral port over the same data directory, so the exact
same code path (and validation) serves both cases.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import grpc
from marie.auth.v1 import auth_service_pb2 as pb
from marie.auth.v1 import auth_service_pb2_grpc as pb_grpc
from marie_kit.channels import insecure_channel, is_serving
from marie_kit.errors import ServiceError
from marie_kit.server import start_server
from marie_kit.settings import load_settings

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
    }


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
        if args.keys_command == "create":
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
            return Result(text, data)
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
