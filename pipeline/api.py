"""pipeline from Python: a DataFrame in, the same rows out with each one's answer.

    import polars as pl
    import pipeline

    frame = pl.DataFrame({"id": [1, 2], "text": ["The cat sat.", "It rained all day."]})
    out = pipeline.run_frame(frame, "jobs/summarise.toml", simulate=True)
    out = pipeline.run_frame(frame, {"request": {"model": "gpt-4o-mini"},
                                     "template": {"user": "Summarise: {{ text }}"}})
    out = await pipeline.arun_frame(frame, job, model="gpt-4.1-mini")   # in an event loop
    summary = pipeline.run("jobs/summarise.toml", rpm=500)   # what `pipeline run` does

`run_frame` returns the input columns, then the result columns, with the names, types
and order `pipeline run` writes (`status`, `error`, `response` or the JSON fields, the
usage and `cost_usd`, ...; `[output] prefix` applies). A row that failed is a row
(`status` "failed", `error`), not an exception. Overrides are the command's flags by
their Python names; `checkpoint=` is `--journal`.

How a call ends, for a task runner to act on:
- it returns: every row has a result, ok or failed (a job's `max_error_rate` does not
  raise: count `status == "failed"`, or the summary's `failed`);
- `JobError` (and its kinds: `SpecError`, `InputError`, `TemplateError`, ...): the job
  or the input is wrong; nothing was sent;
- `BudgetReached`, `Halted` (auth, quota, a server that is down), `Interrupted`: the run
  stopped early. What was answered is in the checkpoint, which the message names: the
  same call again with that checkpoint sends only the rest (a task runner's retry).

The checkpoint. `run` keeps the job's, as the command does (beside its output, or
`checkpoint=`). `run_frame` without `checkpoint=` uses a temporary one, removed when the
call returns a result and kept when the run stopped early (its path is in the message):
a DataFrame has no file to keep a checkpoint beside, and a call is a unit of work whose
result is the DataFrame. With `checkpoint=PATH` a call resumes there: rows answered by an
earlier call with the same job are not sent again, and a different DataFrame (tonight's
export) reuses the answers its rows' requests got before, sending only its new and
changed rows, as the command does for a changed input; `fresh=True` starts over.

Where it runs. The sync forms work in the main thread, in any `threading.Thread`, and
under a running event loop (Jupyter), where the run gets a private loop in a worker
thread. Only a run in the main thread installs SIGINT/SIGTERM handlers (the first drains
and raises `Interrupted`; the second raises KeyboardInterrupt, where the command would
exit at once); elsewhere signals are the host's. A KeyboardInterrupt while a sync call
waits for its worker thread cancels the run; what was committed stays in the checkpoint.

Progress: rich's bar on a terminal and in a notebook, a plain line every few seconds
elsewhere (a task's log); `progress=False` shows none. Notes (a resume, a budget) go to
the `pipeline` logger, warnings at WARNING, the rest at INFO.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import polars as pl

from pipeline.errors import JobError, SpecError
from pipeline.plan import RunOptions, make_plan
from pipeline.progress import in_notebook
from pipeline.runner import Host, Report, execute, execute_frame
from pipeline.signals import raise_interrupt
from pipeline.spec import Job, job_from_mapping, load_job, resolve_paths

_T = TypeVar("_T")

#: A job: a job file's path, a mapping with the job file's structure, or a `Job`.
JobLike: TypeAlias = str | os.PathLike[str] | Mapping[str, Any] | Job
#: A path given as text or a path object.
PathLike: TypeAlias = str | os.PathLike[str]

log = logging.getLogger("pipeline")


def run_frame(
    frame: pl.DataFrame,
    job: JobLike,
    *,
    base_url: str | None = None,
    model: str | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    concurrency: int | None = None,
    limit: int | None = None,
    simulate: bool = False,
    max_cost: float | None = None,
    price: tuple[float, float] | None = None,
    retry_failed: bool = False,
    new_only: bool = False,
    fresh: bool = False,
    checkpoint: PathLike | None = None,
    trust_job_hosts: bool = False,
    progress: bool = True,
) -> pl.DataFrame:
    """Send every row of `frame` through `job`; return the rows with their results.

    >>> out = pipeline.run_frame(pl.DataFrame({"text": ["hello"]}), "jobs/summarise.toml",
    ...                          simulate=True, progress=False)
    >>> out.select("text", "status", "response", "cost_usd")

    The job's `[input]` file, if it names one, is not read (its `key` still keys the
    rows). See the module's docstring for the overrides, the checkpoint and the errors.
    """
    return _blocking(
        lambda: arun_frame(
            frame,
            job,
            base_url=base_url,
            model=model,
            rpm=rpm,
            tpm=tpm,
            concurrency=concurrency,
            limit=limit,
            simulate=simulate,
            max_cost=max_cost,
            price=price,
            retry_failed=retry_failed,
            new_only=new_only,
            fresh=fresh,
            checkpoint=checkpoint,
            trust_job_hosts=trust_job_hosts,
            progress=progress,
        )
    )


async def arun_frame(
    frame: pl.DataFrame,
    job: JobLike,
    *,
    base_url: str | None = None,
    model: str | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    concurrency: int | None = None,
    limit: int | None = None,
    simulate: bool = False,
    max_cost: float | None = None,
    price: tuple[float, float] | None = None,
    retry_failed: bool = False,
    new_only: bool = False,
    fresh: bool = False,
    checkpoint: PathLike | None = None,
    trust_job_hosts: bool = False,
    progress: bool = True,
) -> pl.DataFrame:
    """`run_frame` for code already in an event loop: the run shares that loop, and the
    checks before it (polars' work on the frame) run in a thread, off the loop.

    >>> out = await pipeline.arun_frame(frame, "jobs/summarise.toml", simulate=True)
    """
    if not isinstance(frame, pl.DataFrame):
        raise TypeError(f"run_frame takes a polars DataFrame, not {type(frame).__name__}")
    temporary = None if checkpoint is not None else Path(tempfile.mkdtemp(prefix="pipeline-"))
    try:
        spec = _job(job)
        journal = Path(checkpoint) if checkpoint is not None else None
        if temporary is not None:
            journal = temporary / f"{spec.name}.journal.sqlite"
        opts = _options(
            base_url=base_url,
            model=model,
            rpm=rpm,
            tpm=tpm,
            concurrency=concurrency,
            limit=limit,
            simulate=simulate,
            max_cost=max_cost,
            price=price,
            retry_failed=retry_failed,
            new_only=new_only,
            fresh=fresh,
            journal=journal,
            trust_job_hosts=trust_job_hosts,
        )
        plan = await asyncio.to_thread(make_plan, spec, opts, os.environ, frame)
        log.info("%s: %s rows from %s", plan.job.name, f"{plan.rows:,}", plan.source.name)
        report, out = await execute_frame(plan, _notify, _host(progress))
    except JobError:  # refused before anything was sent: nothing to keep
        _remove(temporary)
        raise
    _raise_if_stopped(report, temporary is not None)
    _remove(temporary)
    return out


def run(
    job: PathLike,
    *,
    input: PathLike | None = None,
    output: PathLike | None = None,
    base_url: str | None = None,
    model: str | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    concurrency: int | None = None,
    limit: int | None = None,
    simulate: bool = False,
    max_cost: float | None = None,
    price: tuple[float, float] | None = None,
    retry_failed: bool = False,
    new_only: bool = False,
    fresh: bool = False,
    checkpoint: PathLike | None = None,
    trust_job_hosts: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a job file as `pipeline run` does: write its output and summary, and return
    the summary (the JSON the command writes beside the output).

    >>> summary = pipeline.run("jobs/summarise.toml", simulate=True, progress=False)
    >>> summary["ok"], summary["failed"], summary["output"], summary["cost_usd"]

    A run that stops early still writes the output (rows not done are `pending`) and
    the summary, then raises (see the module's docstring).
    """
    opts = _options(
        input=None if input is None else Path(input),
        output=None if output is None else Path(output),
        base_url=base_url,
        model=model,
        rpm=rpm,
        tpm=tpm,
        concurrency=concurrency,
        limit=limit,
        simulate=simulate,
        max_cost=max_cost,
        price=price,
        retry_failed=retry_failed,
        new_only=new_only,
        fresh=fresh,
        journal=None if checkpoint is None else Path(checkpoint),
        trust_job_hosts=trust_job_hosts,
    )
    report = run_job(Path(job), opts, _notify, _host(progress))
    _raise_if_stopped(report, temporary=False)
    return report.summary


def run_job(job: Path, opts: RunOptions, notify: Callable[[str], None], host: Host) -> Report:
    """The job file run with these options: what `pipeline run` and `pipeline.run` both
    call. Its Report says how it ended; only a failure before or after sending raises."""
    plan = make_plan(load_job(job), opts)
    notify(f"{plan.job.name}: {plan.rows:,} rows from {plan.source.name}")
    return _blocking(lambda: execute(plan, notify, host))


# --- the parts --------------------------------------------------------------------------


def _job(job: JobLike) -> Job:
    """A job file's path, a mapping, or a Job, as a checked Job."""
    if isinstance(job, Job):
        return resolve_paths(job)
    if isinstance(job, Mapping):
        return job_from_mapping(job)
    if isinstance(job, str | os.PathLike):
        return load_job(Path(job))
    raise TypeError(
        f"job is a job file's path, a mapping or a pipeline.Job, not {type(job).__name__}"
    )


def _options(**given: Any) -> RunOptions:
    """The overrides as RunOptions, checked as the command's options are."""
    for name in ("rpm", "tpm", "concurrency", "limit"):
        value = given.get(name)
        if value is not None and (type(value) is not int or value < 1):
            raise SpecError(
                f"{name}={value!r}: give a whole number of 1 or more (as --{name} takes)"
            )
    max_cost = given.get("max_cost")
    if max_cost is not None and (not _number(max_cost) or max_cost <= 0):
        raise SpecError(f"max_cost={max_cost!r}: give a budget in USD above 0 (as --max-cost)")
    price = given.get("price")
    if price is not None:
        valid = isinstance(price, tuple | list) and len(price) == 2
        if not valid or not all(_number(p) and p >= 0 for p in price):
            raise SpecError(
                f"price={price!r}: give two prices, USD per million input and output "
                "tokens, e.g. price=(0.15, 0.60) (or (0, 0))"
            )
        given["price"] = (float(price[0]), float(price[1]))
    return RunOptions(**given)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _host(progress: bool) -> Host:
    """A library call's ways: rich's bar where it can draw (a terminal, a notebook), and
    a second signal that unwinds with KeyboardInterrupt instead of ending the process."""
    if not progress:
        return Host(progress=False, exit_now=raise_interrupt)
    return Host(progress=True if in_notebook() else None, exit_now=raise_interrupt)


def _notify(line: str) -> None:
    if line.startswith("warning:"):
        log.warning("%s", line.removeprefix("warning: "))
    else:
        log.info("%s", line)


def _raise_if_stopped(report: Report, temporary: bool) -> None:
    """A run that stopped early raises its reason, telling where its answers are kept."""
    reason = report.stopped
    if reason is None:
        return
    journal = report.summary["journal"]
    how = f"pass checkpoint={journal!r} to resume" if temporary else "the same call again resumes"
    raise type(reason)(
        f"{report.message}. The answers so far are kept in the checkpoint {journal}: {how} "
        "(nothing answered is sent again)"
    )


def _remove(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _blocking(start: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run the coroutine `start()` makes to its end, from synchronous code: with
    asyncio.run where no loop runs in this thread, else (Jupyter, an async framework)
    on a private loop in a worker thread, since loops do not nest."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(start())
    return _in_worker_thread(start)


def _in_worker_thread(start: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    running: concurrent.futures.Future[asyncio.Task[Any]] = concurrent.futures.Future()
    result: concurrent.futures.Future[_T] = concurrent.futures.Future()
    loops: list[asyncio.AbstractEventLoop] = []

    async def main() -> _T:
        task = asyncio.current_task()
        assert task is not None
        loops.append(asyncio.get_running_loop())
        running.set_result(task)
        return await start()

    def work() -> None:
        try:
            result.set_result(asyncio.run(main()))
        except BaseException as exc:  # handed to the caller's thread, which raises it
            result.set_exception(exc)

    thread = threading.Thread(target=work, name="pipeline-run", daemon=True)
    thread.start()
    try:
        return result.result()
    except KeyboardInterrupt:
        # The caller was interrupted (Jupyter's stop button): the run must not go on
        # sending behind its back. Cancelled, it keeps what it committed.
        task = running.result()
        loops[0].call_soon_threadsafe(task.cancel)
        thread.join()
        raise
