"""Usage x price -> USD, per row.

    pricer = make_pricer("gpt-4o-mini", override=None)
    pricer.cost(Usage(prompt_tokens=1000, completion_tokens=64))   # 0.0001884

Prices come from genai-prices, looked up once per run; a job's [price] table overrides
them (self-hosted models: all zeros). A flat price is remembered by genai-prices'
version (known_models.py), so later runs start without importing it. Cached prompt
tokens cost the cached price, prompt tokens written to Anthropic's cache the (dearer)
cache-write price,
audio tokens the audio price; audio billed by duration costs its seconds, and a model
priced per image its requests (`per_request_usd` in [price]).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pipeline.errors import SpecError
from pipeline.known_models import remembered, version
from pipeline.records import Usage
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
    #: Audio input tokens (transcription models), per million; None: the input price.
    audio_input: float | None = None
    #: Per second of audio, for models billed by duration (whisper-1).
    per_audio_second: float = 0.0
    #: Per request, for models priced per image or call (dall-e-3 via [price]).
    per_request: float = 0.0
    #: Prompt tokens written to Anthropic's prompt cache, per million; None: the input price.
    cache_write: float | None = None

    def cost(self, usage: Usage, requests: int = 1) -> float:
        """USD for `usage`; `requests`: how many requests it adds up (for per_request)."""
        fixed = requests * self.per_request + usage.audio_seconds * self.per_audio_second
        if self.tiered is not None:
            return _tiered_cost(self.tiered, usage) + fixed
        written = usage.cache_write_tokens
        uncached = usage.prompt_tokens - usage.cached_tokens - usage.audio_tokens - written
        audio = self.input if self.audio_input is None else self.audio_input
        write = self.input if self.cache_write is None else self.cache_write
        return (
            uncached * self.input
            + usage.audio_tokens * audio
            + written * write
            + usage.cached_tokens * self.cached_input
            + usage.completion_tokens * self.output
        ) * _PER_TOKEN + fixed


def make_pricer(model: str, override: PriceSpec | None) -> Pricer:
    """Prices for `model`; raise SpecError, before anything is sent, if none are known."""
    if override is not None:
        cached = override.cached_input_per_mtok
        return Pricer(
            source="job [price]",
            input=override.input_per_mtok,
            output=override.output_per_mtok,
            cached_input=override.input_per_mtok if cached is None else cached,
            per_audio_second=override.per_minute_usd / 60,
            per_request=override.per_request_usd,
        )
    source = f"genai-prices {version()}"
    looked_up: list[Pricer] = []

    def flat_price() -> dict[str, Any] | None:
        """The Pricer's fields for a flat price (JSON, to remember); None for a tiered
        one, which genai-prices' own object prices, so it is looked up each run."""
        looked_up.append(_from_genai_prices(model, source))
        return None if looked_up[0].tiered is not None else dataclasses.asdict(looked_up[0])

    found = remembered(f"price {model}", flat_price)
    if found is not None:
        return Pricer(**found)
    return looked_up[0] if looked_up else _from_genai_prices(model, source)


def _from_genai_prices(model: str, source: str) -> Pricer:
    price = _lookup(model)
    rates = [price.input_mtok, price.output_mtok, price.cache_read_mtok, price.cache_write_mtok]
    if any(v is not None and _flat(v) is None for v in rates):
        return Pricer(source=source, input=0, output=0, cached_input=0, tiered=price)
    input_, output, cached, write = (_flat(v) for v in rates)
    audio_hour = price.audio_hours or price.input_audio_hours
    return Pricer(
        source=source,
        input=input_ or 0.0,
        output=output or 0.0,
        cached_input=(input_ or 0.0) if cached is None else cached,
        audio_input=_flat(price.input_audio_mtok),
        per_audio_second=(_flat(audio_hour) or 0.0) / 3600,
        cache_write=write,
    )


def _flat(value: Any) -> float | None:
    """A flat price as a float; None when absent or tiered."""
    return float(value) if isinstance(value, Decimal | int | float) else None


def _lookup(model: str) -> Any:
    # Imported here, only on a cache miss: see the module's docstring.
    import genai_prices
    from genai_prices import Usage as PriceUsage
    from genai_prices import calc_price

    usage = PriceUsage(input_tokens=1, output_tokens=1)
    for provider in ("openai", None):
        try:
            return calc_price(usage, model_ref=model, provider_id=provider).model_price
        except LookupError:
            continue
    raise SpecError(
        f"no price known for model `{model}` (genai-prices {genai_prices.__version__}): "
        "give one with --price IN,OUT (USD per million input and output tokens; --price 0,0 "
        "for a self-hosted model), or a [price] table in the job (input_per_mtok, "
        "output_per_mtok)"
    )


def _tiered_cost(price: Any, usage: Usage) -> float:
    from genai_prices import Usage as PriceUsage  # loaded already: the price is its object

    calc = price.calc_price(
        PriceUsage(
            input_tokens=usage.prompt_tokens,
            cache_read_tokens=usage.cached_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            output_tokens=usage.completion_tokens,
        )
    )
    return float(calc["total_price"])
