"""Budgets: spend limits of keys and owners per UTC day and month, leased to
holders from counters that every auth replica on the store agrees on, and
seeded from the usage ledger when a limit is set (on each store: SQLite and
OpenSearch)."""

from __future__ import annotations

import datetime as dt
import secrets

import grpc
import pytest
from auth_testkit import AuthStub, CreateKey, FakeClock, StartAuth, rpc_error
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp
from marie.auth.v1 import auth_service_pb2 as pb
from marie.auth.v1 import auth_service_pb2_grpc as pb_grpc
from marie_auth.budgets import next_month_start
from marie_auth.settings import AuthSettings
from marie_kit.channels import insecure_channel

USD = 10**12  # picodollars


def lease(key_id: str, holder: str = "gw-1", **fields: int | bool) -> pb.LeaseBudgetRequest:
    return pb.LeaseBudgetRequest(key_id=key_id, holder=holder, **fields)  # type: ignore[arg-type]


def set_budget(**fields: str) -> pb.UpdateBudgetRequest:
    return pb.UpdateBudgetRequest(budget=pb.Budget(**fields))  # type: ignore[arg-type]


def spend_record(key_id: str, owner: str, cost: int, at: float) -> pb.UsageRecord:
    when = Timestamp()
    when.FromNanoseconds(int(at * 1e9))
    return pb.UsageRecord(
        id=secrets.token_hex(12),
        key_id=key_id,
        owner=owner,
        model="m",
        operation="chat",
        prompt_tokens=1,
        completion_tokens=1,
        status=200,
        time=when,
        cost_picodollars=cost,
        priced=True,
    )


async def test_a_key_without_a_budget_needs_no_lease(stub: AuthStub, create: CreateKey) -> None:
    key_id = (await create()).api_key.id
    got = await stub.LeaseBudget(lease(key_id))
    assert not got.budgeted
    assert got.spend == 0


async def test_two_replicas_lease_one_key_budget_and_never_grant_past_it(
    start_auth: StartAuth, settings: AuthSettings
) -> None:
    first, second = await start_auth(settings), await start_auth(settings)
    async with insecure_channel(first.target) as a, insecure_channel(second.target) as b:
        one, two = pb_grpc.AuthServiceStub(a), pb_grpc.AuthServiceStub(b)
        key_id = (await one.CreateApiKey(pb.CreateApiKeyRequest(name="k"))).api_key.id
        await one.UpdateBudget(set_budget(key_id=key_id, daily_usd="1"))
        got = await one.LeaseBudget(lease(key_id, "gw-1"))
        # The usual share is 5% of the limit.
        assert (got.budgeted, got.spend, got.lease_size) == (True, USD // 20, USD // 20)
        assert got.limit == pb.BUDGET_LIMIT_KEY_DAILY
        got = await two.LeaseBudget(lease(key_id, "gw-2", spend=USD))
        assert (got.spend, got.remaining) == (USD - USD // 20, 0)
        got = await two.LeaseBudget(lease(key_id, "gw-2", spend=1))
        assert got.spend == 0
        # gw-1 gives back what it did not spend: others may have it.
        got = await one.LeaseBudget(lease(key_id, "gw-1", spend_balance=USD // 40, release=True))
        assert (got.spend, got.remaining) == (0, USD // 40)


async def test_costs_beyond_the_lease_count_at_once(stub: AuthStub, create: CreateKey) -> None:
    key_id = (await create()).api_key.id
    await stub.UpdateBudget(set_budget(key_id=key_id, monthly_usd="10"))
    got = await stub.LeaseBudget(lease(key_id, spend=USD))
    assert got.remaining == 9 * USD
    # Its requests cost 3 dollars: 2 beyond the lease are owed and counted.
    got = await stub.LeaseBudget(lease(key_id, spend_balance=-2 * USD, spend=1))
    assert got.remaining == 7 * USD - 1
    assert got.limit == pb.BUDGET_LIMIT_KEY_MONTHLY


async def test_an_owner_budget_holds_every_key_it_owns_and_the_tightest_limit_wins(
    stub: AuthStub, create: CreateKey
) -> None:
    first = (await create(owner="team-a")).api_key.id
    second = (await create(owner="team-a")).api_key.id
    await stub.UpdateBudget(set_budget(owner="team-a", daily_usd="2"))
    await stub.UpdateBudget(set_budget(key_id=first, daily_usd="5"))
    got = await stub.LeaseBudget(lease(first, spend=USD))
    assert (got.spend, got.limit, got.remaining) == (USD, pb.BUDGET_LIMIT_OWNER_DAILY, USD)
    got = await stub.LeaseBudget(lease(second, spend=5 * USD))
    assert (got.spend, got.remaining) == (USD, 0)
    got = await stub.LeaseBudget(lease(first, spend=1))
    assert got.spend == 0


async def test_a_day_limit_resets_at_utc_midnight_and_a_month_limit_on_the_first(
    stub: AuthStub, create: CreateKey, clock: FakeClock
) -> None:
    key_id = (await create()).api_key.id
    await stub.UpdateBudget(set_budget(key_id=key_id, daily_usd="1", monthly_usd="1.5"))
    got = await stub.LeaseBudget(lease(key_id, spend=USD))
    assert got.spend == USD
    midnight = (clock.now // 86_400 + 1) * 86_400
    assert got.reset_seconds == pytest.approx(midnight - clock.now)
    refused = await stub.LeaseBudget(lease(key_id, spend=1))
    assert refused.spend == 0
    clock.advance(midnight - clock.now + 1)
    got = await stub.LeaseBudget(lease(key_id, spend=USD))
    # A new day, but the month has only half a dollar left (unless the month turned too).
    turned = dt.datetime.fromtimestamp(clock.now, dt.UTC).day == 1
    assert got.spend == (USD if turned else USD // 2)
    if not turned:
        assert got.limit == pb.BUDGET_LIMIT_KEY_MONTHLY
        assert got.reset_seconds == pytest.approx(next_month_start(clock.now) - clock.now)


async def test_a_limit_newly_set_counts_what_the_ledger_says_was_spent(
    stub: AuthStub, create: CreateKey, clock: FakeClock
) -> None:
    key_id = (await create(owner="team-z")).api_key.id
    await stub.RecordUsage(
        pb.RecordUsageRequest(
            records=[
                spend_record(key_id, "team-z", USD // 4, clock.now - 1),
                # Yesterday's spend counts for neither today nor (unless the
                # month just turned) only for the month.
                spend_record(key_id, "team-z", USD // 8, clock.now - 86_400),
            ]
        )
    )
    answer = await stub.UpdateBudget(set_budget(key_id=key_id, daily_usd="1"))
    assert answer.budget.daily_usd == "1"
    assert answer.budget.spent_today_usd == "0.25"
    got = await stub.LeaseBudget(lease(key_id, spend=USD))
    assert got.spend == USD - USD // 4
    seen = await stub.GetBudget(pb.GetBudgetRequest(owner="team-z"))
    assert seen.budget.daily_usd == ""  # the owner has no budget of its own
    assert seen.budget.spent_today_usd == "0.25"


async def test_clearing_both_limits_removes_the_budget(stub: AuthStub, create: CreateKey) -> None:
    key_id = (await create()).api_key.id
    await stub.UpdateBudget(set_budget(key_id=key_id, daily_usd="1"))
    await stub.UpdateBudget(set_budget(key_id=key_id, daily_usd=""))
    assert not (await stub.LeaseBudget(lease(key_id))).budgeted
    assert list((await stub.ListBudgets(pb.ListBudgetsRequest())).budgets) == []


async def test_only_the_masked_limit_changes(stub: AuthStub, create: CreateKey) -> None:
    key_id = (await create()).api_key.id
    await stub.UpdateBudget(set_budget(key_id=key_id, daily_usd="1", monthly_usd="20"))
    changed = await stub.UpdateBudget(
        pb.UpdateBudgetRequest(
            budget=pb.Budget(key_id=key_id, monthly_usd="30.000001"),
            update_mask=FieldMask(paths=["monthly_usd"]),
        )
    )
    assert (changed.budget.daily_usd, changed.budget.monthly_usd) == ("1", "30.000001")


async def test_budgets_are_listed_page_by_page(stub: AuthStub, create: CreateKey) -> None:
    key_id = (await create()).api_key.id
    # The longest owner name, in a script of two bytes a character, sorts by bytes.
    long_owner = "é" * 256
    for owner in (long_owner, "b", "a", "Z"):
        await stub.UpdateBudget(set_budget(owner=owner, monthly_usd="3"))
    await stub.UpdateBudget(set_budget(key_id=key_id, daily_usd="1"))
    first = await stub.ListBudgets(pb.ListBudgetsRequest(page_size=2))
    # A budget removed between pages does not shift the next page.
    await stub.UpdateBudget(set_budget(owner="Z", monthly_usd=""))
    second = await stub.ListBudgets(
        pb.ListBudgetsRequest(page_size=2, page_token=first.next_page_token)
    )
    seen = [b.key_id or b.owner for b in [*first.budgets, *second.budgets]]
    assert seen == [key_id, "Z", "a", "b"]
    third = await stub.ListBudgets(
        pb.ListBudgetsRequest(page_size=2, page_token=second.next_page_token)
    )
    assert [b.owner for b in third.budgets] == [long_owner]
    assert third.next_page_token == ""


async def test_bad_budget_requests_name_the_field(stub: AuthStub, create: CreateKey) -> None:
    key_id = (await create()).api_key.id
    cases: list[tuple[object, str]] = [
        (stub.UpdateBudget(set_budget(key_id=key_id, daily_usd="ten")), "budget.daily_usd"),
        (stub.UpdateBudget(set_budget(key_id=key_id, daily_usd="-1")), "budget.daily_usd"),
        (
            stub.UpdateBudget(set_budget(key_id=key_id, monthly_usd="0.0000001")),
            "budget.monthly_usd",
        ),
        (stub.UpdateBudget(set_budget(key_id=key_id, monthly_usd="1e30")), "budget.monthly_usd"),
        (
            stub.UpdateBudget(pb.UpdateBudgetRequest(budget=pb.Budget(daily_usd="1"))),
            "budget.subject",
        ),
        (
            stub.UpdateBudget(
                pb.UpdateBudgetRequest(
                    budget=pb.Budget(key_id=key_id), update_mask=FieldMask(paths=["name"])
                )
            ),
            "update_mask",
        ),
        (stub.GetBudget(pb.GetBudgetRequest()), "subject"),
        (stub.LeaseBudget(lease(key_id, holder="")), "holder"),
        (stub.LeaseBudget(lease(key_id, spend=-1)), "spend"),
        (stub.ListBudgets(pb.ListBudgetsRequest(page_token="nonsense")), "page_token"),
    ]
    for call, field in cases:
        error = await rpc_error(call)  # type: ignore[arg-type]
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, field
        assert error.metadata["field"] == field
    assert list((await stub.ListBudgets(pb.ListBudgetsRequest())).budgets) == []
    unknown = await rpc_error(stub.UpdateBudget(set_budget(key_id="key_nope", daily_usd="1")))
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "KEY_NOT_FOUND")
    unknown = await rpc_error(stub.LeaseBudget(lease("key_nope")))
    assert unknown.code == grpc.StatusCode.NOT_FOUND


async def test_a_rotated_key_keeps_its_budget_and_what_it_spent(
    stub: AuthStub, create: CreateKey, clock: FakeClock
) -> None:
    old_id = (await create(owner="team-r")).api_key.id
    await stub.UpdateBudget(set_budget(key_id=old_id, daily_usd="1"))
    await stub.RecordUsage(
        pb.RecordUsageRequest(records=[spend_record(old_id, "team-r", USD // 2, clock.now - 1)])
    )
    rotated = await stub.RotateApiKey(pb.RotateApiKeyRequest(id=old_id))
    budget = (await stub.GetBudget(pb.GetBudgetRequest(key_id=rotated.api_key.id))).budget
    assert budget.daily_usd == "1"
    got = await stub.LeaseBudget(lease(rotated.api_key.id, spend=USD))
    assert got.spend == USD // 2


async def test_budgets_and_what_was_leased_outlive_the_auth_process(
    start_auth: StartAuth, settings: AuthSettings
) -> None:
    first = await start_auth(settings)
    async with insecure_channel(first.target) as channel:
        stub = pb_grpc.AuthServiceStub(channel)
        key_id = (await stub.CreateApiKey(pb.CreateApiKeyRequest(name="k", owner="o"))).api_key.id
        await stub.UpdateBudget(set_budget(key_id=key_id, daily_usd="1"))
        await stub.UpdateBudget(set_budget(owner="o", monthly_usd="4"))
        assert (await stub.LeaseBudget(lease(key_id, spend=USD // 4))).spend == USD // 4
    await first.stop(0.5)
    second = await start_auth(settings)
    async with insecure_channel(second.target) as channel:
        stub = pb_grpc.AuthServiceStub(channel)
        got = await stub.LeaseBudget(lease(key_id, spend=USD))
        assert (got.spend, got.limit) == (USD - USD // 4, pb.BUDGET_LIMIT_KEY_DAILY)
        listed = (await stub.ListBudgets(pb.ListBudgetsRequest())).budgets
        assert [(b.key_id, b.owner, b.daily_usd, b.monthly_usd) for b in listed] == [
            (key_id, "", "1", ""),
            ("", "o", "", "4"),
        ]


async def test_a_key_with_less_room_than_its_owner_takes_no_more_from_the_owner(
    stub: AuthStub, create: CreateKey
) -> None:
    first = (await create(owner="team-k")).api_key.id
    second = (await create(owner="team-k")).api_key.id
    await stub.UpdateBudget(set_budget(owner="team-k", daily_usd="3"))
    await stub.UpdateBudget(set_budget(key_id=first, daily_usd="1"))
    got = await stub.LeaseBudget(lease(first, spend=2 * USD))
    assert (got.spend, got.remaining, got.limit) == (USD, 0, pb.BUDGET_LIMIT_KEY_DAILY)
    # The owner was charged what the key got, not what it asked for.
    got = await stub.LeaseBudget(lease(second, spend=5 * USD))
    assert (got.spend, got.limit) == (2 * USD, pb.BUDGET_LIMIT_OWNER_DAILY)
    # Half a dollar given back by the first key is room again for both (a tie
    # names the key's limit).
    got = await stub.LeaseBudget(lease(first, spend_balance=USD // 2, spend=USD))
    assert (got.spend, got.remaining, got.limit) == (USD // 2, 0, pb.BUDGET_LIMIT_KEY_DAILY)
