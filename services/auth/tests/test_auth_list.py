"""ListApiKeys: newest first, page by page, filtered by owner and state."""

from __future__ import annotations

import grpc
import pytest
from auth_testkit import AuthStub, CreateKey, FakeClock, rpc_error
from marie.auth.v1 import auth_service_pb2 as pb


async def _all_pages(stub: AuthStub, request: pb.ListApiKeysRequest) -> list[list[str]]:
    pages: list[list[str]] = []
    while True:
        reply = await stub.ListApiKeys(request)
        pages.append([k.id for k in reply.api_keys])
        if not reply.next_page_token:
            return pages
        request.page_token = reply.next_page_token


async def test_pages_hold_every_key_once_newest_first(
    create: CreateKey, stub: AuthStub, clock: FakeClock
) -> None:
    created = []
    for i in range(7):
        created.append((await create(name=f"k{i}")).api_key.id)
        clock.advance(1)

    pages = await _all_pages(stub, pb.ListApiKeysRequest(page_size=3))

    assert [len(p) for p in pages] == [3, 3, 1]
    assert [key_id for page in pages for key_id in page] == created[::-1]


async def test_keys_created_in_the_same_instant_page_without_gaps_or_duplicates(
    create: CreateKey, stub: AuthStub
) -> None:
    created = {(await create(name=f"k{i}")).api_key.id for i in range(5)}

    pages = await _all_pages(stub, pb.ListApiKeysRequest(page_size=2))

    listed = [key_id for page in pages for key_id in page]
    assert len(listed) == len(set(listed)) == 5
    assert set(listed) == created


async def test_a_key_created_between_pages_does_not_shift_later_pages(
    create: CreateKey, stub: AuthStub, clock: FakeClock
) -> None:
    older = []
    for i in range(4):
        older.append((await create(name=f"k{i}")).api_key.id)
        clock.advance(1)
    first = await stub.ListApiKeys(pb.ListApiKeysRequest(page_size=2))
    await create(name="newcomer")

    rest = await stub.ListApiKeys(
        pb.ListApiKeysRequest(page_size=2, page_token=first.next_page_token)
    )

    assert [k.id for k in (*first.api_keys, *rest.api_keys)] == older[::-1]


async def test_owner_filter_lists_only_that_owners_keys(create: CreateKey, stub: AuthStub) -> None:
    mine = (await create(owner="alice")).api_key.id
    await create(owner="bob")
    await create(owner="")

    reply = await stub.ListApiKeys(pb.ListApiKeysRequest(owner="alice"))

    assert [k.id for k in reply.api_keys] == [mine]


async def test_inactive_keys_are_listed_only_on_request(
    create: CreateKey, stub: AuthStub, clock: FakeClock
) -> None:
    active = (await create(name="active")).api_key.id
    revoked = (await create(name="revoked")).api_key.id
    await stub.RevokeApiKey(pb.RevokeApiKeyRequest(id=revoked))
    expiring = await create(name="expiring")
    await stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(
            api_key=pb.ApiKey(id=expiring.api_key.id, expire_time={"seconds": int(clock()) + 5}),
            update_mask={"paths": ["expire_time"]},
        )
    )
    clock.advance(10)

    default = await stub.ListApiKeys(pb.ListApiKeysRequest())
    everything = await stub.ListApiKeys(pb.ListApiKeysRequest(include_inactive=True))

    assert [k.id for k in default.api_keys] == [active]
    states = {k.id: k.state for k in everything.api_keys}
    assert states == {
        active: pb.API_KEY_STATE_ACTIVE,
        revoked: pb.API_KEY_STATE_REVOKED,
        expiring.api_key.id: pb.API_KEY_STATE_EXPIRED,
    }


async def test_oversized_page_size_is_cut_to_the_maximum_not_refused(
    create: CreateKey, stub: AuthStub
) -> None:
    await create()

    reply = await stub.ListApiKeys(pb.ListApiKeysRequest(page_size=100_000))

    assert len(reply.api_keys) == 1
    assert reply.next_page_token == ""


@pytest.mark.parametrize(
    ("list_request", "field"),
    [
        (pb.ListApiKeysRequest(page_size=-1), "page_size"),
        # Page tokens are cursors, not secrets; the second is base64 of '["x", 1]'.
        (pb.ListApiKeysRequest(page_token="not a token"), "page_token"),
        (pb.ListApiKeysRequest(page_token="WyJ4IiwgMV0"), "page_token"),
    ],
)
async def test_bad_paging_arguments_are_invalid_argument(
    stub: AuthStub, list_request: pb.ListApiKeysRequest, field: str
) -> None:
    error = await rpc_error(stub.ListApiKeys(list_request))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.metadata == {"field": field}
