"""How big one request may be: a row too big to ever be answered fails before sending.

    bounds = RowBounds.for_job(job)
    problem = bounds.problem(prompt_tokens=130_000, request_tokens=130_064)   # str | None

Two limits no retry can meet: the model's context window (a longer prompt is refused
with a 400 after a round trip, or truncated by a local server), and the job's TPM (a
request estimated above a minute's tokens can never be admitted by the limiter, and
stalls the run). Context windows come from genai-prices' model data; a model it does
not know (a local one) is not checked.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.known_models import remembered
from pipeline.spec import Job


@dataclass(frozen=True)
class RowBounds:
    #: The model's context window in tokens; None when unknown.
    context_window: int | None
    #: The job's tokens per minute; None when unlimited.
    tpm: int | None

    @classmethod
    def for_job(cls, job: Job) -> RowBounds:
        return cls(context_window(job.request.model, job.request.provider), job.limits.tpm)

    def problem(self, *, prompt_tokens: int, request_tokens: int) -> str | None:
        """Why a request of this size can never be answered, or None."""
        window = self.context_window
        if window is not None and prompt_tokens > window:
            return (
                f"the prompt is about {prompt_tokens:,} tokens, more than the model's "
                f"context window of {window:,}: shorten this row's text (or use a model "
                "with a larger window); not sent"
            )
        if self.tpm is not None and request_tokens > self.tpm:
            return (
                f"the request is about {request_tokens:,} tokens (prompt + max_tokens), more "
                f"than the job's tpm of {self.tpm:,} per minute, so it could never be "
                "admitted: raise --tpm / limits.tpm, lower max_tokens or shorten this "
                "row; not sent"
            )
        return None


def context_window(model: str, provider: str = "openai") -> int | None:
    """The model's context window as genai-prices knows it; None for unknown models."""
    window: int | None = remembered(
        f"context_window {provider} {model}", lambda: _context_window(model, provider)
    )
    return window


def _context_window(model: str, provider: str) -> int | None:
    # Imported here, only when not remembered: see known_models.py.
    from genai_prices import Usage as PriceUsage
    from genai_prices import calc_price

    usage = PriceUsage(input_tokens=1, output_tokens=1)
    for provider_id in (provider if provider != "azure" else "openai", None):
        try:
            found = calc_price(usage, model_ref=model, provider_id=provider_id).model
        except LookupError:
            continue
        window = found.context_window
        return window if isinstance(window, int) and window > 0 else None
    return None
