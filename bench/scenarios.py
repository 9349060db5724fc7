"""Scenarios: `pipeline run`, a usual script and a bare floor, against the simulator.

    make bench BENCH=scenarios      # or: .venv/bin/python bench/scenarios.py --only faults

For every scenario and every tool, starts `pipeline simulate` as its own process (fresh,
so its counters are clean), runs the tool as a child process (`pipeline run` with a job
file written here; `bench/baseline.py`: the official SDK with a semaphore and
aiolimiter; or `bench/floor.py`: a bare aiohttp worker pool) and prints a table row.
At the end it prints the table again with the targets beside the figures (pipeline's
against the floor's where a scenario runs both). Nothing is asserted. bench/README.md
says how each figure is measured.

This process stays small on purpose and never imports polars (children make and read
the tables): the peak RSS that `wait4` reports for a child is at least the RSS its
parent had when it forked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final, Literal

import aiohttp
from simproc import simulator

REPO = Path(__file__).resolve().parent.parent
BASELINE = REPO / "bench" / "baseline.py"
FLOOR = REPO / "bench" / "floor.py"
MODEL = "gpt-4o-mini"
MAX_TOKENS = 16
#: Server latency where the rate limits, not the answers, should set the pace.
RATE_LATENCY_MS = 50
#: 6,000 RPM is 100 requests a second: 3,000 rows take 30 s at best.
RPM = 6_000
#: With 2-4 KB rows a request costs ~560 tokens (o200k_base): 1,000 rows take ~31 s at
#: 1.1M TPM.
TPM = 1_100_000
#: Limits that never bind, for the faults scenario.
GENEROUS_RPM = 60_000
GENEROUS_TPM = 50_000_000
#: Inputs with more rows than this have no token total (the memory runs set no TPM).
MAX_COUNTED_ROWS = 200_000
#: Distinct requests among the memory scenario's rows.
DISTINCT = 1_000
MEMORY_ROWS = (50_000, 5_000_000)
#: The memory runs' time limits: start-up and output, plus a little over the 73 us a row
#: that 50,000 rows take on two cores, so that 5M rows get ~7 minutes.
MEMORY_START_S = 30.0
MEMORY_ROW_S = 80e-6
#: The real-* scenarios: a job shaped like a user's (issue 12). Its limits are lifted far
#: above need, as a user with a high tier sets them: the limiter still runs, but never
#: waits. The floor ignores them.
REAL_ROWS = 20_000
LIFTED_RPM = 1_000_000
LIFTED_TPM = 1_000_000_000
#: The "medium" texts: about this many characters, the size of a short paragraph.
MEDIUM_CHARS = 400
MEDIUM_SPREAD = 20
#: Any fixed seed: the same texts in every run.
MEDIUM_SEED = 400
#: The issue's targets against the floor, on the real-* jobs: CPU per request at most
#: this many times the floor's, the first request at most this much later, peak RSS.
FLOOR_CPU_TARGET = 1.5
FLOOR_STARTUP_TARGET_S = 0.2
REAL_RSS_TARGET_MB = 250.0
#: A rate-bound job's launch to exit against its ideal with a burst (`Run.burst_ideal_s`).
BURST_TARGET = 0.97

#: Bounds, so that the bench stops by itself whatever happens. A run past its limit is
#: sent SIGTERM (pipeline then writes what it has done), then SIGKILL after the grace.
START_TIMEOUT_S = 30.0
SPEND_TIMEOUT_S = 60.0
HELPER_TIMEOUT_S = 120.0
GRACE_S = 60.0
REAP_TIMEOUT_S = 10.0
#: Polling the simulator's stats: often until the first request (the resolution of
#: start-up), then less (the resolution of the sending time).
FIRST_POLL_S = 0.02
POLL_S = 0.1
#: Spending the server's buckets: requests in flight, tokens left unspent.
SPEND_CONCURRENCY = 128
SPEND_TOKEN_MARGIN = 64
#: After spending, the server refills this long before the tool is started.
SETTLE_S = 1.0

Tool = Literal["pipeline", "baseline", "floor"]
Text = Literal["short", "medium", "long", "repeated"]
Bucket = Literal["requests", "tokens"]


@dataclass(frozen=True)
class Server:
    """How `pipeline simulate` is started for a scenario."""

    rpm: int | None = None
    tpm: int | None = None
    latency_ms: float = 0.0
    fault_rate: float = 0.0
    faults: str = ""

    def args(self) -> list[str]:
        args = ["--latency-ms", str(self.latency_ms)]
        if self.rpm is not None:
            args += ["--rpm", str(self.rpm)]
        if self.tpm is not None:
            args += ["--tpm", str(self.tpm)]
        if self.fault_rate:
            args += ["--fault-rate", str(self.fault_rate), "--faults", self.faults]
        return args


@dataclass(frozen=True)
class Scenario:
    name: str
    rows: int
    text: Text
    server: Server
    concurrency: int
    #: The job's limits, the baseline's too.
    rpm: int | None = None
    tpm: int | None = None
    tools: tuple[Tool, ...] = ("pipeline", "baseline")
    #: The server's buckets spent before the tool starts: see `spend`.
    spend: tuple[Bucket, ...] = ()
    limit_s: float = 150.0


def scenarios(
    memory_rows: Sequence[int] = MEMORY_ROWS, real_rows: int = REAL_ROWS
) -> list[Scenario]:
    rate = Server(rpm=RPM, latency_ms=RATE_LATENCY_MS)
    faults = Server(
        rpm=GENEROUS_RPM,
        tpm=GENEROUS_TPM,
        latency_ms=RATE_LATENCY_MS,
        fault_rate=0.05,
        # Kinds are drawn uniformly from the list: 3% 5xx, 1% resets, 1% malformed bodies.
        faults="500,500,500,reset,malformed",
    )
    tokens = Server(rpm=GENEROUS_RPM, tpm=TPM, latency_ms=RATE_LATENCY_MS)
    real = Server(latency_ms=20)

    def lifted(name: str, concurrency: int, tools: tuple[Tool, ...]) -> Scenario:
        return Scenario(
            name, real_rows, "medium", real, concurrency, LIFTED_RPM, LIFTED_TPM, tools, limit_s=240
        )

    return [
        Scenario("rate-bound", 3_000, "short", rate, 32, rpm=RPM, spend=("requests",)),
        Scenario("TPM-bound", 1_000, "long", tokens, 32, tpm=TPM, spend=("tokens",)),
        Scenario("misconfigured", 3_000, "short", rate, 32, rpm=4 * RPM, spend=("requests",)),
        Scenario("faults", 3_000, "short", faults, 32, rpm=GENEROUS_RPM, tpm=GENEROUS_TPM),
        Scenario("overhead", 20_000, "short", Server(latency_ms=20), 64, limit_s=240),
        # The baseline (the SDK) is slow: at 64 only, to keep `make bench` within 15 minutes.
        lifted("real-64", 64, ("pipeline", "floor", "baseline")),
        lifted("real-256", 256, ("pipeline", "floor")),
        *(
            Scenario(
                "memory",
                rows,
                "repeated",
                Server(),
                64,
                tools=("pipeline",),
                limit_s=MEMORY_START_S + rows * MEMORY_ROW_S,
            )
            for rows in memory_rows
        ),
    ]


JOB = """\
[input]
path = "{input}"

[output]
path = "{output}"

[request]
model = "{model}"
max_tokens = {max_tokens}

[template]
user = "{{{{ text }}}}"
"""


@dataclass(frozen=True)
class Inputs:
    path: Path
    rows: int
    #: Every row's request cost as the simulator charges it: prompt tokens + max_tokens.
    tokens: int


@dataclass(frozen=True)
class Output:
    """What a tool's output table says: rows in it, by status."""

    rows: int
    ok: int
    failed: int


@dataclass(frozen=True)
class Stats:
    """The simulator's counters (`GET /_sim/stats`) that the bench reads; others it
    adds later are left out (`read_stats`), so they cannot break the bench."""

    requests: int = 0
    ok: int = 0
    rate_limited: int = 0
    faults: int = 0
    errors: int = 0
    #: What the admitted requests were charged against TPM, as the server counts.
    tokens: int = 0
    #: Wall clock (`time.time()`) of the first request counted in `requests`.
    first_request_at: float | None = None

    def __sub__(self, other: Stats) -> Stats:
        return Stats(
            self.requests - other.requests,
            self.ok - other.ok,
            self.rate_limited - other.rate_limited,
            self.faults - other.faults,
            self.errors - other.errors,
            self.tokens - other.tokens,
            # The first of the requests since `other`: known only if it had seen none.
            self.first_request_at if not other.requests else None,
        )

    @property
    def admitted(self) -> int:
        """Requests that got past the rate limits (faults are drawn after them)."""
        return self.requests - self.rate_limited - self.errors


@dataclass(frozen=True)
class Watched:
    """One child process, watched from spawn to exit."""

    wall_s: float
    #: Wall clock (`time.time()`) at the spawn, for the simulator's `first_request_at`.
    spawned_at: float
    cpu_s: float
    peak_rss_mb: float
    exit_code: int
    #: The run reached its time limit and was stopped.
    cut_off: bool
    #: Seconds from spawn to the poll that first saw a request; None if none came.
    first_s: float | None
    #: ... and to the poll that saw the last one (the exit, if no poll saw it).
    last_s: float | None
    #: The child's CPU seconds when its first request was seen.
    startup_cpu_s: float | None


@dataclass(frozen=True)
class Run:
    scenario: Scenario
    tool: Tool
    inputs: Inputs
    watched: Watched
    stats: Stats
    #: None when the tool wrote no output.
    output: Output | None

    @property
    def finished(self) -> bool:
        return not self.watched.cut_off and self.output is not None

    @property
    def failed(self) -> int | None:
        """Rows failed, or missing from the output of a run that finished."""
        out = self.output
        if out is None:
            return None
        return out.failed + (self.inputs.rows - out.rows if self.finished else 0)

    @property
    def ideal_s(self) -> float | None:
        """The least time the server allows: its limits, or rows x latency / concurrency."""
        server, rows = self.scenario.server, self.inputs.rows
        bounds = [rows * server.latency_ms / 1000 / self.scenario.concurrency]
        if server.rpm is not None:
            bounds.append(rows / (server.rpm / 60))
        if server.tpm is not None:
            bounds.append(self.inputs.tokens / (server.tpm / 60))
        return max(bounds) or None

    @property
    def sending_s(self) -> float | None:
        w = self.watched
        if w.first_s is None or w.last_s is None or w.last_s <= w.first_s:
            return None
        return w.last_s - w.first_s

    @property
    def rpm_used(self) -> float | None:
        """Requests the server admitted per second of sending, as a share of its RPM."""
        rpm, sending = self.scenario.server.rpm, self.sending_s
        if rpm is None or sending is None:
            return None
        return self.stats.admitted / sending / (rpm / 60)

    @property
    def tpm_used(self) -> float | None:
        """The same in tokens, as the server counted the requests it admitted."""
        tpm, sending = self.scenario.server.tpm, self.sending_s
        if tpm is None or sending is None:
            return None
        return self.stats.tokens / sending / (tpm / 60)

    @property
    def cpu_ms_per_request(self) -> float | None:
        if not self.stats.requests:
            return None
        return self.watched.cpu_s * 1000 / self.stats.requests

    @property
    def cpu_ms_per_request_sending(self) -> float | None:
        """The same without the CPU spent before the first request (imports, setup)."""
        startup = self.watched.startup_cpu_s
        if not self.stats.requests or startup is None:
            return None
        return (self.watched.cpu_s - startup) * 1000 / self.stats.requests

    @property
    def startup_s(self) -> float | None:
        """Spawn to the first request: as the simulator stamped it (`first_request_at`),
        or, where the bench sent requests before the tool (`spend`), as first polled."""
        at = self.stats.first_request_at
        return self.watched.first_s if at is None else at - self.watched.spawned_at

    @property
    def burst_ideal_s(self) -> float | None:
        """Launch to exit at best against a server that admits a second's worth of its
        limit at once, then its refill: (rows - RPM/60) / (RPM/60), the same in tokens
        with TPM, whichever is longer. Unlike `ideal_s`, start-up counts against it."""
        server, bounds = self.scenario.server, []
        if server.rpm is not None:
            per_s = server.rpm / 60
            bounds.append(max(self.inputs.rows - per_s, 0.0) / per_s)
        if server.tpm is not None:
            per_s = server.tpm / 60
            bounds.append(max(self.inputs.tokens - per_s, 0.0) / per_s)
        return max(bounds) if bounds else None

    @property
    def burst_ideal_share(self) -> float | None:
        """`burst_ideal_s` over the wall time from launch to exit (1.0: the ideal)."""
        ideal = self.burst_ideal_s
        return None if ideal is None else ideal / self.watched.wall_s


# -------------------------------------------------------------------------------------
# The simulator


def read_stats(base_url: str) -> Stats:
    url = base_url.removesuffix("/v1") + "/_sim/stats"
    with urllib.request.urlopen(url, timeout=5) as answer:
        counters = json.loads(answer.read())
    return Stats(**{f.name: counters[f.name] for f in fields(Stats)})


def spend(base_url: str, buckets: Sequence[Bucket]) -> None:
    """Empty the server's buckets, as a job that has been running for a while finds them.

    The simulator's buckets start full with a minute's worth, as OpenAI documents, so a
    run shorter than a minute would never be refused whatever its rate: it would measure
    that opening credit, not the steady rate that a long job lives with.
    """
    asyncio.run(asyncio.wait_for(_spend(base_url, buckets), SPEND_TIMEOUT_S))
    time.sleep(SETTLE_S)


async def _spend(base_url: str, buckets: Sequence[Bucket]) -> None:
    url = f"{base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        left = await _remaining(session, url, 1)
        if "tokens" in buckets:
            # One request with a max_tokens that takes all the bucket holds but a margin.
            big = None if left is None else left["tokens"] - SPEND_TOKEN_MARGIN
            if big is None or await _remaining(session, url, big) is None:
                raise RuntimeError("the simulator refused to spend its token bucket")
        if "requests" in buckets:
            spent = asyncio.Event()

            async def worker() -> None:
                while not spent.is_set():
                    left = await _remaining(session, url, 1)
                    if left is None or left["requests"] <= 0:
                        spent.set()

            async with asyncio.TaskGroup() as tg:
                for _ in range(SPEND_CONCURRENCY):
                    tg.create_task(worker())


async def _remaining(
    session: aiohttp.ClientSession, url: str, max_tokens: int
) -> dict[str, int] | None:
    """Send one small request: its x-ratelimit-remaining-* headers, or None on a 429."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "."}]}
    async with session.post(url, json={**body, "max_tokens": max(max_tokens, 1)}) as answer:
        await answer.read()
        if answer.status == 429:
            return None
        answer.raise_for_status()
        prefix = "x-ratelimit-remaining-"
        return {
            k.lower().removeprefix(prefix): int(v)
            for k, v in answer.headers.items()
            if k.lower().startswith(prefix)
        }


# -------------------------------------------------------------------------------------
# Tables, made and read by children (see the module docstring)


def make_inputs(text: Text, rows: int, path: Path) -> Inputs:
    said = _helper("--make-input", text, str(rows), str(path))
    return Inputs(path, said["rows"], said["tokens"])


def read_output(path: Path) -> Output | None:
    return Output(**_helper("--read-output", str(path))) if path.exists() else None


def _helper(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        timeout=HELPER_TIMEOUT_S,
        check=True,
    )
    said: dict[str, Any] = json.loads(done.stdout)
    return said


def _write_input(text: Text, rows: int, path: Path) -> dict[str, int]:
    import polars as pl  # only in a helper child: see the module docstring

    ids = pl.int_range(rows, dtype=pl.Int64)
    if text == "short":
        short = pl.format("row {}: a short text of a few words that no other row has", ids)
        table = pl.select(id=ids, text=short)
    elif text == "repeated":
        table = pl.select(id=ids, text=pl.format("Name one colour for item {}.", ids % DISTINCT))
    elif text == "medium":
        low, high = MEDIUM_CHARS - MEDIUM_SPREAD, MEDIUM_CHARS + MEDIUM_SPREAD
        table = pl.DataFrame(
            {"id": range(rows), "text": _articles(rows, low, high, "Note", MEDIUM_SEED)}
        )
    else:
        table = pl.DataFrame({"id": range(rows), "text": _articles(rows)})
    table.write_parquet(path)
    # As the simulator counts: the text's tokens (the model's encoding) + 4 for the
    # message, + 3 for the reply's priming, + max_tokens. Not for the millions of rows
    # of the memory runs, which set no TPM (and tokenising them would take a minute).
    if table.height > MAX_COUNTED_ROWS:
        return {"rows": table.height, "tokens": 0}
    from pipeline.tokens import text_counter

    count = text_counter(MODEL)
    tokens = sum(count(text) for text in table["text"]) + table.height * (4 + 3 + MAX_TOKENS)
    return {"rows": table.height, "tokens": tokens}


_WORDS: Final = (
    "the", "a", "river", "quiet", "signal", "model", "answer", "light", "data", "table",
    "every", "row", "stone", "garden", "swift", "careful", "number", "window", "paper",
    "token", "cloud", "bridge", "morning", "simple", "green", "echo", "harbor", "little",
    "engine", "forest", "is", "and", "of", "to", "with", "under", "between", "again",
    "café", "naïve", "Straße",
)  # fmt: skip


def _articles(
    rows: int, low: int = 2048, high: int = 4096, opening: str = "Article", seed: int = 4
) -> list[str]:
    """Texts of `low` to `high` characters (2-4 KB), mostly ASCII, a few words not; each
    opens with its row's number, so no two are the same."""
    rng = random.Random(seed)
    texts = []
    for i in range(rows):
        size, parts = rng.randint(low, high), [f"{opening} {i}."]
        length = len(parts[0])
        while length < size:
            parts.append(rng.choice(_WORDS))
            length += len(parts[-1]) + 1
        texts.append(" ".join(parts))
    return texts


def _read_output(path: Path) -> dict[str, int]:
    import polars as pl  # only in a helper child: see the module docstring

    status = pl.col("status")
    counts = pl.scan_parquet(path).select(
        rows=pl.len(), ok=(status == "ok").sum(), failed=(status == "failed").sum()
    )
    return {k: int(v) for k, v in counts.collect().row(0, named=True).items()}


# -------------------------------------------------------------------------------------
# Running a tool


def command(tool: Tool, scenario: Scenario, inputs: Inputs, base_url: str, out: Path) -> list[str]:
    if tool == "pipeline":
        job = out.with_suffix(".toml")
        text = JOB.format(input=inputs.path, output=out, model=MODEL, max_tokens=MAX_TOKENS)
        job.write_text(text, encoding="utf-8")
        args = [sys.executable, "-m", "pipeline", "run", str(job), "--fresh"]
    else:
        # The floor accepts --rpm/--tpm and ignores them.
        script = FLOOR if tool == "floor" else BASELINE
        args = [sys.executable, str(script), "--max-tokens", str(MAX_TOKENS)]
    args += ["--base-url", base_url, "--input", str(inputs.path), "--output", str(out)]
    args += ["--concurrency", str(scenario.concurrency)]
    if scenario.rpm is not None:
        args += ["--rpm", str(scenario.rpm)]
    if scenario.tpm is not None:
        args += ["--tpm", str(scenario.tpm)]
    return args


def run_one(scenario: Scenario, tool: Tool, inputs: Inputs, directory: Path) -> Run:
    stem = directory / f"{scenario.name}-{scenario.rows}-{tool}"
    out = stem.with_suffix(".parquet")
    log_path = stem.with_suffix(".simulator.log")
    with simulator(scenario.server.args(), log_path, cwd=REPO) as base_url:
        if scenario.spend:
            spend(base_url, scenario.spend)
        before = read_stats(base_url)
        args = command(tool, scenario, inputs, base_url, out)
        # Only a limited server makes the sending time (`Run.rpm_used`) worth following.
        follow = scenario.server.rpm is not None or scenario.server.tpm is not None
        watcher = Watcher(base_url, before.requests, follow)
        watched = watcher.run(args, stem.with_suffix(".log"), scenario.limit_s)
        stats = read_stats(base_url) - before
    return Run(scenario, tool, inputs, watched, stats, read_output(out))


@dataclass
class Watcher:
    """Runs a child to its end or its time limit, polling the simulator meanwhile."""

    base_url: str
    seen: int
    follow: bool
    first_s: float | None = None
    last_s: float | None = None
    startup_cpu_s: float | None = None

    def run(self, args: list[str], log: Path, limit_s: float) -> Watched:
        with log.open("wb") as sink:
            spawned, spawned_at = time.perf_counter(), time.time()
            proc = subprocess.Popen(args, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
        # SIGTERM at the limit (pipeline writes what it has done), SIGKILL after the grace.
        stops = [(limit_s, signal.SIGTERM), (limit_s + GRACE_S, signal.SIGKILL)]
        reaped = None
        try:
            while (reaped := _reap(proc.pid)) is None:
                now = time.perf_counter() - spawned
                if stops and now > stops[0][0]:
                    proc.send_signal(stops.pop(0)[1])
                elif not stops and now > limit_s + GRACE_S + REAP_TIMEOUT_S:
                    raise RuntimeError(f"{args[:4]} did not die of SIGKILL")
                if self.first_s is None or self.follow:
                    self._poll(proc.pid, now)
                time.sleep(FIRST_POLL_S if self.first_s is None else POLL_S)
            ended = time.perf_counter() - spawned
        finally:
            if reaped is None:
                proc.kill()
                _reap(proc.pid, REAP_TIMEOUT_S)
        _, status, usage = reaped
        proc.returncode = os.waitstatus_to_exitcode(status)
        if read_stats(self.base_url).requests > self.seen:
            self.last_s = ended  # requests after the last poll: the exit bounds them
        return Watched(
            wall_s=ended,
            spawned_at=spawned_at,
            cpu_s=usage.ru_utime + usage.ru_stime,
            peak_rss_mb=usage.ru_maxrss / 1024,  # KiB on Linux
            exit_code=proc.returncode,
            cut_off=len(stops) < 2,
            first_s=self.first_s,
            last_s=self.last_s,
            startup_cpu_s=self.startup_cpu_s,
        )

    def _poll(self, pid: int, now: float) -> None:
        requests = read_stats(self.base_url).requests
        if requests <= self.seen:
            return
        if self.first_s is None:
            self.first_s, self.startup_cpu_s = now, _cpu_s(pid)
        self.last_s, self.seen = now, requests


def _reap(pid: int, wait_s: float = 0.0) -> tuple[int, int, Any] | None:
    """The child's (pid, status, rusage) once it has exited; None while it runs."""
    deadline = time.monotonic() + wait_s
    while True:
        reaped = os.wait4(pid, os.WNOHANG)
        if reaped[0]:
            return reaped
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a running process, all its threads."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which may hold spaces: utime and stime are the
    # 14th and 15th of the whole line, in clock ticks.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -------------------------------------------------------------------------------------
# The report


COLUMNS = (
    ("scenario", "<14"),
    ("tool", "<9"),
    ("rows", ">10"),
    ("wall s", ">8"),
    ("ideal s", ">8"),
    ("wall/ideal", ">11"),
    ("RPM %", ">7"),
    ("TPM %", ">7"),
    ("429s", ">7"),
    ("failed", ">8"),
    ("CPU ms/req", ">11"),
    ("peak MB", ">8"),
    ("start-up s", ">11"),
)


def header() -> str:
    line = "".join(f"{name:{align}}" for name, align in COLUMNS)
    return f"{line}\n{'-' * len(line)}"


def row(run: Run) -> str:
    w, ideal = run.watched, run.ideal_s
    cells = (
        run.scenario.name,
        run.tool,
        f"{run.inputs.rows:,}",
        f"{w.wall_s:.1f}" + ("*" if w.cut_off else ""),
        _fmt(ideal, "{:.1f}"),
        _fmt(w.wall_s / ideal if ideal else None, "{:.2f}"),
        _fmt(run.rpm_used, "{:.1%}"),
        _fmt(run.tpm_used, "{:.1%}"),
        f"{run.stats.rate_limited:,}",
        _fmt(run.failed, "{:,}"),
        _fmt(run.cpu_ms_per_request, "{:.3f}"),
        f"{w.peak_rss_mb:.0f}",
        _fmt(run.startup_s, "{:.2f}"),
    )
    return "".join(f"{cell:{align}}" for cell, (_, align) in zip(cells, COLUMNS, strict=True))


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


@dataclass(frozen=True)
class Target:
    """A figure of pipeline's run in a scenario, and the bound it should keep to."""

    scenario: str
    figure: str
    value: Callable[[Run], float | None]
    #: How the figure is shown, and how the bound is.
    spec: str
    bound_spec: str
    least: float | None = None
    most: float | None = None

    @property
    def want(self) -> str:
        if self.least is not None:
            return f">= {self.bound_spec.format(self.least)}"
        assert self.most is not None
        bound = self.bound_spec.format(self.most)
        return bound if self.most == 0 else f"<= {bound}"

    def met(self, value: float) -> bool:
        return (self.least is None or value >= self.least) and (
            self.most is None or value <= self.most
        )


def _rpm(run: Run) -> float | None:
    return run.rpm_used


def _tpm(run: Run) -> float | None:
    return run.tpm_used


def _429s(run: Run) -> float | None:
    return run.stats.rate_limited


def _failed(run: Run) -> float | None:
    return run.failed


def _cpu(run: Run) -> float | None:
    return run.cpu_ms_per_request


def _burst(run: Run) -> float | None:
    return run.burst_ideal_share


TARGETS = (
    Target("rate-bound", "server RPM used", _rpm, "{:.1%}", "{:.0%}", least=0.97),
    Target("rate-bound", "429s received", _429s, "{:,}", "{:,}", most=0),
    Target("rate-bound", "rows failed", _failed, "{:,}", "{:,}", most=0),
    Target(
        "rate-bound",
        "launch to exit: burst ideal / wall",
        _burst,
        "{:.1%}",
        "{:.0%}",
        least=BURST_TARGET,
    ),
    Target("TPM-bound", "server TPM used", _tpm, "{:.1%}", "{:.0%}", least=0.97),
    Target("TPM-bound", "429s received", _429s, "{:,}", "{:,}", most=0),
    Target("TPM-bound", "rows failed", _failed, "{:,}", "{:,}", most=0),
    Target(
        "TPM-bound",
        "launch to exit: burst ideal / wall",
        _burst,
        "{:.1%}",
        "{:.0%}",
        least=BURST_TARGET,
    ),
    Target("misconfigured", "server RPM used", _rpm, "{:.1%}", "{:.0%}", least=0.90),
    Target("misconfigured", "rows failed", _failed, "{:,}", "{:,}", most=0),
    Target("faults", "rows failed", _failed, "{:,}", "{:,}", most=0),
    Target("overhead", "client CPU ms/request", _cpu, "{:.3f}", "{:.2f}", most=0.25),
)
STARTUP_TARGET_S = 1.0
MEMORY_TARGET = 1.5


#: (scenario, figure, pipeline, baseline, floor, target, verdict)
Line = tuple[str, str, str, str, str, str, str]


def targets(runs: list[Run]) -> list[Line]:
    """(scenario, figure, pipeline, baseline, floor, target, verdict) for every target."""
    lines: list[Line] = []
    for t in TARGETS:
        ours = _pick(runs, t.scenario, "pipeline")
        if ours is None:
            continue
        value = t.value(ours)
        met = value is not None and ours.finished and t.met(value)
        spec = "{:.1%}" if "%" in t.spec else "{:.3f}" if "f" in t.spec else t.spec
        baseline, floor = (
            "-" if theirs is None else _fmt(t.value(theirs), spec)
            for theirs in (_pick(runs, t.scenario, tool) for tool in ("baseline", "floor"))
        )
        lines.append(
            (t.scenario, t.figure, _fmt(value, spec), baseline, floor, t.want, _verdict(met, ours))
        )
    for name in dict.fromkeys(r.scenario.name for r in runs if r.tool == "floor"):
        lines += against_floor(runs, name)
    memory = [r for r in runs if r.scenario.name == "memory"]
    if len(memory) >= 2:
        small, large = memory[0], memory[-1]
        ratio = large.watched.peak_rss_mb / small.watched.peak_rss_mb
        figure = f"peak RSS {large.inputs.rows:,} / {small.inputs.rows:,} rows"
        met = ratio <= MEMORY_TARGET and small.finished and large.finished
        verdict = _verdict(met, large if small.finished else small)
        lines.append(("memory", figure, f"{ratio:.2f}x", "-", "-", f"<= {MEMORY_TARGET}x", verdict))
    ours_all = [r for r in runs if r.tool == "pipeline" and r.startup_s is not None]
    if ours_all:
        slowest = max(ours_all, key=lambda r: r.startup_s or 0.0)
        baseline_s, floor_s = (
            [r.startup_s for r in runs if r.tool == tool and r.startup_s]
            for tool in ("baseline", "floor")
        )
        met = (slowest.startup_s or 0.0) < STARTUP_TARGET_S
        lines.append(
            (
                "all",
                f"start-up, slowest ({slowest.scenario.name})",
                f"{slowest.startup_s:.2f} s",
                f"{max(baseline_s):.2f} s" if baseline_s else "-",
                f"{max(floor_s):.2f} s" if floor_s else "-",
                f"< {STARTUP_TARGET_S:g} s",
                "met" if met else "NOT met",
            )
        )
    return lines


def against_floor(runs: list[Run], scenario: str) -> list[Line]:
    """Pipeline beside the floor in one scenario: CPU per request (and the ratio),
    start-up (and the difference), peak RSS; the baseline's figures for comparison."""
    ours, floor = _pick(runs, scenario, "pipeline"), _pick(runs, scenario, "floor")
    if ours is None or floor is None:
        return []
    theirs = _pick(runs, scenario, "baseline")
    lines: list[Line] = []
    cpu, floor_cpu = ours.cpu_ms_per_request, floor.cpu_ms_per_request
    if cpu is not None and floor_cpu:
        met = ours.finished and floor.finished and cpu <= FLOOR_CPU_TARGET * floor_cpu

        def cpu_cell(run: Run | None) -> str:
            value = None if run is None else run.cpu_ms_per_request
            return "-" if value is None else f"{value:.3f} ({value / floor_cpu:.2f}x)"

        lines.append(
            (
                scenario,
                "client CPU ms/request (x floor)",
                cpu_cell(ours),
                cpu_cell(theirs),
                f"{floor_cpu:.3f}",
                f"<= {FLOOR_CPU_TARGET:g}x floor",
                _verdict(met, ours),
            )
        )
    start, floor_start = ours.startup_s, floor.startup_s
    if start is not None and floor_start is not None:
        met = start - floor_start <= FLOOR_STARTUP_TARGET_S

        def start_cell(run: Run | None) -> str:
            value = None if run is None else run.startup_s
            return "-" if value is None else f"{value:.2f} s ({value - floor_start:+.2f})"

        lines.append(
            (
                scenario,
                "start-up to first request (- floor)",
                start_cell(ours),
                start_cell(theirs),
                f"{floor_start:.2f} s",
                f"<= floor + {FLOOR_STARTUP_TARGET_S:g} s",
                "met" if met else "NOT met",
            )
        )
    rss = ours.watched.peak_rss_mb
    lines.append(
        (
            scenario,
            f"peak RSS, {ours.inputs.rows:,} rows",
            f"{rss:.0f} MB",
            "-" if theirs is None else f"{theirs.watched.peak_rss_mb:.0f} MB",
            f"{floor.watched.peak_rss_mb:.0f} MB",
            f"<= {REAL_RSS_TARGET_MB:.0f} MB",
            _verdict(rss <= REAL_RSS_TARGET_MB and ours.finished, ours),
        )
    )
    return lines


def _pick(runs: list[Run], scenario: str, tool: Tool) -> Run | None:
    return next((r for r in runs if r.scenario.name == scenario and r.tool == tool), None)


def _verdict(met: bool, run: Run) -> str:
    if met:
        return "met"
    return "NOT met" + (" (cut off)" if not run.finished else "")


def notes(runs: list[Run]) -> list[str]:
    said = [
        "RPM %/TPM %: requests the server admitted per second between the first and the "
        "last request seen (polled every 0.1 s), over its limit; tokens as the server "
        "charged the requests it admitted (the model's tokenizer, + max_tokens).",
        "start-up s: spawn to the first request the simulator counted, as it stamped it "
        "(first_request_at, wall clock; GET /models not counted); where the bench sent "
        "requests of its own first (the spent buckets below), to the first stats poll that "
        f"saw one (every {FIRST_POLL_S * 1000:.0f} ms). CPU and peak RSS: wait4() of the "
        "tool's process, start-up and output included.",
    ]
    if any(r.scenario.spend for r in runs):
        said.append(
            "rate-bound, TPM-bound, misconfigured: the server's buckets are spent before "
            f"each tool starts, then refill for {SETTLE_S:g} s, so a 30 s run meets the "
            "steady rate of a long job, not the minute's credit a fresh server opens with. "
            "What refills before the first request is credit a burst may use: figures over "
            "100% are that."
        )
    if any(r.burst_ideal_s is not None and r.scenario.spend for r in runs):
        said.append(
            "burst ideal: launch to exit at best when the server admits a second's worth "
            "of its limit at once, then its refill: (rows - RPM/60) / (RPM/60), or the "
            "same in tokens. Unlike ideal s, the client's start-up and output count against "
            f"it; the target is burst ideal / wall >= {BURST_TARGET:.0%}."
        )
    if any(r.tool == "floor" for r in runs):
        said.append(
            "floor: bench/floor.py, a bare worker pool (polars reads, N aiohttp workers "
            "send and parse with orjson, polars writes; no limiter, retries, journal or "
            "progress). It ignores the lifted --rpm/--tpm that pipeline and the baseline "
            "get. Targets against it: CPU/request at most "
            f"{FLOOR_CPU_TARGET:g}x, first request at most {FLOOR_STARTUP_TARGET_S:g} s "
            f"later, peak RSS at most {REAL_RSS_TARGET_MB:.0f} MB."
        )
    if any(r.watched.cut_off for r in runs):
        said.append("* cut off at its time limit: SIGTERM (pipeline writes what it has done).")
    for run in runs:
        name = f"{run.scenario.name} {run.inputs.rows:,} {run.tool}"
        if run.scenario.spend and run.burst_ideal_s is not None:
            said.append(
                f"{name}: launch to exit {run.watched.wall_s:.1f} s against a burst ideal "
                f"of {run.burst_ideal_s:.1f} s."
            )
        if run.scenario.name == "overhead" or run.scenario.name.startswith("real-"):
            sending = _fmt(run.cpu_ms_per_request_sending, "{:.3f}")
            startup = _fmt(run.watched.startup_cpu_s, "{:.2f}")
            said.append(
                f"{name}: {sending} ms CPU/request without the {startup} s of CPU spent "
                "before its first request."
            )
        if run.scenario.name == "memory" and run.output is not None:
            done = run.output.ok + run.output.failed
            said.append(
                f"{name}: {done:,} of {run.inputs.rows:,} rows done in {run.watched.wall_s:.0f} s "
                f"with {run.stats.requests:,} requests; {_per_row_us(run, done)} us CPU/row."
            )
        if run.watched.exit_code != 0:
            said.append(f"{name}: exit code {run.watched.exit_code}.")
        if run.stats.errors:
            said.append(f"{name}: the simulator refused {run.stats.errors:,} requests as bad.")
    memory = [r.inputs.rows for r in runs if r.scenario.name == "memory"]
    if memory:
        said.append(
            f"memory: pipeline only. Its rows repeat {DISTINCT:,} distinct requests, which "
            "pipeline sends once each and shares, so it reads, renders, journals and writes "
            f"every row while sending ~{DISTINCT:,} requests. The baseline would send "
            f"{max(memory):,} real requests{_baseline_minutes(runs, max(memory))}."
        )
    return said


def _per_row_us(run: Run, rows: int) -> str:
    return f"{run.watched.cpu_s * 1e6 / rows:.0f}" if rows else "-"


def _baseline_minutes(runs: list[Run], requests: int) -> str:
    """How long the baseline would take, at its pace in the overhead scenario."""
    overhead = _pick(runs, "overhead", "baseline")
    if overhead is None or not overhead.sending_s:
        return ""
    minutes = requests * overhead.sending_s / overhead.stats.requests / 60
    return f": about {minutes:.0f} minutes at its pace in the overhead scenario"


def report(runs: list[Run], broken: list[str], elapsed_s: float) -> None:
    print(f"\n\nsummary: {len(runs)} runs in {elapsed_s / 60:.1f} min\n")
    print(header())
    for run in runs:
        print(row(run))
    lines = targets(runs)
    print()
    widths = (14, 38, 16, 16, 10, 18, 0)
    titles = ("scenario", "figure (pipeline's run)", "pipeline", "baseline", "floor", "target", "")
    print("".join(f"{t:<{w}}" for t, w in zip(titles, widths, strict=True)))
    for line in lines:
        print("".join(f"{c:<{w}}" for c, w in zip(line, widths, strict=True)))
    met = sum(line[-1] == "met" for line in lines)
    print(f"\n{met} of {len(lines)} targets met\n")
    for note in notes(runs):
        print(f"- {note}")
    for failure in broken:
        print(f"- did not run: {failure}")


# -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", help="Comma-separated scenario names (default: all).")
    parser.add_argument(
        "--memory-rows",
        type=lambda text: [int(n) for n in text.split(",")],
        default=list(MEMORY_ROWS),
        help="Row counts of the memory runs (default: 50000,5000000).",
    )
    parser.add_argument(
        "--real-rows",
        type=int,
        default=REAL_ROWS,
        help=f"Rows of the real-* runs (default: {REAL_ROWS}; fewer for a quick look).",
    )
    # For the helper children only.
    parser.add_argument("--make-input", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--read-output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_input:
        text, rows, path = args.make_input
        print(json.dumps(_write_input(text, int(rows), Path(path))))
        return
    if args.read_output:
        print(json.dumps(_read_output(args.read_output)))
        return
    # As users run it: an installed package has its bytecode compiled (pip does that),
    # and so has this checkout now, whatever PYTHONDONTWRITEBYTECODE says. Without it,
    # every launch would compile the modules edited since their last .pyc (~50 ms).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "pipeline")], check=True)
    chosen = scenarios(args.memory_rows, args.real_rows)
    if args.only:
        names = set(args.only.split(","))
        chosen = [s for s in chosen if s.name in names]
    run_all(chosen)


def run_all(chosen: list[Scenario]) -> None:
    started = time.perf_counter()
    runs: list[Run] = []
    broken: list[str] = []
    print(header(), flush=True)
    with tempfile.TemporaryDirectory(prefix="pipeline-scenarios-") as tmp:
        directory = Path(tmp)
        # Scenarios that differ only in the job (real-64, real-256) share their table.
        tables: dict[tuple[Text, int], Inputs] = {}
        for scenario in chosen:
            stem = directory / f"{scenario.name}-{scenario.rows}"
            key = (scenario.text, scenario.rows)
            if key not in tables:
                tables[key] = make_inputs(*key, stem.with_suffix(".parquet"))
            inputs = tables[key]
            for tool in scenario.tools:
                try:
                    run = run_one(scenario, tool, inputs, directory)
                except (OSError, RuntimeError, TimeoutError, subprocess.SubprocessError) as exc:
                    # One broken run (a simulator that died, say) leaves the others' figures.
                    broken.append(f"{scenario.name} {scenario.rows:,} {tool}: {exc!r}")
                    print(f"{scenario.name:<14}{tool:<9}  did not run: {exc!r}", flush=True)
                    continue
                runs.append(run)
                print(row(run), flush=True)
    report(runs, broken, time.perf_counter() - started)


if __name__ == "__main__":
    main()
