"""Everything that can be checked before a request is sent, and what a run would cost.

    plan = make_plan(load_job(path), RunOptions(simulate=True))   # raises JobError if off
    estimate(plan).cost_high                                      # USD at most, no request

`pipeline validate` and `pipeline estimate` stop here; `pipeline run` goes on to
`runner.execute(plan)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import polars as pl

from pipeline.bounds import RowSizer
from pipeline.cost import Pricer, make_pricer
from pipeline.dedupe import request_digest
from pipeline.endpoints import Endpoint, Item, Provider, make_endpoint, make_provider
from pipeline.errors import (
    InputError,
    JobError,
    SpecError,
    TemplateError,
    first_line,
)
from pipeline.json_schemas import answer_fields, check_field_names, check_schemas
from pipeline.output import check_joinable, check_writable, result_columns
from pipeline.parse import AnswerCheck, OutputShape
from pipeline.records import ROW_INDEX, Usage
from pipeline.render import Renderer
from pipeline.source import FRAME_NAME, OTHER_SEPARATORS, Source, frame_source, open_source
from pipeline.spec import (
    ANTHROPIC_BASE_URL,
    BASE_URL_ENV,
    MAX_CONCURRENCY,
    OPENAI_BASE_URL,
    InputSpec,
    Job,
    PriceSpec,
    digest,
    output_place,
)
from pipeline.tool_loop import ToolRunner
from pipeline.trust import (
    Destination,
    Origin,
    check_base_url,
    check_output_place,
    refuse_links,
    trusted,
)

#: Rows read, rendered and queued at a time: bounds memory whatever the input's size.
BATCH_ROWS = 2_000
#: Failing rows `validate` names, with their reasons, before it gives the count.
FAILING_SHOWN = 5
#: Rows written, with made-up answers, through the real output writer before sending:
#: the types are the same in every batch, so a few rows prove the whole table writable.
DRY_WRITE_ROWS = 16
#: The first rows, whose requests are sized to judge whether a TPM limit can bind.
TPM_SAMPLE_ROWS = 16
#: How many times the largest of those a later request may be with the TPM limit still
#: unable to bind before the RPM limit does: past that, a run counts tokens exactly.
TPM_HEADROOM = 4


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
    #: Write only the rows this run answered (for append and merge loads).
    new_only: bool = False
    journal: Path | None = None
    #: USD per million input and output tokens, instead of the job's or genai-prices'.
    price: tuple[float, float] | None = None
    #: The user confirms the hosts and the output place the job file names (trust.py).
    trust_job_hosts: bool = False


@dataclass(frozen=True)
class Plan:
    job: Job
    source: Source
    renderer: Renderer
    endpoint: Endpoint
    provider: Provider
    check: AnswerCheck
    shape: OutputShape
    #: The job's tool functions, when it runs a tool loop.
    tools: ToolRunner | None
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
        return journal_path(self.output, self.options.journal)

    @property
    def files_dir(self) -> Path:
        """Where files that answers carry (generated images) are written."""
        return self.output.with_name(f"{self.output.stem}.files")

    @property
    def summary_path(self) -> Path:
        return self.output.with_name(f"{self.output.stem}.summary.json")


def journal_path(output: Path, override: Path | None = None) -> Path:
    """Where a run's checkpoint lives: beside its output, unless --journal says."""
    return override if override is not None else output.with_name(f"{output.stem}.journal.sqlite")


def apply_options(job: Job, opts: RunOptions) -> Job:
    """Flags win over the job file, within the same bounds."""
    if opts.concurrency is not None and opts.concurrency > MAX_CONCURRENCY:
        raise SpecError(
            f"--concurrency {opts.concurrency} is more than {MAX_CONCURRENCY:,}, the most a "
            f"run may have in flight (as for limits.concurrency): use --concurrency "
            f"{MAX_CONCURRENCY} or less"
        )
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
        path = opts.input.resolve()
        given = job.input
        updates["input"] = (
            InputSpec(path=path) if given is None else given.model_copy(update={"path": path})
        )
    if opts.output is not None:
        place = output_place(opts.output, Path.cwd())
        updates["output"] = job.output.model_copy(update={"path": place})
    if opts.price is not None:
        updates["price"] = PriceSpec(input_per_mtok=opts.price[0], output_per_mtok=opts.price[1])
    return job.model_copy(update=updates)


def make_plan(
    job: Job,
    opts: RunOptions,
    env: Mapping[str, str] = os.environ,
    frame: pl.DataFrame | None = None,
) -> Plan:
    """Check everything that can be checked before sending; raise JobError if anything is off.

    `frame`: the input as a DataFrame in memory (`pipeline.run_frame`), instead of the
    job's input file; the job's `[input] key`, if it has one, keys its rows.
    """
    job = apply_options(job, opts)
    source = _source(job, frame)
    renderer = _renderer(job, source)
    schema = job.json_schema()
    check_schemas(job, schema)
    base_url, api_key = _target(job, opts, env)
    req = job.request
    endpoint = make_endpoint(req, job.template, base_url or "", schema, source.folder)
    shape = OutputShape(
        fields=answer_fields(job, schema), answer=endpoint.answer_column, tool_calls=bool(req.tools)
    )
    check_field_names(shape)
    _check_collisions(source.columns, result_columns(shape, job.output.prefix))
    sample = source.head(DRY_WRITE_ROWS)
    if frame is None:
        check_writable(job.output_path, sample, shape=shape, prefix=job.output.prefix)
    else:  # no file is written: the rows' output is a DataFrame too
        check_joinable(sample, shape=shape, prefix=job.output.prefix)
    pricer = make_pricer(req.model, job.price)
    tools = None
    if req.run_tools:
        assert req.tools_module is not None
        tools = ToolRunner.load(req.tools_module, [t.name for t in req.tools])
    rows = source.count()
    plan = Plan(
        job=job,
        source=source,
        renderer=renderer,
        endpoint=endpoint,
        provider=make_provider(req),
        check=AnswerCheck(schema, json_object=req.response_format == "json_object"),
        shape=shape,
        tools=tools,
        pricer=pricer,
        base_url=base_url,
        api_key=api_key,
        key_problem=_key_problem(job, base_url, api_key),
        rows=min(rows, opts.limit) if opts.limit is not None else rows,
        options=opts,
    )
    _check_places(plan, env)
    return plan


def _source(job: Job, frame: pl.DataFrame | None) -> Source:
    """The input: the DataFrame given, else the job's input file, checked whole."""
    given = job.input
    if frame is not None:
        return frame_source(frame, key=given.key if given is not None else None)
    if given is None:
        raise SpecError(
            "the job names no input: give it [input] path = ..., run it with --input PATH, "
            "or pass a DataFrame to pipeline.run_frame"
        )
    return open_source(given.path, format=given.format, key=given.key, separator=given.separator)


def for_sending(plan: Plan) -> Plan:
    """The plan as a run sends it: its rows' tokens estimated (bytes/4) where an exact
    count decides nothing, else counted with the model's encoding as before.

    The encoding holds 66 MB and takes ~40 ms to load. In a run it decides how the
    limiter charges requests, and that matters only where the TPM limit can bind
    (there an exact count starts the limiter close, at WARMUP_RATIO; the estimate starts
    it safe, and `Limiter.calibrate` corrects either from the server's usage). Rows
    whose estimate comes near a bound are still counted exactly (bounds.py); an
    embeddings request packs rows by their exact count; `validate`, `estimate` and the
    budget's check count every row exactly.
    """
    endpoint = plan.endpoint
    if not endpoint.count.exact or endpoint.batch_rows > 1 or _tpm_may_bind(plan):
        return plan
    return dataclasses.replace(plan, endpoint=endpoint.estimating())


def _tpm_may_bind(plan: Plan) -> bool:
    """Whether the TPM limit may hold requests back before the RPM limit does: there is
    no RPM limit, or a minute of requests at it, each TPM_HEADROOM times the largest of
    the first rows' (estimated), would spend the TPM."""
    limits = plan.job.limits
    if limits.tpm is None:
        return False
    if limits.rpm is None or plan.endpoint.prepare_reads_files:
        return True  # files' rows are not sized here: sizing reads them
    sizer = RowSizer(plan.job, plan.endpoint.estimating(), plan.renderer)
    largest = 0
    for row in plan.source.head(TPM_SAMPLE_ROWS).iter_rows(named=True):
        sized = sizer.size(row)
        if isinstance(sized, Item):
            largest = max(largest, sized.tokens)
    return limits.rpm * (largest + sizer.output_tokens) * TPM_HEADROOM >= limits.tpm


def _check_places(plan: Plan, env: Mapping[str, str]) -> None:
    """Where the run writes: a place the user chose, and never through a link."""
    job = plan.job
    check_output_place(
        plan.output,
        job_file=job.file or job.root,
        job_root=job.root,
        chosen_by_user=plan.options.output is not None,
        trusted=trusted(plan.options.trust_job_hosts, env),
    )
    journal = plan.journal_path
    refuse_links(
        [
            (plan.output, "--output"),
            (plan.summary_path, "--output"),
            (plan.files_dir, "--output"),
            *((Path(f"{journal}{end}"), "--journal") for end in ("", "-wal", "-shm", ".lock")),
        ]
    )


def _renderer(job: Job, source: Source) -> Renderer:
    """The templates, compiled; a one-column CSV named `a;b` is said to be `;`-separated."""
    try:
        return Renderer(job.template, source.columns)
    except TemplateError:
        hint = _separator_hint(source)
        if hint is not None:
            raise InputError(hint) from None
        raise


def _separator_hint(source: Source) -> str | None:
    if source.format != "csv" or len(source.columns) != 1:
        return None
    name = source.columns[0]
    for separator in OTHER_SEPARATORS:
        if separator in name and separator != source.separator:
            shown = separator.encode("unicode_escape").decode()
            return (
                f"{source.name}: the file looks `{shown}`-separated (its one column is named "
                f'`{name[:60]}`): set [input] separator = "{shown}" in the job'
            )
    return None


def _target(job: Job, opts: RunOptions, env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """Base URL and key: flag > environment > job file. No key is needed offline."""
    if opts.simulate:
        return None, None
    req = job.request
    default = {"openai": OPENAI_BASE_URL, "anthropic": ANTHROPIC_BASE_URL}.get(req.provider)
    choices: tuple[tuple[Origin, str | None], ...] = (
        ("flag", opts.base_url),
        ("env", env.get(BASE_URL_ENV[req.provider])),
        ("job", req.base_url),
        ("default", default),
    )
    found: tuple[Origin, str | None] = next(
        ((o, url) for o, url in choices if url), ("default", None)
    )
    origin, base_url = found
    if base_url is None:
        raise SpecError(
            "Azure OpenAI needs its endpoint: set base_url in [request] (or "
            f"${BASE_URL_ENV['azure']}) to https://<resource>.openai.azure.com"
        )
    base_url = base_url.rstrip("/")
    if urlsplit(base_url).scheme not in ("http", "https"):
        raise SpecError(f"base URL {base_url!r} must start with http:// or https://")
    api_key = env.get(req.key_env) or None
    check_base_url(
        Destination(
            base_url,
            origin,
            key_var=req.key_env,
            url_var=BASE_URL_ENV[req.provider],
            has_key=api_key is not None,
            default_url=default,
            job_file=job.file or job.root,
            trusted=trusted(opts.trust_job_hosts, env),
        )
    )
    if req.provider == "azure" and req.kind == "responses" and not base_url.endswith("/openai/v1"):
        raise SpecError(
            "Azure OpenAI serves the Responses API only under its v1 API: set base_url to "
            "https://<resource>.openai.azure.com/openai/v1 and `model` to the deployment's name"
        )
    return base_url, api_key


#: Hosts that refuse every request without a key: no run starts without one.
_KEYED_HOSTS = ("api.openai.com", "api.anthropic.com", ".openai.azure.com", ".azure.com")


def _key_problem(job: Job, base_url: str | None, api_key: str | None) -> str | None:
    """Why the run cannot start for want of a key, or None. The public APIs need one."""
    if api_key is not None or base_url is None:
        return None
    host = urlsplit(base_url).hostname or ""
    if not any(host == h or (h.startswith(".") and host.endswith(h)) for h in _KEYED_HOSTS):
        return None
    var = job.request.key_env
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
    """What the results depend on, the input file included (by path, size and mtime,
    and ctime), the prices and the key column: a resume whose job parts differ is
    refused; one whose input parts (INPUT_PARTS) differ is a new input.

    The input is known by its metadata, not its content. A content hash would catch
    every edit but costs a read of the whole file at every start (sha256 took 0.68 s
    for 1 GB from the page cache here, more from disk), and start-up must stay flat in
    the table's size. st_ctime_ns cannot be set by users: an edit in place whose mtime
    is put back (`touch -d`, `cp -p`, os.utime) still moves it, so it catches that case
    for the price of a stat. It also moves on chmod or a rename and back, which then
    refuses a resume that was safe: the message names the input, and that is the safe
    side of the trade.
    """
    parts = plan.job.fingerprint()
    source = plan.source
    if source.path is not None:
        stat = source.path.stat()
        parts["input"] = f"{source.path}:{stat.st_size}:{stat.st_mtime_ns}"
        parts["input ctime"] = str(stat.st_ctime_ns)
    else:
        assert source.frame is not None
        parts[FRAME_PART] = frame_digest(source.frame)
    price = plan.job.price
    parts["price"] = digest(None if price is None else price.model_dump(mode="json"))
    parts["key"] = digest(source.key)
    return parts


#: The fingerprint's part for a DataFrame input; a refused resume names it as it is.
FRAME_PART = "the input DataFrame's rows"
#: The fingerprint's parts that name the input: when only these change, the input is
#: new, not the job (its rows reuse the answers their requests got before: reuse.py).
INPUT_PARTS = frozenset({"input", "input ctime", FRAME_PART})


def frame_digest(frame: pl.DataFrame) -> str:
    """A DataFrame known by its content, in order: its schema and a hash of each row.

    A DataFrame has no size and times to go by, but it is in memory, and hashing its
    rows costs about what reading them does (polars' `hash_rows`, ~10 ms a million
    rows). The hash is polars' own, stable within one polars version: after an upgrade
    a resume from a DataFrame is refused as changed, the safe side.
    """
    try:
        rows = frame.hash_rows().to_arrow()
    except pl.exceptions.PolarsError as exc:  # a type polars cannot hash (Object)
        raise InputError(
            f"{FRAME_NAME}: its rows cannot be hashed to know them on resume "
            f"({first_line(exc)}); convert Object columns to a polars type"
        ) from None
    hashed = hashlib.sha256(str(frame.schema).encode())
    for buffer in rows.buffers()[1:]:
        if buffer is not None:
            hashed.update(buffer)
    return hashed.hexdigest()[:16]


def limited(batches: Iterator[pl.DataFrame], limit: int | None) -> Iterator[pl.DataFrame]:
    """The batches up to row `limit` (all of them when None)."""
    for batch in batches:
        if limit is not None:
            batch = batch.filter(pl.col(ROW_INDEX) < limit)
            if batch.height == 0:
                return
        yield batch


@dataclass(frozen=True)
class RowCheck:
    """What rendering every row found: the rows that would fail before sending."""

    rows: int
    failing: int
    #: (row position, reason) of the first failing rows.
    first: list[tuple[int, str]]
    #: Why the check stopped before the end, if it did.
    stopped: str | None = None


class _Runaway(Exception):
    """LIMIT_ROWS rows ran past the render limits: the template loops whatever the row."""

    def __init__(self, count: int, last: str) -> None:
        super().__init__(last)
        self.count = count


def _sized_rows(
    plan: Plan, done: Callable[[int, int], set[int]] | None = None
) -> Iterator[tuple[int, int, str | None, int]]:
    """Each row (up to --limit, less those `done(first, last)` holds) sized by RowSizer,
    sending nothing: (row, prompt tokens, why it would fail or None, request hash).
    Raises _Runaway once LIMIT_ROWS rows in a row ran past the render limits."""
    sizer = RowSizer(plan.job, plan.endpoint, plan.renderer)
    for batch in limited(plan.source.batches(BATCH_ROWS), plan.options.limit):
        index = batch.get_column(ROW_INDEX)
        skip = done(int(index.min()), int(index.max())) if done and batch.height else set()  # type: ignore[arg-type]
        for row in batch.iter_rows(named=True):
            if row[ROW_INDEX] in skip:
                continue
            sized = sizer.size(row)
            if isinstance(sized, Item):
                yield row[ROW_INDEX], sized.tokens, None, request_digest(sized.key)
                continue
            yield row[ROW_INDEX], 0, str(sized), 0
            if sizer.runaway_reached:
                raise _Runaway(sizer.runaway, sizer.last_limit)


def check_rows(plan: Plan) -> RowCheck:
    """Render every row (up to --limit) and count those that would fail. Sends nothing."""
    rows = failing = 0
    first: list[tuple[int, str]] = []
    try:
        for index, _, problem, _ in _sized_rows(plan):
            rows += 1
            if problem is not None:
                failing += 1
                if len(first) < FAILING_SHOWN:
                    first.append((index, " ".join(problem.split())))
    except _Runaway as stop:
        stopped = (
            f"stopped after {rows:,} of {plan.rows:,} rows: {stop.count} rows ran past "
            "the render limits, so the template is what to fix"
        )
        return RowCheck(rows, failing, first, stopped)
    return RowCheck(rows, failing, first)


@dataclass(frozen=True)
class Estimate:
    rows: int
    #: Rows that would fail before sending (a null the job forbids, a template error,
    #: a prompt over the context window or a request over the job's TPM).
    rejected: int
    prompt_tokens: int
    #: The most completion tokens the rows can use: rows x max_tokens.
    max_completion_tokens: int
    #: Cost of the prompts alone, and with every answer at max_tokens.
    cost_low: float
    cost_high: float
    #: Minutes the rate limits allow it to take at best; None with no limits set.
    minutes: float | None
    #: Rows asking what the checkpoint holds answers to: reused, not sent, not counted.
    reused: int = 0


def estimate(
    plan: Plan,
    done: Callable[[int, int], set[int]] | None = None,
    known: Callable[[Sequence[int]], set[int]] | None = None,
) -> Estimate:
    """Render every row and add up what the run would cost. Sends nothing.

    `done(first, last)`: the rows in [first, last] a checkpoint already holds, left out.
    `known(hashes)`: the requests a checkpoint holds answers to: rows asking them are
    reused, not sent, and left out of the cost (`Estimate.reused`).
    """
    rows = rejected = prompt = reused = 0
    waiting: list[tuple[int, int]] = []  # (tokens, hash) of rows not yet looked up

    def look_up() -> None:
        nonlocal rows, prompt, reused
        answered = known([digest for _, digest in waiting]) if known else set()
        for tokens, digest in waiting:
            if digest in answered:
                reused += 1
            else:
                prompt += tokens
                rows += 1
        waiting.clear()

    try:
        for _, tokens, problem, digest in _sized_rows(plan, done):
            if problem is not None:  # fails before sending: a template error, too big
                rejected += 1
                continue
            waiting.append((tokens, digest))
            if len(waiting) >= BATCH_ROWS:
                look_up()
        look_up()
    except _Runaway as stop:
        raise TemplateError(
            f"{stop.count} rows ran past the render limits, so the template is what to fix "
            f"({stop}); `pipeline validate` shows the rows"
        ) from None
    out = plan.endpoint.max_output_tokens()
    completion = rows * out
    limits = plan.job.limits
    requests = -(-rows // plan.endpoint.batch_rows)
    bounds = [requests / limits.rpm if limits.rpm else 0.0]
    bounds.append((prompt + completion) / limits.tpm if limits.tpm else 0.0)
    return Estimate(
        rows=rows,
        rejected=rejected,
        prompt_tokens=prompt,
        max_completion_tokens=completion,
        cost_low=plan.pricer.cost(Usage(prompt_tokens=prompt), requests),
        cost_high=plan.pricer.cost(
            Usage(prompt_tokens=prompt, completion_tokens=completion), requests
        ),
        minutes=max(bounds) if limits.rpm or limits.tpm else None,
        reused=reused,
    )
