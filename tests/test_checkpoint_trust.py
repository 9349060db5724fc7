"""Issue 10, class 6: a checkpoint is trusted only when it is sound.

Each bad checkpoint is met as a user meets it, by the `pipeline` command in a child
process: it refuses with one line naming the file and the fix, exits 2, and sends
nothing (a silent start over would bill every row again).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
from conftest import Server, read_output, serving, spawn_run, write_job

#: Bound on every wait for a child process.
WAIT_S = 60.0
ROWS = 12


def texts(n: int) -> list[dict[str, object]]:
    return [{"id": i, "text": f"row {i}"} for i in range(n)]


def pipeline(*args: str | Path, cwd: Path | None = None) -> tuple[int, str]:
    """The released command, run as a user runs it: (exit code, stderr + stdout)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=WAIT_S,
    )
    return done.returncode, done.stderr + done.stdout


def one_error_line(output: str) -> str:
    """The single `error:` line of a refusal; no traceback around it."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


def ran_job(tmp_path: Path, sim: Server) -> tuple[Path, Path]:
    """A job that ran to the end once: (job file, its checkpoint)."""
    job = write_job(tmp_path, texts(ROWS))
    code, output = pipeline("run", job, "--base-url", sim.url)
    assert code == 0, output
    return job, tmp_path / "out.journal.sqlite"


def _empty(journal: Path) -> None:
    journal.write_bytes(b"")


def _garbage(journal: Path) -> None:
    journal.write_bytes(b"PK\x03\x04 this is a zip file, or anything else " * 200)


def _truncated(journal: Path) -> None:
    data = journal.read_bytes()
    journal.write_bytes(data[: len(data) // 2])


def _foreign(journal: Path) -> None:
    journal.unlink()
    with sqlite3.connect(journal) as db:
        db.execute("CREATE TABLE moz_places (id INTEGER PRIMARY KEY, url TEXT)")
        db.execute("INSERT INTO moz_places (url) VALUES ('https://example.org')")


def _newer(journal: Path) -> None:
    with sqlite3.connect(journal) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'format_version'")


def _other_job(journal: Path) -> None:
    with sqlite3.connect(journal) as db:
        db.execute("UPDATE meta SET value = 'someone_else' WHERE key = 'job'")


def test_a_damaged_page_the_header_does_not_show_ends_in_a_line(tmp_path: Path) -> None:
    with serving() as sim:
        job, journal = ran_job(tmp_path, sim)
        data = bytearray(journal.read_bytes())
        page = int.from_bytes(data[16:18], "big")
        data[2 * page :] = b"\xff" * (len(data) - 2 * page)  # every page after the meta's
        journal.write_bytes(bytes(data))
        before = sim.sim.stats.requests

        code, output = pipeline("run", job, "--base-url", sim.url)

        assert sim.sim.stats.requests == before
    line = one_error_line(output)
    assert code in (1, 2), output
    assert f"the checkpoint {journal}" in line
    assert "malformed" in line


@pytest.mark.parametrize(
    ("spoil", "said"),
    [
        pytest.param(_empty, "is empty (0 bytes)", id="empty"),
        pytest.param(_garbage, "not a SQLite file", id="garbage"),
        pytest.param(_truncated, "is truncated", id="truncated"),
        pytest.param(_foreign, "not a pipeline checkpoint (tables: moz_places)", id="foreign"),
        pytest.param(_newer, "written by a newer pipeline", id="newer-format"),
        pytest.param(_other_job, "belongs to job `someone_else`, not `job`", id="other-job"),
    ],
)
def test_an_unsound_checkpoint_is_refused_before_sending(
    tmp_path: Path, spoil: Callable[[Path], None], said: str
) -> None:
    with serving() as sim:
        job, journal = ran_job(tmp_path, sim)
        spoil(journal)
        before = sim.sim.stats.requests

        code, output = pipeline("run", job, "--base-url", sim.url)
        status_code, status_output = pipeline("status", job)

        sent = sim.sim.stats.requests - before
    line = one_error_line(output)
    assert code == 2, output
    assert said in line
    assert str(journal) in line
    assert "--fresh" in line or "--journal" in line, "the message names a fix"
    assert sent == 0, "nothing is sent on a checkpoint that cannot be trusted"
    assert status_code == 2, status_output
    assert said in one_error_line(status_output)


def test_a_checkpoint_whose_wal_was_lost_after_a_crash_is_refused(tmp_path: Path) -> None:
    job = write_job(tmp_path, texts(400), limits={"concurrency": 4})
    journal = tmp_path / "out.journal.sqlite"
    wal = Path(f"{journal}-wal")
    with serving(latency_ms=50) as sim:
        crashed_run(job, sim.url, journal)
        assert wal.exists(), "a killed run leaves its -wal"
        kept = tmp_path / "kept-wal"
        shutil.move(wal, kept)  # copied without it, say, or cleaned up by a tool
        Path(f"{journal}-shm").unlink(missing_ok=True)
        before = sim.sim.stats.requests

        code, output = pipeline("run", job, "--base-url", sim.url)
        status_code, status_output = pipeline("status", job)
        refused_sent = sim.sim.stats.requests - before

        shutil.move(kept, wal)  # the fix the message names
        resumed_code, resumed = pipeline("run", job, "--base-url", sim.url)

    line = one_error_line(output)
    assert code == 2, output
    assert f"{journal.name}-wal" in line
    assert "is missing" in line
    assert refused_sent == 0
    assert status_code == 2
    assert "is missing" in one_error_line(status_output)
    assert resumed_code == 0, resumed
    assert "rows done by earlier runs are not sent again" in resumed
    assert read_output(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 400


def crashed_run(job: Path, url: str, journal: Path) -> None:
    """A run of `job` killed (SIGKILL) once it has committed 20 answers."""
    proc = spawn_run(job, url)
    try:
        deadline = time.monotonic() + WAIT_S
        while committed(journal) < 20:
            assert time.monotonic() < deadline, "the run committed nothing"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=WAIT_S)


def test_a_wal_folded_in_by_another_sqlite_tool_after_a_crash_resumes(tmp_path: Path) -> None:
    job = write_job(tmp_path, texts(400), limits={"concurrency": 4})
    journal = tmp_path / "out.journal.sqlite"
    with serving(latency_ms=50) as sim:
        crashed_run(job, sim.url, journal)
        assert Path(f"{journal}-wal").exists()
        # The sqlite3 shell, a backup tool...: its close, the last, folds the -wal in.
        with contextlib.closing(sqlite3.connect(journal)) as db:
            held = db.execute("SELECT count(*) FROM results").fetchone()[0]
        wal = Path(f"{journal}-wal")
        assert not wal.exists() or wal.stat().st_size == 0

        code, output = pipeline("run", job, "--base-url", sim.url)

    assert code == 0, output
    assert held >= 20
    assert read_output(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 400


def test_deleting_the_commit_count_accepts_what_a_checkpoint_still_holds(
    tmp_path: Path,
) -> None:
    job = write_job(tmp_path, texts(400), limits={"concurrency": 4})
    journal = tmp_path / "out.journal.sqlite"
    with serving(latency_ms=50) as sim:
        crashed_run(job, sim.url, journal)
        Path(f"{journal}-wal").unlink()
        Path(f"{journal}-shm").unlink(missing_ok=True)
        code, output = pipeline("run", job, "--base-url", sim.url)
        tally = Path(f"{journal}.commits")
        assert code == 2, output
        assert f"delete {tally}" in one_error_line(output)
        tally.unlink()

        resumed_code, resumed = pipeline("run", job, "--base-url", sim.url)

    assert resumed_code == 0, resumed
    assert read_output(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 400


def committed(journal: Path) -> int:
    if not journal.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
            query = "SELECT count(*) FROM results WHERE status != 'sending'"
            return int(db.execute(query).fetchone()[0])
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0


def test_a_cleanly_closed_checkpoint_needs_no_wal(tmp_path: Path) -> None:
    with serving() as sim:
        job, journal = ran_job(tmp_path, sim)
        assert not Path(f"{journal}-wal").exists(), "a clean close folds the -wal in"
        before = sim.sim.stats.requests

        code, output = pipeline("run", job, "--base-url", sim.url)

        assert code == 0, output
        assert sim.sim.stats.requests == before, "a finished job sends nothing again"
    assert f"{ROWS} rows done by earlier runs" in output


@pytest.mark.parametrize(
    ("change", "named"),
    [
        pytest.param(("--price", "1,2"), "the price", id="price-flag"),
        pytest.param(
            {"price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}},
            "the price",
            id="price-table",
        ),
        pytest.param({"key": "id"}, "key column", id="key-column"),
    ],
)
def test_a_price_or_key_change_is_refused_on_resume(
    tmp_path: Path, change: tuple[str, ...] | dict[str, object], named: str
) -> None:
    with serving() as sim:
        job, _ = ran_job(tmp_path, sim)
        args: tuple[str, ...] = ()
        if isinstance(change, tuple):
            args = change
        elif "price" in change:
            job.write_text(
                job.read_text() + "[price]\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n"
            )
        else:
            job.write_text(job.read_text().replace("[input]\n", '[input]\nkey = "id"\n'))
        before = sim.sim.stats.requests

        code, output = pipeline("run", job, "--base-url", sim.url, *args)

        assert sim.sim.stats.requests == before
    line = one_error_line(output)
    assert code == 2, output
    assert named in line
    assert "--fresh" in line


def test_an_input_edited_in_place_with_its_mtime_put_back_sends_the_edited_row(
    tmp_path: Path,
) -> None:
    with serving() as sim:
        job, _ = ran_job(tmp_path, sim)
        table = tmp_path / "input.csv"
        stat = table.stat()
        text = table.read_text()
        table.write_text(text.replace("row 3", "ROW 3"))  # same size
        os.utime(table, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert table.stat().st_size == stat.st_size
        assert table.stat().st_mtime_ns == stat.st_mtime_ns
        before = sim.sim.stats.requests

        code, output = pipeline("run", job, "--base-url", sim.url)

        # Seen by its inode change time: a new input, whose one edited row is sent.
        assert sim.sim.stats.requests == before + 1
    assert code == 0, output
    assert "1 to send" in output


def test_fresh_keeps_the_paid_answers_in_a_backup_and_says_so(tmp_path: Path) -> None:
    with serving() as sim:
        job, journal = ran_job(tmp_path, sim)

        code, output = pipeline("run", job, "--base-url", sim.url, "--fresh", "--limit", "2")

    assert code == 0, output
    assert f"the old checkpoint held {ROWS} rows" in output
    backups = sorted(tmp_path.glob("out.journal.discarded-*.sqlite"))
    assert len(backups) == 1
    assert str(backups[0]) in output
    with contextlib.closing(sqlite3.connect(backups[0])) as db:
        kept = db.execute("SELECT count(*) FROM results WHERE status = 'ok'").fetchone()[0]
    assert kept == ROWS, "every paid answer is in the backup"
    assert committed(journal) == 2
    assert f"--journal {backups[0]} with another --output" in output
    assert read_output(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 2

    restored = tmp_path / "restored.parquet"
    with serving() as sim:  # the answers come back out of the backup, sent again: none
        code, output = pipeline(
            "run", job, "--base-url", sim.url, "--journal", backups[0], "--output", restored
        )
        assert sim.sim.stats.requests == 0
    assert code == 0, output
    assert read_output(restored)["status"].to_list() == ["ok"] * ROWS


def test_fresh_moves_an_unreadable_file_aside_rather_than_deleting_it(tmp_path: Path) -> None:
    with serving() as sim:
        job, journal = ran_job(tmp_path, sim)
        _garbage(journal)
        garbage = journal.read_bytes()
        # A checkpoint that cannot be read cannot vouch for the output: out of the way.
        (tmp_path / "out.parquet").unlink()

        code, output = pipeline("run", job, "--base-url", sim.url, "--fresh")

    assert code == 0, output
    backups = list(tmp_path.glob("out.journal.discarded-*.sqlite"))
    assert len(backups) == 1
    assert backups[0].read_bytes() == garbage
    assert "not a readable checkpoint" in output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * ROWS
    assert out["id"].cast(pl.Int64).to_list() == list(range(ROWS))  # CSV values are text
