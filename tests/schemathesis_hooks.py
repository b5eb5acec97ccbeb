"""schemathesis hooks for tests/test_schemathesis.py: generated requests
keep the rules between fields that the OpenAPI document cannot state (each
is a 400 naming its field when broken, tested in the end-to-end tests)."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import schemathesis
from marie_gateway.api.usage import DEFAULT_DAYS, parse_time
from marie_gateway.http.errors import ApiError
from marie_gateway.openai.schemas import MAX_COMPLETION_CHOICES


def _tool_names(tools: Any) -> set[str]:
    names: set[str] = set()
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, dict):
            function = tool.get("function")
            name = function.get("name") if isinstance(function, dict) else tool.get("name")
            if isinstance(name, str):
                names.add(name)
    return names


def _named_choice(choice: Any) -> str | None:
    if not isinstance(choice, dict):
        return None
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else choice.get("name")
    return name if isinstance(name, str) else None


def _tool_choice_kept(body: Any) -> bool:
    """A named `tool_choice` is one of `tools`, and `required` has tools to
    call (chat, compare and Responses)."""
    if not isinstance(body, dict):
        return True
    choice = body.get("tool_choice")
    names = _tool_names(body.get("tools"))
    if choice == "required" or isinstance(choice, dict):
        named = _named_choice(choice)
        return bool(names) and (named is None or named in names)
    return True


def _last(value: Any) -> Any:
    """A repeated query parameter's value as the handler reads it: the last."""
    return value[-1] if isinstance(value, list) and value else value


def _usage_range_kept(query: dict[str, Any]) -> bool:
    """`/api/usage`: `to` after `from`, as the handler takes their defaults."""
    try:
        to, since = _last(query.get("to")), _last(query.get("from"))
        end = parse_time(to, "to") if isinstance(to, str) and to else time.time()
        if isinstance(since, str) and since:
            start = parse_time(since, "from")
        else:
            start = end - DEFAULT_DAYS * 86_400
        return end > max(start, 1.0)
    except ApiError:
        return True  # a malformed time: the schema's business


def _choices_within_bounds(body: dict[str, Any]) -> dict[str, Any]:
    """`/v1/completions`: prompts times `n` at most 16 (OpenAI's bound)."""
    prompts = body.get("prompt")
    n = body.get("n")
    if not isinstance(n, int | float) or isinstance(n, bool):
        return body
    if isinstance(prompts, list) and prompts and len(prompts) * n > MAX_COMPLETION_CHOICES:
        return {**body, "n": max(1, MAX_COMPLETION_CHOICES // len(prompts))}
    return body


@schemathesis.hook
def before_call(ctx: Any, case: Any, kwargs: Any) -> None:
    """Every phase's requests (the coverage phase's too, which filters do not
    reach) with the rules between fields kept: a request breaking one is made
    into the nearest one that keeps it."""
    if not _tool_choice_kept(case.body):
        case.body = {**case.body, "tool_choice": "auto"}
    if isinstance(case.body, dict):
        case.body = _choices_within_bounds(case.body)
        expires = case.body.get("expires_at")
        if isinstance(expires, str) and case.path.startswith("/api/keys"):
            try:
                past = dt.datetime.fromisoformat(expires).timestamp() <= time.time()
            except ValueError:
                past = False  # not a time: the schema's business
            if past:
                # Auth takes only an expiry in the future (a rule of time).
                case.body = {**case.body, "expires_at": None}
        models = case.body.get("allowed_models")
        if isinstance(models, list) and case.path.startswith("/api/keys"):
            # Auth takes printable patterns only (as names, below).
            printable = [m for m in models if not isinstance(m, str) or m.isprintable()]
            case.body = {**case.body, "allowed_models": printable}
        owner = case.body.get("owner")
        if isinstance(owner, str) and not owner.isprintable() and case.path.startswith("/api/keys"):
            case.body = {**case.body, "owner": "team"}
        labels = case.body.get("labels")
        if isinstance(labels, dict) and case.path.startswith("/api/keys"):
            # Auth's labels: printable, keys without spaces.
            kept = {
                k: v
                for k, v in labels.items()
                if k.isprintable()
                and not any(c.isspace() for c in k)
                and (not isinstance(v, str) or v.isprintable())
            }
            case.body = {**case.body, "labels": kept}
        name = case.body.get("name")
        if case.path.startswith("/api/keys") and isinstance(name, str) and not name.isprintable():
            # Auth refuses unprintable key names (str.isprintable: a Unicode
            # rule no JSON Schema pattern spells out).
            case.body = {**case.body, "name": "key"}
    query = case.query
    if isinstance(query, dict):
        if query.get("after"):
            # Must name an item of that response; a first page instead.
            case.query = query = {k: v for k, v in query.items() if k != "after"}
        for name in ("from", "to"):
            if case.path == "/api/usage" and not _usage_range_kept(query):
                case.query = query = {k: v for k, v in query.items() if k != name}
