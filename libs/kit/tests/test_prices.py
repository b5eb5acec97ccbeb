"""The price table: patterns, exact costs in picodollars, cached prompt tokens,
and the clear errors of a bad table."""

from __future__ import annotations

from pathlib import Path

import pytest
from marie_kit.prices import PriceError, PriceTable, parse_budget, usd_text

TABLE = PriceTable.parse(
    {
        "openai/gpt-4o-mini": {"input": 0.15, "output": 0.60, "cached_input": 0.075},
        "openai/*": {"input": "2.5", "output": 10},
        "ollama/*": {"input": 0, "output": 0},
    }
)


def test_the_exact_id_wins_over_a_pattern_and_the_longest_pattern_over_a_shorter() -> None:
    table = PriceTable.parse(
        {
            "*": {"input": 1, "output": 1},
            "a/*": {"input": 2, "output": 2},
            "a/b": {"input": 3, "output": 3},
        }
    )
    assert [table.cost(m, 1_000_000, 0).picodollars for m in ("a/b", "a/c", "z/z")] == [
        3 * 10**12,
        2 * 10**12,
        1 * 10**12,
    ]


def test_cost_is_exact_for_decimal_prices() -> None:
    # 1000 prompt tokens at 0.15 $/M and 500 completion at 0.60 $/M:
    # 0.00015 + 0.0003 = 0.00045 USD, no float residue.
    cost = TABLE.cost("openai/gpt-4o-mini", 1000, 500)
    assert cost.priced
    assert usd_text(cost.picodollars) == "0.00045"


def test_cached_prompt_tokens_are_charged_at_the_cached_input_price() -> None:
    # 1000 prompt tokens of which 800 cached: 200 at 0.15 + 800 at 0.075 per M.
    cost = TABLE.cost("openai/gpt-4o-mini", 1000, 0, cached_prompt_tokens=800)
    assert usd_text(cost.picodollars) == "0.00009"
    # Without a cached_input price, cached tokens cost the input price.
    assert TABLE.cost("openai/o1", 10, 0, 10) == TABLE.cost("openai/o1", 10, 0, 0)
    # A cached count above the prompt is capped at the prompt.
    assert TABLE.cost("openai/gpt-4o-mini", 10, 0, 50) == TABLE.cost(
        "openai/gpt-4o-mini", 10, 0, 10
    )


def test_a_model_without_a_price_costs_nothing_and_says_so() -> None:
    cost = TABLE.cost("anthropic/claude", 10_000, 10_000)
    assert (cost.picodollars, cost.priced) == (0, False)
    free = TABLE.cost("ollama/llama3.2:latest", 10_000, 10_000)
    assert (free.picodollars, free.priced) == (0, True)


def test_usd_text_is_exact_decimal_text() -> None:
    assert usd_text(0) == "0"
    assert usd_text(1) == "0.000000000001"
    assert usd_text(12_500_000_000_000) == "12.5"
    assert usd_text(-3) == "-0.000000000003"


@pytest.mark.parametrize(
    ("prices", "message"),
    [
        ([], "must map model ids"),
        ({"m": 1}, "prices.m: must be a mapping"),
        ({"m": {"input": 1}}, "prices.m: 'output' is required"),
        ({"m": {"input": -1, "output": 1}}, "prices.m.input: must be a finite number, 0 or more"),
        ({"m": {"input": "x", "output": 1}}, "prices.m.input: 'x' is not a number"),
        ({"m": {"input": 0.0000001, "output": 1}}, "prices.m.input: at most 6 decimal places"),
        ({"m": {"input": True, "output": 1}}, "prices.m.input: must be a number"),
        ({"m": {"input": 1, "output": 1, "cache": 1}}, "prices.m: unknown field 'cache'"),
        ({"m": {"input": 2_000_000, "output": 1}}, "prices.m.input: at most 1000000"),
        ({"a*b": {"input": 1, "output": 1}}, "'*' may only end a pattern"),
        ({"m": {"input": "nan", "output": 1}}, "must be a finite number"),
    ],
)
def test_a_bad_table_is_refused_naming_the_entry(prices: object, message: str) -> None:
    with pytest.raises(PriceError, match=message.replace("*", r"\*").replace("(", r"\(")):
        PriceTable.parse(prices)


def test_load_reads_only_the_prices_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "marie.yaml"
    path.write_text(
        "providers:\n  ollama: {type: ollama}\nprices:\n  'ollama/*': {input: 0.1, output: 0.2}\n"
    )
    table = PriceTable.load(path)
    assert usd_text(table.cost("ollama/x", 10, 10).picodollars) == "0.000003"
    assert len(PriceTable.load(None)) == 0
    with pytest.raises(PriceError, match=r"missing\.yaml"):
        PriceTable.load(tmp_path / "missing.yaml")


def test_budgets_parse_as_exact_picodollars() -> None:
    assert parse_budget("12.50", "budget") == 12_500_000_000_000
    assert parse_budget("", "budget") == 0
    with pytest.raises(PriceError, match="budget: at most 6 decimal places"):
        parse_budget("0.0000001", "budget")
