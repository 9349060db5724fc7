"""Embeddings: many rows per request, one vector per row, usage shared exactly."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import polars as pl
import pytest
from conftest import Server, invoke, read_output, run_job, spawn_run, write_job

from pipeline.cost import make_pricer
from pipeline.records import Usage
from pipeline.simulator import SimConfig, running_in_thread

ROOT = Path(__file__).resolve().parents[1]
EMBED = {"endpoint": "embeddings", "model": "text-embedding-3-small", "dimensions": 32}


def texts(n: int, distinct: int | None = None) -> list[dict[str, object]]:
    return [{"id": i, "text": f"row {i % (distinct or n)} über café"} for i in range(n)]


def test_the_sample_job_runs_offline_with_a_vector_per_row(tmp_path: Path) -> None:
    out = tmp_path / "embed.parquet"
    result = invoke("run", ROOT / "jobs" / "embed.toml", "--simulate", "--output", out)

    assert result.exit_code == 0, result.output
    frame = read_output(out)
    assert frame.height == 50
    assert frame["status"].to_list() == ["ok"] * 50
    assert frame.schema["embedding"] == pl.List(pl.Float32)
    assert set(frame["embedding"].list.len().to_list()) == {256}
    assert "response" not in frame.columns
    assert (frame["prompt_tokens"] > 0).all()
    assert (frame["cost_usd"] > 0).all()


def test_rows_are_batched_and_the_usage_shared_to_the_token(tmp_path: Path) -> None:
    job = write_job(tmp_path, texts(50), request={**EMBED, "batch_rows": 8})
    with running_in_thread(SimConfig(latency_ms=0)) as (url, sim):
        result = invoke("run", job, "--base-url", url)
        sent, ok = sim.stats.requests, sim.stats.ok

    assert result.exit_code == 0, result.output
    assert sent == ok == math.ceil(50 / 8)
    frame = read_output(tmp_path / "out.parquet")
    # Every row of a request carries that request's id; the shares add up to its usage.
    per_request = frame.group_by("request_id").agg(pl.len(), pl.col("prompt_tokens").sum())
    assert sorted(per_request["len"].to_list()) == [2, 8, 8, 8, 8, 8, 8]
    pricer = make_pricer("text-embedding-3-small", None)
    total = int(frame["prompt_tokens"].sum())
    assert frame["cost_usd"].sum() == pytest.approx(pricer.cost(Usage(prompt_tokens=total)))


def test_a_vector_is_the_same_whatever_batch_it_came_in(tmp_path: Path, sim: Server) -> None:
    vectors = []
    for batch_rows in (1, 7):
        directory = tmp_path / str(batch_rows)
        directory.mkdir()
        job = write_job(directory, texts(12), request={**EMBED, "batch_rows": batch_rows})
        assert run_job(job, sim).exit_code == 0
        vectors.append(read_output(directory / "out.parquet")["embedding"].to_list())

    assert vectors[0] == vectors[1]


def test_identical_texts_are_embedded_once(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(40, distinct=5), request={**EMBED, "batch_rows": 100})

    assert run_job(job, sim).exit_code == 0
    frame = read_output(tmp_path / "out.parquet")
    assert frame["status"].to_list() == ["ok"] * 40
    assert frame.filter(pl.col("attempts") > 0).height == 5
    first = frame.filter(pl.col("id") == "0")["embedding"].item().to_list()
    assert frame.filter(pl.col("id") == "5")["embedding"].item().to_list() == first


def test_a_batch_that_fails_once_is_retried_whole(tmp_path: Path, sim: Server) -> None:
    rows = texts(10)
    rows[3]["text"] = "row 3 <<sim:500:1>>"
    job = write_job(tmp_path, rows, request={**EMBED, "batch_rows": 5})

    assert run_job(job, sim).exit_code == 0
    frame = read_output(tmp_path / "out.parquet")
    assert frame["status"].to_list() == ["ok"] * 10
    assert frame["attempts"].to_list() == [2] * 5 + [1] * 5  # row 3 is in the first batch


def test_an_empty_text_fails_its_row_only(tmp_path: Path, sim: Server) -> None:
    rows = texts(6)
    rows[2]["text"] = None
    job = write_job(tmp_path, rows, request={**EMBED, "batch_rows": 4})

    result = run_job(job, sim)

    assert result.exit_code == 1
    frame = read_output(tmp_path / "out.parquet")
    assert frame["status"].to_list() == ["ok", "ok", "failed", "ok", "ok", "ok"]
    assert "empty" in frame["error"][2]
    assert frame["embedding"][2] is None


def test_a_rejected_batch_fails_all_its_rows_and_a_resume_sends_only_those(
    tmp_path: Path, sim: Server
) -> None:
    rows = texts(8)
    rows[5]["text"] = "row 5 <<sim:400>>"
    job = write_job(tmp_path, rows, request={**EMBED, "batch_rows": 4})

    assert run_job(job, sim).exit_code == 1
    frame = read_output(tmp_path / "out.parquet")
    assert frame["status"].to_list() == ["ok"] * 4 + ["failed"] * 4
    assert frame["error_type"][4] == "invalid_request"

    before = sim.sim.stats.requests
    assert run_job(job, sim).exit_code == 1  # failed rows are done unless --retry-failed
    assert sim.sim.stats.requests == before


def test_csv_output_holds_the_vector_as_json(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(3), request=EMBED, output="out.csv")

    assert run_job(job, sim).exit_code == 0
    frame = pl.read_csv(tmp_path / "out.csv")
    vector = frame["embedding"].str.json_decode(pl.List(pl.Float64))[0].to_list()
    assert len(vector) == 32


def test_a_killed_run_resumes_and_embeds_every_row_once(tmp_path: Path, sim: Server) -> None:
    """Batches in flight at a SIGKILL are sent again; nothing committed is lost."""
    rows, batch, concurrency = 600, 20, 4
    clean = tmp_path / "clean"
    clean.mkdir()
    request = {**EMBED, "batch_rows": batch}
    limits = {"concurrency": concurrency}
    assert (
        run_job(write_job(clean, texts(rows), request=request, limits=limits), sim).exit_code == 0
    )
    expected = read_output(clean / "out.parquet")["embedding"].to_list()

    job = write_job(tmp_path, texts(rows), request=request, limits=limits)
    kills = 0
    with running_in_thread(SimConfig(latency_ms=400)) as (url, slow):
        for kill_after in (1.0, 1.5):
            child = spawn_run(job, url)
            time.sleep(kill_after)
            if child.poll() is None:
                child.kill()
                kills += 1
            child.communicate(timeout=30)
        final = spawn_run(job, url)
        _, stderr = final.communicate(timeout=120)
        sent = slow.stats.ok

    assert final.returncode == 0, stderr
    assert kills >= 1
    frame = read_output(tmp_path / "out.parquet")
    assert frame["status"].to_list() == ["ok"] * rows
    assert frame["embedding"].to_list() == expected
    # Only requests in flight at a kill are sent twice: at most `concurrency` per kill.
    assert rows // batch <= sent <= rows // batch + kills * concurrency


def test_estimate_shows_a_cheap_jobs_cost_to_three_digits() -> None:
    result = invoke("estimate", ROOT / "jobs" / "embed.toml", "--simulate")

    assert result.exit_code == 0, result.output
    assert re.search(r"\$0\.0000[1-9]\d\d to \$0\.0000[1-9]\d\d", result.output), result.output
