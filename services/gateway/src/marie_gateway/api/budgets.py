"""The budgets API over auth's budget RPCs: `GET /api/budgets` (admin),
`GET/PATCH /api/budgets/keys/{key_id}` and `GET/PATCH /api/budgets/owners/{owner}`
(admin; a key may read its own budget).

Amounts are US dollars below a million as exact decimal text ("12.5"), at
most 6 decimals; `null`, `""` or `"0"` clear a limit. What was spent comes from the usage
ledger (this UTC day and month).
"""

from __future__ import annotations

from typing import Annotated, Any

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from marie.auth.v1 import auth_service_pb2 as auth_pb
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from marie_gateway.access.keys import SCOPE_ADMIN
from marie_gateway.api.schemas import BudgetList, BudgetOut
from marie_gateway.core import Gateway
from marie_gateway.http.bodies import JSONResponse, parse_body
from marie_gateway.http.context import current_request_id
from marie_gateway.http.errors import bad_request, from_rpc_error, permission_denied
from marie_gateway.http.params import MAX_PAGE_TOKEN_LENGTH, int_query, path_text, text_query

#: The longest owner (auth's limit).
MAX_OWNER = 256
#: What auth takes: dollars below a million, at most 6 decimals (0 clears
#: the limit; auth keeps limits as int64 picodollars).
Usd = Annotated[str, StringConstraints(max_length=32, pattern=r"^([0-9]{1,6}(\.[0-9]{1,6})?)?$")]


def _at_least_one(schema: dict[str, Any]) -> None:
    """The document says what the handler refuses: an empty body changes nothing."""
    schema["minProperties"] = 1


class BudgetPatch(BaseModel):
    """The limits to change; a field left out keeps its value."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_at_least_one)

    daily_usd: Usd | None = Field(
        None, description='Most spent per UTC day, in USD; null, "" or "0": no limit.'
    )
    monthly_usd: Usd | None = Field(
        None, description='Most spent per UTC calendar month, in USD; null, "" or "0": none.'
    )


def budget_out(b: auth_pb.Budget) -> BudgetOut:
    return BudgetOut(
        object="budget",
        key_id=b.key_id or None,
        owner=b.owner or None,
        currency="USD",
        daily_usd=b.daily_usd or None,
        monthly_usd=b.monthly_usd or None,
        spent_today_usd=b.spent_today_usd or "0",
        spent_this_month_usd=b.spent_this_month_usd or "0",
        updated_at=b.update_time.ToJsonString() if b.HasField("update_time") else None,
    )


class BudgetRoutes:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/api/budgets", self.list, methods=["GET"]),
            Route("/api/budgets/keys/{key_id}", self.get_key, methods=["GET"]),
            Route("/api/budgets/keys/{key_id}", self.update_key, methods=["PATCH"]),
            # An owner is free text: it may hold a '/'.
            Route("/api/budgets/owners/{owner:path}", self.get_owner, methods=["GET"]),
            Route("/api/budgets/owners/{owner:path}", self.update_owner, methods=["PATCH"]),
        ]

    async def _call(self, method: str, message: Any) -> Any:
        try:
            return await getattr(self.gw.backends().auth, method)(
                message, timeout=self.gw.settings.control_timeout_seconds
            )
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc, current_request_id())
            if error.param is not None:
                error.param = error.param.removeprefix("budget.")
            raise error from None

    async def list(self, request: Request) -> Response:
        await self.gw.enter(request, SCOPE_ADMIN)
        reply = await self._call(
            "ListBudgets",
            auth_pb.ListBudgetsRequest(
                page_size=int_query(request, "page_size", default=50, minimum=1, maximum=500),
                page_token=text_query(request, "page_token", MAX_PAGE_TOKEN_LENGTH),
            ),
        )
        out = BudgetList(
            object="list",
            data=[budget_out(b) for b in reply.budgets],
            next_page_token=reply.next_page_token or None,
        )
        return JSONResponse(out.model_dump(mode="json"))

    async def get_key(self, request: Request) -> Response:
        # Any key may read its own budget, uncounted like its usage (a key at
        # its limits can still see where it stands); admin reads any.
        principal = await self.gw.authenticate(request)
        key_id = path_text(request, "key_id")
        if key_id != principal.key_id and SCOPE_ADMIN not in principal.scopes:
            raise permission_denied(
                "Only a key with the 'admin' scope may read other keys' budgets."
            )
        reply = await self._call("GetBudget", auth_pb.GetBudgetRequest(key_id=key_id))
        return JSONResponse(budget_out(reply.budget).model_dump(mode="json"))

    async def get_owner(self, request: Request) -> Response:
        await self.gw.enter(request, SCOPE_ADMIN)
        owner = path_text(request, "owner", MAX_OWNER)
        reply = await self._call("GetBudget", auth_pb.GetBudgetRequest(owner=owner))
        return JSONResponse(budget_out(reply.budget).model_dump(mode="json"))

    async def update_key(self, request: Request) -> Response:
        await self.gw.enter(request, SCOPE_ADMIN)
        return await self._update(request, auth_pb.Budget(key_id=path_text(request, "key_id")))

    async def update_owner(self, request: Request) -> Response:
        await self.gw.enter(request, SCOPE_ADMIN)
        owner = path_text(request, "owner", MAX_OWNER)
        return await self._update(request, auth_pb.Budget(owner=owner))

    async def _update(self, request: Request, budget: auth_pb.Budget) -> Response:
        body = parse_body(BudgetPatch, await self.gw.read_body(request))
        sent = sorted(body.model_fields_set)
        if not sent:
            raise bad_request("Send daily_usd, monthly_usd or both.")
        for name in sent:
            setattr(budget, name, getattr(body, name) or "")
        reply = await self._call(
            "UpdateBudget",
            auth_pb.UpdateBudgetRequest(budget=budget, update_mask=FieldMask(paths=sent)),
        )
        return JSONResponse(budget_out(reply.budget).model_dump(mode="json"))
