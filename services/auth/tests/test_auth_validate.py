"""ValidateApiKey: the principal of a good key; one identical answer for every bad one."""

from __future__ import annotations

import grpc
from auth_testkit import AuthStub, CreateKey, FakeClock, rpc_error
from google.protobuf.timestamp_pb2 import Timestamp
from marie.auth.v1 import auth_service_pb2 as pb
from marie_kit.apikeys import generate_key


async def test_validate_returns_the_principal(create: CreateKey, stub: AuthStub) -> None:
    limits = pb.KeyLimits(
        requests_per_minute=60,
        tokens_per_minute=1000,
        tokens_per_day=50_000,
        max_concurrent_requests=4,
    )
    created = await create(
        name="ci-bot",
        owner="team-a",
        scopes=["chat", "models:read"],
        allowed_models=["ollama/*"],
        limits=limits,
    )

    reply = await stub.ValidateApiKey(pb.ValidateApiKeyRequest(key=created.key))

    principal = reply.principal
    assert principal.key_id == created.api_key.id
    assert principal.key_name == "ci-bot"
    assert principal.owner == "team-a"
    assert list(principal.scopes) == ["chat", "models:read"]
    assert list(principal.allowed_models) == ["ollama/*"]
    assert principal.limits == limits
    assert not principal.HasField("expire_time")
    assert reply.cache_ttl_seconds == 60


async def test_a_key_without_scopes_has_every_scope_but_admin(
    create: CreateKey, stub: AuthStub
) -> None:
    created = await create()

    reply = await stub.ValidateApiKey(pb.ValidateApiKeyRequest(key=created.key))

    assert list(created.api_key.scopes) == []
    assert list(reply.principal.scopes) == ["chat", "models:read", "embeddings", "memory"]


async def test_admin_scope_is_granted_only_by_name(create: CreateKey, stub: AuthStub) -> None:
    created = await create(scopes=["admin"])

    reply = await stub.ValidateApiKey(pb.ValidateApiKeyRequest(key=created.key))

    assert list(reply.principal.scopes) == ["admin"]


async def test_unknown_revoked_expired_and_malformed_keys_are_answered_alike(
    create: CreateKey, stub: AuthStub, clock: FakeClock
) -> None:
    revoked = await create(name="revoked")
    await stub.RevokeApiKey(pb.RevokeApiKeyRequest(id=revoked.api_key.id))
    expired = await create(name="expired", expire_time=Timestamp(seconds=int(clock() + 60)))
    clock.advance(61)
    malformed = revoked.key[:-1] + ("A" if revoked.key[-1] != "A" else "B")
    candidates = {
        "unknown": generate_key(),
        "revoked": revoked.key,
        "expired": expired.key,
        "malformed": malformed,
        "empty": "",
    }

    errors = {
        name: await rpc_error(stub.ValidateApiKey(pb.ValidateApiKeyRequest(key=key)))
        for name, key in candidates.items()
    }

    answers = {
        (e.code, e.message, e.reason, e.domain, tuple(sorted(e.metadata.items())))
        for e in errors.values()
    }
    assert answers == {
        (grpc.StatusCode.UNAUTHENTICATED, "invalid API key", "INVALID_API_KEY", "marie.auth", ())
    }


async def test_cache_ttl_never_outlives_the_key(
    create: CreateKey, stub: AuthStub, clock: FakeClock
) -> None:
    created = await create(expire_time=Timestamp(seconds=int(clock()) + 30))

    reply = await stub.ValidateApiKey(pb.ValidateApiKeyRequest(key=created.key))

    assert 28 <= reply.cache_ttl_seconds <= 30
    assert reply.principal.expire_time.seconds == int(clock()) + 30


async def test_a_key_is_accepted_until_its_expiry(
    create: CreateKey, stub: AuthStub, clock: FakeClock
) -> None:
    created = await create(expire_time=Timestamp(seconds=int(clock()) + 30))
    clock.advance(25)

    reply = await stub.ValidateApiKey(pb.ValidateApiKeyRequest(key=created.key))

    assert reply.principal.key_id == created.api_key.id
