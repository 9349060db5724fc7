"""One run: send what is not done yet, commit every answer, write the output and summary.

    plan = make_plan(load_job(path), RunOptions(simulate=True))   # plan.py: nothing sent
    report = asyncio.run(execute(plan, notify=print))             # the run itself
    report.exit_code

A producer renders rows into a bounded queue, a fixed pool of workers sends them, and
one writer commits to the journal: a row is recorded as sent before it goes out, and
its result is committed before it counts as done.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import math
import re
import shutil
import signal
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import polars as pl

from pipeline import __version__
from pipeline.bounds import RowBounds
from pipeline.dispatch import Dispatcher, RetryPolicy, rejected
from pipeline.endpoints import Endpoint
from pipeline.endpoints.base import JSON
from pipeline.endpoints.tools import ToolRunner
from pipeline.errors import (
    BudgetReached,
    BudgetTooSmall,
    Halted,
    JobError,
    OutputError,
    OutputRefused,
    PipelineError,
    PromptTooLarge,
    RenderLimit,
    RowProblem,
    RowRejected,
)
from pipeline.journal import Journal, Totals
from pipeline.limits import WARMUP_RATIO, Limiter
from pipeline.output import (
    OUTPUT_META,
    check_replaceable,
    output_record,
    pending_record,
    recorded_output,
    remove_leftovers,
    write_bytes_atomic,
    write_output,
)
from pipeline.parse import to_results
from pipeline.plan import BATCH_ROWS, LIMIT_ROWS, Plan, estimate, fingerprint, limited
from pipeline.preflight import check_server
from pipeline.progress import Counters, Display
from pipeline.records import ROW_INDEX, Answer, HttpRequest, Outcome, RowResult, Usage, Work
from pipeline.redact import redact, redact_result
from pipeline.signals import Signals, stopped
from pipeline.spec import Job, digest
from pipeline.transport import AiohttpTransport, env_proxy

#: Entries committed in one transaction at most; a commit takes whatever is waiting.
COMMIT_ROWS = 2_000
#: The shortest time between two commits when entries come fast: requests wait at
#: most this long to be recorded as sent. Far below any API's latency.
COMMIT_SPACING_S = 0.002
#: Commits between two WAL checkpoints (which run in a thread: they fsync).
CHECKPOINT_COMMITS = 500
#: After SIGINT/SIGTERM, how long in-flight requests may take to finish.
DRAIN_S = 30.0
#: Answers kept in memory to share with identical requests that come later. The
#: journal answers for older ones; this closes the gap while a commit is on its way.
RECENT_ANSWERS = 10_000
#: Disk a run needs at the least: SQLite and Parquet need room to work, and every
#: row's result takes a few hundred bytes in the journal and again in the output.
MIN_FREE_BYTES = 64 * 2**20
BYTES_PER_ROW = 512


@dataclass
class Report:
    exit_code: int
    message: str | None
    summary: dict[str, Any]


@dataclass(slots=True)
class Sending:
    """A row about to be sent; `recorded` resolves once that is durable."""

    work: Work
    recorded: asyncio.Future[None]


@dataclass(slots=True)
class NotSent:
    """A row recorded as sending that the run stopped before it could be billed."""

    work: Work


Entry = Outcome | Sending | NotSent | RowResult | None


class Runner:
    """One run's moving parts: a producer, the workers and the journal writer."""

    def __init__(self, plan: Plan, journal: Journal, base_url: str, earlier: Totals):
        self.plan = plan
        self.journal = journal
        self.base_url = base_url
        job = plan.job
        self.url = plan.provider.url(base_url, plan.endpoint.path)
        self.headers = plan.provider.headers(plan.api_key)
        self._json_headers = {**self.headers, "content-type": JSON}
        start = WARMUP_RATIO if plan.endpoint.count.exact else 1.0
        self.limiter = Limiter(rpm=job.limits.rpm, tpm=job.limits.tpm, prompt_ratio=start)
        resumed = earlier.ok if plan.options.retry_failed else earlier.ok + earlier.failed
        self.counters = Counters(total=plan.rows, resumed=resumed)
        self.dispatcher: Dispatcher | None = None
        self._outbox: asyncio.Queue[Entry] = asyncio.Queue(maxsize=COMMIT_ROWS)
        self._dedupe = job.request.dedupe
        #: In-flight requests by hash -> the rows waiting for the same answer.
        self._leaders: dict[int, list[int]] = {}
        self._recent: OrderedDict[int, RowResult] = OrderedDict()
        self.shared = 0  # rows answered by an identical request's answer
        #: Rows of a batching endpoint waiting to fill a request.
        self._group: list[Work] = []
        self._group_tokens = 0
        #: Rows too big to ever be answered fail before sending.
        self._bounds = RowBounds.for_job(job)
        #: Rows in a row that ran past the render limits (each costs MAX_RENDER_S).
        self._runaway = 0
        #: The producer and the workers, once running: what abandon() cancels.
        self._senders: list[asyncio.Task[None]] = []

    def abandon(self) -> int:
        """Stop sending at once (a drain that took too long); return how many requests
        were in flight. Those stay recorded as sending, so a resume says so and sends
        them again; the writer still commits every answer that arrived."""
        abandoned = self.dispatcher.in_flight if self.dispatcher is not None else 0
        for task in self._senders:
            task.cancel()
        return abandoned

    async def run(self, transport: AiohttpTransport) -> Dispatcher:
        limits = self.plan.job.limits
        policy = RetryPolicy(limits.max_attempts, limits.backoff_s, limits.backoff_max_s)
        self.dispatcher = dispatcher = Dispatcher(
            transport,
            self.plan.endpoint,
            self.limiter,
            policy,
            self.plan.check,
            tools=_ToolRounds(self, self.plan.tools) if self.plan.tools is not None else None,
            before_send=self._record_sending,
            not_sent=self._record_not_sent,
        )
        # Before the first row: a server that cannot serve any halts the run here.
        plan = self.plan
        halt = await check_server(
            transport, plan.provider, self.base_url, self.headers, plan.endpoint
        )
        if halt is not None:
            dispatcher.stop(halt)
        # Bounded queues: a full inbox blocks the producer (backpressure), so memory
        # holds a batch and a few requests per worker, never the whole input.
        inbox: asyncio.Queue[Work | None] = asyncio.Queue(maxsize=limits.concurrency * 2)
        try:
            async with Display(self.counters, dispatcher.stats), asyncio.TaskGroup() as tg:
                writer = tg.create_task(self._write(tg))
                producer = tg.create_task(self._produce(inbox, limits.concurrency))
                workers = [
                    tg.create_task(dispatcher.worker(inbox, self._outbox))
                    for _ in range(limits.concurrency)
                ]
                self._senders = [producer, *workers]
                # return_exceptions: senders that abandon() cancelled end quietly, and the
                # writer still commits what arrived; one that failed fails the group.
                await asyncio.gather(producer, *workers, return_exceptions=True)
                await self._outbox.put(None)
                await writer
        except* PipelineError as group:
            # A stage failed for the whole run (the disk, say): report that one, plainly.
            raise group.exceptions[0] from None
        return dispatcher

    async def _record_sending(self, work: Work) -> None:
        recorded = asyncio.get_running_loop().create_future()
        await self._outbox.put(Sending(work, recorded))
        await recorded

    async def _record_not_sent(self, work: Work) -> None:
        await self._outbox.put(NotSent(work))

    async def _produce(self, inbox: asyncio.Queue[Work | None], workers: int) -> None:
        assert self.dispatcher is not None
        batches = limited(self.plan.source.batches(BATCH_ROWS), self.plan.options.limit)
        while not self.dispatcher.stopped:
            batch = await asyncio.to_thread(next, batches, None)
            if batch is None:
                break
            step = self.plan.endpoint.prepare_rows
            for start in range(0, batch.height, step):
                if self.dispatcher.stopped:
                    break
                chunk = batch.slice(start, step)
                works, ready = await asyncio.to_thread(self._prepare, chunk)
                for entry in ready:
                    await self._outbox.put(entry)
                for work in works:
                    if self.dispatcher.stopped:
                        break
                    if not self._dedupe or await self._lead(work):
                        await self._queue(work, inbox)
        if self._group and not self.dispatcher.stopped:
            await inbox.put(self._pack())
        for _ in range(workers):
            await inbox.put(None)

    async def _queue(self, work: Work, inbox: asyncio.Queue[Work | None]) -> None:
        """Send a one-row request as it is; gather rows of a batching endpoint first."""
        endpoint = self.plan.endpoint
        if endpoint.batch_rows == 1:
            await inbox.put(work)
            return
        full = len(self._group) >= endpoint.batch_rows
        if full or (self._group and self._group_tokens + work.tokens > endpoint.batch_tokens):
            await inbox.put(self._pack())
        self._group.append(work)
        self._group_tokens += work.tokens

    def _pack(self) -> Work:
        """The waiting rows as one request."""
        group, self._group, self._group_tokens = self._group, [], 0
        payloads = [w.payload for w in group]
        return Work(
            rows=tuple(w.rows[0] for w in group),
            request=self._request(payloads),
            tokens=sum(w.tokens for w in group),
            digests=tuple(w.digests[0] for w in group),
            weights=tuple(w.weights[0] for w in group),
            payload=payloads,
        )

    def _request(self, payloads: list[Any]) -> HttpRequest:
        body, content_type = self.plan.endpoint.encode(payloads)
        headers = (
            self._json_headers
            if content_type == JSON
            else {**self.headers, "content-type": content_type}
        )
        return HttpRequest("POST", self.url, headers, body)

    async def _lead(self, work: Work) -> bool:
        """True if `work` must be sent; else it waits for, or takes, an identical answer."""
        digest, row = work.digests[0], work.rows[0]
        followers = self._leaders.get(digest)
        if followers is not None:
            followers.append(row)
            return False
        recent = self._recent.get(digest)
        if recent is not None:
            await self._outbox.put(_shared(recent, row))
            return False
        self._leaders[digest] = []
        return True

    def _prepare(self, batch: pl.DataFrame) -> tuple[list[Work], list[Entry]]:
        """Render a batch's rows not yet done into requests (runs in a thread).

        Each Work is one row; a batching endpoint's rows are encoded together later.
        """
        rows = batch.get_column(ROW_INDEX)
        done = self.journal.done_rows(
            int(rows.min()),  # type: ignore[arg-type]
            int(rows.max()),  # type: ignore[arg-type]
            failed_too=not self.plan.options.retry_failed,
        )
        renderer, endpoint = self.plan.renderer, self.plan.endpoint
        extra_tokens = endpoint.max_output_tokens()
        works: list[Work] = []
        ready: list[Entry] = []
        for row in batch.iter_rows(named=True):
            if self.dispatcher is not None and self.dispatcher.stopped:
                break  # Ctrl-C: a render may take MAX_RENDER_S; do not start the next
            index = row[ROW_INDEX]
            if index in done:
                continue
            try:
                item = endpoint.item(renderer.render(row))
            except RowProblem as exc:
                ready.append(rejected(index, RowRejected(str(exc))))
                self._runaway = self._runaway + 1 if isinstance(exc, RenderLimit) else 0
                if self._runaway >= LIMIT_ROWS:
                    self._halt_runaway(exc)
                continue
            self._runaway = 0
            size = item.tokens + extra_tokens
            too_big = self._bounds.problem(prompt_tokens=item.tokens, request_tokens=size)
            if too_big is not None:
                ready.append(rejected(index, PromptTooLarge(too_big)))
                continue
            works.append(
                Work(
                    rows=(index,),
                    request=_UNSENT,
                    tokens=size,
                    digests=(_digest(item.key),),
                    weights=(item.tokens,),
                    payload=item.payload,
                )
            )
        if self._dedupe and works:
            answered = self.journal.answered(w.digests[0] for w in works)
            ready.extend(
                _shared(answered[w.digests[0]], w.rows[0])
                for w in works
                if w.digests[0] in answered
            )
            works = [w for w in works if w.digests[0] not in answered]
        if endpoint.batch_rows == 1:  # encoded only for rows that will be sent
            for work in works:
                work.request = self._request([work.payload])
        return works, ready

    def _halt_runaway(self, exc: Exception) -> None:
        """A template past its render limits row after row loops whatever the row: stop
        rather than spend MAX_RENDER_S on each of a million rows."""
        if self.dispatcher is not None:
            self.dispatcher.stop(
                Halted(
                    f"{self._runaway} rows in a row ran past the render limits ({exc}): the "
                    "template is what to fix; `pipeline validate` shows the rows (done rows "
                    "are kept)"
                )
            )

    async def _write(self, tg: asyncio.TaskGroup) -> None:
        """The journal's one writer: commits whatever has arrived, in one transaction."""
        finished = False
        commits = 0
        last_commit = 0.0
        checkpointing: asyncio.Task[None] | None = None
        while not finished:
            entries = [await self._outbox.get()]
            # Every commit appends whole pages to the WAL, so a commit per request would
            # cost more than the request. At a trickle a commit goes at once; when they
            # come fast, at most one per COMMIT_SPACING_S, taking all that has arrived.
            wait = last_commit + COMMIT_SPACING_S - time.monotonic()
            await asyncio.sleep(max(wait, 0.0))
            while not self._outbox.empty() and len(entries) < COMMIT_ROWS:
                entries.append(self._outbox.get_nowait())
            finished = entries[-1] is None
            sending: list[tuple[int, int, int]] = []
            waiting: list[asyncio.Future[None]] = []
            results: list[RowResult] = []
            unsent: list[int] = []
            for entry in entries:
                if isinstance(entry, Sending):
                    sending.extend(_sending(entry.work))
                    waiting.append(entry.recorded)
                elif isinstance(entry, NotSent):
                    unsent.extend(entry.work.rows)
                elif isinstance(entry, Outcome):
                    results.extend(self._results(entry))
                elif isinstance(entry, RowResult):
                    results.append(entry)
            if sending or results or unsent:
                # In the loop, not a thread: a WAL append without fsync takes ~40 us,
                # less than the hop to a thread and back. The fsync is in checkpoint().
                self.journal.write(sending=sending, results=results, unsent=unsent)
                last_commit = time.monotonic()
                commits += 1
                if commits % CHECKPOINT_COMMITS == 0 and (
                    checkpointing is None or checkpointing.done()
                ):
                    checkpointing = tg.create_task(asyncio.to_thread(self.journal.checkpoint))
            for future in waiting:
                future.set_result(None)
            self._count(results)

    def _results(self, outcome: Outcome) -> list[RowResult]:
        """The outcome's rows, and the rows that sent nothing and wait for their answers."""
        answers = outcome.answers
        if answers is not None and any(a.data is not None for a in answers):
            outcome.answers = self._save_files(outcome.work, answers)
        everyone: list[RowResult] = []
        for result in to_results(outcome, self.plan.pricer):
            result = redact_result(result, self.plan.api_key)
            digest = result.request_hash or 0
            followers = self._leaders.pop(digest, [])
            if result.status == "ok" and digest:
                self._recent[digest] = result
                if len(self._recent) > RECENT_ANSWERS:
                    self._recent.popitem(last=False)
            everyone.append(result)
            everyone.extend(_shared(result, row) for row in followers)
        return everyone

    def _save_files(self, work: Work, answers: list[Answer]) -> list[Answer]:
        """Write the files answers carry (generated images) beside the output.

        The answer's text becomes the file's path; the file is on disk before the
        result that names it is committed.
        """
        saved = []
        for row, answer in zip(work.rows, answers, strict=True):
            if answer.data is None:
                saved.append(answer)
                continue
            suffix = _safe_suffix(str(answer.extra.get("file_suffix") or ".bin"))
            path = self.plan.files_dir / f"{row}{suffix}"
            write_bytes_atomic(path, answer.data)
            saved.append(dataclasses.replace(answer, text=str(path), data=None))
        return saved

    def _count(self, results: list[RowResult]) -> None:
        c = self.counters
        for r in results:
            if r.status == "ok":
                c.ok += 1
            else:
                c.failed += 1
            c.prompt_tokens += r.prompt_tokens or 0
            c.completion_tokens += r.completion_tokens or 0
            c.cost_usd += r.cost_usd or 0.0
            self.shared += r.attempts == 0 and r.request_id is not None
        max_cost = self.plan.job.limits.max_cost
        if max_cost is not None and c.cost_usd >= max_cost and self.dispatcher is not None:
            self.dispatcher.stop(
                BudgetReached(f"spent ${c.cost_usd:.4f}, the budget is ${max_cost:.4f}")
            )


class _ToolRounds:
    """The tool loop: run a tool-calling answer's calls, send the results back."""

    def __init__(self, runner: Runner, tools: ToolRunner) -> None:
        self._runner = runner
        self._tools = tools
        self._endpoint: Endpoint = runner.plan.endpoint
        self.max_rounds = runner.plan.job.request.max_tool_rounds

    def next_work(self, work: Work, answer: Answer) -> tuple[Work, list[dict[str, Any]]]:
        """The row's next request, and the calls run with their results (in a thread:
        the functions may block)."""
        calls = list(answer.extra.get("tool_calls") or ())
        results = self._tools.call_all(calls)
        payload = self._endpoint.follow_up(work.payload, answer, results)
        request = self._runner._request([payload])
        # The last prompt, plus the model's message with its calls and a message per
        # result. Not the body's length: it carries images as base64, not counted so.
        count = self._endpoint.count
        added = count(answer.text or "") + 4 + sum(count(c["name"] + c["arguments"]) for c in calls)
        added += sum(count(str(r["content"])) + 4 for r in results)
        prompt = work.weights[0] + added
        out = self._endpoint.max_output_tokens()
        ran = [{**call, "result": r["content"]} for call, r in zip(calls, results, strict=True)]
        following = dataclasses.replace(
            work, request=request, tokens=prompt + out, weights=(prompt,), payload=payload
        )
        return following, ran


def _sending(work: Work) -> list[tuple[int, int, int]]:
    """The journal's `sending` records of a request: (row, hash, tokens it may cost)."""
    if len(work.rows) == 1:
        return [(work.rows[0], work.digests[0], work.tokens)]
    out = (work.tokens - sum(work.weights)) // len(work.rows)
    return [
        (row, digest, weight + out)
        for row, digest, weight in zip(work.rows, work.digests, work.weights, strict=True)
    ]


#: Stands for the request of a row that a batching endpoint has yet to pack.
_UNSENT = HttpRequest("POST", "", {}, b"")


def _digest(body: bytes) -> int:
    """64 bits of the body's sha256: a collision is a 1 in 10^19 chance per pair."""
    return int.from_bytes(hashlib.sha256(body).digest()[:8], "big", signed=True)


def _shared(result: RowResult, row: int) -> RowResult:
    """An identical request's answer for another row: not sent, so not billed again."""
    return dataclasses.replace(result, row=row, attempts=0, cost_usd=0.0, latency_ms=None)


async def execute(plan: Plan, notify: Callable[[str], None] = lambda _: None) -> Report:
    """Run the plan: send what is not done yet, then write the output and the summary."""
    started = time.time()
    if plan.key_problem is not None:
        raise JobError(plan.key_problem)
    check_disk(plan)
    recorded = recorded_output(plan.journal_path, plan.output)  # before --fresh discards it
    journal = Journal.open(
        plan.journal_path, fingerprint(plan), fresh=plan.options.fresh, job=plan.job.name
    )
    try:
        if journal.set_aside:
            notify(journal.set_aside)
        check_replaceable(plan.output, recorded)
        budget = _check_budget(plan, journal)  # before the run is on record as started
        for path in (plan.output, plan.summary_path):
            remove_leftovers(path.parent, path.name)
        remove_leftovers(plan.files_dir)
        journal.set_meta(
            last_started=str(started),
            last_finished="",
            last_exit="",
            input=str(plan.source.path),
            rows=str(plan.rows),
        )
        earlier = journal.totals()
        resume = _resume_note(plan, journal, earlier.ok + earlier.failed)
        if resume:
            notify(resume)
        if budget:
            notify(budget)
        async with _server(plan) as base_url:
            runner = Runner(plan, journal, base_url, earlier)
            dispatcher = await _run_with_signals(runner, plan.job, notify)
        journal.set_meta(**{OUTPUT_META: pending_record(plan.output)})
        try:
            summary = await asyncio.to_thread(_finish, plan, journal, runner, started)
        except OutputError as exc:
            raise OutputError(_kept_note(plan, exc)) from None
        journal.set_meta(**{OUTPUT_META: output_record(plan.output)})
        if summary["rows_without_usage"]:
            notify(
                f"warning: {_plural(summary['rows_without_usage'], 'row')} answered without "
                "`usage`: their cost is unknown (cost_usd is empty), is not in the totals, "
                "and --max-cost cannot count it"
            )
        report = _report(plan, dispatcher, summary)
        journal.set_meta(last_finished=str(time.time()), last_exit=str(report.exit_code))
    finally:
        journal.close()
    return report


def _kept_note(plan: Plan, exc: OutputError) -> str:
    """Writing failed after sending: the answers are safe, and how to write them out."""
    return (
        f"{exc}. Every answer is kept in the checkpoint {plan.journal_path}: to write the "
        "output, run the same command again once that is fixed, or add --output "
        f"OTHER{plan.output.suffix} --journal {plan.journal_path} (nothing is sent again)"
    )


def _report(plan: Plan, dispatcher: Dispatcher, summary: dict[str, Any]) -> Report:
    reason = dispatcher.stop_reason
    if reason is not None:
        return Report(reason.exit_code, redact(str(reason), plan.api_key), summary)
    failed_share = summary["failed"] / max(plan.rows, 1)
    if summary["failed"] and failed_share > plan.job.limits.max_error_rate:
        return Report(1, f"{summary['failed']} row(s) failed; see `error` in the output", summary)
    return Report(0, None, summary)


def _resume_note(plan: Plan, journal: Journal, done: int) -> str | None:
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


def _check_budget(plan: Plan, journal: Journal) -> str | None:
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
    left = f"the {_plural(e.rows, 'row')} left to send"
    if e.cost_low > budget:
        raise BudgetTooSmall(
            f"the budget (--max-cost or [limits] max_cost) {_usd(budget)} is below what the "
            f"prompts alone cost: {_usd(e.cost_low)} for {left} (up to {_usd(e.cost_high)} "
            f"with every answer at max_tokens); raise it to at least {_usd(e.cost_low)}, or "
            "send fewer rows with --limit. Nothing was sent"
        )
    # A row costs its prompt plus an answer of 0 to max_tokens tokens.
    fewest = int(e.rows * budget / e.cost_high)
    most = min(e.rows, int(e.rows * budget / e.cost_low)) if e.cost_low else e.rows
    return (
        f"the budget {_usd(budget)} is below the worst case for {left} "
        f"({_usd(e.cost_low)} to {_usd(e.cost_high)}, as answers run short or to max_tokens): "
        f"it covers about {fewest:,} to {most:,} rows, and the run stops when it is spent "
        "(exit 3; run again with a larger --max-cost to go on)"
    )


def _usd(amount: float) -> str:
    """Dollars to four places, or to three significant digits below a cent."""
    if amount == 0 or amount >= 0.01:
        return f"${amount:,.4f}"
    return f"${amount:.{2 - math.floor(math.log10(amount))}f}"


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def check_disk(plan: Plan) -> None:
    """Stop before spending if the output or the checkpoint cannot be written."""
    for directory in {plan.output.parent, plan.journal_path.parent}:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / f".pipeline-probe-{time.monotonic_ns()}"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as exc:
            raise OutputRefused(
                f"cannot write to {directory} ({exc.strerror or exc}): choose another "
                "--output (or --journal) or fix the folder's permissions"
            ) from None
        free = shutil.disk_usage(directory).free
        need = MIN_FREE_BYTES + plan.rows * BYTES_PER_ROW
        if free < need:
            raise OutputRefused(
                f"only {free / 2**20:,.0f} MiB free on {directory}; the run needs at least "
                f"{need / 2**20:,.0f} MiB. Free some space or choose another --output / --journal"
            )


@contextlib.asynccontextmanager
async def _server(plan: Plan) -> AsyncIterator[str]:
    """The base URL to send to: the job's, or an in-process simulator's with --simulate."""
    if plan.base_url is not None:
        yield plan.base_url
        return
    from pipeline.simulator import SimConfig, Simulator

    limits = plan.job.limits
    config = SimConfig(rpm=limits.rpm, tpm=limits.tpm, latency_ms=20, track_bodies=False)
    async with Simulator(config) as url:
        yield url.rstrip("/")


async def _run_with_signals(runner: Runner, job: Job, notify: Callable[[str], None]) -> Dispatcher:
    """SIGINT/SIGTERM: stop taking rows and drain; a second signal exits at once
    (signals.py), and DRAIN_S cuts the drain short."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    drain: list[asyncio.TimerHandle] = []

    def on_drain_timeout(sig: signal.Signals) -> None:
        assert runner.dispatcher is not None
        abandoned = runner.abandon()
        runner.dispatcher.stop_reason = stopped(
            sig,
            f"interrupted: {_plural(abandoned, 'request')} still in flight after "
            f"{DRAIN_S:g} s {'was' if abandoned == 1 else 'were'} abandoned (the server may "
            "bill them; a resume sends them again); finished rows are kept and the output "
            "is written",
        )

    def on_signal(sig: signal.Signals) -> None:
        if runner.dispatcher is None:
            task.cancel()
            return
        # A run already halting (a halt, the budget) keeps its reason, the one to act on;
        # the first signal still drains and writes the output, like any first signal.
        stop = stopped(sig, "interrupted: finished rows are kept; run again to resume")
        runner.dispatcher.stop(stop)
        # The drain's end abandons the requests still out and writes the output; only
        # a second signal stops without it.
        drain.append(loop.call_later(DRAIN_S, on_drain_timeout, sig))
        notify(
            f"stopping: requests in flight have up to {DRAIN_S:.0f} s to finish, then the "
            "output is written; interrupt again to stop at once"
        )

    transport = AiohttpTransport(
        timeout_s=job.request.timeout_s,
        connect_timeout_s=job.request.connect_timeout_s,
        max_body_bytes=runner.plan.endpoint.max_response_bytes,
        proxy=env_proxy(runner.url),
    )
    with Signals(loop, on_signal) as signals:
        try:
            async with transport:
                return await runner.run(transport)
        except asyncio.CancelledError:
            raise stopped(
                signals.first, "stopped before the drain ended; finished rows are kept"
            ) from None
        finally:
            for handle in drain:
                handle.cancel()


def _finish(plan: Plan, journal: Journal, runner: Runner, started: float) -> dict[str, Any]:
    job, c = plan.job, runner.counters
    assert runner.dispatcher is not None
    stats = runner.dispatcher.stats
    parts = fingerprint(plan)
    provenance = {
        "job": job.name,
        "job_fingerprint": digest(parts),
        "template_hash": parts["template"],
        "price_source": plan.pricer.source,
        "model": job.request.model,
        "version": __version__,
    }
    written = write_output(
        plan.output,
        limited(plan.source.batches(BATCH_ROWS), plan.options.limit),
        journal,
        shape=plan.shape,
        prefix=job.output.prefix,
        metadata={f"pipeline.{k}": str(v) for k, v in provenance.items()},
    )
    totals = journal.totals()
    summary: dict[str, Any] = {
        **provenance,
        "output": str(plan.output),
        "journal": str(plan.journal_path),
        "rows": written,
        "ok": totals.ok,
        "failed": totals.failed,
        "pending": written - totals.ok - totals.failed,
        "resumed": c.resumed,
        "shared_answers": runner.shared,
        "cut_off_by_max_tokens": totals.cut_off,
        "rows_without_usage": totals.without_usage,
        "requests_sent": stats.sent,
        "retries": stats.retries,
        "rate_limited": stats.rate_limited,
        "maybe_billed_retries": stats.maybe_billed_retries,
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        "cost_usd": round(totals.cost_usd, 8),
        "cost_this_run_usd": round(c.cost_usd, 8),
        "started": started,
        "duration_s": round(time.time() - started, 3),
        "stop_reason": redact(str(runner.dispatcher.stop_reason or ""), plan.api_key) or None,
    }
    write_bytes_atomic(plan.summary_path, orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    return summary


def _safe_suffix(suffix: str) -> str:
    """A file suffix the server chose (an image's format), kept only if it is plainly
    one: "png/../../x" must not choose where the file goes."""
    return suffix if _SUFFIX.fullmatch(suffix) else ".bin"


_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,10}")
