"""Nightly runs: a changed input is normal, and pays only for what is new.

A row whose request was answered `ok` for an earlier input of the same job is not sent
again: a new export of the same table, rows appended, changed, deleted or reordered.
Requests are counted at the simulator; outputs are complete and in the input's order.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import Server, invoke, read_output, run_job, write_job

ROWS = 40


def texts(ids: list[int], changed: frozenset[int] = frozenset()) -> list[dict[str, Any]]:
    return [{"id": i, "text": f"row {i}" + (" (edited)" if i in changed else "")} for i in ids]


def rewrite(table: Path, rows: list[dict[str, Any]]) -> None:
    """A new export: another file in the table's place (a new inode and mtime)."""
    fresh = table.with_suffix(".new.csv")
    pl.DataFrame(rows).write_csv(fresh)
    fresh.replace(table)


def test_a_new_export_of_the_same_table_sends_nothing(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(list(range(ROWS))))
    assert run_job(job, sim).exit_code == 0
    first = read_output(tmp_path / "out.parquet")
    table = tmp_path / "input.csv"
    data = table.read_bytes()
    table.unlink()
    table.write_bytes(data)  # the same bytes, a new file

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    assert sim.sim.stats.requests == ROWS
    assert f"{ROWS} ask what was answered before" in result.output
    assert "0 to send" in result.output
    again = read_output(tmp_path / "out.parquet")
    assert again.drop("latency_ms").equals(first.drop("latency_ms"))


def test_appended_changed_deleted_and_reordered_rows_send_only_the_new_and_changed(
    tmp_path: Path, sim: Server
) -> None:
    job = write_job(tmp_path, texts(list(range(ROWS))))
    assert run_job(job, sim).exit_code == 0
    first = read_output(tmp_path / "out.parquet")
    answers = dict(zip(first["id"].to_list(), first["response"].to_list(), strict=True))
    # Reversed, rows 3 and 7 deleted, 10 and 11 edited, three appended.
    ids = [i for i in reversed(range(ROWS)) if i not in (3, 7)] + [100, 101, 102]
    rewrite(tmp_path / "input.csv", texts(ids, changed=frozenset({10, 11})))

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    assert sim.sim.stats.requests == ROWS + 5, "the two edited and the three new rows"
    assert max(sim.sim.stats.by_body.values()) == 1, "no request was sent twice"
    assert "5 to send" in result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["id"].to_list() == [str(i) for i in ids]  # CSV columns are text
    assert out["status"].to_list() == ["ok"] * len(ids)
    sent = ["10", "11", "100", "101", "102"]
    for i, response in zip(out["id"].to_list(), out["response"].to_list(), strict=True):
        if i not in sent:
            assert response == answers[i], f"row {i} reuses its answer"
    # A reused answer keeps what it was billed; the run's totals count each answer once.
    kept = out.filter(~pl.col("id").is_in(sent))
    assert (kept["attempts"] >= 1).all()
    before = first.filter(pl.col("id").is_in(kept["id"].implode()))
    assert kept["cost_usd"].sum() == pytest.approx(before["cost_usd"].sum())


def test_rows_that_ask_the_same_share_one_reused_answer_at_no_cost(
    tmp_path: Path, sim: Server
) -> None:
    job = write_job(tmp_path, texts([1, 2]))
    assert run_job(job, sim).exit_code == 0
    rewrite(tmp_path / "input.csv", [*texts([1, 2]), {"id": 3, "text": "row 1"}])

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    assert sim.sim.stats.requests == 2
    out = read_output(tmp_path / "out.parquet")
    assert out["response"][2] == out["response"][0]
    assert out["cost_usd"][2] == 0.0, "the copy is not billed again"
    assert out["cost_usd"][0] > 0.0


def test_a_changed_job_and_input_is_still_refused_naming_the_job(
    tmp_path: Path, sim: Server
) -> None:
    job = write_job(tmp_path, texts(list(range(5))))
    assert run_job(job, sim).exit_code == 0
    rewrite(tmp_path / "input.csv", texts(list(range(6))))
    job.write_text(job.read_text().replace("{{ text }}", "Say: {{ text }}"))

    refused = run_job(job, sim)
    fresh = run_job(job, sim, "--fresh")

    assert refused.exit_code == 2
    assert "template changed" in refused.output
    assert sim.sim.stats.requests == 5 + 6, "with --fresh every row is sent"
    assert fresh.exit_code == 0


def test_a_run_stopped_by_limit_then_a_new_input_reuses_what_was_answered(
    tmp_path: Path, sim: Server
) -> None:
    job = write_job(tmp_path, texts(list(range(10))))
    assert run_job(job, sim, "--limit", "4").exit_code == 0
    rewrite(tmp_path / "input.csv", texts(list(range(12))))

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    assert sim.sim.stats.requests == 12
    assert max(sim.sim.stats.by_body.values()) == 1
    assert read_output(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 12


def test_status_shows_the_kept_answers_and_prune_drops_them(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(list(range(ROWS))))
    assert run_job(job, sim).exit_code == 0
    rewrite(tmp_path / "input.csv", texts(list(range(ROWS // 2))))  # half the rows stay
    assert run_job(job, sim).exit_code == 0

    held = invoke("status", job)
    pruned = invoke("prune", job)
    after = invoke("status", job)
    again = run_job(job, sim)

    assert held.exit_code == 0, held.output
    assert f"{ROWS} answers kept from earlier inputs" in held.output
    assert pruned.exit_code == 0, pruned.output
    assert f"dropped {ROWS} answers" in pruned.output
    assert "kept from earlier inputs" not in after.output
    assert again.exit_code == 0, again.output
    assert sim.sim.stats.requests == ROWS, "the latest input's rows keep their answers"
    assert read_output(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * (ROWS // 2)


def test_prune_before_a_new_input_was_given_its_answers_is_refused(
    tmp_path: Path, sim: Server
) -> None:
    job = write_job(tmp_path, texts(list(range(5))))
    assert run_job(job, sim).exit_code == 0
    journal = tmp_path / "out.journal.sqlite"
    with contextlib.closing(sqlite3.connect(journal)) as db, db:
        db.execute("INSERT OR REPLACE INTO meta VALUES ('reusing', '1')")  # a pass cut short

    refused = invoke("prune", job)

    assert refused.exit_code == 2, refused.output
    assert "run the job first" in refused.output


def test_prune_without_a_checkpoint_says_so(tmp_path: Path) -> None:
    job = write_job(tmp_path, texts([1]))

    refused = invoke("prune", job)

    assert refused.exit_code == 2
    assert "no checkpoint" in refused.output
    assert not (tmp_path / "out.journal.sqlite").exists()


def test_each_row_says_when_it_was_answered_and_by_which_run(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(list(range(6))))
    assert run_job(job, sim).exit_code == 0
    first = read_output(tmp_path / "out.parquet")
    rewrite(tmp_path / "input.csv", texts([0, 1, 2, 3, 4, 5, 6, 7], changed=frozenset({2})))

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    stamp = out.schema["answered_at"]
    assert isinstance(stamp, pl.Datetime)
    assert stamp.time_zone == "UTC"
    assert first["run"].to_list() == [1] * 6
    assert out["run"].to_list() == [1, 1, 2, 1, 1, 1, 2, 2]
    kept = out.filter(pl.col("run") == 1)["answered_at"]
    assert kept.to_list() == first.filter(pl.col("id") != "2")["answered_at"].to_list()
    assert (out.filter(pl.col("run") == 2)["answered_at"] > first["answered_at"].max()).all()


def test_new_only_writes_just_the_rows_this_run_answered(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(list(range(6))))
    assert run_job(job, sim).exit_code == 0
    rewrite(tmp_path / "input.csv", texts([5, 4, 3, 2, 1, 0, 6], changed=frozenset({4})))

    result = run_job(job, sim, "--new-only")

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["id"].to_list() == ["4", "6"], "the changed and the new row, in input order"
    assert out["run"].to_list() == [2, 2]
    assert out["status"].to_list() == ["ok", "ok"]


def test_a_job_with_dedupe_off_sends_a_repeated_request_again_rather_than_share_it(
    tmp_path: Path, sim: Server
) -> None:
    rows = [{"id": 1, "text": "same"}, {"id": 2, "text": "same"}]
    job = write_job(tmp_path, rows, request={"dedupe": False})
    assert run_job(job, sim).exit_code == 0
    assert sim.sim.stats.requests == 2
    rewrite(tmp_path / "input.csv", rows)

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    # One earlier answer is kept per request: the first row takes it, the second asks.
    assert sim.sim.stats.requests == 3
    assert read_output(tmp_path / "out.parquet")["attempts"].to_list() == [1, 1]


def test_estimate_shows_what_a_changed_input_would_reuse_and_send(
    tmp_path: Path, sim: Server
) -> None:
    job = write_job(tmp_path, texts(list(range(10))))
    assert run_job(job, sim).exit_code == 0
    # The same server as the run's: what is sent (max_tokens' name) depends on it.
    unchanged = invoke("estimate", job, "--base-url", sim.url)
    rewrite(tmp_path / "input.csv", texts(list(range(12)), changed=frozenset({4})))

    changed = invoke("estimate", job, "--base-url", sim.url)

    assert unchanged.exit_code == 0, unchanged.output
    assert "estimate for 0 rows" in unchanged.output, "every row is done"
    assert changed.exit_code == 0, changed.output
    assert "estimate for 3 rows" in changed.output, "the edited row and the two new ones"
    assert "9 rows ask what" in changed.output
    assert sim.sim.stats.requests == 10, "estimate sends nothing"
    result = run_job(job, sim)
    assert result.exit_code == 0, result.output
    assert sim.sim.stats.requests == 13


def test_validate_says_what_a_run_would_send_now(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(list(range(10))))
    assert run_job(job, sim).exit_code == 0
    rewrite(tmp_path / "input.csv", texts(list(range(12)), changed=frozenset({4})))

    checked = invoke("validate", job, "--base-url", sim.url)

    assert checked.exit_code == 0, checked.output
    assert "all 12 rows render" in checked.output
    assert "a run now would send 3 rows: 9 ask what" in checked.output
    assert "0 are done" in checked.output
    assert sim.sim.stats.requests == 10, "validate sends nothing"
