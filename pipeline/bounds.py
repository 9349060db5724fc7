"""How big one request may be: a row too big to ever be answered fails before sending.

    bounds = RowBounds.for_job(job)
    problem = bounds.problem(prompt_tokens=130_000, request_tokens=130_064)   # str | None
    sizer = RowSizer(job, endpoint, renderer)
    sizer.size(row)        # the row's Item, or RowRejected / PromptTooLarge: not sent

Two limits no retry can meet: the model's context window (a longer prompt is refused
with a 400 after a round trip, or truncated by a local server), and the job's TPM (a
request estimated above a minute's tokens can never be admitted by the limiter, and
stalls the run). Context windows come from genai-prices' model data; a model it does
not know (a local one) is not checked.

A run may estimate its rows' tokens (bytes/4, `Endpoint.estimating`) rather than count
them with the model's encoding. A row's exact count is then at most ESTIMATE_BOUND
times its estimate, and only a row whose estimate times that comes near a bound is
counted exactly: the answer is the same as counting every row, for a fraction of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.endpoints import Endpoint, Item
from pipeline.errors import PromptTooLarge, RenderLimit, RowProblem, RowRejected
from pipeline.known_models import remembered
from pipeline.render import Renderer
from pipeline.spec import Job

#: Rows past the render limits in a row after which a run halts and a check of every
#: row stops: the template loops whatever the row, and each such row takes the render
#: time limit to find out.
LIMIT_ROWS = 3
#: An exact count is at most this many times the bytes/4 estimate: the estimate counts
#: a quarter of a text's UTF-8 bytes (rounded up), OpenAI's encodings give every token
#: at least one byte, and the rest (message framing, images) is counted alike.
ESTIMATE_BOUND = 4


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


class RowSizer:
    """A row made into its part of a request, as a run makes it and as validate and
    estimate see it: the endpoint's item, or why the row fails before sending. It counts
    the rows in a row that ran past the render limits: LIMIT_ROWS of them say the
    template loops whatever the row (each costs MAX_RENDER_S to find out)."""

    def __init__(self, job: Job, endpoint: Endpoint, renderer: Renderer) -> None:
        self._endpoint, self._renderer = endpoint, renderer
        self._bounds = RowBounds.for_job(job)
        #: What a row's answer may add to its request's tokens (max_tokens).
        self.output_tokens = endpoint.max_output_tokens()
        #: Rows in a row that ran past the render limits, and the last one's reason.
        self.runaway = 0
        self.last_limit = ""

    def size(self, row: dict[str, Any]) -> Item | RowRejected | PromptTooLarge:
        try:
            prompt = self._renderer.render(row)
            item = self._endpoint.item(prompt)
        except RowProblem as exc:
            limit = isinstance(exc, RenderLimit)
            self.runaway = self.runaway + 1 if limit else 0
            self.last_limit = str(exc) if limit else self.last_limit
            return RowRejected(str(exc))
        self.runaway = 0
        tokens = item.tokens
        exact = self._endpoint.exact
        if exact is not None and self._problem(tokens * ESTIMATE_BOUND) is not None:
            tokens = exact.item(prompt).tokens  # near a bound: counted, not estimated
        problem = self._problem(tokens)
        return item if problem is None else PromptTooLarge(problem)

    def _problem(self, prompt_tokens: int) -> str | None:
        return self._bounds.problem(
            prompt_tokens=prompt_tokens, request_tokens=prompt_tokens + self.output_tokens
        )

    @property
    def runaway_reached(self) -> bool:
        return self.runaway >= LIMIT_ROWS


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
