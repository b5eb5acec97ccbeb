"""Several auth replicas on one store: key events come from the store's
change log, so each replica streams the changes made through any of them."""

from __future__ import annotations

import asyncio

from auth_testkit import StartAuth
from marie.auth.v1 import auth_service_pb2 as pb
from marie.auth.v1 import auth_service_pb2_grpc as pb_grpc
from marie_auth.settings import AuthSettings
from marie_kit.channels import insecure_channel

EVENT_TIMEOUT_SECONDS = 5.0


async def test_a_change_through_one_replica_is_streamed_by_the_other(
    start_auth: StartAuth, settings: AuthSettings
) -> None:
    first = await start_auth(settings)
    second = await start_auth(settings)
    async with insecure_channel(first.target) as a, insecure_channel(second.target) as b:
        writer = pb_grpc.AuthServiceStub(a)
        watcher = pb_grpc.AuthServiceStub(b)
        created = await writer.CreateApiKey(pb.CreateApiKeyRequest(name="shared"))
        call = watcher.WatchKeyEvents(pb.WatchKeyEventsRequest())
        events = aiter(call)
        try:
            sync = await asyncio.wait_for(anext(events), EVENT_TIMEOUT_SECONDS)
            assert sync.type == pb.KEY_EVENT_TYPE_SYNC

            await writer.RevokeApiKey(pb.RevokeApiKeyRequest(id=created.api_key.id))
            event = await asyncio.wait_for(anext(events), EVENT_TIMEOUT_SECONDS)
            assert (event.type, event.key_id) == (pb.KEY_EVENT_TYPE_REVOKED, created.api_key.id)

            other = await writer.CreateApiKey(pb.CreateApiKeyRequest(name="other"))
            await writer.RotateApiKey(
                pb.RotateApiKeyRequest(id=other.api_key.id, grace_period_seconds=60)
            )
            event = await asyncio.wait_for(anext(events), EVENT_TIMEOUT_SECONDS)
            assert (event.type, event.key_id) == (pb.KEY_EVENT_TYPE_UPDATED, other.api_key.id)
        finally:
            call.cancel()


async def test_a_replica_does_not_stream_its_own_changes_twice(
    start_auth: StartAuth, settings: AuthSettings
) -> None:
    server = await start_auth(settings)
    async with insecure_channel(server.target) as channel:
        stub = pb_grpc.AuthServiceStub(channel)
        one = await stub.CreateApiKey(pb.CreateApiKeyRequest(name="one"))
        two = await stub.CreateApiKey(pb.CreateApiKeyRequest(name="two"))
        call = stub.WatchKeyEvents(pb.WatchKeyEventsRequest())
        events = aiter(call)
        try:
            assert (await anext(events)).type == pb.KEY_EVENT_TYPE_SYNC
            await stub.RevokeApiKey(pb.RevokeApiKeyRequest(id=one.api_key.id))
            # Longer than a few polls of the change log.
            await asyncio.sleep(0.8)
            await stub.RevokeApiKey(pb.RevokeApiKeyRequest(id=two.api_key.id))
            ids = [
                (await asyncio.wait_for(anext(events), EVENT_TIMEOUT_SECONDS)).key_id
                for _ in range(2)
            ]
            assert ids == [one.api_key.id, two.api_key.id]
        finally:
            call.cancel()
