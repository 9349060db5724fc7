"""Issue 10, class 2: the output never destroys what it should not.

Symbolic links, places a job file alone chose, files no run of the job wrote, a kill
in the middle of the final write, and a write that fails after the answers were paid.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pytest
from aiohttp import web
from conftest import Server, invoke, read_output, run_job, serving_app, write_job

from pipeline.output import OUTPUT_META, TEMP_SUFFIX, atomic_write, remove_leftovers
from pipeline.trust import TRUST_ENV

REPO = Path(__file__).resolve().parent.parent


def texts(n: int) -> list[dict[str, object]]:
    return [{"id": i, "text": f"row {i}"} for i in range(n)]


def temps(directory: Path) -> list[Path]:
    return sorted(directory.rglob(f"*{TEMP_SUFFIX}"))


# --- symbolic links -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("link", "args"),
    [
        pytest.param("out.parquet", [], id="output"),
        pytest.param("out.summary.json", [], id="summary"),
        pytest.param("out.journal.sqlite", [], id="journal"),
        pytest.param("out.journal.sqlite-wal", [], id="journal-wal"),
        pytest.param("mine.sqlite", ["--journal", "{dir}/mine.sqlite"], id="journal-flag"),
    ],
)
def test_a_symbolic_link_is_never_written_through(
    tmp_path: Path, sim: Server, link: str, args: list[str]
) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's own file")
    (tmp_path / link).symlink_to(precious)
    job = write_job(tmp_path, texts(3))

    result = run_job(job, sim, *(a.format(dir=tmp_path) for a in args))

    assert result.exit_code == 2, result.output
    assert "symbolic link" in result.output
    assert str(tmp_path / link) in result.output
    assert precious.read_text() == "the user's own file"
    assert (tmp_path / link).is_symlink()
    assert sim.sim.stats.requests == 0


def test_a_linked_files_folder_is_refused(tmp_path: Path, sim: Server) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out.files").symlink_to(elsewhere, target_is_directory=True)
    job = write_job(tmp_path, texts(2))

    result = run_job(job, sim)

    assert result.exit_code == 2, result.output
    assert "out.files is a symbolic link" in result.output
    assert sim.sim.stats.requests == 0


def test_a_linked_output_given_with_the_flag_is_refused_too(tmp_path: Path, sim: Server) -> None:
    precious = tmp_path / "precious.parquet"
    precious.write_bytes(b"not ours")
    (tmp_path / "link.parquet").symlink_to(precious)
    job = write_job(tmp_path, texts(2))

    result = run_job(job, sim, "--output", str(tmp_path / "link.parquet"))

    assert result.exit_code == 2, result.output
    assert precious.read_bytes() == b"not ours"
    assert sim.sim.stats.requests == 0


def test_a_linked_folder_on_the_way_is_fine(tmp_path: Path, sim: Server) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "results").symlink_to(real, target_is_directory=True)
    job = write_job(tmp_path, texts(2), output="results/out.parquet")

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    assert read_output(real / "out.parquet").height == 2


# --- where a job file may write -----------------------------------------------------


@pytest.mark.parametrize(
    "output",
    [
        pytest.param("../../escaped.parquet", id="dot-dot"),
        pytest.param("{outside}/escaped.parquet", id="absolute"),
    ],
)
def test_a_job_files_output_outside_its_folder_needs_confirmation(
    tmp_path: Path, sim: Server, output: str
) -> None:
    folder = tmp_path / "downloads" / "job"
    folder.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    job = write_job(folder, texts(2), output=output.format(outside=outside))
    target = (folder / output.format(outside=outside)).resolve()

    refused = run_job(job, sim)

    assert refused.exit_code == 2, refused.output
    assert str(target) in refused.output
    assert "--output" in refused.output
    assert "--trust-job-hosts" in refused.output
    assert sim.sim.stats.requests == 0
    assert not target.exists()

    assert run_job(job, sim, "--trust-job-hosts").exit_code == 0
    assert read_output(target).height == 2


def test_the_environment_confirms_the_output_place_too(tmp_path: Path, sim: Server) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    job = write_job(folder, texts(2), output="../elsewhere.parquet")

    result = run_job(job, sim, env={TRUST_ENV: "1"})

    assert result.exit_code == 0, result.output
    assert (tmp_path / "elsewhere.parquet").exists()


def test_output_given_with_the_flag_is_the_users_choice(tmp_path: Path, sim: Server) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    job = write_job(folder, texts(2))
    chosen = tmp_path / "mine" / "out.parquet"

    result = run_job(job, sim, "--output", str(chosen))

    assert result.exit_code == 0, result.output
    assert read_output(chosen).height == 2


def test_a_job_may_write_under_the_current_folder(
    tmp_path: Path, sim: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the sample jobs do: jobs/x.toml writes ../out/x.parquet, run from the repo."""
    (tmp_path / "jobs").mkdir()
    job = write_job(tmp_path / "jobs", texts(2), output="../out/x.parquet")
    monkeypatch.chdir(tmp_path)

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "x.parquet").exists()


def test_a_job_name_cannot_steer_the_default_output_out(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(2), top={"name": "../../../escaped"})
    job.write_text(job.read_text().replace('path = "out.parquet"\n', ""))

    result = run_job(job, sim)

    assert result.exit_code == 2, result.output
    assert "escaped.parquet" in result.output
    assert sim.sim.stats.requests == 0


@pytest.mark.parametrize("name", ["summarise", "extract", "embed", "images", "tools"])
def test_the_sample_jobs_validate_from_the_repository(name: str) -> None:
    """`make run` runs from the repository: the samples' ../out/ is inside it."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", f"jobs/{name}.toml", "--simulate"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
        env={k: v for k, v in os.environ.items() if k != TRUST_ENV},
    )

    assert result.returncode == 0, result.stderr


# --- an output that is not this job's -----------------------------------------------


def test_an_output_no_run_of_this_job_wrote_is_not_replaced(tmp_path: Path, sim: Server) -> None:
    (tmp_path / "out.parquet").write_bytes(b"the user's report")
    job = write_job(tmp_path, texts(3))

    result = run_job(job, sim)

    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()[-1]
    assert str(tmp_path / "out.parquet") in message
    assert "--output" in message
    assert "remove" in message
    assert (tmp_path / "out.parquet").read_bytes() == b"the user's report"
    assert sim.sim.stats.requests == 0


def test_a_rerun_replaces_its_own_output(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(3))
    assert run_job(job, sim).exit_code == 0

    again = run_job(job, sim)
    fresh = run_job(job, sim, "--fresh")
    limited = run_job(job, sim, "--limit", "2")

    assert again.exit_code == 0, again.output
    assert fresh.exit_code == 0, fresh.output
    assert limited.exit_code == 0, limited.output
    assert read_output(tmp_path / "out.parquet").height == 2
    assert sim.sim.stats.requests == 6  # three, then three again after --fresh


def test_an_output_changed_since_the_job_wrote_it_is_kept(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(3))
    assert run_job(job, sim).exit_code == 0
    (tmp_path / "out.parquet").write_bytes(b"edited by hand")

    result = run_job(job, sim)

    assert result.exit_code == 2, result.output
    assert "changed since this job wrote it" in result.output
    assert (tmp_path / "out.parquet").read_bytes() == b"edited by hand"


def test_an_output_left_when_its_checkpoint_was_removed_is_kept(
    tmp_path: Path, sim: Server
) -> None:
    job = write_job(tmp_path, texts(3))
    assert run_job(job, sim).exit_code == 0
    for path in tmp_path.glob("out.journal.sqlite*"):
        path.unlink()
    before = (tmp_path / "out.parquet").read_bytes()

    result = run_job(job, sim)

    assert result.exit_code == 2, result.output
    assert (tmp_path / "out.parquet").read_bytes() == before
    assert sim.sim.stats.requests == 3


def test_an_output_of_a_checkpoint_from_before_outputs_were_recorded_is_replaced(
    tmp_path: Path, sim: Server
) -> None:
    """Upgrading must not refuse the rerun of a job an earlier version ran."""
    job = write_job(tmp_path, texts(3))
    assert run_job(job, sim).exit_code == 0
    with contextlib.closing(sqlite3.connect(tmp_path / "out.journal.sqlite")) as db, db:
        db.execute("DELETE FROM meta WHERE key = ?", (OUTPUT_META,))

    assert run_job(job, sim).exit_code == 0
    with contextlib.closing(sqlite3.connect(tmp_path / "out.journal.sqlite")) as db, db:
        db.execute("DELETE FROM meta WHERE key = ?", (OUTPUT_META,))
    later = time.time() + 60  # written after that run finished: not its output
    os.utime(tmp_path / "out.parquet", (later, later))

    result = run_job(job, sim)

    assert result.exit_code == 2, result.output
    assert sim.sim.stats.requests == 3


def test_validate_names_an_output_it_would_not_replace(tmp_path: Path, sim: Server) -> None:
    (tmp_path / "out.parquet").write_bytes(b"the user's report")
    job = write_job(tmp_path, texts(2))

    result = invoke("validate", job, "--base-url", sim.url)

    assert result.exit_code == 2, result.output
    assert "already exists" in result.output


# --- a kill during the final write --------------------------------------------------


def wide_rows(n: int) -> pl.DataFrame:
    """Rows with an incompressible column, so that writing them takes a while."""
    noise = [hashlib.sha512(str(i).encode()).hexdigest() * 6 for i in range(n)]
    return pl.DataFrame({"id": range(n), "noise": noise})


def test_a_kill_during_the_final_write_leaves_no_stray_temporary_file(tmp_path: Path) -> None:
    # Every row asks the same question: one request, then the run is all writing.
    job = write_job(tmp_path, wide_rows(60_000), template={"user": "the same question"})
    first = invoke("run", job, "--simulate")
    assert first.exit_code == 0, first.output

    left: list[Path] = []
    for _ in range(5):  # a resume with nothing to send only writes; catch it mid-write
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", str(job), "--simulate"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            if temps(tmp_path):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=30)
        left = temps(tmp_path)
        if left:  # killed mid-write (not just after the rename): its temp is left
            break
    assert left, "the write was never caught under way"

    result = invoke("run", job, "--simulate")

    assert result.exit_code == 0, result.output
    assert temps(tmp_path) == []
    assert read_output(tmp_path / "out.parquet").height == 60_000


def test_leftovers_of_a_live_process_are_kept(tmp_path: Path) -> None:
    mine = tmp_path / f".out.parquet.{os.getpid()}{TEMP_SUFFIX}"
    mine.write_bytes(b"being written")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    theirs = tmp_path / f".out.parquet.{int(dead.stdout)}{TEMP_SUFFIX}"
    theirs.write_bytes(b"left by a killed run")
    unrelated = tmp_path / ".other.parquet.1.tmp"
    unrelated.write_bytes(b"not ours")

    removed = remove_leftovers(tmp_path, "out.parquet")

    assert removed == [theirs]
    assert mine.exists()
    assert unrelated.exists()


def test_a_failed_write_removes_its_temporary_file(tmp_path: Path) -> None:
    def fails(tmp: Path) -> int:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with contextlib.suppress(Exception):
        atomic_write(tmp_path / "out.parquet", fails)

    assert list(tmp_path.iterdir()) == []


# --- a write that fails after sending -----------------------------------------------


CHAT_ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "an answer"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}


@contextlib.contextmanager
def json_server(
    route: str, answer: object, on_request: Callable[[], None] = lambda: None
) -> Iterator[tuple[str, list[int]]]:
    """A loopback server that answers POST /v1`route` with `answer`, calling
    `on_request` before its first answer; yields its base URL and the requests seen."""
    count: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        if not count:
            on_request()
        count.append(1)
        await request.read()
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post(f"/v1{route}", handle)
    with serving_app(app) as url:
        yield url, count


def test_a_server_chosen_image_format_cannot_choose_where_the_file_goes(tmp_path: Path) -> None:
    answer = {
        "created": 1,
        "data": [{"b64_json": base64.b64encode(b"not really a png").decode()}],
        "output_format": "png/../../../traversed-by-server",
        "usage": {"input_tokens": 5, "output_tokens": 10, "total_tokens": 15},
    }
    job = write_job(
        tmp_path,
        [{"id": 0, "text": "a cat"}],
        request={"endpoint": "images.generations", "model": "gpt-image-1"},
    )

    with json_server("/images/generations", answer) as (url, requests):
        result = invoke("run", job, "--base-url", url)

    assert result.exit_code == 0, result.output
    assert len(requests) == 1
    path = Path(read_output(tmp_path / "out.parquet")["image_path"][0])
    assert path == tmp_path / "out.files" / "0.bin"
    assert path.read_bytes() == b"not really a png"
    assert not list(tmp_path.parent.rglob("traversed-by-server*"))


def test_a_write_that_fails_after_sending_keeps_the_answers_and_says_how(
    tmp_path: Path,
) -> None:
    out = tmp_path / "results"
    out.mkdir()
    checkpoint = tmp_path / "checkpoint" / "job.sqlite"
    job = write_job(tmp_path, texts(4), output="results/out.parquet")

    def lose_the_folder() -> None:
        # Where the output was to go is a file by the time the answers are in: the
        # write fails as on a full or read-only disk, for root too.
        shutil.rmtree(out)
        out.write_text("in the way")

    with json_server("/chat/completions", CHAT_ANSWER, lose_the_folder) as (url, requests):
        result = invoke("run", job, "--base-url", url, "--journal", str(checkpoint))
        assert result.exit_code == 1, result.output
        message = result.output.strip().splitlines()[-1]
        assert "cannot write" in message
        assert str(checkpoint) in message
        assert "--output" in message
        assert f"--journal {checkpoint}" in message
        assert len(requests) == 4

        elsewhere = tmp_path / "other.parquet"
        again = invoke(
            "run", job, "--base-url", url, "--output", str(elsewhere), "--journal", str(checkpoint)
        )

        assert again.exit_code == 0, again.output
        assert len(requests) == 4, "nothing was sent again"
    written = read_output(elsewhere)
    assert written["status"].to_list() == ["ok"] * 4
    assert written["response"].to_list() == ["an answer"] * 4
