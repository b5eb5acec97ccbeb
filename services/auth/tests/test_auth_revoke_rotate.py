"""RevokeApiKey and RotateApiKey: revocation is at once and for good; rotation keeps
the settings and retires the old secret now or after a grace period that survives restarts."""

from __future__ import annotations

import grpc
import pytest
from auth_testkit import AuthStub, CreateKey, FakeClock, StartAuth, rpc_error
from marie.auth.v1 import auth_service_pb2 as pb
from marie.auth.v1 import auth_service_pb2_grpc as pb_grpc
from marie_auth.settings import AuthSettings
from marie_kit.apikeys import is_well_formed
from marie_kit.channels import insecure_channel


async def _is_valid(stub: AuthStub, key: str) -> bool:
    try:
        await stub.ValidateApiKey(pb.ValidateApiKeyRequest(key=key))
    except grpc.aio.AioRpcError:
        return False
    return True


async def test_revoke_refuses_the_key_at_once(create: CreateKey, stub: AuthStub) -> None:
    created = await create()

    reply = await stub.RevokeApiKey(pb.RevokeApiKeyRequest(id=created.api_key.id))

    assert reply.api_key.state == pb.API_KEY_STATE_REVOKED
    assert reply.api_key.HasField("revoke_time")
    assert not await _is_valid(stub, created.key)


async def test_revoking_a_revoked_key_succeeds_and_changes_nothing(
    create: CreateKey, stub: AuthStub, clock: FakeClock
) -> None:
    created = await create()
    first = await stub.RevokeApiKey(pb.RevokeApiKeyRequest(id=created.api_key.id))
    clock.advance(30)

    second = await stub.RevokeApiKey(pb.RevokeApiKeyRequest(id=created.api_key.id))

    assert second.api_key == first.api_key


async def test_revoke_of_an_unknown_key_is_key_not_found(stub: AuthStub) -> None:
    error = await rpc_error(stub.RevokeApiKey(pb.RevokeApiKeyRequest(id="key_NOPE")))

    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "KEY_NOT_FOUND"


async def test_rotate_issues_a_new_key_with_the_same_settings(
    create: CreateKey, stub: AuthStub
) -> None:
    created = await create(
        name="ci", owner="team", scopes=["chat"], allowed_models=["ollama/*"], labels={"a": "b"}
    )

    rotated = await stub.RotateApiKey(pb.RotateApiKeyRequest(id=created.api_key.id))

    new, old = rotated.api_key, created.api_key
    assert is_well_formed(rotated.key) and rotated.key != created.key
    assert rotated.previous_id == old.id and new.id != old.id
    assert (new.name, new.owner, list(new.scopes), list(new.allowed_models), dict(new.labels)) == (
        old.name,
        old.owner,
        list(old.scopes),
        list(old.allowed_models),
        dict(old.labels),
    )
    assert await _is_valid(stub, rotated.key)


async def test_rotate_without_grace_revokes_the_old_key_at_once(
    create: CreateKey, stub: AuthStub
) -> None:
    created = await create()

    await stub.RotateApiKey(pb.RotateApiKeyRequest(id=created.api_key.id))

    old = await stub.GetApiKey(pb.GetApiKeyRequest(id=created.api_key.id))
    assert old.api_key.state == pb.API_KEY_STATE_REVOKED
    assert not await _is_valid(stub, created.key)


async def test_rotate_with_grace_keeps_the_old_key_until_the_grace_ends(
    create: CreateKey, stub: AuthStub, clock: FakeClock
) -> None:
    created = await create()

    await stub.RotateApiKey(pb.RotateApiKeyRequest(id=created.api_key.id, grace_period_seconds=300))

    clock.advance(299)
    assert await _is_valid(stub, created.key)
    clock.advance(2)
    assert not await _is_valid(stub, created.key)
    old = await stub.GetApiKey(pb.GetApiKeyRequest(id=created.api_key.id))
    assert old.api_key.state == pb.API_KEY_STATE_EXPIRED


async def test_a_grace_period_never_extends_an_earlier_expiry(
    create: CreateKey, stub: AuthStub, clock: FakeClock
) -> None:
    created = await create(expire_time={"seconds": int(clock()) + 60})

    await stub.RotateApiKey(
        pb.RotateApiKeyRequest(id=created.api_key.id, grace_period_seconds=3600)
    )

    old = await stub.GetApiKey(pb.GetApiKeyRequest(id=created.api_key.id))
    assert old.api_key.expire_time == created.api_key.expire_time


async def test_a_rotation_grace_period_survives_a_restart(
    start_auth: StartAuth, settings: AuthSettings, clock: FakeClock
) -> None:
    first = await start_auth(settings)
    async with insecure_channel(first.target) as channel:
        stub: AuthStub = pb_grpc.AuthServiceStub(channel)
        created = await stub.CreateApiKey(pb.CreateApiKeyRequest(name="old"))
        await stub.RotateApiKey(
            pb.RotateApiKeyRequest(id=created.api_key.id, grace_period_seconds=60)
        )
    await first.stop(0)

    second = await start_auth(settings)
    async with insecure_channel(second.target) as channel:
        stub = pb_grpc.AuthServiceStub(channel)
        assert await _is_valid(stub, created.key)
        clock.advance(61)
        assert not await _is_valid(stub, created.key)


@pytest.mark.parametrize("grace", [-1, 86_401])
async def test_a_grace_period_out_of_range_is_invalid_argument(
    create: CreateKey, stub: AuthStub, grace: int
) -> None:
    created = await create()

    error = await rpc_error(
        stub.RotateApiKey(pb.RotateApiKeyRequest(id=created.api_key.id, grace_period_seconds=grace))
    )

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.metadata == {"field": "grace_period_seconds"}


async def test_a_revoked_key_cannot_be_rotated(create: CreateKey, stub: AuthStub) -> None:
    created = await create()
    await stub.RevokeApiKey(pb.RevokeApiKeyRequest(id=created.api_key.id))

    error = await rpc_error(stub.RotateApiKey(pb.RotateApiKeyRequest(id=created.api_key.id)))

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "KEY_INACTIVE"
