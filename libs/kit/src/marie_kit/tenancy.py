"""Tenants in user ids, and their enforcement on calls that come through Envoy.

Marie's data belongs to a tenant (an API key's owner, or its id when it has
none) and, within it, to an end user. Services see one opaque `user_id`;
the gateway builds it with `tenant_user_id` (`<len(tenant)>:<tenant>/<user>`),
so the tenant part cannot be forged by a user name holding `/` or `:`.

Calls from the gateway are trusted to name the right user. Calls from
outside come through Envoy, whose key check (the gateway's ext_authz) adds
`x-marie-tenant`: the verified tenant of the key, percent-encoded (Envoy drops
any client-sent `x-marie-*` header first). `TenantInterceptor` refuses such a
call with PERMISSION_DENIED (reason TENANT_MISMATCH, ErrorInfo field
`user_id`) unless every `user_id` field of its request belongs to that
tenant. Keys with the `admin` scope get no tenant header: they may name any
tenant, as over REST.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import unquote

import grpc
from google.protobuf.message import Message

from marie_kit.errors import ServiceError
from marie_kit.interceptors import Handler, rewrap

TENANT_HEADER = "x-marie-tenant"
#: End users named "marie:…" are Marie's own, never a person: a tenant's stored
#: Responses API records live under RESPONSES_USER (the gateway refuses these
#: names as a REST `user`). Services leave their data out of what serves people
#: (memory embeds none of their messages: no route searches them).
RESERVED_USER_PREFIX = "marie:"
RESPONSES_USER = RESERVED_USER_PREFIX + "responses"
TENANT_MISMATCH = "TENANT_MISMATCH"
USER_ID_FIELD = "user_id"
#: The longest `user_id` (the memory contract's limit). The gateway's longest
#: is 517 characters: a tenant of 256 (a key's owner) whose end user is the
#: tenant itself, with the encoding's 5; gRPC callers get the same room.
MAX_USER_ID = 1024


def tenant_user_id(tenant: str, user: str) -> str:
    """The `user_id` of end user `user` of `tenant`."""
    return f"{len(tenant)}:{tenant}/{user}"


def end_user(user_id: str) -> str:
    """The end user of a `user_id` built by `tenant_user_id`; the whole id otherwise."""
    size, colon, rest = user_id.partition(":")
    if colon and size.isdigit() and len(rest) > int(size) and rest[int(size)] == "/":
        return rest[int(size) + 1 :]
    return user_id


def is_reserved_user(user_id: str) -> bool:
    """True for Marie's own end users (RESERVED_USER_PREFIX), as the gateway encodes them."""
    return end_user(user_id).startswith(RESERVED_USER_PREFIX)


def belongs_to(user_id: str, tenant: str) -> bool:
    """True when `user_id` (built by `tenant_user_id`) is one of `tenant`'s."""
    return user_id.startswith(f"{len(tenant)}:{tenant}/")


def user_ids(message: Message, *, top: bool = True) -> Iterator[str]:
    """Every `user_id` string field of `message` that is set, nested messages
    included, and "" for an unset top-level one (it names no user)."""
    for field, value in message.ListFields():
        if field.type == field.TYPE_MESSAGE:
            entry = field.message_type
            if entry is not None and entry.GetOptions().map_entry:
                continue  # maps (metadata) hold no user ids
            for item in [value] if isinstance(value, Message) else value:
                yield from user_ids(item, top=False)
        elif field.name == USER_ID_FIELD and field.type == field.TYPE_STRING:
            yield value
    # An unset user_id is no field of ListFields(), but still names a user (none).
    # Nested ones (a Conversation's, output only) are left to the service.
    if top and getattr(message, USER_ID_FIELD, None) == "":
        yield ""


class TenantInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls carrying `x-marie-tenant` whose request names a user of
    another tenant (see the module's docstring). Calls without the header
    pass unchanged."""

    def __init__(self, domain: str) -> None:
        self.domain = domain

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata or ()
        raw = next((v for k, v in metadata if k == TENANT_HEADER), None)
        if handler is None or raw is None:
            return handler
        tenant = unquote(raw) if isinstance(raw, str) else ""

        def check_unary(unary: Any) -> Any:
            async def checked_unary(request: Any, context: Any) -> Any:
                self._check(request, tenant)
                return await unary(request, context)

            return checked_unary

        def check_stream(stream: Any) -> Any:
            async def checked_stream(request: Any, context: Any) -> Any:
                self._check(request, tenant)
                async for response in stream(request, context):
                    yield response

            return checked_stream

        # Client- and bidi-streaming RPCs (None) are not part of Marie's
        # contracts: refused rather than passed unchecked.
        return rewrap(handler, check_unary, check_stream)

    def _check(self, request: Message, tenant: str) -> None:
        for user_id in user_ids(request):
            if not tenant or not belongs_to(user_id, tenant):
                raise ServiceError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    TENANT_MISMATCH,
                    "user_id does not belong to the tenant of this API key",
                    domain=self.domain,
                    metadata={"field": USER_ID_FIELD},
                )
