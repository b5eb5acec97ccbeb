"""LeaseCapacity: shares of a key's limits taken from counters that every
auth replica on the same store agrees on (a fake wall clock drives refills
and slot expiry)."""

from __future__ import annotations

import grpc
from auth_testkit import AuthStub, CreateKey, FakeClock, StartAuth, rpc_error
from marie.auth.v1 import auth_service_pb2 as pb
from marie.auth.v1 import auth_service_pb2_grpc as pb_grpc
from marie_auth.settings import AuthSettings
from marie_kit.channels import insecure_channel


def ask(key_id: str, holder: str = "gw-1", **fields: int) -> pb.LeaseCapacityRequest:
    return pb.LeaseCapacityRequest(key_id=key_id, holder=holder, **fields)


async def test_requests_come_out_of_one_bucket_shared_by_two_replicas(
    start_auth: StartAuth, settings: AuthSettings, clock: FakeClock
) -> None:
    first, second = await start_auth(settings), await start_auth(settings)
    async with insecure_channel(first.target) as a, insecure_channel(second.target) as b:
        one, two = pb_grpc.AuthServiceStub(a), pb_grpc.AuthServiceStub(b)
        created = await one.CreateApiKey(
            pb.CreateApiKeyRequest(name="k", limits=pb.KeyLimits(requests_per_minute=10))
        )
        key_id = created.api_key.id
        got = await one.LeaseCapacity(ask(key_id, "gw-1", requests=6))
        assert (got.requests, got.requests_remaining) == (6, 4)
        assert got.limits.requests_per_minute == 10
        # The other replica sees the same bucket: only 4 are left.
        got = await two.LeaseCapacity(ask(key_id, "gw-2", requests=6))
        assert (got.requests, got.requests_remaining) == (4, 0)
        got = await two.LeaseCapacity(ask(key_id, "gw-2", requests=1))
        assert got.requests == 0
        assert got.retry_after_seconds == 6.0  # one request refills every 6 s
        # Refill, and given-back requests, go back into the bucket (up to the limit).
        clock.advance(12)
        got = await one.LeaseCapacity(ask(key_id, "gw-1", returned_requests=3))
        assert got.requests_remaining == 5
        assert got.requests_reset_seconds == 30.0


async def test_tokens_settle_debts_and_count_toward_the_day(
    stub: AuthStub, create: CreateKey, clock: FakeClock
) -> None:
    key_id = (
        await create(limits=pb.KeyLimits(tokens_per_minute=100, tokens_per_day=150))
    ).api_key.id
    got = await stub.LeaseCapacity(ask(key_id, tokens=20))
    assert (got.tokens, got.tokens_remaining) == (20, 80)
    # Its answers used 50: 30 beyond the lease are taken now.
    got = await stub.LeaseCapacity(ask(key_id, token_balance=-30, tokens=20))
    assert (got.tokens, got.tokens_remaining) == (20, 30)
    clock.advance(60)  # the minute refills; the day does not
    got = await stub.LeaseCapacity(ask(key_id, tokens=200))
    assert got.tokens == 80  # 150 a day, 70 used or leased
    got = await stub.LeaseCapacity(ask(key_id, tokens=1))
    assert got.tokens == 0
    assert got.retry_after_seconds > 60  # until the next UTC day
    # Unused tokens given back count toward neither.
    got = await stub.LeaseCapacity(ask(key_id, token_balance=50, tokens=10))
    assert got.tokens == 10


async def test_slots_are_capped_across_holders_and_lapse(
    stub: AuthStub, create: CreateKey, clock: FakeClock
) -> None:
    key_id = (await create(limits=pb.KeyLimits(max_concurrent_requests=3))).api_key.id
    assert (await stub.LeaseCapacity(ask(key_id, "gw-1", slots=2))).slots == 2
    got = await stub.LeaseCapacity(ask(key_id, "gw-2", slots=2))
    assert (got.slots, got.retry_after_seconds) == (1, 1.0)
    # Asking again replaces a holder's slots; 0 gives them all back.
    assert (await stub.LeaseCapacity(ask(key_id, "gw-1", slots=0))).slots == 0
    assert (await stub.LeaseCapacity(ask(key_id, "gw-2", slots=3))).slots == 3
    # A holder that stops asking (a crashed gateway) loses its slots.
    clock.advance(got.slot_ttl_seconds + 0.1)
    assert (await stub.LeaseCapacity(ask(key_id, "gw-1", slots=3))).slots == 3


async def test_bad_asks_name_the_field_and_unknown_keys_are_not_found(
    stub: AuthStub, create: CreateKey
) -> None:
    key_id = (await create()).api_key.id
    for request, field in (
        (pb.LeaseCapacityRequest(holder="gw"), "key_id"),
        (pb.LeaseCapacityRequest(key_id=key_id), "holder"),
        (ask(key_id, requests=-1), "requests"),
        (ask(key_id, slots=-2), "slots"),
    ):
        error = await rpc_error(stub.LeaseCapacity(request))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.metadata["field"] == field
    error = await rpc_error(stub.LeaseCapacity(ask("key_nope", requests=1)))
    assert error.code == grpc.StatusCode.NOT_FOUND
