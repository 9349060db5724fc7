"""Prices: genai-prices for known models, the job's override otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.cost import make_pricer
from pipeline.errors import SpecError
from pipeline.records import Usage
from pipeline.spec import PriceSpec


def test_known_model_is_priced_with_cached_tokens_cheaper() -> None:
    pricer = make_pricer("gpt-4o-mini", None)

    plain = pricer.cost(Usage(prompt_tokens=1_000_000, completion_tokens=0))
    cached = pricer.cost(Usage(prompt_tokens=1_000_000, cached_tokens=1_000_000))

    assert plain == pytest.approx(0.15)
    assert cached == pytest.approx(0.075)
    assert pricer.source.startswith("genai-prices")


def test_unknown_model_without_override_is_an_error_with_the_fix() -> None:
    with pytest.raises(SpecError, match=r"no price known for model `my-llama`.*\[price\]"):
        make_pricer("my-llama", None)


def test_override_wins_and_self_hosted_is_free() -> None:
    free = make_pricer("my-llama", PriceSpec(input_per_mtok=0, output_per_mtok=0))
    paid = make_pricer("gpt-4o-mini", PriceSpec(input_per_mtok=1, output_per_mtok=2))

    assert free.cost(Usage(prompt_tokens=10**6, completion_tokens=10**6)) == 0
    assert paid.cost(Usage(prompt_tokens=10**6, completion_tokens=10**6)) == pytest.approx(3.0)
    assert paid.source == "job [price]"


usage = st.builds(
    lambda p, c, k: Usage(prompt_tokens=p, completion_tokens=c, cached_tokens=min(k, p)),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
)


@given(usage, usage)
def test_cost_is_additive(a: Usage, b: Usage) -> None:
    pricer = make_pricer("gpt-4o-mini", None)
    both = Usage(
        prompt_tokens=a.prompt_tokens + b.prompt_tokens,
        completion_tokens=a.completion_tokens + b.completion_tokens,
        cached_tokens=a.cached_tokens + b.cached_tokens,
    )

    assert pricer.cost(both) == pytest.approx(pricer.cost(a) + pricer.cost(b))


def _price_in_child(cache: Path) -> tuple[dict[str, object], bool]:
    """gpt-4o-mini's prices as a fresh interpreter finds them, and whether it imported
    genai-prices to find them."""
    code = (
        "import dataclasses, json, sys\n"
        "from pipeline.cost import make_pricer\n"
        "p = make_pricer('gpt-4o-mini', None)\n"
        "print(json.dumps([dataclasses.asdict(p), 'genai_prices' in sys.modules]))\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    fields, imported = json.loads(out.stdout)
    return fields, imported


def test_a_flat_price_is_cached_and_a_later_run_skips_genai_prices(tmp_path: Path) -> None:
    first, imported_first = _price_in_child(tmp_path)
    assert imported_first
    assert (tmp_path / "pipeline" / "models.json").is_file()
    second, imported_second = _price_in_child(tmp_path)
    assert not imported_second
    assert second == first
    assert first["input"] == pytest.approx(0.15)  # gpt-4o-mini, USD per million


def test_an_unreadable_price_cache_is_looked_up_again_and_rewritten(tmp_path: Path) -> None:
    cache = tmp_path / "pipeline" / "models.json"
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json", encoding="utf-8")
    fields, imported = _price_in_child(tmp_path)
    assert imported
    assert fields["output"] == pytest.approx(0.6)
    assert json.loads(cache.read_text(encoding="utf-8"))  # written anew, readable
