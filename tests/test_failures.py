"""Every failure class of DESIGN.md, against a real server: the row's status, its
attempts and the run's exit code.

Rows carry `<<sim:KIND:N>>` directives: the simulator answers that row with KIND for the
first N times it sees the request, then normally.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import Server, invoke, read_output, run_job, write_job

from pipeline.simulator import SimConfig, running_in_thread

MAX_ATTEMPTS = 4


def rows_with(directive: str, n: int = 4) -> list[dict[str, object]]:
    """n rows; the second one carries the directive."""
    return [{"id": i, "text": f"row {i} {directive if i == 1 else ''}".strip()} for i in range(n)]


RECOVERS = [
    pytest.param("<<sim:500:2>>", 3, id="500-twice-then-ok"),
    pytest.param("<<sim:503:1>>", 2, id="503-slow-down-then-ok"),
    pytest.param("<<sim:529:1>>", 2, id="529-overloaded-then-ok"),
    pytest.param("<<sim:reset:1>>", 2, id="connection-reset-then-ok"),
    pytest.param("<<sim:truncated:1>>", 2, id="truncated-body-then-ok"),
    pytest.param("<<sim:malformed:1>>", 2, id="malformed-json-then-ok"),
    pytest.param("<<sim:429:2>>", 3, id="429-rate-limited-then-ok"),
]


@pytest.mark.parametrize(("directive", "attempts"), RECOVERS)
def test_retryable_failures_recover(
    tmp_path: Path, sim: Server, directive: str, attempts: int
) -> None:
    job = write_job(tmp_path, rows_with(directive), limits={"max_attempts": MAX_ATTEMPTS})

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 4
    assert out["attempts"].to_list() == [1, attempts, 1, 1]


ROW_FAILS = [
    pytest.param("<<sim:400>>", 400, "invalid_request", id="400-bad-request"),
    pytest.param("<<sim:400ctx>>", 400, "invalid_request", id="400-context-length"),
    pytest.param("<<sim:413>>", 413, "invalid_request", id="413-too-large"),
    pytest.param("<<sim:422>>", 422, "invalid_request", id="422-unprocessable"),
    pytest.param("<<sim:500noretry>>", 500, "server", id="x-should-retry-false"),
]


@pytest.mark.parametrize(("directive", "status", "kind"), ROW_FAILS)
def test_row_failures_fail_the_row_without_retry(
    tmp_path: Path, sim: Server, directive: str, status: int, kind: str
) -> None:
    job = write_job(tmp_path, rows_with(directive), limits={"max_attempts": MAX_ATTEMPTS})

    result = run_job(job, sim)

    assert result.exit_code == 1, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok", "failed", "ok", "ok"]
    assert out["attempts"][1] == 1
    assert out["http_status"][1] == status
    assert out["error_type"][1] == kind
    assert out["error"][1]


def test_persistent_server_error_fails_after_max_attempts(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, rows_with("<<sim:500>>"), limits={"max_attempts": MAX_ATTEMPTS})

    result = run_job(job, sim)

    assert result.exit_code == 1
    out = read_output(tmp_path / "out.parquet")
    assert out["status"][1] == "failed"
    assert out["attempts"][1] == MAX_ATTEMPTS
    assert out["error_type"][1] == "server"


def test_retry_failed_sends_only_the_failed_rows_again(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, rows_with("<<sim:500:3>>"), limits={"max_attempts": 2})
    assert run_job(job, sim).exit_code == 1
    sent_before = sim.sim.stats.requests

    again = run_job(job, sim, "--retry-failed")

    assert again.exit_code == 0, again.output
    assert sim.sim.stats.requests - sent_before == 2  # one 500 left, then ok
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 4


def test_max_error_rate_tolerates_some_failed_rows(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, rows_with("<<sim:400>>"), limits={"max_error_rate": 0.5})

    assert run_job(job, sim).exit_code == 0


HALTS = [
    pytest.param("<<sim:401>>", "API key", id="401-bad-key"),
    pytest.param("<<sim:403>>", "permission", id="403-forbidden"),
    pytest.param("<<sim:404model>>", "--model", id="404-model-not-found"),
    pytest.param("<<sim:429quota>>", "quota", id="429-insufficient-quota"),
]


@pytest.mark.parametrize(("directive", "hint"), HALTS)
def test_halting_failures_stop_the_run_once_with_the_fix(
    tmp_path: Path, sim: Server, directive: str, hint: str
) -> None:
    rows = [{"id": i, "text": f"row {i} {directive}"} for i in range(30)]
    job = write_job(tmp_path, rows, limits={"concurrency": 2})

    result = run_job(job, sim)

    assert result.exit_code == 4, result.output
    assert hint in result.output
    assert sim.sim.stats.requests <= 2, "halts at the first, not after every row"
    out = read_output(tmp_path / "out.parquet")
    assert out.height == 30
    assert out["status"].to_list() == ["pending"] * 30


def test_wrong_base_url_404_halts_naming_the_flag(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, rows_with(""))

    result = invoke("run", job, "--base-url", sim.url.removesuffix("/v1") + "/nope")

    assert result.exit_code == 4
    assert "--base-url" in result.output


def test_request_too_large_for_the_token_limit_fails_without_retry(tmp_path: Path) -> None:
    rows = [{"id": 0, "text": "short"}, {"id": 1, "text": "long " * 400}]
    with running_in_thread(SimConfig(tpm=300)) as (url, simulator):
        job = write_job(tmp_path, rows, request={"max_tokens": 10})
        result = invoke("run", job, "--base-url", url)
        sent = simulator.stats.requests

    assert result.exit_code == 1, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok", "failed"]
    assert "request too large" in out["error"][1]
    assert out["attempts"][1] == 1
    assert sent == 2


def test_same_client_error_on_many_rows_halts_the_job(tmp_path: Path, sim: Server) -> None:
    rows = [{"id": i, "text": f"{i} <<sim:400>>"} for i in range(200)]
    job = write_job(tmp_path, rows, limits={"concurrency": 4})

    result = run_job(job, sim)

    assert result.exit_code == 4
    assert "same error" in result.output
    assert sim.sim.stats.requests < 60


def test_same_server_error_on_every_row_halts_the_job(tmp_path: Path, sim: Server) -> None:
    # llama.cpp answers a response_format it lacks with the same 500 on every row.
    rows = [{"id": i, "text": f"{i} <<sim:500>>"} for i in range(200)]
    job = write_job(tmp_path, rows, limits={"concurrency": 4, "max_attempts": 2})

    result = run_job(job, sim)

    assert result.exit_code == 4
    assert "same error" in result.output
    assert sim.sim.stats.requests < 2 * 60


def test_connection_refused_halts_with_the_rows_pending(tmp_path: Path) -> None:
    # A refused port will not clear by retrying row by row: the run halts (issue 10).
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = write_job(tmp_path, rows_with("", 2), limits={"max_attempts": 2})

    result = invoke("run", job, "--base-url", f"http://127.0.0.1:{port}/v1")

    assert result.exit_code == 4, result.output
    assert "connection refused" in result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["pending", "pending"]  # a resume sends them


def test_read_timeout_is_retried(tmp_path: Path, sim: Server) -> None:
    job = write_job(
        tmp_path,
        rows_with("<<sim:slow:1>>"),
        request={"timeout_s": 0.5},
        limits={"max_attempts": 3},
    )

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    assert read_output(tmp_path / "out.parquet")["attempts"][1] == 2


def test_api_key_never_appears_in_anything_written(tmp_path: Path) -> None:
    canary = "sk-canary-" + "Zq9" * 12
    rows = [{"id": i, "text": f"row {i} {'<<sim:500:1>>' if i == 2 else ''}"} for i in range(6)]
    job = write_job(tmp_path, rows)
    with running_in_thread(SimConfig(api_key=canary)) as (url, _):
        good = invoke("run", job, "--base-url", url, env={"OPENAI_API_KEY": canary})
        bad = invoke("run", job, "--fresh", "--base-url", url, env={"OPENAI_API_KEY": canary + "x"})

    assert good.exit_code == 0, good.output
    assert bad.exit_code == 4
    for result in (good, bad):
        assert canary not in result.output
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) >= 4
    for path in written:
        assert canary.encode() not in path.read_bytes(), path
