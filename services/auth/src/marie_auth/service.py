"""The AuthService gRPC servicer (a thin proto ⇄ core translation) and the
component the kit's server bootstrap runs.

What callers see beyond the proto comments:
- scopes are "chat", "models:read", "embeddings", "memory" and "admin"
  (see `scopes.py`); an empty list means all of them but "admin", and any
  other name is INVALID_ARGUMENT (field "scopes");
- ListApiKeys pages default to 50 keys; larger page sizes are cut to 500;
- updating a revoked key, or rotating a revoked or expired one, is
  FAILED_PRECONDITION with reason KEY_INACTIVE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from marie.auth.v1 import auth_service_pb2 as pb
from marie.auth.v1 import auth_service_pb2_grpc as pb_grpc
from marie_kit.errors import ServiceError
from marie_kit.storage import StorageWatch

from marie_auth import convert
from marie_auth.budgets import (
    KEY,
    BudgetAsk,
    BudgetBook,
    BudgetStore,
    SqliteBudgetStore,
)
from marie_auth.errors import DOMAIN
from marie_auth.events import KeyEventBroadcaster
from marie_auth.keys import (
    DEFAULT_EVENT_POLL_SECONDS,
    DEFAULT_EXPIRY_CHECK_SECONDS,
    KeyManager,
    open_store,
)
from marie_auth.leases import LeaseBook, LeaseStore, SqliteLeaseStore
from marie_auth.settings import AuthSettings
from marie_auth.store import KeyLimits
from marie_auth.usage import SqliteUsageStore, UsageLedger, UsageStore

log = logging.getLogger("marie.auth.service")

SERVICE_NAME = "marie.auth.v1.AuthService"

Context = grpc.aio.ServicerContext[Any, Any]


async def open_usage_store(settings: AuthSettings) -> UsageStore:
    if settings.store == "opensearch":
        from marie_auth.opensearch_store import OpenSearchUsageStore  # noqa: PLC0415

        return await OpenSearchUsageStore.open(
            settings.opensearch_url, prefix=settings.opensearch_index_prefix
        )
    return await SqliteUsageStore.open(settings.db_path, max_bytes=settings.db_max_bytes)


async def open_lease_store(settings: AuthSettings) -> LeaseStore:
    if settings.store == "opensearch":
        from marie_auth.opensearch_store import OpenSearchLeaseStore  # noqa: PLC0415

        return await OpenSearchLeaseStore.open(
            settings.opensearch_url, prefix=settings.opensearch_index_prefix
        )
    return await SqliteLeaseStore.open(settings.db_path, max_bytes=settings.db_max_bytes)


async def open_budget_store(settings: AuthSettings) -> BudgetStore:
    if settings.store == "opensearch":
        from marie_auth.opensearch_store import OpenSearchBudgetStore  # noqa: PLC0415

        return await OpenSearchBudgetStore.open(
            settings.opensearch_url, prefix=settings.opensearch_index_prefix
        )
    return await SqliteBudgetStore.open(settings.db_path, max_bytes=settings.db_max_bytes)


class AuthComponent:
    """The auth service as a kit `Component`: opens the key store in `start()`,
    closes it (and ends every WatchKeyEvents stream) in `close()`."""

    service_names: Sequence[str] = (SERVICE_NAME,)
    domain: str = DOMAIN

    def __init__(
        self,
        settings: AuthSettings,
        *,
        clock: Callable[[], float] = time.time,
        expiry_check_seconds: float = DEFAULT_EXPIRY_CHECK_SECONDS,
        event_poll_seconds: float = DEFAULT_EVENT_POLL_SECONDS,
    ) -> None:
        self.settings = settings
        self.events = KeyEventBroadcaster(clock=clock)
        self._clock = clock
        self._expiry_check_seconds = expiry_check_seconds
        self._event_poll_seconds = event_poll_seconds
        self._follow_task: asyncio.Task[None] | None = None
        self._keys: KeyManager | None = None
        self._usage: UsageLedger | None = None
        self._leases: LeaseBook | None = None
        self._budgets: BudgetBook | None = None
        self._expiry_task: asyncio.Task[None] | None = None
        # A write refused for lack of space makes the service NOT_SERVING
        # until a probe write on the key store succeeds (marie_kit.storage).
        self.storage = StorageWatch(self._probe_store)

    async def _probe_store(self) -> None:
        await self.keys.probe_store()

    @property
    def keys(self) -> KeyManager:
        """The started key manager; UNAVAILABLE before `start()` and after `close()`."""
        if self._keys is None:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE", "auth service not ready", domain=DOMAIN
            )
        return self._keys

    @property
    def usage(self) -> UsageLedger:
        """The started usage ledger; UNAVAILABLE before `start()` and after `close()`."""
        if self._usage is None:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE", "auth service not ready", domain=DOMAIN
            )
        return self._usage

    @property
    def leases(self) -> LeaseBook:
        """The started lease book; UNAVAILABLE before `start()` and after `close()`."""
        if self._leases is None:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE", "auth service not ready", domain=DOMAIN
            )
        return self._leases

    @property
    def budgets(self) -> BudgetBook:
        """The started budget book; UNAVAILABLE before `start()` and after `close()`."""
        if self._budgets is None:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE", "auth service not ready", domain=DOMAIN
            )
        return self._budgets

    def register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_AuthServiceServicer_to_server(AuthServicer(self), server)

    async def start(self) -> None:
        store = await open_store(self.settings)
        self._keys = KeyManager(
            store,
            pepper=self.settings.pepper_bytes,
            cache_ttl_seconds=self.settings.validation_cache_ttl_seconds,
            events=self.events,
            clock=self._clock,
        )
        self._usage = UsageLedger(await open_usage_store(self.settings))
        keys = self._keys

        async def limits_of(key_id: str) -> KeyLimits:
            return (await keys.get(key_id)).spec.limits

        self._leases = LeaseBook(
            await open_lease_store(self.settings), limits_of, clock=self._clock
        )
        usage = self._usage

        async def owner_of(key_id: str) -> str:
            return (await keys.get(key_id)).spec.owner

        async def spent(kind: str, subject: str, start: float, end: float) -> int:
            if kind == KEY:
                report = await usage.query(start, end, key_id=subject)
            else:
                report = await usage.query(start, end, owner=subject)
            return report.total.cost_picodollars

        self._budgets = BudgetBook(
            await open_budget_store(self.settings), owner_of, spent, clock=self._clock
        )
        self._expiry_task = asyncio.create_task(
            self._keys.notify_expirations(self._expiry_check_seconds)
        )
        # Events of the other processes on the same store (replicas, the CLI).
        self._follow_task = asyncio.create_task(self._keys.follow_events(self._event_poll_seconds))
        log.info("key store open", extra={"store": self.settings.store})

    async def stopping(self) -> None:
        # Watch streams never end on their own; end them before the grace period.
        self.events.close()

    async def close(self) -> None:
        self.events.close()
        if self._follow_task is not None:
            self._follow_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow_task
            self._follow_task = None
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry_task
            self._expiry_task = None
        if self._keys is not None:
            keys, self._keys = self._keys, None
            await keys.close()
        if self._usage is not None:
            usage, self._usage = self._usage, None
            await usage.close()
        if self._leases is not None:
            leases, self._leases = self._leases, None
            await leases.close()
        if self._budgets is not None:
            budgets, self._budgets = self._budgets, None
            await budgets.close()


class AuthServicer(pb_grpc.AuthServiceServicer):
    """AuthService RPCs: each translates its request, calls the KeyManager, translates back."""

    def __init__(self, component: AuthComponent) -> None:
        self._component = component

    @property
    def _keys(self) -> KeyManager:
        return self._component.keys

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: Context
    ) -> pb.CreateApiKeyResponse:
        issued = await self._keys.create(convert.spec_from_create(request))
        return pb.CreateApiKeyResponse(
            api_key=convert.api_key_to_proto(issued.record, self._keys.now()), key=issued.key
        )

    async def GetApiKey(
        self, request: pb.GetApiKeyRequest, context: Context
    ) -> pb.GetApiKeyResponse:
        record = await self._keys.get(request.id)
        return pb.GetApiKeyResponse(api_key=convert.api_key_to_proto(record, self._keys.now()))

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: Context
    ) -> pb.ListApiKeysResponse:
        page = await self._keys.list(
            owner=request.owner or None,
            include_inactive=request.include_inactive,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        now = self._keys.now()
        return pb.ListApiKeysResponse(
            api_keys=[convert.api_key_to_proto(record, now) for record in page.keys],
            next_page_token=page.next_page_token,
        )

    async def UpdateApiKey(
        self, request: pb.UpdateApiKeyRequest, context: Context
    ) -> pb.UpdateApiKeyResponse:
        record = await self._keys.update(
            request.api_key.id,
            convert.spec_from_api_key(request.api_key),
            list(request.update_mask.paths),
        )
        return pb.UpdateApiKeyResponse(api_key=convert.api_key_to_proto(record, self._keys.now()))

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: Context
    ) -> pb.RevokeApiKeyResponse:
        record = await self._keys.revoke(request.id)
        return pb.RevokeApiKeyResponse(api_key=convert.api_key_to_proto(record, self._keys.now()))

    async def RotateApiKey(
        self, request: pb.RotateApiKeyRequest, context: Context
    ) -> pb.RotateApiKeyResponse:
        rotated = await self._keys.rotate(request.id, request.grace_period_seconds)
        # The new key keeps the old one's budget, and what the old one spent counts.
        await self._component.budgets.carry(rotated.previous.id, rotated.record.id)
        return pb.RotateApiKeyResponse(
            api_key=convert.api_key_to_proto(rotated.record, self._keys.now()),
            key=rotated.key,
            previous_id=rotated.previous.id,
        )

    async def ValidateApiKey(
        self, request: pb.ValidateApiKeyRequest, context: Context
    ) -> pb.ValidateApiKeyResponse:
        validation = await self._keys.validate(request.key)
        return pb.ValidateApiKeyResponse(
            principal=convert.principal_to_proto(validation.principal),
            cache_ttl_seconds=validation.cache_ttl_seconds,
        )

    async def WatchKeyEvents(
        self, request: pb.WatchKeyEventsRequest, context: Context
    ) -> AsyncIterator[pb.WatchKeyEventsResponse]:
        with self._component.events.subscribe() as subscription:
            async for event in subscription:
                yield convert.event_to_proto(event)

    async def RecordUsage(
        self, request: pb.RecordUsageRequest, context: Context
    ) -> pb.RecordUsageResponse:
        records = [convert.usage_record_from_proto(r) for r in request.records]
        recorded = await self._component.usage.record(records)
        return pb.RecordUsageResponse(recorded=recorded)

    async def QueryUsage(
        self, request: pb.QueryUsageRequest, context: Context
    ) -> pb.QueryUsageResponse:
        report = await self._component.usage.query(
            convert.unix_seconds(request.start_time) if request.HasField("start_time") else 0.0,
            convert.unix_seconds(request.end_time) if request.HasField("end_time") else 0.0,
            key_id=request.key_id,
            owner=request.owner,
            group_by=convert.GROUP_BY.get(request.group_by, convert.GROUP_BY[0]),
        )
        return convert.usage_report_to_proto(report)

    async def LeaseCapacity(
        self, request: pb.LeaseCapacityRequest, context: Context
    ) -> pb.LeaseCapacityResponse:
        grant = await self._component.leases.lease(convert.lease_ask_from_proto(request))
        return convert.lease_grant_to_proto(grant)

    async def GetBudget(
        self, request: pb.GetBudgetRequest, context: Context
    ) -> pb.GetBudgetResponse:
        kind, subject = convert.budget_subject(request)
        view = await self._component.budgets.get(kind, subject)
        return pb.GetBudgetResponse(budget=convert.budget_to_proto(view))

    async def UpdateBudget(
        self, request: pb.UpdateBudgetRequest, context: Context
    ) -> pb.UpdateBudgetResponse:
        kind, subject = convert.budget_subject(request.budget, "budget.")
        daily, monthly = convert.budget_limits_from_proto(request)
        view = await self._component.budgets.update(kind, subject, daily, monthly)
        return pb.UpdateBudgetResponse(budget=convert.budget_to_proto(view))

    async def ListBudgets(
        self, request: pb.ListBudgetsRequest, context: Context
    ) -> pb.ListBudgetsResponse:
        views, token = await self._component.budgets.list(request.page_size, request.page_token)
        return pb.ListBudgetsResponse(
            budgets=[convert.budget_to_proto(v) for v in views], next_page_token=token
        )

    async def LeaseBudget(
        self, request: pb.LeaseBudgetRequest, context: Context
    ) -> pb.LeaseBudgetResponse:
        grant = await self._component.budgets.lease(
            BudgetAsk(
                key_id=request.key_id,
                holder=request.holder,
                spend=request.spend,
                spend_balance=request.spend_balance,
                release=request.release,
            )
        )
        return pb.LeaseBudgetResponse(
            budgeted=grant.budgeted,
            spend=grant.spend,
            remaining=grant.remaining,
            limit=int(grant.limit),  # type: ignore[arg-type]
            limit_amount=grant.limit_amount,
            reset_seconds=grant.reset_seconds,
            lease_size=grant.lease_size,
        )
