"""Partitioning: the tenant and end user whose data a request reaches.

Data belongs to a tenant, the key's owner (the key id when it has none); keys
with the `admin` scope may name another tenant with `tenant`. Within a
tenant, the end user is the `user` of the body or query (OpenAI's `user`
field), by default the tenant itself. The memory service sees one `user_id`
that encodes both (`<len(tenant)>:<tenant>/<user>`), so no key ever reaches
another tenant's data and no end user another's.
"""

from __future__ import annotations

from marie_kit.tenancy import RESERVED_USER_PREFIX, RESPONSES_USER, tenant_user_id

from marie_gateway.access.keys import SCOPE_ADMIN, Principal
from marie_gateway.http.errors import ApiError, bad_request


def key_tenant(principal: Principal) -> str:
    """The tenant a key's data belongs to: its owner, or its id when it has none."""
    return principal.owner or principal.key_id


#: The longest end-user name a request may give.
MAX_USER = 128
#: The longest tenant (a key's owner is at most 256 characters).
MAX_TENANT = 256
#: What `user_id_of` accepts as `user`, as JSON Schema (the OpenAPI document).
USER_SCHEMA: dict[str, object] = {
    "minLength": 1,
    "maxLength": MAX_USER,
    "not": {"type": "string", "pattern": f"^{RESERVED_USER_PREFIX}"},
}
# End users named "marie:…" (RESERVED_USER_PREFIX, `marie_kit.tenancy`) are
# Marie's own. A tenant's stored Responses API responses live under
# RESPONSES_USER (openai/responses/store.py), so no REST `user` may name it:
# they never show among the tenant's conversations or search hits, and memory
# embeds none of their messages.


def tenant_of(principal: Principal, requested: str | None) -> str:
    """The tenant whose data a request reaches: the key's owner (or key id); an
    admin key may name another."""
    own = key_tenant(principal)
    if requested and len(requested) > MAX_TENANT:
        raise bad_request(f"'tenant' is longer than {MAX_TENANT} characters.", "tenant")
    if requested and requested != own:
        if SCOPE_ADMIN not in principal.scopes:
            raise ApiError(
                403,
                "Only keys with the 'admin' scope may name a tenant.",
                "permission_error",
                "permission_denied",
                "tenant",
            )
        return requested
    return own


def user_id_of(principal: Principal, user: str | None, tenant: str | None) -> str:
    """The memory service's `user_id` for an end user of the caller's tenant."""
    owner = tenant_of(principal, tenant)
    if user is not None and not user:
        raise bad_request("'user' must not be empty.", "user")
    if user is not None and len(user) > MAX_USER:
        raise bad_request(f"'user' is longer than {MAX_USER} characters.", "user")
    if user is not None and user.startswith(RESERVED_USER_PREFIX):
        raise bad_request(
            f"'user' names starting with '{RESERVED_USER_PREFIX}' are reserved.", "user"
        )
    # At most 517 characters (MAX_TENANT twice, and the encoding's 5), within
    # the memory service's MAX_USER_ID (marie_kit.tenancy).
    return tenant_user_id(owner, user if user is not None else owner)


def responses_user_id(principal: Principal) -> str:
    """The memory service's `user_id` holding the caller's tenant's stored responses."""
    return tenant_user_id(key_tenant(principal), RESPONSES_USER)
