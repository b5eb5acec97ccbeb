"""WatchKeyEvents: SYNC first, then one event per revocation, update or expiry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from auth_testkit import AuthStub, CreateKey, FakeClock
from google.protobuf.field_mask_pb2 import FieldMask
from marie.auth.v1 import auth_service_pb2 as pb
from marie_auth.events import KeyEventType
from marie_auth.service import AuthComponent
from marie_auth.settings import AuthSettings
from marie_kit.server import RunningServer

EVENT_TIMEOUT_SECONDS = 5.0

Events = AsyncIterator[pb.WatchKeyEventsResponse]


@pytest.fixture
async def events(stub: AuthStub) -> AsyncIterator[Events]:
    """An open WatchKeyEvents stream, cancelled after the test."""
    call = stub.WatchKeyEvents(pb.WatchKeyEventsRequest())
    yield aiter(call)
    call.cancel()


async def _next(events: Events) -> pb.WatchKeyEventsResponse:
    return await asyncio.wait_for(anext(events), EVENT_TIMEOUT_SECONDS)


async def test_the_stream_starts_with_sync(events: Events) -> None:
    first = await _next(events)

    assert first.type == pb.KEY_EVENT_TYPE_SYNC
    assert first.key_id == ""
    assert first.HasField("event_time")


async def test_a_revocation_is_streamed_after_sync(
    create: CreateKey, stub: AuthStub, events: Events
) -> None:
    created = await create()
    assert (await _next(events)).type == pb.KEY_EVENT_TYPE_SYNC

    await stub.RevokeApiKey(pb.RevokeApiKeyRequest(id=created.api_key.id))

    event = await _next(events)
    assert (event.type, event.key_id) == (pb.KEY_EVENT_TYPE_REVOKED, created.api_key.id)


async def test_an_update_is_streamed(create: CreateKey, stub: AuthStub, events: Events) -> None:
    created = await create()
    assert (await _next(events)).type == pb.KEY_EVENT_TYPE_SYNC

    await stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(
            api_key=pb.ApiKey(id=created.api_key.id, scopes=["chat"]),
            update_mask=FieldMask(paths=["scopes"]),
        )
    )

    event = await _next(events)
    assert (event.type, event.key_id) == (pb.KEY_EVENT_TYPE_UPDATED, created.api_key.id)


async def test_rotation_without_grace_streams_the_old_keys_revocation(
    create: CreateKey, stub: AuthStub, events: Events
) -> None:
    created = await create()
    assert (await _next(events)).type == pb.KEY_EVENT_TYPE_SYNC

    await stub.RotateApiKey(pb.RotateApiKeyRequest(id=created.api_key.id))

    event = await _next(events)
    assert (event.type, event.key_id) == (pb.KEY_EVENT_TYPE_REVOKED, created.api_key.id)


async def test_rotation_with_grace_streams_an_update_then_the_expiry(
    create: CreateKey, stub: AuthStub, events: Events, clock: FakeClock
) -> None:
    created = await create()
    assert (await _next(events)).type == pb.KEY_EVENT_TYPE_SYNC

    await stub.RotateApiKey(pb.RotateApiKeyRequest(id=created.api_key.id, grace_period_seconds=60))
    updated = await _next(events)
    clock.advance(61)
    expired = await _next(events)

    assert (updated.type, updated.key_id) == (pb.KEY_EVENT_TYPE_UPDATED, created.api_key.id)
    assert (expired.type, expired.key_id) == (pb.KEY_EVENT_TYPE_REVOKED, created.api_key.id)


async def test_an_expiry_is_streamed_as_a_revocation(
    create: CreateKey, events: Events, clock: FakeClock
) -> None:
    created = await create(expire_time={"seconds": int(clock()) + 10})
    assert (await _next(events)).type == pb.KEY_EVENT_TYPE_SYNC

    clock.advance(11)

    event = await _next(events)
    assert (event.type, event.key_id) == (pb.KEY_EVENT_TYPE_REVOKED, created.api_key.id)


async def test_closing_the_component_ends_every_stream(
    settings: AuthSettings, clock: FakeClock
) -> None:
    component = AuthComponent(settings, clock=clock)
    await component.start()
    with component.events.subscribe() as subscription:
        first = await anext(subscription)

        await component.close()

        assert first.type is KeyEventType.SYNC
        assert [event async for event in subscription] == []


async def test_a_cancelled_watch_unsubscribes(stub: AuthStub, server: RunningServer) -> None:
    component = server.components[0]
    assert isinstance(component, AuthComponent)
    call = stub.WatchKeyEvents(pb.WatchKeyEventsRequest())
    await asyncio.wait_for(anext(aiter(call)), EVENT_TIMEOUT_SECONDS)
    assert component.events.subscriber_count == 1

    call.cancel()

    for _ in range(100):
        if component.events.subscriber_count == 0:
            break
        await asyncio.sleep(0.01)
    assert component.events.subscriber_count == 0
