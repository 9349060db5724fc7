"""Issue 10, class 7: what a run says about money is true.

Only requests that left and were not answered are "in flight, may be billed again";
a drain that runs out of time still writes the output; a budget is weighed against
the estimate before anything is sent; an answer without usage has an unknown cost,
not a zero one; a model without a price names --price.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from conftest import read_output, run_job, serving, serving_app, spawn_run, write_job

import pipeline.signals
from pipeline.plan import RunOptions, estimate, make_plan
from pipeline.spec import load_job
from pipeline.tokens import bytes_over_four, estimate_tokens, text_counter

#: Bound on every wait for a child process or a server to reach a state.
WAIT_S = 60.0


def texts(n: int) -> list[dict[str, object]]:
    return [{"id": i, "text": f"row {i}"} for i in range(n)]


def pipeline_cmd(*args: str | Path, env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """The released command in a child process: (exit code, stderr + stdout)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=WAIT_S,
    )
    return done.returncode, done.stderr + done.stdout


def sending(journal: Path) -> int:
    """Rows the checkpoint holds as sent and unanswered."""
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        query = "SELECT count(*) FROM results WHERE status = 'sending'"
        return int(db.execute(query).fetchone()[0])


def answered(journal: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
            query = "SELECT count(*) FROM results WHERE status = 'ok'"
            return int(db.execute(query).fetchone()[0])
    except sqlite3.OperationalError:  # not created yet
        return 0


def wait_for(condition: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"never: {condition}"
        time.sleep(0.02)


def test_rows_waiting_on_the_limiter_at_ctrl_c_are_not_in_flight(tmp_path: Path) -> None:
    # 120 rpm paces a request every half second: most of the 8 workers are waiting on
    # the limiter, not on the server, when the signal comes.
    job = write_job(tmp_path, texts(40), limits={"concurrency": 8, "rpm": 120})
    journal = tmp_path / "out.journal.sqlite"
    with serving() as sim:
        proc = spawn_run(job, sim.url)
        wait_for("two answers committed", lambda: answered(journal) >= 2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=WAIT_S)
        received = sim.sim.stats.requests

        assert proc.returncode == 130, stderr
        assert sending(journal) == 0, "rows that never left are not recorded as sent"
        assert answered(journal) == received, "every request the server got was answered"

        code, resumed = pipeline_cmd("run", job, "--base-url", sim.url)

        assert code == 0, resumed
        assert sim.sim.stats.requests == 40, "no row was sent twice"
    assert "in flight" not in resumed
    assert read_output(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 40


def test_rows_refused_by_a_quota_halt_are_not_in_flight(tmp_path: Path) -> None:
    job = write_job(tmp_path, texts(20), limits={"concurrency": 4})
    journal = tmp_path / "out.journal.sqlite"
    # The server check before the first row passes; every row's request is refused
    # with 429 insufficient_quota, which halts the run and is not billed.
    with serving(faults=("429quota",), fault_rate=1.0) as broke:
        code, output = pipeline_cmd("run", job, "--base-url", broke.url)
        refused = broke.sim.stats.faults

    assert code == 4, output
    assert 1 <= refused <= 4
    assert sending(journal) == 0, "a refused request is not billed: the row is not in flight"
    with serving() as sim:
        code, resumed = pipeline_cmd("run", job, "--base-url", sim.url)
        assert sim.sim.stats.requests == 20
    assert code == 0, resumed
    assert "in flight" not in resumed


def test_a_drain_that_times_out_still_writes_the_output_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The drain's length is the only thing shortened: 30 s in a run, half a second here.
    monkeypatch.setattr(pipeline.signals, "DRAIN_S", 0.5)
    job = write_job(tmp_path, texts(10), limits={"concurrency": 3})
    journal = tmp_path / "out.journal.sqlite"
    with serving(latency_ms=600_000) as never:  # answers nothing within the test

        def interrupt() -> None:
            wait_for("three requests received", lambda: never.sim.stats.requests >= 3)
            os.kill(os.getpid(), signal.SIGINT)

        sender = threading.Thread(target=interrupt)
        sender.start()
        result = run_job(job, never)
        sender.join(timeout=WAIT_S)

    assert result.exit_code == 130, result.output
    assert "3 requests still in flight after 0.5 s were abandoned" in result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["pending"] * 10, "the output is written"
    assert sending(journal) == 3, "abandoned requests stay on record: they may be billed"

    with serving() as sim:
        resumed = run_job(job, sim)
    assert resumed.exit_code == 0, resumed.output
    assert "3 requests were in flight" in resumed.output


def test_a_budget_below_the_prompts_cost_is_refused_before_sending(tmp_path: Path) -> None:
    job = write_job(tmp_path, texts(12))
    with serving() as sim:
        plan = make_plan(load_job(job), RunOptions(base_url=sim.url))
        prompts = estimate(plan).cost_low
        budget = f"{prompts * 0.75:.10f}"

        refused_code, refused = pipeline_cmd(
            "run", job, "--base-url", sim.url, "--max-cost", budget
        )
        refused_sent = sim.sim.stats.requests
        half_code, half = pipeline_cmd("run", job, "--base-url", sim.url, "--limit", "6")
        # Six rows left: their prompts cost half the twelve's, within the budget.
        rest_code, rest = pipeline_cmd("run", job, "--base-url", sim.url, "--max-cost", budget)

    assert refused_code == 2, refused
    lines = [line for line in refused.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert "below what the prompts alone cost" in lines[0]
    assert "for the 12 rows left to send" in lines[0]
    assert refused_sent == 0
    assert half_code == 0, half
    assert rest_code in (0, 3), rest
    assert "it covers about" in rest
    assert "the 6 rows left" in rest


@contextlib.contextmanager
def answering_without_usage() -> Iterator[tuple[str, list[int]]]:
    """A chat completions server whose 200s carry no `usage` (some proxies drop it)."""
    received: list[int] = []

    async def complete(request: web.Request) -> web.Response:
        await request.read()
        received.append(1)
        body = {
            "id": f"chatcmpl-{len(received)}",
            "object": "chat.completion",
            "model": "gpt-4o-mini",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "an answer"},
                    "finish_reason": "stop",
                }
            ],
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", complete)
    with serving_app(app) as url:
        yield url, received


def test_an_answer_without_usage_has_an_unknown_cost_said_once(tmp_path: Path) -> None:
    job = write_job(tmp_path, texts(6))
    with answering_without_usage() as (url, received):
        code, output = pipeline_cmd("run", job, "--base-url", url)

    assert code == 0, output
    assert len(received) == 6
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 6, "the answers are real"
    assert out["cost_usd"].null_count() == 6, "their cost is unknown, not zero"
    assert out["prompt_tokens"].null_count() == 6
    warnings = [line for line in output.splitlines() if "without `usage`" in line]
    assert len(warnings) == 1
    assert "6 rows answered without `usage`" in warnings[0]
    summary = orjson.loads((tmp_path / "out.summary.json").read_bytes())
    assert summary["rows_without_usage"] == 6


def test_a_model_without_a_price_names_the_price_flag(tmp_path: Path) -> None:
    job = write_job(tmp_path, texts(3), request={"model": "my-local-llama"})
    with serving() as sim:
        code, output = pipeline_cmd("run", job, "--base-url", sim.url)
        refused_sent = sim.sim.stats.requests
        priced_code, priced = pipeline_cmd("run", job, "--base-url", sim.url, "--price", "0,0")

    assert code == 2, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert "--price" in lines[0]
    assert "my-local-llama" in lines[0]
    assert refused_sent == 0
    assert priced_code == 0, priced


def test_an_estimating_runs_in_flight_tokens_bound_the_exact_count(tmp_path: Path) -> None:
    # No TPM limit: the run counts bytes/4, which undercounts rare CJK characters (three
    # bytes each, two or three tokens). What a crash leaves in flight must stay "at most".
    text = "鱻龘靐齉麤" * 10
    rows = [{"text": f"{i}{text}"} for i in range(3)]  # not identical: each is sent
    job = write_job(tmp_path, rows, limits={"concurrency": 3})
    journal = tmp_path / "out.journal.sqlite"
    arrived, released = threading.Event(), threading.Event()

    async def hang(request: web.Request) -> web.Response:
        arrived.set()
        await asyncio.to_thread(released.wait, WAIT_S)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", hang)
    with serving_app(app) as url:
        child = spawn_run(job, url)
        try:
            wait_for("a request at the server", arrived.is_set)
            wait_for("the rows recorded as sending", lambda: sending(journal) == 3)
        finally:
            child.kill()
            child.communicate(timeout=WAIT_S)
            released.set()

    exact = estimate_tokens([{"role": "user", "content": text}], text_counter("gpt-4o-mini"))
    assert exact > bytes_over_four(text) + 3 + 4  # the case this is about
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        recorded = [t for (t,) in db.execute("SELECT tokens FROM results")]
    assert len(recorded) == 3
    assert all(tokens >= exact + 32 for tokens in recorded)  # + max_tokens
