"""Bounded everything: the answer's size, a row's size, --concurrency, the signals.

Against the simulator over a real socket; the signals against the `pipeline` command
in a child process, as a user would meet them.
"""

from __future__ import annotations

import email.utils
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Server, invoke, read_output, run_job, serving, write_job

from pipeline.bounds import RowSizer, context_window
from pipeline.endpoints import Item
from pipeline.errors import PromptTooLarge, SpecError
from pipeline.limits import retry_after
from pipeline.plan import Plan, RunOptions, for_sending, make_plan
from pipeline.records import ROW_INDEX
from pipeline.spec import MAX_CONCURRENCY, load_job
from pipeline.transport import MAX_BODY_BYTES

#: Bound on every wait for a child process.
WAIT_S = 30.0


def rows(n: int, special: str = "special", at: int = 1) -> list[dict[str, object]]:
    return [{"id": i, "text": special if i == at else f"row {i}"} for i in range(n)]


def test_gzip_bomb_fails_its_row_with_the_size_and_stores_nothing_big(
    tmp_path: Path, sim: Server
) -> None:
    job = write_job(tmp_path, rows(4, "row 1 <<sim:bomb>>"))

    result = run_job(job, sim)

    assert result.exit_code == 1, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok", "failed", "ok", "ok"]
    assert out["error_type"][1] == "response_too_large"
    assert f"more than the {MAX_BODY_BYTES // 2**20} MiB" in out["error"][1]
    assert out["response"][1] is None
    assert out["attempts"][1] == 1, "not retried: the same bomb would come again"
    assert sim.sim.stats.requests == 4
    written = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert written < 2**20, "nothing of the inflated answer is kept"


def test_prompt_over_the_context_window_fails_before_sending(tmp_path: Path, sim: Server) -> None:
    window = context_window("gpt-4o-mini")
    assert window is not None
    huge = "word " * (window + 1000)
    job = write_job(tmp_path, rows(3, huge))

    result = run_job(job, sim)

    assert result.exit_code == 1, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok", "failed", "ok"]
    assert out["error_type"][1] == "too_large"
    assert f"context window of {window:,}" in out["error"][1]
    assert out["attempts"][1] == 0
    assert sim.sim.stats.requests == 2, "the big row was never sent"


def test_request_over_the_jobs_tpm_fails_instead_of_stalling(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, rows(3, "word " * 40_000), limits={"tpm": 30_000})

    result = run_job(job, sim)

    assert result.exit_code == 1, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok", "failed", "ok"]
    assert out["error_type"][1] == "too_large"
    assert "more than the job's tpm of 30,000" in out["error"][1]
    assert "--tpm" in out["error"][1]
    assert sim.sim.stats.requests == 2


def test_unknown_model_has_no_window_and_is_not_checked() -> None:
    assert context_window("my-local-llama") is None


def test_concurrency_flag_has_the_job_files_cap(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, rows(3))

    result = run_job(job, sim, "--concurrency", str(MAX_CONCURRENCY + 1))

    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: --concurrency")
    assert f"{MAX_CONCURRENCY} or less" in line
    assert sim.sim.stats.requests == 0


def test_zero_rate_limit_headers_wait_for_the_reset_and_finish(tmp_path: Path) -> None:
    job = write_job(tmp_path, rows(6))
    with serving(fault_rate=1.0, faults=("zerolimit",)) as server:
        result = run_job(job, server)
        assert server.sim.stats.requests == 6

    assert result.exit_code == 0, result.output


def test_retry_after_date_is_read_on_the_servers_clock() -> None:
    server_now = time.time() - 3600  # the server's clock is an hour behind ours
    headers = {
        "retry-after": email.utils.formatdate(server_now + 30, usegmt=True),
        "date": email.utils.formatdate(server_now, usegmt=True),
    }

    assert retry_after(headers) == pytest.approx(30, abs=1)
    del headers["date"]  # no Date: the local clock is all there is
    assert retry_after(headers) == 0.0


# Signals, against the command in a child process


def spawn(job: Path, url: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(job), "--base-url", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for_line(proc: subprocess.Popen[str], text: str) -> str:
    """Read the child's stderr (bounded) until a line holds `text`."""
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + WAIT_S
    while text not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {text!r} in {WAIT_S} s: {seen}"
        ready, _, _ = select.select([proc.stderr], [], [], left)
        if ready:
            line = proc.stderr.readline()
            assert line, f"the child ended before {text!r}: {seen}"
            seen += line
    return seen


def test_sigterm_exits_143_after_the_drain(tmp_path: Path) -> None:
    job = write_job(tmp_path, rows(50), limits={"concurrency": 2})
    with serving(latency_ms=300) as slow:
        proc = spawn(job, slow.url)
        wait_for_line(proc, "rows from")
        deadline = time.monotonic() + WAIT_S
        while slow.sim.stats.requests < 2:
            assert time.monotonic() < deadline, "no request reached the server"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=WAIT_S)

    assert proc.returncode == 143, stderr
    assert "interrupted: finished rows are kept" in stderr
    status = read_output(tmp_path / "out.parquet")["status"].to_list()
    assert "ok" in status
    assert "pending" in status


def test_second_sigint_exits_at_once_while_a_thread_never_returns(tmp_path: Path) -> None:
    # The template renders for ever (in the producer's thread): the first signal cannot
    # finish the run, and a normal exit would wait for that thread without end.
    forever = (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ text }}"
    )
    job = write_job(tmp_path, rows(3), template={"user": forever})
    with serving() as sim:
        proc = spawn(job, sim.url)
        wait_for_line(proc, "rows from")
        time.sleep(0.5)  # not a timing assertion: lets the render start (it never ends)
        proc.send_signal(signal.SIGINT)
        wait_for_line(proc, "interrupt again to stop at once")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=WAIT_S)
        sent = sim.sim.stats.requests

    assert proc.returncode == 130, stderr
    assert "interrupted twice: stopped at once" in stderr
    assert sent == 0


def test_concurrency_cap_holds_for_the_python_api_too(tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path, rows(2)))

    with pytest.raises(SpecError, match=f"more than {MAX_CONCURRENCY:,}"):
        make_plan(job, RunOptions(concurrency=MAX_CONCURRENCY + 1, simulate=True))


def test_estimate_counts_rows_too_big_to_send(tmp_path: Path) -> None:
    job = write_job(tmp_path, rows(3, "word " * 40_000), limits={"tpm": 30_000})

    result = invoke("estimate", job, "--simulate")

    assert result.exit_code == 0, result.output
    assert "1 rows would fail before sending" in result.output


# --- a run that estimates its rows' tokens (plan.for_sending) ------------------------

#: A text the estimate (bytes/4) counts at a quarter of its exact count: "x1" is two
#: tokens in o200k_base, one a byte, the most any text can have.
DENSE = "x1"


def plan_for(job: Path) -> Plan:
    return make_plan(load_job(job), RunOptions(base_url="http://127.0.0.1:9/v1"))


def test_a_run_estimates_only_where_the_tpm_cannot_bind(tmp_path: Path) -> None:
    def counts_exactly(limits: dict[str, int], request: dict[str, str] | None = None) -> bool:
        job = write_job(tmp_path, rows(20), limits=limits, request=request)
        return for_sending(plan_for(job)).endpoint.count.exact

    assert not counts_exactly({}), "no TPM limit: nothing to charge exactly"
    assert not counts_exactly({"rpm": 1_000_000, "tpm": 1_000_000_000}), "lifted far above need"
    assert counts_exactly({"tpm": 200_000}), "no RPM limit: the TPM one paces the run"
    assert counts_exactly({"rpm": 10_000, "tpm": 200_000}), "the TPM binds before the RPM"
    embeddings = {"endpoint": "embeddings", "model": "text-embedding-3-small"}
    assert counts_exactly({}, embeddings), "embeddings pack rows by their exact count"


def test_validate_and_estimate_still_count_exactly(tmp_path: Path) -> None:
    job = write_job(tmp_path, rows(3))
    assert plan_for(job).endpoint.count.exact


def test_an_estimating_run_refuses_a_row_that_only_its_exact_count_puts_over_the_window(
    tmp_path: Path, sim: Server
) -> None:
    window = context_window("gpt-4o-mini")
    assert window is not None
    dense = DENSE * (window * 3 // 4)  # estimated at 3/8 of the window, exactly 1.5x it
    job = write_job(tmp_path, rows(3, dense))
    assert not for_sending(plan_for(job)).endpoint.count.exact

    result = run_job(job, sim)

    assert result.exit_code == 1, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok", "failed", "ok"]
    assert f"more than the model's context window of {window:,}" in out["error"][1]
    assert f"about {len(dense) + 4 + 3:,} tokens" in out["error"][1], "the exact count"
    assert sim.sim.stats.requests == 2, "the big row was never sent"


def test_an_estimating_run_refuses_a_request_that_only_its_exact_count_puts_over_the_tpm(
    tmp_path: Path,
) -> None:
    # 100 requests a minute of the first rows' size cannot spend 100,000 tokens: the run
    # estimates, and row 20 (past the rows sampled) is 120,000 tokens exactly.
    table = rows(21, DENSE * 60_000, at=20)
    plan = for_sending(plan_for(write_job(tmp_path, table, limits={"rpm": 100, "tpm": 100_000})))
    assert not plan.endpoint.count.exact
    sizer = RowSizer(plan.job, plan.endpoint, plan.renderer)

    sized = [sizer.size({ROW_INDEX: i, **row}) for i, row in enumerate(table)]

    assert all(isinstance(s, Item) for s in sized[:20])
    assert isinstance(sized[20], PromptTooLarge)
    assert "more than the job's tpm of 100,000" in str(sized[20])


def test_a_run_with_its_limits_far_above_need_never_loads_the_encoding(
    tmp_path: Path, sim: Server
) -> None:
    # The encoding holds 66 MB: a run whose counts decide nothing does not load it.
    def loaded(limits: str) -> str:
        code = (
            "import asyncio, sys\nfrom pathlib import Path\n"
            "from pipeline import tokens\nfrom pipeline.plan import RunOptions, make_plan\n"
            "from pipeline.runner import execute\nfrom pipeline.spec import load_job\n"
            f"options = RunOptions(base_url={sim.url!r}, fresh=True, {limits})\n"
            "plan = make_plan(load_job(Path(sys.argv[1])), options)\n"
            "assert asyncio.run(execute(plan)).exit_code == 0\n"
            "print(tokens._bindings.cache_info().currsize)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, str(job)],
            capture_output=True,
            text=True,
            check=True,
            timeout=WAIT_S,
        )
        return done.stdout.strip()

    job = write_job(tmp_path, rows(5))
    assert loaded("rpm=1_000_000, tpm=1_000_000_000") == "0"
    assert loaded("tpm=100_000") == "1", "a TPM limit that binds: counted exactly"
