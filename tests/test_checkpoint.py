"""Checkpoint and resume: signals, one writer, fan-out, disk problems, any-prefix resume."""

from __future__ import annotations

import contextlib
import re
import select
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from conftest import Server, invoke, read_output, run_job, serving, spawn_run, write_job
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import OutputError
from pipeline.output import atomic_write
from pipeline.simulator import SimConfig, running_in_thread

#: Bound on every wait for a child process to reach a state.
WAIT_S = 30.0


def texts(n: int, prefix: str = "row") -> list[dict[str, object]]:
    return [{"id": i, "text": f"{prefix} {i}"} for i in range(n)]


def committed(journal: Path) -> int:
    if not journal.exists():
        return 0
    with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as db:
        try:
            query = "SELECT count(*) FROM results WHERE status != 'sending'"
            return int(db.execute(query).fetchone()[0])
        except sqlite3.OperationalError:  # the schema is not there yet
            return 0


def wait_until_committed(journal: Path, rows: int) -> None:
    """Poll the journal (bounded) until `rows` results are in."""
    deadline = time.monotonic() + WAIT_S
    while committed(journal) < rows:
        assert time.monotonic() < deadline, f"fewer than {rows} rows committed in {WAIT_S} s"
        time.sleep(0.05)


def slow_server(latency_ms: float = 100) -> contextlib.AbstractContextManager[Server]:
    return serving(latency_ms=latency_ms)


def test_sigint_drains_in_flight_writes_the_output_and_exits_130(tmp_path: Path) -> None:
    job = write_job(tmp_path, texts(300), limits={"concurrency": 4})
    with slow_server() as server:
        proc = spawn_run(job, server.url)
        wait_until_committed(tmp_path / "out.journal.sqlite", 8)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=WAIT_S)

        assert proc.returncode == 130, stderr
        assert "interrupted" in stderr
        out = read_output(tmp_path / "out.parquet")
        statuses = out["status"].value_counts()
        assert out.height == 300
        assert set(statuses["status"]) == {"ok", "pending"}
        assert statuses.filter(pl.col("status") == "ok")["count"][0] == committed(
            tmp_path / "out.journal.sqlite"
        )

        resumed = run_job(job, server)

        assert resumed.exit_code == 0, resumed.output
        assert max(server.sim.stats.by_body.values()) == 1, "drained rows were not sent twice"
    assert read_output(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 300


def test_second_signal_exits_at_once_and_the_journal_stays_consistent(tmp_path: Path) -> None:
    job = write_job(tmp_path, texts(300), limits={"concurrency": 4})
    with slow_server(latency_ms=3000) as slow:
        proc = spawn_run(job, slow.url)
        wait_until_committed(tmp_path / "out.journal.sqlite", 4)
        proc.send_signal(signal.SIGINT)
        heard = wait_for_line(proc, "interrupt again to stop at once")
        proc.send_signal(signal.SIGINT)  # while 4 requests wait 3 s for their answers
        _, stderr = proc.communicate(timeout=WAIT_S)

        assert proc.returncode == 130, heard + stderr
        assert "interrupted twice" in stderr
        first_run = slow.sim.stats.by_body.copy()

    with running_in_thread(SimConfig()) as (url, fast):
        resumed = invoke("run", job, "--base-url", url)
        assert resumed.exit_code == 0, resumed.output
        reported = re.search(r"(\d+) requests were in flight", resumed.output)
        assert reported is not None, resumed.output
        sent_twice = sum(n - 1 for n in (first_run + fast.stats.by_body).values())
    assert 1 <= int(reported[1]) <= 4, "at most the concurrency can be in flight"
    assert sent_twice == int(reported[1]), "the resume says what the server saw twice"
    assert read_output(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 300


def wait_for_line(proc: subprocess.Popen[str], text: str) -> str:
    """Read the child's stderr (bounded) until a line holds `text`; return what was read."""
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + WAIT_S
    while text not in seen:
        assert time.monotonic() < deadline, f"no {text!r} from the child; it said: {seen}"
        ready, _, _ = select.select([proc.stderr], [], [], 0.1)
        if ready:
            seen += proc.stderr.readline()
    return seen


def test_second_concurrent_run_is_refused_at_once(tmp_path: Path) -> None:
    job = write_job(tmp_path, texts(200), limits={"concurrency": 2})
    with slow_server(latency_ms=300) as server:
        first = spawn_run(job, server.url)
        try:
            wait_until_committed(tmp_path / "out.journal.sqlite", 1)
            second = run_job(job, server)
        finally:
            first.kill()
            first.communicate(timeout=WAIT_S)

    assert second.exit_code == 2
    assert "another run of this job is in progress" in second.output
    assert f"pid {first.pid}" in second.output


def test_lock_dies_with_a_killed_run(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(50), limits={"concurrency": 2})
    with slow_server(latency_ms=300) as server:
        first = spawn_run(job, server.url)
        wait_until_committed(tmp_path / "out.journal.sqlite", 1)
        first.kill()
        first.communicate(timeout=WAIT_S)

    assert run_job(job, sim).exit_code == 0


def test_identical_requests_are_sent_once_and_the_answer_shared(
    tmp_path: Path, sim: Server
) -> None:
    rows = [{"id": i, "text": f"text {i % 5}"} for i in range(40)]
    job = write_job(tmp_path, rows)

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    assert sim.sim.stats.requests == 5
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 40
    by_text = out.group_by("text").agg(pl.col("response").n_unique())
    assert by_text["response"].to_list() == [1] * 5, "each copy has its leader's answer"
    assert (out["attempts"] == 1).sum() == 5
    assert out.filter(pl.col("attempts") == 0)["cost_usd"].sum() == 0, "copies cost nothing"


def test_identical_requests_after_a_resume_take_the_journals_answer(
    tmp_path: Path, sim: Server
) -> None:
    rows = [{"id": i, "text": f"text {i % 3}"} for i in range(12)]
    job = write_job(tmp_path, rows)
    assert run_job(job, sim, "--limit", "3").exit_code == 0

    assert run_job(job, sim).exit_code == 0

    assert sim.sim.stats.requests == 3


def test_dedupe_off_sends_every_row(tmp_path: Path, sim: Server) -> None:
    rows = [{"id": i, "text": "same"} for i in range(6)]
    job = write_job(tmp_path, rows, request={"dedupe": False, "temperature": 1.0})

    assert run_job(job, sim).exit_code == 0

    assert sim.sim.stats.requests == 6


def test_unwritable_output_stops_before_sending(tmp_path: Path, sim: Server) -> None:
    (tmp_path / "blocker").write_text("a file where a folder should be")
    job = write_job(tmp_path, texts(3), output="blocker/out.parquet")

    result = run_job(job, sim)

    assert result.exit_code == 2  # a refusal before sending (issue 10)
    assert "cannot write to" in result.output
    assert sim.sim.stats.requests == 0


def test_crash_while_writing_the_output_leaves_the_previous_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "out.parquet"
    target.write_bytes(b"previous")

    def dies_half_way(tmp: Path) -> int:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="No space left"):
        atomic_write(target, dies_half_way)

    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"], "no temp file left"


VOLATILE = ["latency_ms", "request_id", "answered_at", "run"]


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(rows=st.integers(1, 25), data=st.data())
def test_resume_after_any_prefix_equals_an_uninterrupted_run(
    tmp_path_factory: pytest.TempPathFactory, rows: int, data: st.DataObject
) -> None:
    prefix = data.draw(st.integers(0, rows), label="prefix")
    with running_in_thread(SimConfig(seed=3)) as (url, _):
        whole = write_job(tmp_path_factory.mktemp("whole"), texts(rows))
        parts = write_job(tmp_path_factory.mktemp("parts"), texts(rows))
        assert invoke("run", whole, "--base-url", url).exit_code == 0
        if prefix:
            assert invoke("run", parts, "--base-url", url, "--limit", str(prefix)).exit_code == 0
        assert invoke("run", parts, "--base-url", url).exit_code == 0

    expected = read_output(whole.parent / "out.parquet").drop(VOLATILE)
    actual = read_output(parts.parent / "out.parquet").drop(VOLATILE)
    assert actual.equals(expected)


@contextlib.contextmanager
def small_disk(path: Path, mib: int) -> Iterator[Path]:
    """A tmpfs of `mib` MiB at `path`, to fill up; skips where mounting is not allowed."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Write until the disk is full; return the filler to delete."""
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 2**20)
                handle.flush()
        except OSError:
            pass
    return filler


def test_disk_full_mid_run_halts_cleanly_and_loses_nothing(tmp_path: Path) -> None:
    job = write_job(tmp_path, texts(400), limits={"concurrency": 4})
    with small_disk(tmp_path / "disk", mib=80) as disk, slow_server(latency_ms=50) as server:
        journal = disk / "job.journal.sqlite"
        proc = spawn_run(job, server.url, "--journal", str(journal))
        wait_until_committed(journal, 20)
        filler = fill(disk)
        _, stderr = proc.communicate(timeout=WAIT_S)
        kept = committed(journal)

        assert proc.returncode == 1, stderr
        assert "cannot write the checkpoint" in stderr
        assert kept >= 20
        sent_before = server.sim.stats.by_body.copy()
        filler.unlink()

        resumed = invoke("run", job, "--base-url", server.url, "--journal", journal)

        assert resumed.exit_code == 0, resumed.output
        assert f"{kept:,} rows done by earlier runs" in resumed.output
        resent = sum(server.sim.stats.by_body[b] - n for b, n in sent_before.items())
    assert resent <= 4, "only requests in flight at the halt are sent again"
    assert read_output(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 400


def test_status_reads_the_checkpoint_without_touching_the_input(
    tmp_path: Path, sim: Server
) -> None:
    job = write_job(tmp_path, texts(10))
    never_run = invoke("status", job)
    assert run_job(job, sim, "--limit", "4").exit_code == 0
    (tmp_path / "input.csv").unlink()  # status needs only the journal

    result = invoke("status", job)

    assert never_run.exit_code == 2
    assert "has not run yet" in never_run.output
    assert result.exit_code == 0, result.output
    assert "4 ok, 0 failed, 0 pending of 4 rows" in result.output
    assert "finished" in result.output
    assert "exit 0" in result.output
