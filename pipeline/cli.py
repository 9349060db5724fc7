"""The `pipeline` command. Commands parse options and call the library; a
`PipelineError` becomes one line on stderr and its exit code."""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from pipeline import __version__
from pipeline.api import run_job
from pipeline.errors import Interrupted, JobError, PipelineError, RowProblem
from pipeline.journal import Journal
from pipeline.output import check_replaceable, recorded_output
from pipeline.plan import (
    INPUT_PARTS,
    Estimate,
    Plan,
    RunOptions,
    apply_options,
    check_rows,
    estimate,
    fingerprint,
    journal_path,
    make_plan,
)
from pipeline.progress import plural, summary_table, usd
from pipeline.redact import env_keys, redact_all
from pipeline.runner import COMMAND
from pipeline.spec import Job, load_job

F = TypeVar("F", bound=Callable[..., Any])


def _errors_to_exit(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PipelineError as exc:
            # A server's words can reach a message (a halt's reason): never a key in them.
            click.echo(f"error: {redact_all(str(exc), env_keys(os.environ))}", err=True)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]


class _OneLineErrors(click.Group):
    """Click's own errors (a bad option value, an unknown flag) as one line, like ours."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # `pipeline` alone: the help, as click shows it
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            path = exc.ctx.command_path.split()[1:] if exc.ctx is not None else []
            where = " ".join(["pipeline", *path])
            message = " ".join(exc.format_message().split())
            click.echo(f"error: {message} (see `{where} --help`)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(Interrupted.exit_code)


@click.group(cls=_OneLineErrors)
@click.version_option(__version__, prog_name="pipeline")
def main() -> None:
    """Run bulk AI jobs against OpenAI-style APIs: rate-limited, resumable, costed."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")


_job = click.argument("job", type=click.Path(path_type=Path, dir_okay=False))
_positive = click.IntRange(min=1)


def _parse_price(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        prices = tuple(float(part) for part in value.split(","))
    except ValueError:
        prices = ()
    if len(prices) != 2 or min(prices) < 0:
        raise click.BadParameter("give two prices, e.g. --price 0.15,0.60 (or 0,0)")
    return prices[0], prices[1]


def _plan_options(func: F) -> F:
    options = [
        click.option("--input", "input_", type=click.Path(path_type=Path), help="Input table."),
        click.option("--output", type=click.Path(path_type=Path), help="Output .parquet/.csv."),
        click.option("--base-url", help="OpenAI-compatible API base URL (…/v1)."),
        click.option("--model", help="Model name, instead of the job's."),
        click.option("--limit", type=_positive, help="Only the first N rows."),
        click.option("--simulate", is_flag=True, help="Run against the built-in simulator."),
        click.option(
            "--trust-job-hosts",
            is_flag=True,
            help="Confirm the hosts and the output place the job file names: the API key "
            "may go to its base_url (also: PIPELINE_TRUST_JOB_HOSTS=1).",
        ),
        click.option(
            "--price",
            callback=_parse_price,
            metavar="IN,OUT",
            help="USD per million input and output tokens, instead of genai-prices' "
            "(a self-hosted model: 0,0).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command()
@_job
@_plan_options
@click.option("--rpm", type=_positive, help="Requests per minute.")
@click.option("--tpm", type=_positive, help="Tokens per minute.")
@click.option("--concurrency", type=_positive, help="Requests in flight at most.")
@click.option("--max-cost", type=click.FloatRange(min=0, min_open=True), help="Budget in USD.")
@click.option("--fresh", is_flag=True, help="Discard the checkpoint and start over.")
@click.option("--retry-failed", is_flag=True, help="Send again the rows that failed before.")
@click.option(
    "--new-only",
    is_flag=True,
    help="Write only the rows this run answered (for append or merge loads).",
)
@click.option("--journal", type=click.Path(path_type=Path), help="Checkpoint file location.")
@_errors_to_exit
def run(job: Path, input_: Path | None, **flags: Any) -> None:
    """Send every row of JOB's input not yet done; write the output table."""
    report = run_job(
        job, RunOptions(input=input_, **flags), lambda line: click.echo(line, err=True), COMMAND
    )
    s = report.summary
    summary_table(
        f"{s['job']}: {s['ok']:,} ok, {s['failed']:,} failed, {s['pending']:,} pending",
        [
            ("output", s["output"]),
            ("rows", f"{s['rows']:,} ({s['resumed']:,} done by an earlier run)"),
            (
                "this run",
                f"{plural(s['requests_sent'], 'request')} sent, {s['retries']:,} retried, "
                f"{s['rate_limited']:,} rate-limited, ${s['cost_this_run_usd']:.6f}",
            ),
            (
                "tokens",
                f"{s['prompt_tokens']:,} prompt, {s['completion_tokens']:,} completion (all rows)",
            ),
            ("cost", f"${s['cost_usd']:.6f} for all rows ({s['price_source']})"),
            ("cut off", f"{s['cut_off_by_max_tokens']:,} rows hit max_tokens"),
            ("time", f"{s['duration_s']:.1f} s"),
            ("checkpoint", s["journal"]),
        ],
        sys.stdout,
    )
    if s["failed"] and report.exit_code == 1:
        click.echo("to send the failed rows again: add --retry-failed", err=True)
    if report.message:
        message = redact_all(report.message, env_keys(os.environ))
        click.echo(f"error: {message}" if report.exit_code else message, err=True)
    sys.exit(report.exit_code)


@main.command()
@_job
@_plan_options
@click.option(
    "--rows",
    "shown",
    default=3,
    show_default=True,
    type=click.IntRange(min=0),
    help="Rows to render.",
)
@_errors_to_exit
def validate(job: Path, input_: Path | None, shown: int, **flags: Any) -> None:
    """Check JOB, its input and its templates, render the first rows, and check that every
    row renders. Sends nothing, needs no API key; exits 2 if any row would fail."""
    plan = make_plan(load_job(job), RunOptions(input=input_, **flags))
    click.echo(f"job {plan.job.name}: ok")
    click.echo(
        f"input {plan.source.name}: {plan.rows:,} rows, columns {', '.join(plan.source.columns)}"
    )
    click.echo(f"model {plan.job.request.model}, prices from {plan.pricer.source}")
    click.echo(f"output {plan.output}")
    _show_rows(plan, shown)
    check_replaceable(plan.output, recorded_output(plan.journal_path, plan.output))
    if plan.key_problem is not None:  # `run` refuses without it; checking needs none
        click.echo(f"note: {plan.key_problem}")
    checked = check_rows(plan)
    if not checked.failing:
        click.echo(f"\nall {checked.rows:,} rows render")
        e, held = _estimate_beside_checkpoint(plan) if plan.journal_path.is_file() else (None, None)
        if e is not None and held is not None:
            done = max(0, checked.rows - e.rows - e.reused - e.rejected)
            click.echo(
                f"a run now would send {plural(e.rows, 'row')}: {e.reused:,} ask what {held} "
                f"holds answers to, {done:,} are done"
            )
        return
    click.echo(f"\n{checked.failing:,} of {checked.rows:,} rows would fail before sending:")
    for row, reason in checked.first:
        click.echo(f"  row {row}: {reason}")
    row, reason = checked.first[0]
    stopped = f"; {checked.stopped}" if checked.stopped else ""
    raise JobError(
        f"{checked.failing:,} of {checked.rows:,} rows would fail before sending "
        f"(row {row}: {reason}){stopped}"
    )


def _show_rows(plan: Plan, shown: int) -> None:
    for row in plan.source.head(shown).iter_rows(named=True):
        click.echo(f"\n--- row {row['__row']} ---")
        try:
            prompt = plan.renderer.render(row)
            for message in prompt.messages:
                if message["content"] or prompt.file is None:  # no prompt with the file
                    click.echo(f"[{message['role']}] {message['content']}")
            for image in prompt.images:
                shown_ref = (
                    image if len(image) <= 120 else f"{image[:60]}... ({len(image):,} chars)"
                )
                click.echo(f"[image] {shown_ref}")
            if prompt.file is not None:
                click.echo(f"[file] {prompt.file}")
            item = plan.endpoint.item(prompt)  # a file that cannot be read fails here
            click.echo(f"(about {item.tokens:,} prompt tokens)")
        except RowProblem as exc:  # a row that would fail is shown, not raised
            click.echo(f"(this row would fail: {exc})")


@main.command("estimate")
@_job
@_plan_options
@click.option("--rpm", type=_positive, help="Requests per minute.")
@click.option("--tpm", type=_positive, help="Tokens per minute.")
@_errors_to_exit
def estimate_command(job: Path, input_: Path | None, **flags: Any) -> None:
    """Forecast JOB's tokens, cost and duration. Sends nothing."""
    plan = make_plan(load_job(job), RunOptions(input=input_, **flags))
    e, held = _estimate_beside_checkpoint(plan)
    duration = (
        "no limits set: as fast as the server"
        if e.minutes is None
        else (f"at least {e.minutes:,.1f} min at the job's rate limits")
    )
    summary_table(
        f"{plan.job.name}: estimate for {e.rows:,} rows",
        [
            ("prompt tokens", f"{e.prompt_tokens:,} (estimated, no tokenizer)"),
            ("completion", f"at most {e.max_completion_tokens:,} tokens (rows x max_tokens)"),
            ("cost", f"{usd(e.cost_low)} to {usd(e.cost_high)} ({plan.pricer.source})"),
            ("duration", duration),
            ("rejected", f"{e.rejected:,} rows would fail before sending"),
            *(
                [("reused", f"{e.reused:,} rows ask what {held} holds answers to: not sent")]
                if held
                else []
            ),
        ],
        sys.stdout,
    )


def _estimate_beside_checkpoint(plan: Plan) -> tuple[Estimate, Path | None]:
    """The estimate of what a run would send now: less the rows the job's checkpoint
    has done (for the same input), and the rows whose requests it holds answers to
    (a changed input's reuse). The checkpoint too, if there is one."""
    path = plan.journal_path
    if not path.is_file():
        return estimate(plan), None
    checkpoint = Journal.read(path, job=plan.job.name)
    try:
        done = None
        if checkpoint.same_input(fingerprint(plan), INPUT_PARTS):
            failed_too = not plan.options.retry_failed

            def done(first: int, last: int) -> set[int]:
                return checkpoint.done_rows(first, last, failed_too=failed_too)

        return estimate(plan, done, checkpoint.known), path
    finally:
        checkpoint.close()


def _checkpoint_options(func: F) -> F:
    """--output and --journal: where a run of JOB wrote, to find its checkpoint."""
    func = click.option(
        "--journal", type=click.Path(path_type=Path), help="Checkpoint file location."
    )(func)
    return click.option(
        "--output", type=click.Path(path_type=Path), help="Output the run wrote to."
    )(func)


def _checkpoint_of(job: Path, output: Path | None, journal: Path | None) -> tuple[Job, Path]:
    """JOB, and the checkpoint its runs keep (beside the output, or --journal)."""
    spec = apply_options(load_job(job), RunOptions(output=output))
    path = journal_path(spec.output_path, journal)
    if path.is_dir():
        raise JobError(f"{path} is a directory: point --journal at a run's .journal.sqlite file")
    return spec, path


@main.command()
@_job
@_checkpoint_options
@_errors_to_exit
def status(job: Path, output: Path | None, journal: Path | None) -> None:
    """What JOB's checkpoint holds: rows done, failed, pending, cost, the last run."""
    spec, path = _checkpoint_of(job, output, journal)
    try:
        checkpoint = Journal.read(path, job=spec.name)
        try:
            t, flight = checkpoint.totals(), checkpoint.in_flight()
            meta = {k: checkpoint.meta(k) for k in ("last_started", "last_finished", "last_exit")}
            rows, source = int(checkpoint.meta("rows") or 0), checkpoint.meta("input")
            kept = checkpoint.earlier_answers()
        finally:
            checkpoint.close()
    except (sqlite3.Error, ValueError) as exc:
        raise JobError(
            f"{path} is not a checkpoint that pipeline wrote ({exc}): point --journal at the "
            ".journal.sqlite file a run of this job wrote"
        ) from None
    of = f", {rows - t.ok - t.failed:,} pending of {rows:,} rows from {source}" if source else ""
    click.echo(f"{spec.name}: {t.ok:,} ok, {t.failed:,} failed{of}; ${t.cost_usd:.6f} spent")
    click.echo(f"checkpoint {path}")
    if meta["last_started"]:
        when = _when(float(meta["last_started"]))
        if meta["last_finished"]:
            done = _when(float(meta["last_finished"]))
            click.echo(f"last run started {when}, finished {done}, exit {meta['last_exit']}")
        else:
            click.echo(f"last run started {when} and has not finished (running, or killed)")
    if flight.rows:
        click.echo(f"{flight.rows:,} requests in flight with no answer recorded")
    if kept:
        click.echo(
            f"{kept:,} answers kept from earlier inputs, for rows that ask again "
            f"(`pipeline prune {job}` drops them)"
        )


@main.command()
@_job
@_checkpoint_options
@_errors_to_exit
def prune(job: Path, output: Path | None, journal: Path | None) -> None:
    """Drop the answers JOB's checkpoint keeps from earlier inputs: those the latest
    input does not use (its rows hold every answer they reuse)."""
    spec, path = _checkpoint_of(job, output, journal)
    if not path.is_file():
        raise JobError(f"no checkpoint at {path}: the job has not run yet (or give --journal)")
    before = path.stat().st_size
    checkpoint = Journal.open(path, None, fresh=False, job=spec.name)
    try:
        dropped = checkpoint.prune()
    finally:
        checkpoint.close()
    after = path.stat().st_size
    click.echo(
        f"{spec.name}: dropped {plural(dropped, 'answer')} kept from earlier inputs; "
        f"{path} went from {before / 2**20:.1f} to {after / 2**20:.1f} MB"
    )


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--rpm", type=_positive, help="Requests per minute the server allows.")
@click.option("--tpm", type=_positive, help="Tokens per minute the server allows.")
@click.option("--latency-ms", default=0.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--fault-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1))
@click.option(
    "--faults",
    default="500,503,reset,truncated,malformed",
    show_default=True,
    help="Comma-separated fault kinds drawn when a fault is injected.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--api-key", envvar="PIPELINE_SIMULATOR_KEY", help="Require this bearer key.")
@_errors_to_exit
def simulate(host: str, port: int, faults: str, **config: Any) -> None:
    """Serve an OpenAI-compatible simulator (chat, embeddings, models)."""
    from pipeline.simulator import SimConfig, serve  # only for this command: start-up time

    kinds = tuple(k.strip() for k in faults.split(",") if k.strip())
    try:
        settings = SimConfig(faults=kinds, **config)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--faults") from None
    try:
        serve(settings, host=host, port=port)
    except OSError as exc:  # the port is taken, or the host is not this machine's
        raise JobError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --port "
            "(0 picks a free one) or --host"
        ) from None
