"""Prices of models and the cost of a request, in exact integers.

The price table is the `prices` map of `MARIE_CONFIG`: a model id or a
pattern with a trailing `*` to US dollars per million tokens —
`input`, `output`, and optionally `cached_input` (prompt tokens the upstream
read from its prompt cache; the `input` price when not given). Every
service that records usage loads the same file (`PriceTable.load`) and asks
`cost` here, so a ledger row's cost is computed in one place, for the model
as resolved (the one that answered), from the prices as configured when the
request ended.

Money is never a float: prices are read as decimals with at most
`PRICE_DECIMALS` places (of a dollar per million tokens), which makes the
cost of any whole number of tokens a whole number of picodollars (10⁻¹²
USD). Ledger rows, totals and budgets are integers of picodollars; people
and JSON see exact decimal text (`usd_text`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

#: The one currency of every price, cost and budget.
CURRENCY = "USD"
#: Picodollars in a dollar: the ledger's unit of money.
PICODOLLARS_PER_DOLLAR = 10**12
#: Decimal places a price (USD per million tokens) may have: 10⁻⁶ USD per
#: million tokens is one picodollar per token, so costs stay whole.
PRICE_DECIMALS = 6
#: The dearest price accepted, USD per million tokens (a typo guard).
MAX_PRICE = Decimal(1_000_000)
#: Picodollars a budget or a cost may reach (fits int64 with room to add).
MAX_PICODOLLARS = 10**18
_PRICE_FIELDS = ("input", "output", "cached_input")


class PriceError(ValueError):
    """A price table that cannot be used; str() says where and why."""


@dataclass(frozen=True, slots=True)
class Price:
    """A model's price in picodollars per token (= micro-USD per million tokens)."""

    input: int
    output: int
    cached_input: int


@dataclass(frozen=True, slots=True)
class Cost:
    """What a request cost, and whether its model had a price at all."""

    picodollars: int
    priced: bool


def parse_usd(value: Any, what: str, *, decimals: int = PRICE_DECIMALS) -> Decimal:
    """A non-negative amount of dollars, exact; PriceError naming `what` otherwise.

    YAML numbers arrive as floats: their shortest text (`repr`) is what was
    written, so `0.15` is read as the decimal 0.15, never as 0.1499…"""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise PriceError(f"{what}: must be a number of US dollars")
    try:
        amount = Decimal(repr(value) if isinstance(value, float) else str(value).strip())
    except InvalidOperation:
        raise PriceError(f"{what}: {value!r} is not a number") from None
    if not amount.is_finite() or amount < 0:
        raise PriceError(f"{what}: must be a finite number, 0 or more")
    exponent = amount.normalize().as_tuple().exponent
    if isinstance(exponent, int) and -exponent > decimals:
        raise PriceError(f"{what}: at most {decimals} decimal places")
    return amount


def usd_to_picodollars(amount: Decimal) -> int:
    return int(amount * PICODOLLARS_PER_DOLLAR)


def usd_text(picodollars: int) -> str:
    """Exact decimal text of an amount: 150000 → "0.00000015", 0 → "0"."""
    sign = "-" if picodollars < 0 else ""
    whole, frac = divmod(abs(picodollars), PICODOLLARS_PER_DOLLAR)
    digits = f"{frac:012d}".rstrip("0")
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"


def parse_budget(value: str, what: str) -> int:
    """A budget in dollars (text, e.g. "12.50") as picodollars; "" or "0" is none.

    Budgets, like prices, have at most `PRICE_DECIMALS` places (a micro-dollar)."""
    if not value.strip():
        return 0
    picodollars = usd_to_picodollars(parse_usd(value, what))
    if picodollars > MAX_PICODOLLARS:
        raise PriceError(f"{what}: at most {MAX_PICODOLLARS // PICODOLLARS_PER_DOLLAR} dollars")
    return picodollars


def _price(entry: Any, where: str) -> Price:
    if not isinstance(entry, Mapping):
        raise PriceError(f"{where}: must be a mapping with input and output (USD per 1M tokens)")
    unknown = sorted(set(entry) - set(_PRICE_FIELDS))
    if unknown:
        raise PriceError(
            f"{where}: unknown field {unknown[0]!r} (known: {', '.join(_PRICE_FIELDS)})"
        )
    amounts: dict[str, int] = {}
    for name in ("input", "output"):
        if name not in entry:
            raise PriceError(f"{where}: '{name}' is required (USD per 1M tokens)")
    for name in _PRICE_FIELDS:
        if name in entry:
            amount = parse_usd(entry[name], f"{where}.{name}")
            if amount > MAX_PRICE:
                raise PriceError(f"{where}.{name}: at most {MAX_PRICE} USD per 1M tokens")
            # USD per 1M tokens with 6 places = whole picodollars per token.
            amounts[name] = int(amount * 10**PRICE_DECIMALS)
    return Price(amounts["input"], amounts["output"], amounts.get("cached_input", amounts["input"]))


class PriceTable:
    """Model ids and patterns to prices. The exact id wins; otherwise the
    longest matching pattern (`openai/*` before `*`)."""

    def __init__(self, prices: Mapping[str, Price] | None = None) -> None:
        prices = dict(prices or {})
        self._exact = {k: v for k, v in prices.items() if not k.endswith("*")}
        self._patterns = sorted(
            ((k[:-1], v) for k, v in prices.items() if k.endswith("*")),
            key=lambda item: -len(item[0]),
        )

    def __len__(self) -> int:
        return len(self._exact) + len(self._patterns)

    @classmethod
    def parse(cls, data: Any, where: str = "prices") -> PriceTable:
        """The table of a `prices` mapping; PriceError naming the bad entry."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise PriceError(f"{where}: must map model ids or patterns to prices")
        table: dict[str, Price] = {}
        for model, entry in data.items():
            if not isinstance(model, str) or not model.strip():
                raise PriceError(f"{where}: model ids must be non-empty text")
            if "*" in model[:-1]:
                raise PriceError(f"{where}.{model}: '*' may only end a pattern")
            table[model] = _price(entry, f"{where}.{model}")
        return cls(table)

    @classmethod
    def load(cls, path: Path | None) -> PriceTable:
        """The `prices` of the YAML file at `path` (MARIE_CONFIG); empty without one."""
        if path is None:
            return cls()
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise PriceError(f"{path}: {exc}") from None
        if not isinstance(data, Mapping):
            return cls()
        return cls.parse(data.get("prices"), f"{path}: prices")

    def price(self, model: str) -> Price | None:
        found = self._exact.get(model)
        if found is not None:
            return found
        for prefix, price in self._patterns:
            if model.startswith(prefix):
                return price
        return None

    def cost(
        self, model: str, prompt_tokens: int, completion_tokens: int, cached_prompt_tokens: int = 0
    ) -> Cost:
        """The cost of a request's tokens on `model` (as resolved). Cached
        prompt tokens are part of `prompt_tokens` (OpenAI's meaning) and are
        charged at `cached_input`. A model without a price costs 0, unpriced."""
        price = self.price(model)
        if price is None:
            return Cost(0, priced=False)
        cached = min(max(0, cached_prompt_tokens), max(0, prompt_tokens))
        fresh = max(0, prompt_tokens) - cached
        picodollars = (
            fresh * price.input
            + cached * price.cached_input
            + max(0, completion_tokens) * price.output
        )
        return Cost(picodollars, priced=True)


NO_PRICES = PriceTable()
