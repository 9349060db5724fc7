"""Usage x price -> USD, per row.

    pricer = make_pricer("gpt-4o-mini", override=None)
    pricer.cost(Usage(prompt_tokens=1000, completion_tokens=64))   # 0.0001884

Prices come from genai-prices, looked up once per run; a job's [price] table overrides
them (self-hosted models: all zeros). Cached prompt tokens cost the cached price.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import genai_prices
from genai_prices import Usage as PriceUsage
from genai_prices import calc_price

from pipeline.endpoints import Usage
from pipeline.errors import SpecError
from pipeline.spec import PriceSpec

_PER_TOKEN = 1e-6  # prices are per million tokens


@dataclass(frozen=True)
class Pricer:
    #: Where the prices came from, for the output's provenance.
    source: str
    input: float
    output: float
    cached_input: float
    #: genai-prices' own model price, for tiered prices the flat rates cannot express.
    tiered: Any = None

    def cost(self, usage: Usage) -> float:
        if self.tiered is not None:
            return _tiered_cost(self.tiered, usage)
        uncached = usage.prompt_tokens - usage.cached_tokens
        return (
            uncached * self.input
            + usage.cached_tokens * self.cached_input
            + usage.completion_tokens * self.output
        ) * _PER_TOKEN


def make_pricer(model: str, override: PriceSpec | None) -> Pricer:
    """Prices for `model`; raise SpecError, before anything is sent, if none are known."""
    if override is not None:
        cached = override.cached_input_per_mtok
        return Pricer(
            source="job [price]",
            input=override.input_per_mtok,
            output=override.output_per_mtok,
            cached_input=override.input_per_mtok if cached is None else cached,
        )
    price = _lookup(model)
    flat = [price.input_mtok, price.output_mtok, price.cache_read_mtok]
    source = f"genai-prices {genai_prices.__version__}"
    if not all(v is None or isinstance(v, Decimal | int | float) for v in flat):
        return Pricer(source=source, input=0, output=0, cached_input=0, tiered=price)
    input_, output, cached = (float(v) if v is not None else None for v in flat)
    return Pricer(
        source=source,
        input=input_ or 0.0,
        output=output or 0.0,
        cached_input=(input_ or 0.0) if cached is None else cached,
    )


def _lookup(model: str) -> Any:
    usage = PriceUsage(input_tokens=1, output_tokens=1)
    for provider in ("openai", None):
        try:
            return calc_price(usage, model_ref=model, provider_id=provider).model_price
        except LookupError:
            continue
    raise SpecError(
        f"no price known for model `{model}` (genai-prices {genai_prices.__version__}). "
        "Add a [price] table to the job, e.g. input_per_mtok = 0.0 and output_per_mtok = 0.0 "
        "for a self-hosted model"
    )


def _tiered_cost(price: Any, usage: Usage) -> float:
    calc = price.calc_price(
        PriceUsage(
            input_tokens=usage.prompt_tokens,
            cache_read_tokens=usage.cached_tokens,
            output_tokens=usage.completion_tokens,
        )
    )
    return float(calc["total_price"])
