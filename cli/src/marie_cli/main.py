"""The `marie` command: `marie up` starts the suite; `marie keys …` manages API keys;
`marie owners …` manages owners' budgets.

Every command honours the same environment variables as the services
(`MARIE_AUTH_PORT`, `MARIE_DATA_DIR`, …).
"""

from __future__ import annotations

import os

# gRPC's C core logs connection chatter (GOAWAY on shutdown) at INFO; a
# command-line tool shows only errors. Must be set before grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import asyncio
import sys
from collections.abc import Sequence

import orjson

from marie_cli import keys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="marie", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("up", help="start every service and wait until Ctrl-C")

    keys_parser = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys_parser.add_subparsers(dest="keys_command", required=True)

    create = keys_sub.add_parser("create", help="create a key and print it (shown once)")
    create.add_argument("--name", required=True, help="a name to recognise the key by")
    create.add_argument("--owner", default="", help="user or team the key belongs to")
    create.add_argument(
        "--scope",
        action="append",
        default=[],
        dest="scopes",
        help="a scope the key gets (repeatable); default: every scope but admin",
    )
    create.add_argument(
        "--model",
        action="append",
        default=[],
        dest="models",
        help="a model id or 'provider/*' pattern the key may use (repeatable); default: all",
    )
    _limit_options(create)
    _budget_options(create)
    create.add_argument("--json", action="store_true", help="print one JSON object")

    lst = keys_sub.add_parser("list", help="list keys (never their secrets)")
    lst.add_argument("--owner", default="")
    lst.add_argument("--all", action="store_true", help="include revoked and expired keys")
    lst.add_argument("--json", action="store_true", help="print one JSON object")

    update = keys_sub.add_parser(
        "update", help="change a key's name, owner, scopes, models, limits, budget or expiry"
    )
    update.add_argument("id")
    update.add_argument("--name")
    update.add_argument("--owner")
    update.add_argument(
        "--scope", action="append", dest="scopes", help="replaces the scopes (repeatable)"
    )
    update.add_argument(
        "--model", action="append", dest="models", help="replaces the allowed models (repeatable)"
    )
    _limit_options(update)
    _budget_options(update)
    update.add_argument("--expires", help="ISO 8601 date or time, or 'never'")
    update.add_argument("--json", action="store_true", help="print one JSON object")

    rotate = keys_sub.add_parser("rotate", help="replace a key's secret (prints the new key once)")
    rotate.add_argument("id")
    rotate.add_argument(
        "--grace",
        type=int,
        default=0,
        help="seconds the old secret keeps working (0 to 86400; default 0: revoked now)",
    )
    rotate.add_argument("--json", action="store_true", help="print one JSON object")

    usage = keys_sub.add_parser("usage", help="usage and cost totals from the ledger")
    usage.add_argument("--key", default="", help="only this key id")
    usage.add_argument("--owner", default="", help="only this owner's keys")
    usage.add_argument("--from", dest="start", help="ISO 8601 start (default: 30 days ago)")
    usage.add_argument("--to", help="ISO 8601 end, exclusive (default: now)")
    usage.add_argument("--group-by", choices=["day", "model", "key", "owner"], default="")
    usage.add_argument("--json", action="store_true", help="print one JSON object")

    revoke = keys_sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("id")
    revoke.add_argument("--json", action="store_true", help="print one JSON object")

    owners_parser = sub.add_parser("owners", help="manage owners' budgets")
    owners_sub = owners_parser.add_subparsers(dest="owners_command", required=True)
    budget = owners_sub.add_parser(
        "budget", help="show an owner's budget and spend, or set it with the options"
    )
    budget.add_argument("owner", help="the owner (user or team id) of the keys")
    _budget_options(budget)
    budget.add_argument("--json", action="store_true", help="print one JSON object")
    owners_list = owners_sub.add_parser("list", help="the owners that have a budget")
    owners_list.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _budget_options(parser: argparse.ArgumentParser) -> None:
    """Spend limits in US dollars (exact, up to 6 decimals; 0 = no limit)."""
    parser.add_argument(
        "--budget-day", dest="budget_day", metavar="USD", help="spend per UTC day (0 = no limit)"
    )
    parser.add_argument(
        "--budget-month",
        dest="budget_month",
        metavar="USD",
        help="spend per UTC calendar month (0 = no limit)",
    )


def _limit_options(parser: argparse.ArgumentParser) -> None:
    """The per-key limits (0 = no limit)."""
    parser.add_argument("--rpm", type=int, help="requests per minute (0 = no limit)")
    parser.add_argument("--tpm", type=int, help="tokens per minute (0 = no limit)")
    parser.add_argument("--tpd", type=int, help="tokens per UTC day (0 = no limit)")
    parser.add_argument(
        "--max-concurrent",
        type=int,
        dest="max_concurrent",
        help="requests running at once (0 = no limit)",
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    env = dict(os.environ)
    env["MARIE_DATA_DIR"] = os.path.abspath(env.get("MARIE_DATA_DIR") or "./.marie")
    if args.command == "up":
        from marie_cli.supervisor import up  # noqa: PLC0415 - only `up` needs it

        raise SystemExit(asyncio.run(up(env)))
    try:
        result = asyncio.run(keys.run(args, env))
    except keys.CliError as exc:
        print(f"marie: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    if getattr(args, "json", False):
        sys.stdout.write(orjson.dumps(result.data).decode() + "\n")
    else:
        sys.stdout.write(result.text + "\n")
    if result.note:
        print(result.note, file=sys.stderr)


if __name__ == "__main__":
    main()
