"""UpdateApiKey: only the masked fields change; the mask is required and checked."""

from __future__ import annotations

import grpc
import pytest
from auth_testkit import AuthStub, CreateKey, FakeClock, rpc_error
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp
from marie.auth.v1 import auth_service_pb2 as pb


async def test_update_changes_only_the_masked_fields(
    create: CreateKey, stub: AuthStub, clock: FakeClock
) -> None:
    created = await create(name="before", owner="alice", scopes=["chat"], labels={"env": "dev"})
    clock.advance(5)

    reply = await stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(
            api_key=pb.ApiKey(
                id=created.api_key.id,
                name="after",
                owner="ignored-not-in-mask",
                limits=pb.KeyLimits(requests_per_minute=10),
                labels={"env": "prod"},
            ),
            update_mask=FieldMask(paths=["name", "limits", "labels"]),
        )
    )

    updated = reply.api_key
    assert updated.name == "after"
    assert updated.limits.requests_per_minute == 10
    assert dict(updated.labels) == {"env": "prod"}
    assert updated.owner == "alice"
    assert list(updated.scopes) == ["chat"]
    assert updated.update_time.ToSeconds() > created.api_key.update_time.ToSeconds()
    got = await stub.GetApiKey(pb.GetApiKeyRequest(id=created.api_key.id))
    assert got.api_key == updated


async def test_validation_sees_the_updated_settings(create: CreateKey, stub: AuthStub) -> None:
    created = await create(scopes=["chat"])

    await stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(
            api_key=pb.ApiKey(id=created.api_key.id, scopes=["embeddings"]),
            update_mask=FieldMask(paths=["scopes"]),
        )
    )
    reply = await stub.ValidateApiKey(pb.ValidateApiKeyRequest(key=created.key))

    assert list(reply.principal.scopes) == ["embeddings"]


async def test_an_unset_expire_time_in_the_mask_clears_the_expiry(
    create: CreateKey, stub: AuthStub, clock: FakeClock
) -> None:
    created = await create(expire_time=Timestamp(seconds=int(clock()) + 60))

    reply = await stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(
            api_key=pb.ApiKey(id=created.api_key.id), update_mask=FieldMask(paths=["expire_time"])
        )
    )

    assert not reply.api_key.HasField("expire_time")


@pytest.mark.parametrize(
    ("paths", "field"),
    [
        ([], "update_mask"),
        (["state"], "update_mask"),
        (["digest"], "update_mask"),
        (["name"], "name"),  # the new name is empty
    ],
)
async def test_bad_updates_are_invalid_argument_naming_the_field(
    create: CreateKey, stub: AuthStub, paths: list[str], field: str
) -> None:
    created = await create()

    error = await rpc_error(
        stub.UpdateApiKey(
            pb.UpdateApiKeyRequest(
                api_key=pb.ApiKey(id=created.api_key.id), update_mask=FieldMask(paths=paths)
            )
        )
    )

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.metadata == {"field": field}


async def test_update_of_an_unknown_key_is_key_not_found(stub: AuthStub) -> None:
    error = await rpc_error(
        stub.UpdateApiKey(
            pb.UpdateApiKeyRequest(
                api_key=pb.ApiKey(id="key_NOPE", name="x"), update_mask=FieldMask(paths=["name"])
            )
        )
    )

    assert error.reason == "KEY_NOT_FOUND"


async def test_a_revoked_key_cannot_be_updated(create: CreateKey, stub: AuthStub) -> None:
    created = await create()
    await stub.RevokeApiKey(pb.RevokeApiKeyRequest(id=created.api_key.id))

    error = await rpc_error(
        stub.UpdateApiKey(
            pb.UpdateApiKeyRequest(
                api_key=pb.ApiKey(id=created.api_key.id, name="x"),
                update_mask=FieldMask(paths=["name"]),
            )
        )
    )

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "KEY_INACTIVE"
