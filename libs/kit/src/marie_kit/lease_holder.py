"""What every holder of leases from auth's shared counters does, whatever it
leases (request and token capacity: `marie_kit.leased_limits`; spend:
`marie_kit.budgets`): one lease per key, topped up in the background before it
runs out (one call at a time per key), swept every second (idle leases given
back), all given back at close, and auth's outages noticed once and logged
once, so that callers admit by their fallback for a while instead of waiting
on a dead auth at every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Generic, Protocol, TypeVar

import grpc

if TYPE_CHECKING:
    from marie.auth.v1.auth_service_pb2_grpc import AuthServiceAsyncStub

#: A lease unused this long is given back.
IDLE_SECONDS = 5.0
#: How often idle leases are given back (and held slots kept alive).
SWEEP_SECONDS = 1.0
#: Deadline of a lease call: a request waiting on one waits at most this.
LEASE_TIMEOUT_SECONDS = 2.0
#: After a failed lease call, requests are admitted without asking auth this
#: long (background renewals keep probing it).
AUTH_DOWN_SECONDS = 2.0


class Lease(Protocol):
    #: The background call topping the lease up, if one is under way.
    renewing: asyncio.Task[None] | None


L = TypeVar("L", bound=Lease)


class LeaseHolder(Generic[L]):
    """The lease bookkeeping shared by the holders; a subclass says how to
    top a lease up (`_top_up`), give it back (`_give_back`), which leases a
    sweep gives back or renews (`_sweep`), and which are worth giving back
    at close (`_holds_anything`)."""

    #: Names the holder at auth (appended to host, pid and a random part).
    HOLDER_SUFFIX: ClassVar[str] = ""
    #: The warning logged once when auth cannot be reached.
    UNREACHABLE_MESSAGE: ClassVar[str]
    log: ClassVar[logging.Logger]

    def __init__(
        self,
        auth: AuthServiceAsyncStub,
        *,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = LEASE_TIMEOUT_SECONDS,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self._auth = auth
        self._clock = clock
        self._timeout = timeout
        self._idle = idle_seconds
        self.holder = (
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}{self.HOLDER_SUFFIX}"
        )
        self._leases: dict[str, L] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._auth_down_until = 0.0
        self._auth_down_logged = False

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        """Stop, and give every lease back (best effort)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        leases, self._leases = self._leases, {}
        with contextlib.suppress(Exception):
            await asyncio.gather(
                *(self._give_back(k, lease) for k, lease in leases.items() if self._holds(lease))
            )

    # -- what a holder of one kind of lease defines ------------------------

    async def _top_up(self, key_id: str, lease: L) -> None:
        """Ask auth for the lease's usual top-up (settling what it owes)."""
        raise NotImplementedError

    async def _give_back(self, key_id: str, lease: L) -> None:
        """Return what the lease holds to auth."""
        raise NotImplementedError

    async def _sweep(self) -> None:
        """Give idle leases back (and keep busy ones alive)."""
        raise NotImplementedError

    def _holds(self, lease: L) -> bool:
        """Whether the lease holds anything to give back at close."""
        return True

    # -- shared ------------------------------------------------------------

    @staticmethod
    def _busy(lease: L) -> bool:
        return lease.renewing is not None and not lease.renewing.done()

    def _renew_later(self, key_id: str, lease: L) -> None:
        """Top the lease up in the background (unless a call is under way)."""
        if not self._busy(lease):
            lease.renewing = asyncio.create_task(self._renew_quietly(key_id, lease))

    async def _renew_quietly(self, key_id: str, lease: L) -> None:
        try:
            await self._top_up(key_id, lease)
        except grpc.aio.AioRpcError as exc:
            self._auth_unreachable(exc)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                await self._sweep()
            except grpc.aio.AioRpcError as exc:
                self._auth_unreachable(exc)
            except Exception:
                self.log.exception("lease sweep failed")

    def _auth_answered(self) -> None:
        self._auth_down_until = 0.0
        self._auth_down_logged = False

    def _auth_unreachable(self, exc: grpc.aio.AioRpcError) -> None:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            self._auth_down_until = self._clock() + AUTH_DOWN_SECONDS
        if not self._auth_down_logged:
            self._auth_down_logged = True
            self.log.warning(self.UNREACHABLE_MESSAGE, extra={"code": exc.code().name})
