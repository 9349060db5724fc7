"""What a run may spend: the budget against the estimate before anything is sent, the
stop once it is spent, and what a crashed run's requests in flight may have cost.

    note = check_budget(plan, journal)      # BudgetTooSmall (exit 2), a warning, or None
    spent = Spent(max_cost=5.0, stop=stop)
    spent(counters)                         # asks the run to stop at $5 committed
    resume_note(plan, journal, done=120)    # "resuming from ...: 120 rows ... at most $0.0031"
"""

from __future__ import annotations

from pipeline.errors import BudgetReached, BudgetTooSmall
from pipeline.journal import Journal
from pipeline.plan import Plan, estimate
from pipeline.progress import Counters, plural, usd
from pipeline.records import Stop, Usage


class Spent:
    """The run stops (exit 3) once what its committed rows cost reaches the budget."""

    def __init__(self, max_cost: float | None, stop: Stop) -> None:
        self._max_cost = max_cost
        self._stop = stop

    def __call__(self, counters: Counters) -> None:
        max_cost = self._max_cost
        if max_cost is not None and counters.cost_usd >= max_cost:
            self._stop.ask(
                BudgetReached(f"spent ${counters.cost_usd:.4f}, the budget is ${max_cost:.4f}")
            )


def check_budget(plan: Plan, journal: Journal) -> str | None:
    """The budget against the estimate of the rows left, before anything is sent:
    refuse one below the prompts' cost alone, say how far one below the worst case goes.

    Only when a budget is set: the estimate renders every row left, a pass over the
    input that a run without one does not pay at start-up.
    """
    budget = plan.job.limits.max_cost
    if budget is None:
        return None
    failed_too = not plan.options.retry_failed
    e = estimate(plan, lambda first, last: journal.done_rows(first, last, failed_too=failed_too))
    if e.rows == 0 or e.cost_high <= budget:
        return None
    left = f"the {plural(e.rows, 'row')} left to send"
    if e.cost_low > budget:
        raise BudgetTooSmall(
            f"the budget (--max-cost or [limits] max_cost) {usd(budget)} is below what the "
            f"prompts alone cost: {usd(e.cost_low)} for {left} (up to {usd(e.cost_high)} "
            f"with every answer at max_tokens); raise it to at least {usd(e.cost_low)}, or "
            "send fewer rows with --limit. Nothing was sent"
        )
    # A row costs its prompt plus an answer of 0 to max_tokens tokens.
    fewest = int(e.rows * budget / e.cost_high)
    most = min(e.rows, int(e.rows * budget / e.cost_low)) if e.cost_low else e.rows
    return (
        f"the budget {usd(budget)} is below the worst case for {left} "
        f"({usd(e.cost_low)} to {usd(e.cost_high)}, as answers run short or to max_tokens): "
        f"it covers about {fewest:,} to {most:,} rows, and the run stops when it is spent "
        "(exit 3; run again with a larger --max-cost to go on)"
    )


def resume_note(plan: Plan, journal: Journal, done: int) -> str | None:
    """What a resume will skip, and what the last run's crash may have cost."""
    flight = journal.in_flight()
    if done == 0 and flight.rows == 0:
        return None
    note = f"resuming from {journal.path}: {done:,} rows done by earlier runs are not sent again"
    if flight.rows:
        out = plan.endpoint.max_output_tokens()
        prompt = flight.tokens - flight.rows * out
        usage = Usage(prompt_tokens=prompt, completion_tokens=flight.rows * out)
        most = plan.pricer.cost(usage, flight.rows)
        note += (
            f"; {flight.rows:,} requests were in flight when the last run stopped: they are "
            f"sent again, and what they cost before is billed again (at most ${most:.4f})"
        )
    return note
