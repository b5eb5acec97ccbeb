"""When `marie up` restarts a crashed service, and when it gives up."""

from __future__ import annotations

import pytest
from marie_cli.supervisor import Backoff, SupervisorSettings


def backoff(**settings: float) -> Backoff:
    return Backoff(SupervisorSettings.model_validate(settings))


def test_quick_crashes_double_the_wait_up_to_the_cap() -> None:
    b = backoff(restart_delay_seconds=0.5, restart_max_delay_seconds=3, max_restarts=10)
    assert [b.crashed(ran_for=1.0) for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_a_long_enough_run_starts_the_backoff_over() -> None:
    b = backoff(stable_seconds=30, max_restarts=3)
    assert b.crashed(ran_for=1.0) == 0.5
    assert b.crashed(ran_for=1.0) == 1.0
    assert b.crashed(ran_for=30.0) == 0.5
    assert b.quick_crashes == 1


def test_more_quick_crashes_than_allowed_is_a_loop() -> None:
    b = backoff(max_restarts=2)
    assert b.crashed(ran_for=0.1) is not None
    assert b.crashed(ran_for=0.1) is not None
    assert b.crashed(ran_for=0.1) is None


def test_crashes_spread_over_long_runs_never_give_up() -> None:
    b = backoff(max_restarts=2, stable_seconds=30)
    assert all(b.crashed(ran_for=60.0) == 0.5 for _ in range(20))


def test_zero_max_restarts_never_restarts() -> None:
    assert backoff(max_restarts=0).crashed(ran_for=3600.0) is None


def test_defaults() -> None:
    b = backoff()
    assert [b.crashed(ran_for=0.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, None]


@pytest.mark.parametrize(
    ("name", "value"),
    [("restart_delay_seconds", 0), ("max_restarts", -1), ("stable_seconds", 0)],
)
def test_bad_settings_are_refused(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        SupervisorSettings.model_validate({name: value})
