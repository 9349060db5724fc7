"""The Python API (pipeline/api.py) against a real simulator: `run_frame` from the main
thread, a worker thread and a running event loop; jobs as files, mappings and `Job`s;
overrides; errors; the checkpoint."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import Server, read_output, run_job, serving, write_job
from polars.testing import assert_frame_equal

import pipeline
from pipeline.parse import RESULT_SCHEMA

#: Columns that differ between two runs of the same rows: timing and the server's ids.
PER_RUN = ["latency_ms", "request_id", "answered_at"]
REQUEST = {"model": "gpt-4o-mini", "max_tokens": 32}
TEMPLATE = {"system": "Be brief.", "user": "Say: {{ text }}"}
LIMITS = {"concurrency": 8, "backoff_s": 0.01, "backoff_max_s": 0.05}


def rows(n: int) -> pl.DataFrame:
    return pl.DataFrame({"id": list(range(n)), "text": [f"row {i}: plain words" for i in range(n)]})


def python_job(**request: Any) -> pipeline.Job:
    return pipeline.Job(
        name="frames",
        request=pipeline.RequestSpec.model_validate({**REQUEST, **request}),
        template=pipeline.TemplateSpec(system="Be brief.", user="Say: {{ text }}"),
        limits=pipeline.LimitsSpec(concurrency=8, backoff_s=0.01, backoff_max_s=0.05),
    )


def stable(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.drop(PER_RUN)


def test_a_job_built_in_python_gives_the_cli_output_of_the_same_job_file(
    tmp_path: Path, sim: Server
) -> None:
    frame = rows(12)
    job = write_job(
        tmp_path, frame, input_name="in.parquet", request=REQUEST, template=TEMPLATE, limits=LIMITS
    )
    assert run_job(job, sim).exit_code == 0
    from_cli = read_output(tmp_path / "out.parquet")

    out = pipeline.run_frame(frame, python_job(), base_url=sim.url, progress=False)

    assert out.columns == ["id", "text", *RESULT_SCHEMA]
    assert_frame_equal(stable(out), stable(from_cli))  # names, types, order and values
    assert sim.sim.stats.requests == 24


def test_a_mapping_and_a_job_file_serve_as_the_job(tmp_path: Path, sim: Server) -> None:
    job_file = write_job(tmp_path, rows(1), request=REQUEST, template=TEMPLATE, limits=LIMITS)
    mapping = {"request": REQUEST, "template": TEMPLATE, "limits": LIMITS}
    frame = rows(5)

    by_mapping = pipeline.run_frame(frame, mapping, base_url=sim.url, progress=False)
    by_file = pipeline.run_frame(frame, str(job_file), base_url=sim.url, progress=False)
    by_job = pipeline.run_frame(frame, python_job(), base_url=sim.url, progress=False)

    assert_frame_equal(stable(by_mapping), stable(by_file))
    assert_frame_equal(stable(by_mapping), stable(by_job))
    assert by_file.height == 5, "the frame's rows, not the job file's input"


def test_the_output_prefix_applies(sim: Server) -> None:
    job = {"request": REQUEST, "template": TEMPLATE, "output": {"prefix": "llm_"}}
    frame = rows(2).with_columns(pl.lit("mine").alias("status"))

    out = pipeline.run_frame(frame, job, base_url=sim.url, progress=False)

    assert out.columns == ["id", "text", "status", *(f"llm_{c}" for c in RESULT_SCHEMA)]
    assert out["status"].to_list() == ["mine", "mine"]
    assert out["llm_status"].to_list() == ["ok", "ok"]


def test_from_a_worker_thread(sim: Server) -> None:
    got: list[pl.DataFrame] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            got.append(pipeline.run_frame(rows(4), python_job(), base_url=sim.url, progress=False))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)

    assert not errors, errors
    assert got[0]["status"].to_list() == ["ok"] * 4


def test_inside_a_running_event_loop_sync_and_awaited(sim: Server) -> None:
    async def notebook_cell() -> tuple[pl.DataFrame, pl.DataFrame]:
        blocking = pipeline.run_frame(rows(3), python_job(), base_url=sim.url, progress=False)
        awaited = await pipeline.arun_frame(rows(3), python_job(), base_url=sim.url, progress=False)
        return blocking, awaited

    blocking, awaited = asyncio.run(notebook_cell())

    assert blocking["status"].to_list() == ["ok"] * 3
    assert_frame_equal(stable(blocking), stable(awaited))


def test_overrides_model_limit_and_simulate(sim: Server) -> None:
    out = pipeline.run_frame(
        rows(6), python_job(), base_url=sim.url, model="gpt-4.1-mini", limit=2, progress=False
    )
    offline = pipeline.run_frame(rows(2), python_job(), simulate=True, progress=False)

    assert out["model"].to_list() == ["gpt-4.1-mini"] * 2
    assert out["status"].to_list() == ["ok", "ok"], "the first 2 rows, as --limit 2 writes"
    assert sim.sim.stats.requests == 2
    assert offline["status"].to_list() == ["ok", "ok"]


def test_pipeline_run_returns_the_summary_it_writes(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, rows(5), request=REQUEST, template=TEMPLATE, limits=LIMITS)

    summary = pipeline.run(job, base_url=sim.url, progress=False)

    written = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary == written
    assert (summary["ok"], summary["failed"], summary["requests_sent"]) == (5, 0, 5)
    assert read_output(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 5


def test_checkpoint_resumes_and_a_second_call_sends_nothing(tmp_path: Path, sim: Server) -> None:
    checkpoint = tmp_path / "frames.journal.sqlite"
    frame = rows(6)
    first = pipeline.run_frame(
        frame, python_job(), base_url=sim.url, checkpoint=checkpoint, limit=4, progress=False
    )
    assert sim.sim.stats.requests == 4

    second = pipeline.run_frame(
        frame, python_job(), base_url=sim.url, checkpoint=checkpoint, progress=False
    )
    assert sim.sim.stats.requests == 6, "only the two rows the first call left"
    third = pipeline.run_frame(
        frame, python_job(), base_url=sim.url, checkpoint=str(checkpoint), progress=False
    )

    assert sim.sim.stats.requests == 6, "the third call sends nothing"
    assert first.height == 4
    assert second["status"].to_list() == ["ok"] * 6
    assert_frame_equal(second, third)
    assert_frame_equal(first.head(4), second.head(4))


def test_checkpoint_reuses_answers_for_a_different_frame(tmp_path: Path, sim: Server) -> None:
    checkpoint = tmp_path / "frames.journal.sqlite"
    first = pipeline.run_frame(rows(3), python_job(), base_url=sim.url, checkpoint=checkpoint)
    assert sim.sim.stats.requests == 3

    # Tonight's frame: yesterday's rows and one more. Only the new row is sent.
    second = pipeline.run_frame(rows(4), python_job(), base_url=sim.url, checkpoint=checkpoint)

    assert sim.sim.stats.requests == 4
    assert second["status"].to_list() == ["ok"] * 4
    assert second["response"].head(3).to_list() == first["response"].to_list()


def test_without_a_checkpoint_each_call_sends_again_and_leaves_no_file(
    tmp_path: Path, sim: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.chdir(tmp_path)

    pipeline.run_frame(rows(3), python_job(), base_url=sim.url, progress=False)
    pipeline.run_frame(rows(3), python_job(), base_url=sim.url, progress=False)

    assert sim.sim.stats.requests == 6
    assert list(tmp_path.iterdir()) == [], "no checkpoint, output or folder left behind"


def test_errors_are_the_exported_exceptions_with_the_cli_messages(
    tmp_path: Path, sim: Server
) -> None:
    job = write_job(tmp_path, rows(2), template={"user": "{{ txt }}"})
    cli = run_job(job, sim)

    with pytest.raises(pipeline.TemplateError) as raised:
        pipeline.run_frame(rows(2), job, base_url=sim.url)

    assert cli.exit_code == raised.value.exit_code == 2
    assert str(raised.value) in cli.output.replace("\n", " ")
    assert isinstance(raised.value, pipeline.JobError)
    assert sim.sim.stats.requests == 0


@pytest.mark.parametrize(
    ("job", "frame", "overrides", "error", "message"),
    [
        pytest.param(
            {"request": {"model": "m"}, "template": {"usr": "x"}},
            rows(1),
            {},
            pipeline.SpecError,
            r"the job mapping: 1 problem in the job file\n"
            r"  - unknown key `template.usr`; did you mean `user`",
            id="mapping-typo",
        ),
        pytest.param(
            {"input": {"path": "x.csv", "key": "id"}, **{"request": REQUEST, "template": TEMPLATE}},
            pl.DataFrame({"id": [1, 2, 1], "text": ["a", "b", "c"]}),
            {},
            pipeline.InputError,
            r"the input DataFrame: key column `id` has the value `1` at rows 1 and 3",
            id="duplicate-key",
        ),
        pytest.param(
            {"request": REQUEST, "template": TEMPLATE},
            pl.DataFrame({"__row": [1], "text": ["a"]}),
            {},
            pipeline.InputError,
            r"the input DataFrame: column `__row` is reserved",
            id="reserved-column",
        ),
        pytest.param(
            {"request": REQUEST, "template": TEMPLATE},
            rows(0),
            {},
            pipeline.InputError,
            r"the input DataFrame: has no rows",
            id="no-rows",
        ),
        pytest.param(
            {"request": REQUEST, "template": TEMPLATE},
            rows(1),
            {"rpm": 0},
            pipeline.SpecError,
            r"rpm=0: give a whole number of 1 or more",
            id="rpm-zero",
        ),
        pytest.param(
            {"request": REQUEST, "template": TEMPLATE},
            rows(1),
            {"price": (1.0,)},
            pipeline.SpecError,
            r"give two prices",
            id="price-one-number",
        ),
    ],
)
def test_bad_jobs_inputs_and_overrides_raise_before_sending(
    sim: Server,
    job: dict[str, Any],
    frame: pl.DataFrame,
    overrides: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        pipeline.run_frame(frame, job, base_url=sim.url, progress=False, **overrides)
    assert sim.sim.stats.requests == 0


def test_a_halted_run_raises_halted_naming_the_checkpoint_to_resume(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with serving(api_key="sk-right-key-0000") as sim:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-0000")
        with pytest.raises(pipeline.Halted) as raised:
            pipeline.run_frame(rows(3), python_job(), base_url=sim.url, progress=False)
        checkpoint = raised.value.args[0].split("checkpoint=")[1].split(" ")[0].strip("'")
        assert Path(checkpoint).exists(), "kept, to resume from"

        monkeypatch.setenv("OPENAI_API_KEY", "sk-right-key-0000")
        out = pipeline.run_frame(
            rows(3), python_job(), base_url=sim.url, checkpoint=checkpoint, progress=False
        )

    assert raised.value.exit_code == 4
    assert out["status"].to_list() == ["ok"] * 3


def test_progress_shows_unless_told_not_to(sim: Server, capfd: pytest.CaptureFixture[str]) -> None:
    pipeline.run_frame(rows(2), python_job(), base_url=sim.url, progress=False)
    quiet = capfd.readouterr()
    pipeline.run_frame(rows(2), python_job(), base_url=sim.url)
    shown = capfd.readouterr()

    assert quiet.out == quiet.err == ""
    assert "2/2 rows (100%)" in shown.err


def test_import_pipeline_stays_light() -> None:
    code = (
        "import sys, pipeline\n"
        "print(sorted(m for m in sys.modules if m.startswith(('pipeline', 'polars', 'rich'))))\n"
        "pipeline.JobError\n"
        "print(sorted(m for m in sys.modules if m.startswith('pipeline.')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )

    alone, after_an_error_class = done.stdout.splitlines()
    assert alone == "['pipeline']"
    assert after_an_error_class == "['pipeline.errors']"
