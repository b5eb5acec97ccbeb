"""RecordUsage and QueryUsage: batches stored durably and idempotently,
totals grouped by day, model and key, percentiles, and bad input."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import grpc
import pytest
from auth_testkit import AuthStub, StartAuth, rpc_error
from google.protobuf.timestamp_pb2 import Timestamp
from marie.auth.v1 import auth_service_pb2 as pb
from marie.auth.v1 import auth_service_pb2_grpc as pb_grpc
from marie_auth.settings import AuthSettings
from marie_auth.usage import SqliteUsageStore, UsageLedger, UsageRecord, percentile
from marie_kit.channels import insecure_channel

# 2026-12-01 00:00:00 UTC
DAY1 = 1_796_083_200
DAY2 = DAY1 + 86_400


def ts(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def record(rid: str, **fields: object) -> pb.UsageRecord:
    values: dict[str, object] = {
        "id": rid,
        "key_id": "key_a",
        "owner": "team-a",
        "provider": "ollama",
        "model": "ollama/llama3.2:latest",
        "operation": "chat",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "latency_ms": 100.0,
        "status": 200,
        "time": ts(DAY1 + 3600),
    }
    values.update(fields)
    return pb.UsageRecord(**values)  # type: ignore[arg-type]


def query(**fields: object) -> pb.QueryUsageRequest:
    values: dict[str, object] = {"start_time": ts(DAY1), "end_time": ts(DAY2 + 86_400)}
    values.update(fields)
    return pb.QueryUsageRequest(**values)  # type: ignore[arg-type]


MIX = [
    record("r1"),
    record("r2", latency_ms=300.0, completion_tokens=15),
    record("r3", status=502, prompt_tokens=0, completion_tokens=0, latency_ms=50.0),
    record("r4", model="ollama/qwen:latest", time=ts(DAY2 + 60), latency_ms=200.0),
    record("r5", key_id="key_b", owner="team-b", time=ts(DAY2 + 120), prompt_tokens=7),
]


async def test_totals_grouped_by_day_model_and_key(stub: AuthStub) -> None:
    assert (await stub.RecordUsage(pb.RecordUsageRequest(records=MIX))).recorded == 5

    everything = await stub.QueryUsage(query())
    total = everything.total
    assert (total.requests, total.prompt_tokens, total.completion_tokens, total.errors) == (
        5,
        37,
        30,
        1,
    )
    # Latencies 50, 100, 100, 200, 300: nearest-rank p50 = 100, p95 = 300.
    assert (total.latency_p50_ms, total.latency_p95_ms) == (100.0, 300.0)
    assert list(everything.groups) == []

    by_day = await stub.QueryUsage(query(group_by=pb.USAGE_GROUP_BY_DAY))
    assert [(g.group, g.requests) for g in by_day.groups] == [("2026-12-01", 3), ("2026-12-02", 2)]

    by_model = await stub.QueryUsage(query(group_by=pb.USAGE_GROUP_BY_MODEL))
    # Groups come in order; key_b's llama3.2 record joins key_a's three.
    assert [(g.group, g.requests, g.prompt_tokens) for g in by_model.groups] == [
        ("ollama/llama3.2:latest", 4, 27),
        ("ollama/qwen:latest", 1, 10),
    ]

    by_key = await stub.QueryUsage(query(group_by=pb.USAGE_GROUP_BY_KEY))
    assert {g.group: (g.requests, g.errors) for g in by_key.groups} == {
        "key_a": (4, 1),
        "key_b": (1, 0),
    }


async def test_filters_by_key_owner_and_time(stub: AuthStub) -> None:
    await stub.RecordUsage(pb.RecordUsageRequest(records=MIX))
    assert (await stub.QueryUsage(query(key_id="key_b"))).total.requests == 1
    assert (await stub.QueryUsage(query(owner="team-a"))).total.requests == 4
    # [start, end): the end is exclusive.
    first_day = await stub.QueryUsage(query(end_time=ts(DAY2)))
    assert first_day.total.requests == 3
    empty = await stub.QueryUsage(query(key_id="key_none"))
    assert (empty.total.requests, empty.total.latency_p50_ms) == (0, 0.0)


async def test_a_resent_batch_is_stored_once(stub: AuthStub) -> None:
    assert (await stub.RecordUsage(pb.RecordUsageRequest(records=MIX[:2]))).recorded == 2
    again = await stub.RecordUsage(pb.RecordUsageRequest(records=MIX[:3]))
    assert again.recorded == 1
    assert (await stub.QueryUsage(query())).total.requests == 3


async def test_acknowledged_records_survive_a_restart(
    start_auth: StartAuth, settings: AuthSettings
) -> None:
    first = await start_auth(settings)
    async with insecure_channel(first.target) as channel:
        await pb_grpc.AuthServiceStub(channel).RecordUsage(pb.RecordUsageRequest(records=MIX))
    await first.stop(0)

    second = await start_auth(settings)
    async with insecure_channel(second.target) as channel:
        total = (await pb_grpc.AuthServiceStub(channel).QueryUsage(query())).total
    assert (total.requests, total.prompt_tokens) == (5, 37)


async def test_bad_records_name_the_field_and_store_nothing(stub: AuthStub) -> None:
    cases = [
        ([record("x", key_id="")], "records[0].key_id"),
        ([record("ok"), record("")], "records[1].id"),
        ([record("x", prompt_tokens=-1)], "records[0].prompt_tokens"),
        ([record("x", status=42)], "records[0].status"),
        ([pb.UsageRecord(id="x", key_id="k", status=200)], "records[0].time"),
        ([], "records"),
    ]
    for records, field in cases:
        error = await rpc_error(stub.RecordUsage(pb.RecordUsageRequest(records=records)))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.metadata["field"] == field
    assert (await stub.QueryUsage(query())).total.requests == 0


async def test_bad_queries_are_invalid_argument(stub: AuthStub) -> None:
    error = await rpc_error(stub.QueryUsage(pb.QueryUsageRequest(end_time=ts(DAY2))))
    assert error.metadata["field"] == "start_time"
    error = await rpc_error(stub.QueryUsage(query(end_time=ts(DAY1))))
    assert error.metadata["field"] == "end_time"


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) == 0.0
    assert percentile([7.0], 95) == 7.0
    values = [float(v) for v in range(1, 21)]
    assert percentile(values, 50) == 10.0
    assert percentile(values, 95) == 19.0
    assert percentile(values, 100) == 20.0


async def test_cached_answers_are_counted_apart_in_totals_and_groups(stub: AuthStub) -> None:
    records = [
        record("c1"),
        record("c2", cached=True, prompt_tokens=0, completion_tokens=0),
        record("c3", cached=True, prompt_tokens=0, completion_tokens=0, time=ts(DAY2 + 60)),
    ]
    await stub.RecordUsage(pb.RecordUsageRequest(records=records))

    total = (await stub.QueryUsage(query())).total
    by_day = await stub.QueryUsage(query(group_by=pb.USAGE_GROUP_BY_DAY))

    assert (total.requests, total.cached_requests, total.prompt_tokens) == (3, 2, 10)
    assert [(g.group, g.requests, g.cached_requests) for g in by_day.groups] == [
        ("2026-12-01", 2, 1),
        ("2026-12-02", 1, 1),
    ]


async def test_a_ledger_from_before_the_cached_column_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(OLD_USAGE_SCHEMA)
    old.execute(
        "INSERT INTO usage_records VALUES ('old1', 'key_a', 'team-a', 'ollama', 'm', 'chat',"
        f" 3, 4, 10.0, 200, {DAY1 + 10})"
    )
    old.commit()
    old.close()

    store = await SqliteUsageStore.open(path)
    try:
        ledger = UsageLedger(store)
        await ledger.record(
            [
                UsageRecord(
                    "new1",
                    "key_a",
                    "team-a",
                    "ollama",
                    "m",
                    "chat",
                    0,
                    0,
                    1.0,
                    200,
                    DAY1 + 20,
                    cached=True,
                )
            ]
        )
        report = await ledger.query(DAY1, DAY2)
    finally:
        await store.close()
    assert (report.total.requests, report.total.cached_requests) == (2, 1)
    assert report.total.prompt_tokens == 3


#: The ledger's table as it was before `cached`.
OLD_USAGE_SCHEMA = """
CREATE TABLE usage_records (
    id TEXT PRIMARY KEY, key_id TEXT NOT NULL, owner TEXT NOT NULL, provider TEXT NOT NULL,
    model TEXT NOT NULL, operation TEXT NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, latency_ms REAL NOT NULL, status INTEGER NOT NULL,
    time REAL NOT NULL
) WITHOUT ROWID;
"""


# -- spend ---------------------------------------------------------------------

# Costs in picodollars: r1 and r2 priced, r3 not (its model had no price).
SPEND = [
    record("s1", cost_picodollars=1_500_000, priced=True, cached_prompt_tokens=4),
    record("s2", cost_picodollars=2_250_001, priced=True, owner="team-b", key_id="key_b"),
    record("s3", model="ollama/free", cost_picodollars=0, priced=False),
]


async def test_totals_carry_the_exact_sum_of_the_rows_costs(stub: AuthStub) -> None:
    await stub.RecordUsage(pb.RecordUsageRequest(records=SPEND))

    answer = await stub.QueryUsage(query(group_by=pb.USAGE_GROUP_BY_MODEL))
    assert answer.currency == "USD"
    # 3_750_001 picodollars, written exactly (no float rounding).
    assert answer.total.cost == "0.000003750001"
    assert answer.total.unpriced_requests == 1
    assert answer.total.cached_prompt_tokens == 4
    assert [(g.group, g.cost, g.unpriced_requests) for g in answer.groups] == [
        ("ollama/free", "0", 1),
        ("ollama/llama3.2:latest", "0.000003750001", 0),
    ]


async def test_totals_grouped_by_owner(stub: AuthStub) -> None:
    await stub.RecordUsage(pb.RecordUsageRequest(records=SPEND))
    answer = await stub.QueryUsage(query(group_by=pb.USAGE_GROUP_BY_OWNER))
    assert [(g.group, g.requests, g.cost) for g in answer.groups] == [
        ("team-a", 2, "0.0000015"),
        ("team-b", 1, "0.000002250001"),
    ]


async def test_bad_spend_fields_name_the_field_and_store_nothing(stub: AuthStub) -> None:
    cases = [
        ([record("x", cost_picodollars=-1)], "records[0].cost_picodollars"),
        ([record("x", cost_picodollars=10**18 + 1)], "records[0].cost_picodollars"),
        ([record("x", cached_prompt_tokens=-3)], "records[0].cached_prompt_tokens"),
        ([record("x", prompt_tokens=2, cached_prompt_tokens=3)], "records[0].cached_prompt_tokens"),
    ]
    for records, field in cases:
        error = await rpc_error(stub.RecordUsage(pb.RecordUsageRequest(records=records)))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.metadata["field"] == field
    assert (await stub.QueryUsage(query())).total.requests == 0


async def test_a_ledger_from_before_costs_keeps_its_rows_unpriced(
    start_auth: StartAuth, settings: AuthSettings
) -> None:
    if settings.store != "sqlite":
        pytest.skip("OpenSearch documents need no migration: missing fields read as 0")
    # The table as it was before the spend columns, with one row in it.
    settings.db_path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(settings.db_path)
    db.executescript(
        "CREATE TABLE usage_records (id TEXT PRIMARY KEY, key_id TEXT NOT NULL, "
        "owner TEXT NOT NULL, provider TEXT NOT NULL, model TEXT NOT NULL, "
        "operation TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, "
        "completion_tokens INTEGER NOT NULL, latency_ms REAL NOT NULL, "
        "status INTEGER NOT NULL, time REAL NOT NULL) WITHOUT ROWID;"
    )
    db.execute(
        "INSERT INTO usage_records VALUES ('old', 'key_a', 'team-a', 'ollama', 'm', 'chat', "
        f"3, 4, 10.0, 200, {DAY1 + 10})"
    )
    db.commit()
    db.close()

    running = await start_auth(settings)
    async with insecure_channel(running.target) as channel:
        stub = pb_grpc.AuthServiceStub(channel)
        await stub.RecordUsage(pb.RecordUsageRequest(records=SPEND[:1]))
        total = (await stub.QueryUsage(query())).total
    assert (total.requests, total.prompt_tokens, total.cost) == (2, 13, "0.0000015")
    assert total.unpriced_requests == 1
