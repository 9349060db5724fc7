"""End to end: job file + input table -> requests to a real simulator -> output table."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import Server, invoke, read_output, run_job, write_job

from pipeline.parse import RESULT_SCHEMA
from pipeline.spec import load_job

ROOT = Path(__file__).resolve().parent.parent


def texts(n: int) -> list[dict[str, object]]:
    return [{"id": i, "text": f"row {i}: ünïcödé and plain words"} for i in range(n)]


def test_csv_to_parquet_keeps_input_columns_order_and_adds_results(
    tmp_path: Path, sim: Server
) -> None:
    job = write_job(tmp_path, texts(40))

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out.columns == ["id", "text", *RESULT_SCHEMA]
    assert out["id"].to_list() == [str(i) for i in range(40)], "CSV values as written"
    assert out["status"].unique().to_list() == ["ok"]
    assert out["response"].str.len_chars().min() > 0  # type: ignore[operator]
    assert (out["cost_usd"] > 0).all()
    assert (out["prompt_tokens"] > 0).all()
    assert out["request_id"].null_count() == 0
    assert sim.sim.stats.ok == 40


def test_prefix_keeps_an_input_column_named_like_a_result(tmp_path: Path, sim: Server) -> None:
    rows = [{**row, "status": "mine"} for row in texts(3)]
    job = write_job(tmp_path, rows, tables={"output": {"path": "out.parquet", "prefix": "llm_"}})

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out.columns == ["id", "text", "status", *(f"llm_{c}" for c in RESULT_SCHEMA)]
    assert out["status"].to_list() == ["mine"] * 3
    assert out["llm_status"].to_list() == ["ok"] * 3


def test_parquet_to_csv(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(12), input_name="in.parquet", output="out.csv")

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    out = pl.read_csv(tmp_path / "out.csv")
    assert out.height == 12
    assert out["status"].to_list() == ["ok"] * 12


def test_summary_json_and_parquet_metadata_carry_provenance(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(5))

    assert run_job(job, sim).exit_code == 0

    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["ok"] == 5
    assert summary["failed"] == 0
    assert summary["pending"] == 0
    assert summary["price_source"].startswith("genai-prices")
    meta = pq.read_schema(tmp_path / "out.parquet").metadata
    assert meta[b"pipeline.template_hash"].decode() == summary["template_hash"]
    assert meta[b"pipeline.job_fingerprint"].decode() == summary["job_fingerprint"]
    assert b"pipeline.version" in meta


def test_json_schema_answers_become_typed_columns(tmp_path: Path, sim: Server) -> None:
    schema = {
        "type": "object",
        "properties": {
            "sentiment": {"type": "string", "enum": ["positive", "negative"]},
            "score": {"type": "number"},
            "count": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "urgent": {"type": "boolean"},
        },
        "required": ["sentiment", "score", "count", "tags", "urgent"],
        "additionalProperties": False,
    }
    job = write_job(
        tmp_path,
        texts(10),
        request={"response_format": "json_schema", "max_tokens": 400},
        tables={"request.json_schema": {"name": "facts", "schema": schema}},
    )

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out.schema["score"] == pl.Float64
    assert out.schema["count"] == pl.Int64
    assert out.schema["tags"] == pl.List(pl.String)
    assert out.schema["urgent"] == pl.Boolean
    assert set(out["sentiment"].to_list()) <= {"positive", "negative"}
    assert out.columns.index("sentiment") == out.columns.index("response") + 1


def test_answer_that_breaks_the_schema_fails_the_row_and_keeps_the_text(
    tmp_path: Path, sim: Server
) -> None:
    # json_object mode, but the schema the job validates against wants a key the
    # simulator's json_object answers never have.
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    job = write_job(
        tmp_path,
        texts(3),
        request={
            "response_format": "json_schema",
            "max_tokens": 400,
            "extra_body": {"response_format": {"type": "json_object"}},
        },
        tables={"request.json_schema": {"schema": schema, "strict": False}},
    )

    result = run_job(job, sim)

    assert result.exit_code == 1
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["failed"] * 3
    assert out["error_type"].to_list() == ["invalid_response"] * 3
    assert out["error"].str.contains("'x' is a required property").all()
    assert out["response"].str.starts_with("{").all()
    assert (out["cost_usd"] > 0).all(), "a generated answer is billed even if it fails"
    assert out["x"].null_count() == 3


def test_max_tokens_cut_is_reported_as_length(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(6), request={"max_tokens": 1})

    result = run_job(job, sim)

    assert result.exit_code == 0
    out = read_output(tmp_path / "out.parquet")
    assert out["finish_reason"].to_list() == ["length"] * 6
    assert "6 rows hit max_tokens" in result.output


def test_nulls_render_empty_by_default_and_fail_when_asked(tmp_path: Path, sim: Server) -> None:
    rows: list[dict[str, object]] = [{"id": 1, "text": "hello"}, {"id": 2, "text": None}]
    job = write_job(tmp_path, rows, template={"user": "[{{ text }}]", "nulls": "fail"})

    result = run_job(job, sim)

    assert result.exit_code == 1
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok", "failed"]
    assert out["error_type"][1] == "invalid_row"
    assert "`text` is null" in out["error"][1]
    assert out["attempts"][1] == 0
    assert sim.sim.stats.requests == 1


def test_rerun_resumes_without_sending_finished_rows(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(20))
    assert run_job(job, sim, "--limit", "8").exit_code == 0
    assert sim.sim.stats.requests == 8

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    assert sim.sim.stats.requests == 20
    assert max(sim.sim.stats.by_body.values()) == 1, "no row was sent twice"
    assert read_output(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 20


def test_changed_job_is_refused_naming_what_changed(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(3))
    assert run_job(job, sim).exit_code == 0
    job.write_text(job.read_text().replace("{{ text }}", "Say: {{ text }}"))

    refused = run_job(job, sim)
    fresh = run_job(job, sim, "--fresh")

    assert refused.exit_code == 2
    assert "template changed" in refused.output
    assert "--fresh" in refused.output
    assert fresh.exit_code == 0


def test_budget_stops_the_run_with_exit_3(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(200), limits={"concurrency": 2})

    # Above the prompts' cost ($0.00054: a budget below that is refused before
    # sending, see test_money.py), below the worst case ($0.0044).
    result = run_job(job, sim, "--max-cost", "0.001")

    assert result.exit_code == 3, result.output
    assert "it covers about" in result.output
    out = read_output(tmp_path / "out.parquet")
    assert out.height == 200
    assert out["status"].value_counts().filter(pl.col("status") == "pending")["count"][0] > 100


def test_simulate_flag_needs_no_key_or_server(tmp_path: Path) -> None:
    job = write_job(tmp_path, texts(4))

    result = invoke("run", job, "--simulate")

    assert result.exit_code == 0, result.output
    assert read_output(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 4


def test_no_key_for_openai_says_how_to_get_going(tmp_path: Path) -> None:
    job = write_job(tmp_path, texts(2))

    result = invoke("run", job)

    assert result.exit_code == 2
    assert "OPENAI_API_KEY" in result.output
    assert "--simulate" in result.output
    assert not (tmp_path / "out.parquet").exists()


def test_validate_checks_everything_then_notes_the_missing_key(tmp_path: Path) -> None:
    job = write_job(tmp_path, texts(2))

    result = invoke("validate", job)

    # validate sends nothing, so it needs no key (issue 10): the key is a note for `run`.
    assert result.exit_code == 0
    assert "[user] row 0" in result.output
    assert "no API key: set OPENAI_API_KEY" in result.output


def test_environment_base_url_is_honoured_and_flag_wins(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(2))

    from_env = invoke("run", job, env={"OPENAI_BASE_URL": sim.url})
    flag_wins = invoke(
        "run",
        job,
        "--fresh",
        "--base-url",
        sim.url,
        env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"},
    )

    assert from_env.exit_code == 0, from_env.output
    assert flag_wins.exit_code == 0, flag_wins.output


def test_validate_renders_rows_and_sends_nothing(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(5), template={"user": "Say: {{ text }}"})

    result = invoke("validate", job, "--base-url", sim.url)

    assert result.exit_code == 0, result.output
    assert "5 rows" in result.output
    assert "[user] Say: row 0" in result.output
    assert sim.sim.stats.requests == 0


@pytest.mark.parametrize("job", sorted(p.stem for p in (ROOT / "jobs").glob("*.toml")))
def test_every_sample_job_runs_offline_with_every_row_ok(tmp_path: Path, job: str) -> None:
    spec = load_job(ROOT / "jobs" / f"{job}.toml")
    out = tmp_path / "out.parquet"

    # --rpm only speeds the run up: the simulator enforces whatever the job asks.
    result = invoke(
        "run", spec.root / f"{job}.toml", "--simulate", "--rpm", "6000", "--output", out
    )

    assert result.exit_code == 0, result.output
    frame = pl.read_parquet(out)
    rows = pl.read_csv(spec.input.path).height
    assert frame.height == rows
    assert frame["status"].to_list() == ["ok"] * rows
    assert (frame["prompt_tokens"] > 0).all()
    if spec.price is None:  # a model genai-prices knows: every row sent has a cost
        assert (frame.filter(pl.col("attempts") > 0)["cost_usd"] > 0).all()


def test_schema_openai_would_refuse_in_strict_mode_is_caught_before_sending(
    tmp_path: Path, sim: Server
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    job = write_job(
        tmp_path,
        texts(3),
        request={"response_format": "json_schema"},
        tables={"request.json_schema": {"schema": schema}},
    )

    result = invoke("validate", job, "--base-url", sim.url)

    assert result.exit_code == 2
    assert '"additionalProperties": false' in result.output
    assert sim.sim.stats.requests == 0


def test_estimate_forecasts_tokens_cost_and_time_without_sending(
    tmp_path: Path, sim: Server
) -> None:
    job = write_job(tmp_path, texts(30), request={"max_tokens": 10}, limits={"rpm": 60})

    result = invoke("estimate", job, "--base-url", sim.url)

    assert result.exit_code == 0, result.output
    assert "estimate for 30 rows" in result.output
    assert "at most 300 tokens" in result.output
    assert "at least 0.5 min" in result.output
    assert sim.sim.stats.requests == 0


def test_summary_prints_brackets_as_text(tmp_path: Path, sim: Server) -> None:
    job = write_job(
        tmp_path,
        texts(2),
        request={"model": "my-llama"},
        tables={"price": {"input_per_mtok": 0.0, "output_per_mtok": 0.0}},
    )

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    assert "job [price]" in result.output
