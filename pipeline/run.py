"""Wires the stages for one run: check everything, send, commit, write, summarise.

    plan = make_plan(load_job(path), RunOptions(simulate=True))   # nothing sent yet
    report = asyncio.run(execute(plan))                           # the run itself
    report.exit_code

`make_plan` is everything that can be checked without sending a request (the job, the
input, the templates, the price, the key); `pipeline validate` stops there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import polars as pl

from pipeline import __version__
from pipeline.cost import Pricer, make_pricer
from pipeline.dispatch import Dispatcher, Outcome, RetryPolicy, Work
from pipeline.endpoints import Endpoint, HttpRequest, Usage, auth_headers, make_endpoint
from pipeline.errors import (
    BudgetReached,
    Interrupted,
    JobError,
    PipelineError,
    RowRejected,
    SpecError,
)
from pipeline.journal import Journal
from pipeline.limits import Limiter
from pipeline.output import output_format, result_columns, write_bytes_atomic, write_output
from pipeline.parse import (
    AnswerCheck,
    RowResult,
    fields_dtype,
    strict_schema_problem,
    to_result,
)
from pipeline.progress import Counters, Display
from pipeline.render import NullValue, Renderer, RenderFailed, estimate_tokens
from pipeline.source import ROW_INDEX, Source, open_source
from pipeline.spec import OPENAI_BASE_URL, Job
from pipeline.transport import AiohttpTransport

#: Rows read, rendered and queued at a time: bounds memory whatever the input's size.
BATCH_ROWS = 2_000
#: Outcomes committed in one transaction at most; a commit takes whatever is waiting.
COMMIT_ROWS = 2_000
#: After SIGINT/SIGTERM, how long in-flight requests may take to finish.
DRAIN_S = 30.0


@dataclass(frozen=True)
class RunOptions:
    """Command-line overrides; None means 'as the job file says'."""

    input: Path | None = None
    output: Path | None = None
    base_url: str | None = None
    model: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    limit: int | None = None
    max_cost: float | None = None
    simulate: bool = False
    fresh: bool = False
    #: Send again the rows an earlier run recorded as failed.
    retry_failed: bool = False
    journal: Path | None = None


@dataclass(frozen=True)
class Plan:
    job: Job
    source: Source
    renderer: Renderer
    endpoint: Endpoint
    check: AnswerCheck
    fields: pl.Struct | None
    pricer: Pricer
    #: None with --simulate: the simulator's address is known once it listens.
    base_url: str | None
    api_key: str | None = field(repr=False)
    #: Set when no key is at hand for a server that needs one: `run` refuses to start.
    key_problem: str | None
    rows: int
    options: RunOptions

    @property
    def output(self) -> Path:
        return self.job.output_path

    @property
    def journal_path(self) -> Path:
        if self.options.journal is not None:
            return self.options.journal
        return self.output.with_name(f"{self.output.stem}.journal.sqlite")

    @property
    def summary_path(self) -> Path:
        return self.output.with_name(f"{self.output.stem}.summary.json")


def apply_options(job: Job, opts: RunOptions) -> Job:
    """Flags win over the job file."""
    req: dict[str, Any] = {"model": opts.model, "base_url": opts.base_url}
    lim: dict[str, Any] = {
        "rpm": opts.rpm,
        "tpm": opts.tpm,
        "concurrency": opts.concurrency,
        "max_cost": opts.max_cost,
    }
    updates: dict[str, Any] = {
        "request": job.request.model_copy(update={k: v for k, v in req.items() if v}),
        "limits": job.limits.model_copy(update={k: v for k, v in lim.items() if v}),
    }
    if opts.input is not None:
        updates["input"] = job.input.model_copy(update={"path": opts.input.resolve()})
    if opts.output is not None:
        updates["output"] = job.output.model_copy(update={"path": opts.output.resolve()})
    return job.model_copy(update=updates)


def make_plan(job: Job, opts: RunOptions, env: Mapping[str, str] = os.environ) -> Plan:
    """Check everything that can be checked before sending; raise JobError if anything is off."""
    job = apply_options(job, opts)
    source = open_source(job.input.path, format=job.input.format, key=job.input.key)
    renderer = Renderer(job.template, source.columns)
    schema = job.json_schema()
    fields = _fields(job, schema)
    _check_collisions(source.columns, result_columns(fields, job.output.prefix))
    output_format(job.output_path)
    pricer = make_pricer(job.request.model, job.price)
    base_url, api_key = _target(job, opts, env)
    rows = source.count()
    return Plan(
        job=job,
        source=source,
        renderer=renderer,
        endpoint=make_endpoint(job.request, base_url or "", schema),
        check=AnswerCheck(schema, json_object=job.request.response_format == "json_object"),
        fields=fields,
        pricer=pricer,
        base_url=base_url,
        api_key=api_key,
        key_problem=_key_problem(job, base_url, api_key),
        rows=min(rows, opts.limit) if opts.limit is not None else rows,
        options=opts,
    )


def _fields(job: Job, schema: dict[str, Any] | None) -> pl.Struct | None:
    """The JSON answer's typed columns; a schema the API would refuse is a job error."""
    if schema is None:
        return None
    spec = job.request.json_schema
    if spec is not None and spec.strict and (problem := strict_schema_problem(schema)):
        raise SpecError(
            f"the JSON schema breaks OpenAI's strict mode rules at {problem}; "
            "or set strict = false in [request.json_schema]"
        )
    try:
        return fields_dtype(schema)
    except ValueError as exc:
        raise SpecError(f"the JSON schema: {exc}") from None


def _target(job: Job, opts: RunOptions, env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """Base URL and key: flag > environment > job file. No key is needed offline."""
    if opts.simulate:
        return None, None
    base_url = (
        opts.base_url or env.get("OPENAI_BASE_URL") or job.request.base_url or OPENAI_BASE_URL
    ).rstrip("/")
    if urlsplit(base_url).scheme not in ("http", "https"):
        raise SpecError(f"base URL {base_url!r} must start with http:// or https://")
    return base_url, env.get(job.request.api_key_env) or None


def _key_problem(job: Job, base_url: str | None, api_key: str | None) -> str | None:
    """Why the run cannot start for want of a key, or None. api.openai.com needs one."""
    if api_key is not None or base_url is None or urlsplit(base_url).hostname != "api.openai.com":
        return None
    var = job.request.api_key_env
    return (
        f"no API key: set {var} (export {var}=...), or point --base-url at an "
        "OpenAI-compatible server, or try the job offline with --simulate"
    )


def _check_collisions(columns: tuple[str, ...], results: list[str]) -> None:
    clash = [c for c in results if c in columns]
    if clash:
        raise JobError(
            f"the input already has column(s) {', '.join(clash)}, which the output adds as "
            'result columns: set [output] prefix = "llm_" (any prefix) in the job'
        )


def fingerprint(plan: Plan) -> dict[str, str]:
    """What the results depend on, the input file included (by path, size and mtime)."""
    stat = plan.source.path.stat()
    parts = plan.job.fingerprint()
    parts["input"] = f"{plan.source.path}:{stat.st_size}:{stat.st_mtime_ns}"
    return parts


def limited(batches: Iterator[pl.DataFrame], limit: int | None) -> Iterator[pl.DataFrame]:
    """The batches up to row `limit` (all of them when None)."""
    for batch in batches:
        if limit is not None:
            batch = batch.filter(pl.col(ROW_INDEX) < limit)
            if batch.height == 0:
                return
        yield batch


@dataclass(frozen=True)
class Estimate:
    rows: int
    #: Rows that would fail before sending (a null the job forbids, a template error).
    rejected: int
    prompt_tokens: int
    #: The most completion tokens the rows can use: rows x max_tokens.
    max_completion_tokens: int
    #: Cost of the prompts alone, and with every answer at max_tokens.
    cost_low: float
    cost_high: float
    #: Minutes the rate limits allow it to take at best; None with no limits set.
    minutes: float | None


def estimate(plan: Plan) -> Estimate:
    """Render every row and add up what the run would cost. Sends nothing."""
    rows = rejected = prompt = 0
    for batch in limited(plan.source.batches(BATCH_ROWS), plan.options.limit):
        for row in batch.iter_rows(named=True):
            try:
                prompt += estimate_tokens(plan.renderer.messages(row))
                rows += 1
            except (NullValue, RenderFailed):
                rejected += 1
    completion = rows * plan.endpoint.max_output_tokens()
    limits = plan.job.limits
    bounds = [rows / limits.rpm if limits.rpm else 0.0]
    bounds.append((prompt + completion) / limits.tpm if limits.tpm else 0.0)
    return Estimate(
        rows=rows,
        rejected=rejected,
        prompt_tokens=prompt,
        max_completion_tokens=completion,
        cost_low=plan.pricer.cost(Usage(prompt_tokens=prompt)),
        cost_high=plan.pricer.cost(Usage(prompt_tokens=prompt, completion_tokens=completion)),
        minutes=max(bounds) if limits.rpm or limits.tpm else None,
    )


@dataclass
class Report:
    exit_code: int
    message: str | None
    summary: dict[str, Any]


class Runner:
    """One run's moving parts: a producer, the workers and the journal writer."""

    def __init__(self, plan: Plan, journal: Journal, base_url: str, api_key: str | None):
        self.plan = plan
        self.journal = journal
        job = plan.job
        self.url = base_url + plan.endpoint.path
        self.headers = auth_headers(api_key)
        self.limiter = Limiter(rpm=job.limits.rpm, tpm=job.limits.tpm)
        totals = journal.totals()
        resumed = totals.ok if plan.options.retry_failed else totals.ok + totals.failed
        self.counters = Counters(total=plan.rows, resumed=resumed)
        self.dispatcher: Dispatcher | None = None

    async def run(self, transport: AiohttpTransport) -> Dispatcher:
        limits = self.plan.job.limits
        policy = RetryPolicy(limits.max_attempts, limits.backoff_s, limits.backoff_max_s)
        self.dispatcher = dispatcher = Dispatcher(
            transport, self.plan.endpoint, self.limiter, policy, self.plan.check
        )
        # Bounded queues: a full inbox blocks the producer (backpressure), so memory
        # holds a batch and a few requests per worker, never the whole input.
        inbox: asyncio.Queue[Work | None] = asyncio.Queue(maxsize=limits.concurrency * 2)
        outbox: asyncio.Queue[Outcome | None] = asyncio.Queue(maxsize=COMMIT_ROWS)
        try:
            async with Display(self.counters, dispatcher.stats), asyncio.TaskGroup() as tg:
                writer = tg.create_task(self._write(outbox))
                producer = tg.create_task(self._produce(inbox, outbox, limits.concurrency))
                workers = [
                    tg.create_task(dispatcher.worker(inbox, outbox))
                    for _ in range(limits.concurrency)
                ]
                await producer
                await asyncio.gather(*workers)
                await outbox.put(None)
                await writer
        except* PipelineError as group:
            # A stage failed for the whole run (the disk, say): report that one, plainly.
            raise group.exceptions[0] from None
        return dispatcher

    async def _produce(
        self, inbox: asyncio.Queue[Work | None], outbox: asyncio.Queue[Outcome | None], workers: int
    ) -> None:
        assert self.dispatcher is not None
        batches = limited(self.plan.source.batches(BATCH_ROWS), self.plan.options.limit)
        while not self.dispatcher.stopped:
            batch = await asyncio.to_thread(next, batches, None)
            if batch is None:
                break
            works, rejected = await asyncio.to_thread(self._prepare, batch)
            for outcome in rejected:
                await outbox.put(outcome)
            for work in works:
                if self.dispatcher.stopped:
                    break
                await inbox.put(work)
        for _ in range(workers):
            await inbox.put(None)

    def _prepare(self, batch: pl.DataFrame) -> tuple[list[Work], list[Outcome]]:
        """Render a batch's rows not yet done into requests (runs in a thread)."""
        rows = batch.get_column(ROW_INDEX)
        done = self.journal.done_rows(
            int(rows.min()),  # type: ignore[arg-type]
            int(rows.max()),  # type: ignore[arg-type]
            failed_too=not self.plan.options.retry_failed,
        )
        renderer, endpoint = self.plan.renderer, self.plan.endpoint
        extra_tokens = endpoint.max_output_tokens()
        works: list[Work] = []
        rejected: list[Outcome] = []
        for row in batch.iter_rows(named=True):
            index = row[ROW_INDEX]
            if index in done:
                continue
            try:
                messages = renderer.messages(row)
            except (NullValue, RenderFailed) as exc:
                rejected.append(Outcome(index, None, RowRejected(str(exc)), attempts=0))
                continue
            body = orjson.dumps(endpoint.body(messages))
            request = HttpRequest("POST", self.url, self.headers, body)
            works.append(Work(index, request, estimate_tokens(messages) + extra_tokens))
        return works, rejected

    async def _write(self, outbox: asyncio.Queue[Outcome | None]) -> None:
        """The journal's one writer: commits whatever has arrived, in one transaction."""
        finished = False
        while not finished:
            outcomes = [await outbox.get()]
            while not outbox.empty() and len(outcomes) < COMMIT_ROWS:
                outcomes.append(outbox.get_nowait())
            finished = outcomes[-1] is None
            results = [self._result(o) for o in outcomes if o is not None]
            if results:
                await asyncio.to_thread(self.journal.write, results)
                self._count(results)

    def _result(self, outcome: Outcome) -> RowResult:
        result = to_result(outcome, self.plan.pricer)
        if result.error is not None:
            result.error = redact(result.error, self.plan.api_key)
        return result

    def _count(self, results: list[RowResult]) -> None:
        c = self.counters
        for r in results:
            if r.status == "ok":
                c.ok += 1
            else:
                c.failed += 1
            c.cut_off += r.finish_reason == "length"
            c.prompt_tokens += r.prompt_tokens or 0
            c.completion_tokens += r.completion_tokens or 0
            c.cost_usd += r.cost_usd or 0.0
        max_cost = self.plan.job.limits.max_cost
        if max_cost is not None and c.cost_usd >= max_cost and self.dispatcher is not None:
            self.dispatcher.stop(
                BudgetReached(f"spent ${c.cost_usd:.4f}, the budget is ${max_cost:.4f}")
            )


async def execute(plan: Plan) -> Report:
    """Run the plan: send what is not done yet, then write the output and the summary."""
    started = time.time()
    if plan.key_problem is not None:
        raise JobError(plan.key_problem)
    journal = Journal.open(plan.journal_path, fingerprint(plan), fresh=plan.options.fresh)
    try:
        async with _server(plan) as base_url:
            runner = Runner(plan, journal, base_url, plan.api_key)
            dispatcher = await _run_with_signals(runner, plan.job)
        summary = await asyncio.to_thread(_finish, plan, journal, runner, started)
    finally:
        journal.close()
    reason = dispatcher.stop_reason
    if reason is not None:
        return Report(reason.exit_code, redact(str(reason), plan.api_key), summary)
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
    from pipeline.simulator import SimConfig, Simulator

    limits = plan.job.limits
    async with Simulator(SimConfig(rpm=limits.rpm, tpm=limits.tpm, latency_ms=20)) as url:
        yield url.rstrip("/")


async def _run_with_signals(runner: Runner, job: Job) -> Dispatcher:
    """SIGINT/SIGTERM: stop taking rows and drain; a second signal (or DRAIN_S) cuts short."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal() -> None:
        if runner.dispatcher is None or runner.dispatcher.stopped:
            task.cancel()
            return
        stop = Interrupted("interrupted: finished rows are kept; run again to resume")
        runner.dispatcher.stop(stop)
        loop.call_later(DRAIN_S, task.cancel)

    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    transport = AiohttpTransport(
        timeout_s=job.request.timeout_s,
        connect_timeout_s=job.request.connect_timeout_s,
    )
    try:
        async with transport:
            return await runner.run(transport)
    except asyncio.CancelledError:
        raise Interrupted("interrupted twice: stopped at once; finished rows are kept") from None
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def _finish(plan: Plan, journal: Journal, runner: Runner, started: float) -> dict[str, Any]:
    job, c = plan.job, runner.counters
    assert runner.dispatcher is not None
    stats = runner.dispatcher.stats
    parts = fingerprint(plan)
    provenance = {
        "job": job.name,
        "job_fingerprint": _short(parts),
        "template_hash": parts["template"],
        "price_source": plan.pricer.source,
        "model": job.request.model,
        "version": __version__,
    }
    written = write_output(
        plan.output,
        limited(plan.source.batches(BATCH_ROWS), plan.options.limit),
        journal,
        fields=plan.fields,
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
        "cut_off_by_max_tokens": c.cut_off,
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


def redact(text: str, secret: str | None) -> str:
    """Servers and proxies may echo a key back in an error body; it goes no further."""
    if secret and len(secret) >= 8:
        return text.replace(secret, "[redacted]")
    return text


def _short(parts: dict[str, str]) -> str:
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
