"""What the journal costs a run: client CPU per request with the checkpoint, and without.

    make bench          # or: .venv/bin/python bench/journal.py

Starts `pipeline simulate` as its own process (20 ms latency, no rate limits), then runs
the same 20,000-row job in this process through `runner.send_all`, alternately with the journal
as it is and with a journal whose writes do nothing, three times each, and prints the
medians. Client CPU is `time.process_time()` around the dispatch (every thread of this
process, the journal writer's included); the simulator's CPU is not in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from simproc import simulator

from pipeline.journal import Journal
from pipeline.plan import Plan, RunOptions, fingerprint, make_plan
from pipeline.records import RowResult
from pipeline.runner import send_all
from pipeline.spec import load_job

ROWS = 20_000
CONCURRENCY = 64
LATENCY_MS = 20
REPEATS = 3
#: Extra client CPU the journal may cost, as a share of the run without it.
TARGET = 0.10
#: Bounds, so that the bench stops by itself whatever happens.
START_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 300.0

JOB = f"""
[input]
path = "input.csv"

[output]
path = "out.parquet"

[request]
model = "gpt-4o-mini"
max_tokens = 32

[template]
user = "{{{{ text }}}}"

[limits]
concurrency = {CONCURRENCY}
"""


class CountedJournal(Journal):
    """The journal as it is, counting its transactions (one per `write`)."""

    commits = 0

    def write(
        self,
        *,
        sending: Sequence[tuple[int, int, int]] = (),
        results: Sequence[RowResult] = (),
        unsent: Sequence[int] = (),
    ) -> None:
        self.commits += 1
        super().write(sending=sending, results=results, unsent=unsent)


class UnwrittenJournal(Journal):
    """The journal with its writes switched off: the run as it would be without it."""

    def write(
        self,
        *,
        sending: Sequence[tuple[int, int, int]] = (),
        results: Sequence[RowResult] = (),
        unsent: Sequence[int] = (),
    ) -> None:
        return None


@dataclass(frozen=True)
class Sample:
    requests: int
    wall_s: float
    cpu_s: float
    #: Journal transactions; None when the journal wrote nothing.
    commits: int | None = None

    @property
    def cpu_ms_per_request(self) -> float:
        return self.cpu_s * 1000 / self.requests


def running_simulator(directory: Path) -> contextlib.AbstractContextManager[str]:
    return simulator(["--latency-ms", str(LATENCY_MS)], directory / "simulator.log")


def write_job(directory: Path) -> Path:
    texts = [f"row {i}: a text of a few words that no other row has" for i in range(ROWS)]
    pl.DataFrame({"id": range(ROWS), "text": texts}).write_csv(directory / "input.csv")
    job = directory / "job.toml"
    job.write_text(JOB, encoding="utf-8")
    return job


def measure(plan: Plan, journal_type: type[Journal], path: Path, base_url: str) -> Sample:
    journal = journal_type.open(path, fingerprint(plan), fresh=True)
    try:
        sample = asyncio.run(asyncio.wait_for(_dispatch(plan, journal, base_url), RUN_TIMEOUT_S))
        if not isinstance(journal, CountedJournal):
            return sample
        done = journal.count()
        if done != ROWS:
            raise RuntimeError(f"{done:,} of {ROWS:,} rows committed")
        return dataclasses.replace(sample, commits=journal.commits)
    finally:
        journal.close()


async def _dispatch(plan: Plan, journal: Journal, base_url: str) -> Sample:
    earlier = journal.totals()
    # Progress lines go nowhere: the table below is the report.
    with contextlib.redirect_stderr(io.StringIO()):
        wall, cpu = time.perf_counter(), time.process_time()
        sent = await send_all(plan, journal, base_url, earlier)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if sent.stop.reason is not None or sent.counters.ok != ROWS:
        raise RuntimeError(f"{sent.counters.ok:,} rows ok: {sent.stop.reason}")
    return Sample(sent.stats.sent, wall, cpu)


def median(samples: list[Sample]) -> Sample:
    commits = [s.commits for s in samples if s.commits is not None]
    return Sample(
        requests=samples[0].requests,
        wall_s=statistics.median(s.wall_s for s in samples),
        cpu_s=statistics.median(s.cpu_s for s in samples),
        commits=int(statistics.median(commits)) if commits else None,
    )


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        directory = Path(tmp)
        job = write_job(directory)
        with running_simulator(directory) as base_url:
            plan = make_plan(load_job(job), RunOptions(base_url=base_url), env={})
            runs: dict[str, list[Sample]] = {"with": [], "without": []}
            for i in range(REPEATS):
                for name, kind in (("with", CountedJournal), ("without", UnwrittenJournal)):
                    path = directory / f"{name}-{i}.journal.sqlite"
                    sample = measure(plan, kind, path, base_url)
                    runs[name].append(sample)
                    print(
                        f"  {name:<8} #{i + 1}: {sample.wall_s:6.2f} s wall, "
                        f"{sample.cpu_ms_per_request:.3f} ms CPU/request",
                        flush=True,
                    )
    report(median(runs["with"]), median(runs["without"]))


def report(with_journal: Sample, without: Sample) -> None:
    overhead = with_journal.cpu_ms_per_request / without.cpu_ms_per_request - 1
    print(f"\njournal cost: {ROWS:,} rows, concurrency {CONCURRENCY}, simulator {LATENCY_MS} ms")
    print(f"median of {REPEATS}, alternating\n")
    print(f"{'journal':<10}{'rows':>8}{'wall s':>9}{'client CPU ms/request':>24}{'commits':>10}")
    for name, s in (("with", with_journal), ("without", without)):
        commits = "-" if s.commits is None else f"{s.commits:,}"
        print(
            f"{name:<10}{s.requests:>8,}{s.wall_s:>9.2f}{s.cpu_ms_per_request:>24.3f}{commits:>10}"
        )
    print(f"{'overhead':<10}{'':>8}{'':>9}{overhead:>+24.1%}")
    verdict = "met" if overhead < TARGET else "NOT met"
    print(f"\ntarget: under {TARGET:.0%} extra client CPU: {verdict}")


if __name__ == "__main__":
    main()
