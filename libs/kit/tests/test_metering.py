"""The metering marker (`x-marie-limits`) as the key check writes it and the
providers service reads it: round trip, forward compatibility, and every
malformed shape refused with a reason."""

from __future__ import annotations

import pytest
from marie_kit.limits import (
    LIMITS_HEADER,
    MAX_LIMIT,
    NO_LIMITS,
    Limits,
    limits_value,
    parse_limits_value,
)
from marie_kit.metering import Marker, marker_of

KEY = (("x-marie-key-id", "k1"), ("x-marie-owner", "team%20a"))


def test_limits_round_trip_through_the_header_value() -> None:
    limits = Limits(
        requests_per_minute=60,
        tokens_per_minute=1000,
        tokens_per_day=MAX_LIMIT,
        max_concurrent_requests=2,
    )
    assert limits_value(limits) == f"rpm=60,tpm=1000,tpd={MAX_LIMIT},concurrent=2"
    assert parse_limits_value(limits_value(limits)) == limits


def test_an_unlimited_key_is_still_marked() -> None:
    # The marker also asks for the ledger record: every key gets one.
    assert limits_value(NO_LIMITS) == "rpm=0,tpm=0,tpd=0,concurrent=0"
    assert parse_limits_value(limits_value(NO_LIMITS)).unlimited


def test_names_left_out_are_no_limit_and_unknown_ones_are_skipped() -> None:
    assert parse_limits_value("rpm=5") == Limits(requests_per_minute=5)
    assert parse_limits_value(" tpm = 7 , burst=3,") == Limits(tokens_per_minute=7)
    assert parse_limits_value("") == NO_LIMITS


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("rpm=ten", "not a whole number"),
        ("rpm=-1", "not a whole number"),
        ("rpm=1.5", "not a whole number"),
        ("rpm=", "not a whole number"),
        ("rpm=٣", "not a whole number"),  # a digit, but not an ASCII one
        (f"tpd={MAX_LIMIT + 1}", "not a whole number"),
        ("rpm", "not name=value"),
        ("=5", "not name=value"),
        ("rpm=1,rpm=1", "given twice"),
    ],
)
def test_a_malformed_value_says_what_is_wrong(value: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_limits_value(value)


def test_a_call_without_the_marker_is_not_metered() -> None:
    assert marker_of(None) is None
    assert marker_of(KEY) is None
    assert marker_of((("x-marie-limit", "rpm=1"), *KEY)) is None


def test_the_marker_names_the_key_to_charge() -> None:
    assert marker_of((*KEY, (LIMITS_HEADER, "rpm=3"))) == Marker(
        "k1", "team a", Limits(requests_per_minute=3)
    )


def test_a_marker_without_a_key_id_or_not_text_is_refused() -> None:
    with pytest.raises(ValueError, match="x-marie-key-id"):
        marker_of(((LIMITS_HEADER, "rpm=3"), ("x-marie-owner", "o")))
    with pytest.raises(ValueError, match="not text"):
        marker_of((*KEY, (LIMITS_HEADER, b"rpm=3")))
