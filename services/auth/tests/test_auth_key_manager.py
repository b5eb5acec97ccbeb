"""KeyManager used directly, as the CLI does when the service is not running."""

from __future__ import annotations

from pathlib import Path

from auth_testkit import FakeClock
from marie_auth.keys import TOUCH_INTERVAL_SECONDS, KeyManager, open_key_manager
from marie_auth.settings import AuthSettings
from marie_auth.sqlite_store import SqliteKeyStore
from marie_auth.store import KeyLimits, KeySpec


async def test_open_key_manager_creates_keys_the_service_accepts(
    settings: AuthSettings, clock: FakeClock
) -> None:
    async with open_key_manager(settings, clock=clock) as keys:
        issued = await keys.create(KeySpec(name="from-cli", limits=KeyLimits(tokens_per_day=10)))

    async with open_key_manager(settings, clock=clock) as keys:
        validation = await keys.validate(issued.key)

    assert validation.principal.key_id == issued.record.id
    assert validation.principal.limits == KeyLimits(tokens_per_day=10)


async def test_an_issued_keys_repr_does_not_show_the_plaintext(
    settings: AuthSettings, clock: FakeClock
) -> None:
    async with open_key_manager(settings, clock=clock) as keys:
        issued = await keys.create(KeySpec(name="secret"))

    assert issued.key not in repr(issued)


async def test_last_used_time_is_written_at_most_about_once_a_minute(
    tmp_path: Path, clock: FakeClock
) -> None:
    store = await SqliteKeyStore.open(tmp_path / "keys.db")
    keys = KeyManager(store, clock=clock)
    issued = await keys.create(KeySpec(name="busy"))
    first_use = clock()

    await keys.validate(issued.key)
    await keys.flush()
    clock.advance(TOUCH_INTERVAL_SECONDS / 2)
    await keys.validate(issued.key)
    await keys.flush()
    after_half_a_minute = (await keys.get(issued.record.id)).last_used_time
    clock.advance(TOUCH_INTERVAL_SECONDS)
    await keys.validate(issued.key)
    await keys.close()

    reopened = await SqliteKeyStore.open(tmp_path / "keys.db")
    record = await reopened.get(issued.record.id)
    await reopened.close()
    assert after_half_a_minute == first_use
    assert record is not None and record.last_used_time == clock()


async def test_close_waits_for_pending_last_used_writes(tmp_path: Path, clock: FakeClock) -> None:
    store = await SqliteKeyStore.open(tmp_path / "keys.db")
    keys = KeyManager(store, clock=clock)
    issued = await keys.create(KeySpec(name="used-once"))

    await keys.validate(issued.key)
    await keys.close()

    reopened = await SqliteKeyStore.open(tmp_path / "keys.db")
    record = await reopened.get(issued.record.id)
    await reopened.close()
    assert record is not None and record.last_used_time == clock()
