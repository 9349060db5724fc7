"""One run: wire the stages, send what is not done yet, write the output and the summary.

    plan = make_plan(load_job(path), RunOptions(simulate=True))   # plan.py: nothing sent
    report = asyncio.run(execute(plan, notify=print))             # the run itself
    report.exit_code
    report, table = asyncio.run(execute_frame(make_plan(job, opts, frame=df)))  # in memory

(The module is `runner`, not `run`: `pipeline.run` is the public function, api.py.)

The stages, each in its own file, in the order a row meets them:

    source.py ─> prepare.py ─────────> ENGINE ──────────> journal/writer.py ─> output.py
     (batches)   render, dedupe.py,    sends, one         group commits         Parquet/CSV
                 build the request     Outcome per row    (parse, cost, files)

This module only wires them: it opens the journal, builds the stages, runs the writer
and the engine in one TaskGroup under the signal handlers, then writes the output and
the summary and picks the exit code.

Engines (DESIGN.md, "Engines: how requests leave"): the stages before and after sending
are shared; what sends is an engine, chosen per run in `_engine`. An engine takes the
run's requests (`Requests.stream()`, an async iterator of Work, in input order), puts
one Outcome per row into the journal's writer (after `writer.sending` for each request
that leaves), and honours the run's `Stop`; it offers `stats` for progress and the
summary, and `abandon()` for a drain that ran out of time. `online.Online` (workers ->
tool loop -> dispatcher's retry loop -> transport) is the one there is; batch mode
(rows packed into provider batch files, polled, collected) and a cluster engine (shards
on Ray workers, each with the online engine) plug in beside it, at `_engine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import polars as pl

from pipeline import __version__
from pipeline.bounds import ESTIMATE_BOUND
from pipeline.budget import Spent, check_budget, resume_note
from pipeline.dedupe import Dedupe
from pipeline.dispatch import DispatchStats
from pipeline.errors import JobError, OutputError, PipelineError
from pipeline.garbage import fewer_collections
from pipeline.journal import Journal, Totals
from pipeline.journal.writer import Writer
from pipeline.online import Online
from pipeline.output import (
    OUTPUT_META,
    check_disk,
    check_replaceable,
    output_frame,
    output_record,
    pending_record,
    recorded_output,
    remove_leftovers,
    save_files,
    write_bytes_atomic,
    write_output,
)
from pipeline.parse import to_results
from pipeline.plan import BATCH_ROWS, INPUT_PARTS, Plan, fingerprint, for_sending, limited
from pipeline.preflight import check_server
from pipeline.prepare import RequestBuilder, Requests
from pipeline.progress import Counters, Display, plural
from pipeline.records import Outcome, RowResult, Stop, Work
from pipeline.redact import redact, redact_result
from pipeline.reuse import reuse
from pipeline.signals import draining
from pipeline.spec import digest
from pipeline.transport import AiohttpTransport, Transport, env_proxy


@dataclass
class Report:
    exit_code: int
    message: str | None
    summary: dict[str, Any]
    #: Why the run stopped early (a halt, the budget, a signal), if it did.
    stopped: PipelineError | None = None


class Engine(Protocol):
    """How requests leave (see the module's docstring)."""

    @property
    def stats(self) -> DispatchStats: ...

    async def run(self, works: AsyncIterator[Work]) -> None: ...

    def abandon(self) -> int: ...


@dataclass
class Sent:
    """What the sending part of a run leaves for the summary and the exit code."""

    counters: Counters
    stats: DispatchStats
    stop: Stop


def _engine(
    plan: Plan, transport: Transport, build: RequestBuilder, writer: Writer, stop: Stop
) -> Engine:
    """The engine that sends this run's requests: where batch mode and a cluster plug in."""
    return Online(plan, transport, build, writer=writer, stop=stop)


@dataclass(frozen=True)
class Host:
    """How a run meets the program it runs in: the command's ways, or a library call's."""

    #: None: rich's live bar on a terminal, a plain line every few seconds elsewhere;
    #: True: rich's bar wherever (a notebook draws it); False: no display at all.
    progress: bool | None = None
    #: What a second SIGINT/SIGTERM calls (signals.draining): the command exits at once.
    exit_now: Callable[[int], None] = os._exit


#: The command's: a bar on a terminal, lines in CI, and a second signal ends the process.
COMMAND = Host()


async def execute(
    plan: Plan, notify: Callable[[str], None] = lambda _: None, host: Host = COMMAND
) -> Report:
    """Run the plan: send what is not done yet, then write the output and the summary."""
    started = time.time()
    _check_key(plan)
    check_disk({plan.output.parent, plan.journal_path.parent}, plan.rows)
    recorded = recorded_output(plan.journal_path, plan.output)  # before --fresh discards it
    journal = await _open_journal(plan, notify)
    try:
        check_replaceable(plan.output, recorded)
        budget = check_budget(plan, journal)  # before the run is on record as started
        for path in (plan.output, plan.summary_path):
            remove_leftovers(path.parent, path.name)
        remove_leftovers(plan.files_dir)
        sent = await _send(plan, journal, started, budget, notify, host)
        journal.set_meta(**{OUTPUT_META: pending_record(plan.output)})
        try:
            summary = await asyncio.to_thread(_finish, plan, journal, sent, started)
        except OutputError as exc:
            raise OutputError(_kept_note(plan, exc)) from None
        journal.set_meta(**{OUTPUT_META: output_record(plan.output)})
        report = _ended(plan, journal, sent, summary, notify)
    finally:
        journal.close()
    return report


async def execute_frame(
    plan: Plan, notify: Callable[[str], None] = lambda _: None, host: Host = COMMAND
) -> tuple[Report, pl.DataFrame]:
    """Run a plan over a DataFrame (`make_plan(..., frame=...)`): send what is not done
    yet, and return the output as a DataFrame, with the summary; no file is written but
    the checkpoint (and the files answers carry, images, beside the job's output)."""
    started = time.time()
    _check_key(plan)
    check_disk({plan.journal_path.parent}, plan.rows)
    journal = await _open_journal(plan, notify)
    try:
        budget = check_budget(plan, journal)
        remove_leftovers(plan.files_dir)
        sent = await _send(plan, journal, started, budget, notify, host)
        frame = await asyncio.to_thread(_output_frame, plan, journal)
        summary = _summary(plan, journal, sent, started, output=None, rows=frame.height)
        report = _ended(plan, journal, sent, summary, notify)
    finally:
        journal.close()
    return report, frame


def _check_key(plan: Plan) -> None:
    if plan.key_problem is not None:
        raise JobError(plan.key_problem)


async def _open_journal(plan: Plan, notify: Callable[[str], None]) -> Journal:
    """The run's journal, open; when the input changed since the last run, its rows
    given the answers their requests got before (reuse.py), and the split told."""
    journal = Journal.open(
        plan.journal_path,
        fingerprint(plan),
        fresh=plan.options.fresh,
        job=plan.job.name,
        inputs=INPUT_PARTS,
    )
    try:
        if journal.set_aside:
            notify(journal.set_aside)
        if journal.reusing:
            notify((await asyncio.to_thread(reuse, plan, journal)).note())
    except BaseException:
        journal.close()
        raise
    return journal


async def _send(
    plan: Plan,
    journal: Journal,
    started: float,
    budget: str | None,
    notify: Callable[[str], None],
    host: Host,
) -> Sent:
    """The run on record as started (its number counted), its notes told, then its
    requests sent."""
    journal.set_meta(
        runs=str(_run_number(journal) + 1),
        last_started=str(started),
        last_finished="",
        last_exit="",
        input=plan.source.name,
        rows=str(plan.rows),
    )
    earlier = journal.totals()
    for note in (resume_note(plan, journal, earlier.ok + earlier.failed), budget):
        if note:
            notify(note)
    async with _server(plan) as base_url:
        with fewer_collections():
            return await send_all(plan, journal, base_url, earlier, notify, host)


def _ended(
    plan: Plan,
    journal: Journal,
    sent: Sent,
    summary: dict[str, Any],
    notify: Callable[[str], None],
) -> Report:
    """The run's warnings told, its report made, and its end on record."""
    if summary["rows_without_usage"]:
        notify(
            f"warning: {plural(summary['rows_without_usage'], 'row')} answered without "
            "`usage`: their cost is unknown (cost_usd is empty), is not in the totals, "
            "and --max-cost cannot count it"
        )
    report = _report(plan, sent.stop, summary)
    journal.set_meta(last_finished=str(time.time()), last_exit=str(report.exit_code))
    return report


async def send_all(
    plan: Plan,
    journal: Journal,
    base_url: str,
    earlier: Totals,
    notify: Callable[[str], None] = lambda _: None,
    host: Host = COMMAND,
) -> Sent:
    """The stages that send, wired: requests -> engine -> writer, in one TaskGroup."""
    plan = for_sending(plan)
    stop = Stop()
    resumed = earlier.ok if plan.options.retry_failed else earlier.ok + earlier.failed
    counters = Counters(total=plan.rows, resumed=resumed)
    spent = Spent(plan.job.limits.max_cost, stop)

    def committed(results: list[RowResult]) -> None:
        counters.add(results)
        spent(counters)

    dedupe = Dedupe(journal.answered) if plan.job.request.dedupe else None
    # An estimating run's "sending" records take the bound, not the estimate: the
    # resume note's "at most" must hold for text the estimate undercounts (CJK, code).
    bound = ESTIMATE_BOUND if plan.endpoint.exact is not None else 1
    writer = Writer(
        journal,
        collect=_collector(plan, dedupe, _run_number(journal)),
        committed=committed,
        prompt_bound=bound,
    )
    build = RequestBuilder(plan.provider, base_url, plan.api_key, plan.endpoint)
    requests = Requests(plan, journal, build, dedupe=dedupe, sink=writer, stop=stop)
    transport = AiohttpTransport(
        timeout_s=plan.job.request.timeout_s,
        connect_timeout_s=plan.job.request.connect_timeout_s,
        max_body_bytes=plan.endpoint.max_response_bytes,
        proxy=env_proxy(build.url),
    )
    engine = _engine(plan, transport, build, writer, stop)
    with draining(stop, engine.abandon, notify, host.exit_now):
        try:
            async with transport:
                # Before the first row: a server that cannot serve any halts the run here.
                halt = await check_server(
                    transport, plan.provider, base_url, build.headers, plan.endpoint
                )
                if halt is not None:
                    stop.ask(halt)
                async with _display(host, counters, engine.stats), asyncio.TaskGroup() as tg:
                    tg.create_task(writer.run())
                    await engine.run(requests.stream())
                    await writer.close()
        except* PipelineError as group:
            # A stage failed for the whole run (the disk, say): report that one, plainly,
            # however deep the TaskGroups nest it.
            while isinstance(first := group.exceptions[0], BaseExceptionGroup):
                group = first
            raise first from None
    return Sent(counters, engine.stats, stop)


def _display(
    host: Host, counters: Counters, stats: DispatchStats
) -> contextlib.AbstractAsyncContextManager[object]:
    if host.progress is False:
        return contextlib.nullcontext()
    return Display(counters, stats, live=host.progress)


def _run_number(journal: Journal) -> int:
    """The job's runs on record in its checkpoint: the one sending now is the latest."""
    return int(journal.meta("runs") or 0)


def _collector(plan: Plan, dedupe: Dedupe | None, run: int) -> Callable[[Outcome], list[RowResult]]:
    """An outcome as its rows' results, at commit time: the files its answers carry
    saved, priced, the key redacted, stamped with the time and the run, and copies for
    the rows that waited for it."""

    def collect(outcome: Outcome) -> list[RowResult]:
        answers = outcome.answers
        if answers is not None and any(a.data is not None for a in answers):
            outcome.answers = save_files(plan.files_dir, outcome.work, answers)
        stamped = to_results(outcome, plan.pricer, answered_at=time.time(), run=run)
        results = [redact_result(r, plan.api_key) for r in stamped]
        return dedupe.settle(results) if dedupe is not None else results

    return collect


def _kept_note(plan: Plan, exc: OutputError) -> str:
    """Writing failed after sending: the answers are safe, and how to write them out."""
    return (
        f"{exc}. Every answer is kept in the checkpoint {plan.journal_path}: to write the "
        "output, run the same command again once that is fixed, or add --output "
        f"OTHER{plan.output.suffix} --journal {plan.journal_path} (nothing is sent again)"
    )


def _report(plan: Plan, stop: Stop, summary: dict[str, Any]) -> Report:
    reason = stop.reason
    if reason is not None:
        return Report(reason.exit_code, redact(str(reason), plan.api_key), summary, reason)
    failed_share = summary["failed"] / max(plan.rows, 1)
    if summary["failed"] and failed_share > plan.job.limits.max_error_rate:
        return Report(1, f"{summary['failed']} row(s) failed; see `error` in the output", summary)
    return Report(0, None, summary)


@contextlib.asynccontextmanager
async def _server(plan: Plan) -> AsyncIterator[str]:
    """The base URL to send to: the job's, or an in-process simulator's with --simulate."""
    if plan.base_url is not None:
        yield plan.base_url
        return
    from pipeline.simulator import SimConfig, Simulator  # only when asked: start-up time

    limits = plan.job.limits
    config = SimConfig(rpm=limits.rpm, tpm=limits.tpm, latency_ms=20, track_bodies=False)
    async with Simulator(config) as url:
        yield url.rstrip("/")


def _finish(plan: Plan, journal: Journal, sent: Sent, started: float) -> dict[str, Any]:
    """The output and the summary written; the summary returned."""
    written = write_output(
        plan.output,
        limited(plan.source.batches(BATCH_ROWS), plan.options.limit),
        journal,
        shape=plan.shape,
        prefix=plan.job.output.prefix,
        metadata={f"pipeline.{k}": str(v) for k, v in _provenance(plan).items()},
        only_run=_run_number(journal) if plan.options.new_only else None,
    )
    summary = _summary(plan, journal, sent, started, output=str(plan.output), rows=written)
    write_bytes_atomic(plan.summary_path, orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    return summary


def _output_frame(plan: Plan, journal: Journal) -> pl.DataFrame:
    batches = limited(plan.source.batches(BATCH_ROWS), plan.options.limit)
    only_run = _run_number(journal) if plan.options.new_only else None
    return output_frame(
        batches, journal, shape=plan.shape, prefix=plan.job.output.prefix, only_run=only_run
    )


def _provenance(plan: Plan) -> dict[str, Any]:
    job, parts = plan.job, fingerprint(plan)
    return {
        "job": job.name,
        "job_fingerprint": digest(parts),
        "template_hash": parts["template"],
        "price_source": plan.pricer.source,
        "model": job.request.model,
        "version": __version__,
    }


def _summary(
    plan: Plan, journal: Journal, sent: Sent, started: float, *, output: str | None, rows: int
) -> dict[str, Any]:
    """What the command writes as `<name>.summary.json`; `output` None: a DataFrame's run."""
    c, stats = sent.counters, sent.stats
    totals = journal.totals()
    return {
        **_provenance(plan),
        "output": output,
        "journal": str(plan.journal_path),
        "rows": rows,
        "ok": totals.ok,
        "failed": totals.failed,
        "pending": rows - totals.ok - totals.failed,
        "resumed": c.resumed,
        "shared_answers": c.shared,
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
        "stop_reason": redact(str(sent.stop.reason or ""), plan.api_key) or None,
    }
