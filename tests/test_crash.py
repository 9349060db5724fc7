"""Crash safety the way SQLite tests itself: a child run killed (SIGKILL) at random
instants, resumed each time, then the invariants checked against the journal's own
tables and the requests the server actually received.

Each run is a real `python -m pipeline run` against the simulator in this process, so
`by_body` (sha256 of each request body -> times received) is read directly. Between
runs the journal is read with sqlite3, read-only. The kill instants come from a seeded
RNG; the server's latency bounds how far a run gets (32 in flight / 200 ms), so the
job outlasts the kills on any machine and the test takes about half a minute.
"""

from __future__ import annotations

import random
import re
import sqlite3
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from conftest import read_output, spawn_run, write_job

from pipeline.simulator import SimConfig, Simulator, running_in_thread

ROWS = 2_500
CONCURRENCY = 32
#: Mean server latency: it sets the pace (CONCURRENCY / LATENCY requests a second).
LATENCY_MS = 200.0
#: Children started; each is killed unless it finishes first.
ITERATIONS = 22
MIN_KILLS = 20
#: A child is killed this long after it starts; it takes about 0.5 s to send anything.
KILL_AFTER_S = (0.4, 1.6)
#: Bound on a child that is not killed, and on reading a killed child's last words.
CHILD_TIMEOUT_S = 60.0
SEED = 20_240_607

_IN_FLIGHT = re.compile(r"([\d,]+) requests were in flight")


@dataclass(frozen=True)
class Checkpoint:
    """What the journal holds between runs: row -> request hash, for both tables."""

    results: dict[int, int]
    inflight: dict[int, int]


@dataclass
class Run:
    number: int
    kill_at: float | None  # None: run to completion
    killed: bool
    returncode: int
    stderr: str
    before: Checkpoint
    after: Checkpoint
    #: by_body keyed like the journal's request_hash, before and after the run.
    seen_before: Counter[int]
    seen_after: Counter[int]

    @property
    def label(self) -> str:
        if self.kill_at is None:
            return f"run {self.number} (the final run)"
        return f"run {self.number} (killed at {self.kill_at:.2f} s)"

    @property
    def resumed(self) -> bool:
        return "resuming from" in self.stderr

    @property
    def reported(self) -> int:
        """In-flight requests the run's resume line owned up to; 0 when it named none."""
        found = _IN_FLIGHT.search(self.stderr)
        return int(found[1].replace(",", "")) if found else 0

    @property
    def sent_again(self) -> set[int]:
        """Bodies this run sent that the server had received before: the duplicates."""
        return {
            h
            for h, n in self.seen_after.items()
            if n > self.seen_before[h] and n >= 2  # n >= 2: a late arrival counts too
        }


def read_checkpoint(path: Path) -> Checkpoint:
    if not path.exists():
        return Checkpoint({}, {})
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        (integrity,) = db.execute("PRAGMA integrity_check").fetchone()
        assert integrity == "ok", f"{path} is corrupt: {integrity}"
        try:
            rows = db.execute("SELECT row, request_hash, status FROM results").fetchall()
            results = {row: digest for row, digest, status in rows if status != "sending"}
            inflight = {row: digest for row, digest, status in rows if status == "sending"}
        except sqlite3.OperationalError:  # killed before the schema was created
            return Checkpoint({}, {})
        statuses = {s for (s,) in db.execute("SELECT DISTINCT status FROM results")}
    finally:
        db.close()
    assert statuses <= {"ok", "sending"}, f"rows failed against a faultless server: {statuses}"
    return Checkpoint(results, inflight)


def seen(sim: Simulator) -> Counter[int]:
    """The server's per-body counts, keyed like the journal's request_hash: the first
    64 bits of the body's sha256, as a signed integer."""
    return Counter(
        {
            int.from_bytes(bytes.fromhex(h[:16]), "big", signed=True): n
            for h, n in dict(sim.stats.by_body).items()
        }
    )


def run_child(job: Path, url: str, kill_at: float | None) -> tuple[bool, int, str]:
    """Start a run; SIGKILL it `kill_at` seconds after its start unless it ends first."""
    proc = spawn_run(job, url, cwd=job.parent)
    try:
        _, stderr = proc.communicate(timeout=CHILD_TIMEOUT_S if kill_at is None else kill_at)
        return False, proc.returncode, stderr
    except subprocess.TimeoutExpired:
        proc.kill()  # SIGKILL: no handler, no cleanup, no last commit
        _, stderr = proc.communicate(timeout=CHILD_TIMEOUT_S)
        return True, proc.returncode, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_sigkill_at_random_instants_loses_nothing_and_bounds_duplicates(tmp_path: Path) -> None:
    rows = [{"id": i, "text": f"row {i}: a text no other row has"} for i in range(ROWS)]
    job = write_job(tmp_path, rows, limits={"concurrency": CONCURRENCY})
    journal = tmp_path / "out.journal.sqlite"
    rng = random.Random(SEED)
    runs: list[Run] = []
    started = time.monotonic()

    with running_in_thread(SimConfig(latency_ms=LATENCY_MS)) as (url, sim):
        kill_times: list[float | None] = [rng.uniform(*KILL_AFTER_S) for _ in range(ITERATIONS)]
        for number, kill_at in enumerate([*kill_times, None], start=1):
            before, seen_before = read_checkpoint(journal), seen(sim)
            killed, code, stderr = run_child(job, url, kill_at)
            runs.append(
                Run(
                    number,
                    kill_at,
                    killed,
                    code,
                    stderr,
                    before,
                    read_checkpoint(journal),
                    seen_before,
                    seen(sim),
                )
            )
        final_seen = seen(sim)

    elapsed = time.monotonic() - started
    kills = sum(r.killed for r in runs)
    print(f"\n{kills} kills, {len(runs) - kills} runs that ended by themselves, {elapsed:.1f} s")
    for r in runs[1:]:
        print(
            f"{r.label}: {len(r.before.results):,} rows committed before it, "
            f"{r.reported} in flight reported, {len(r.sent_again)} sent again"
        )

    for r in runs:
        assert r.killed or r.returncode == 0, f"{r.label} exited {r.returncode}: {r.stderr}"
    assert kills >= MIN_KILLS, f"only {kills} kills: the job finished too soon"
    check_output(tmp_path)
    check_nothing_committed_is_lost_or_sent_again(runs, final_seen)
    check_duplicates_are_bounded_and_owned_up_to(runs)


def check_output(directory: Path) -> None:
    out = read_output(directory / "out.parquet")
    assert out.height == ROWS, f"{out.height} output rows for {ROWS} input rows"
    # CSV input columns are written as the text they were (CSV has no types).
    ids = [str(i) for i in range(ROWS)]
    assert out["id"].to_list() == ids, "every input row once, in input order"
    bad = out.filter(out["status"] != "ok")
    assert bad.height == 0, f"{bad.height} rows not ok, the first: {bad.row(0, named=True)}"


def check_nothing_committed_is_lost_or_sent_again(runs: list[Run], final: Counter[int]) -> None:
    for r in runs:
        kill = r.label
        lost = {row for row, h in r.before.results.items() if r.after.results.get(row) != h}
        assert not lost, f"{kill} lost (or changed) committed rows: {sorted(lost)[:10]}"
        fresh = r.after.results.keys() - r.before.results.keys()
        unsent = [row for row in fresh if r.seen_after[r.after.results[row]] == 0]
        assert not unsent, f"{kill} committed rows the server never received: {unsent[:10]}"
        known = {*r.after.results.values(), *r.after.inflight.values()}
        unrecorded = [h for h in r.seen_after if h not in known]
        assert not unrecorded, (
            f"after {kill} the server had received {len(unrecorded)} requests the journal "
            f"holds neither as in flight nor as done, e.g. {unrecorded[:3]}"
        )
        assert len(r.after.inflight) <= CONCURRENCY, (
            f"{kill} left {len(r.after.inflight)} rows in flight in the journal, "
            f"more than the {CONCURRENCY} workers can hold"
        )
        again = [
            (row, r.seen_after[h], final[h])
            for row, h in r.after.results.items()
            if final[h] != r.seen_after[h]
        ]
        assert not again, (
            f"rows committed by the end of {kill} were sent again later "
            f"(row, times received by then, times at the end): {again[:10]}"
        )


def check_duplicates_are_bounded_and_owned_up_to(runs: list[Run]) -> None:
    reported = duplicates = 0
    for r in runs[1:]:
        kill = f"the resume after kill {r.number - 1}, {r.label},"
        twice = r.sent_again
        recorded = set(r.before.inflight.values())
        assert twice <= recorded, (
            f"{kill} sent again {len(twice - recorded)} requests the journal did not "
            "record as in flight"
        )
        assert len(twice) <= CONCURRENCY, (
            f"{kill} sent {len(twice)} requests the server had already received, "
            f"more than the {CONCURRENCY} that can be in flight"
        )
        if r.resumed:
            assert r.reported == len(r.before.inflight), (
                f"{kill} reported {r.reported} requests in flight; the journal holds "
                f"{len(r.before.inflight)}: {r.stderr}"
            )
        assert r.reported >= len(twice), (
            f"{kill} reported {r.reported} requests in flight but the server received "
            f"{len(twice)} of its requests a second time: {r.stderr}"
        )
        assert r.reported - len(twice) <= CONCURRENCY, (
            f"{kill} reported {r.reported} in flight, the server saw {len(twice)} again"
        )
        reported += r.reported
        duplicates += len(twice)
    print(f"in flight reported {reported}, sent twice {duplicates}: {reported - duplicates} gap")
    kills = sum(r.killed for r in runs)
    assert reported - duplicates <= CONCURRENCY * kills, (
        f"the resumes reported {reported} requests in flight, the server saw {duplicates}"
    )


def test_resume_before_any_result_reports_in_flight(tmp_path: Path) -> None:
    rows = [{"id": i, "text": f"row {i}"} for i in range(4)]
    job = write_job(tmp_path, rows, limits={"concurrency": 4})
    # Answers take 30 s: every request is received, none answered, none committed.
    with running_in_thread(SimConfig(latency_ms=30_000)) as (url, slow):
        proc = spawn_run(job, url)
        try:
            deadline = time.monotonic() + CHILD_TIMEOUT_S
            while slow.stats.requests < len(rows):
                assert time.monotonic() < deadline, "the child sent nothing"
                time.sleep(0.02)
        finally:
            proc.kill()
            proc.communicate()
    assert not read_checkpoint(tmp_path / "out.journal.sqlite").results

    with running_in_thread(SimConfig()) as (url, _):
        _, code, stderr = run_child(job, url, None)

    assert code == 0, stderr
    assert "4 requests were in flight" in stderr, stderr
