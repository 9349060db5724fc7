"""Shared fixtures: a real simulator on a loopback port, and job files written to tmp."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import polars as pl
import pytest
from aiohttp import web
from click.testing import CliRunner, Result
from multidict import CIMultiDict

from pipeline.cli import main
from pipeline.limits import Limiter
from pipeline.simulator import SimConfig, Simulator, running_in_thread


@pytest.fixture(scope="session")
def _cache_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, _cache_home: Path) -> None:
    """Tests never see the developer's real key or base URL, nor write to their cache
    (known_models.py keeps what genai-prices said there)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(_cache_home))
    for name in (
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "AZURE_OPENAI_API_KEY",
        "AZURE_OPENAI_ENDPOINT",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
        "PIPELINE_TRUST_JOB_HOSTS",
    ):
        monkeypatch.delenv(name, raising=False)


@dataclass
class Server:
    url: str
    sim: Simulator


@contextlib.contextmanager
def serving(**config: Any) -> Iterator[Server]:
    """A simulator with these SimConfig settings, in a thread, on a loopback port."""
    with running_in_thread(SimConfig(**config)) as (url, simulator):
        yield Server(url, simulator)


@pytest.fixture
def sim() -> Iterator[Server]:
    with serving() as server:
        yield server


#: Bound on starting, stopping and each step of a test's own server thread.
THREAD_TIMEOUT_S = 30


@contextlib.contextmanager
def loop_in_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop of its own, run by `asyncio.run` in a daemon thread until the block
    ends; hand it work with `asyncio.run_coroutine_threadsafe`. On the way out,
    `asyncio.run` cancels whatever is left and closes the loop, as the simulator's does."""
    ready: concurrent.futures.Future[tuple[asyncio.AbstractEventLoop, asyncio.Event]]
    ready = concurrent.futures.Future()

    async def hold() -> None:
        stop = asyncio.Event()
        ready.set_result((asyncio.get_running_loop(), stop))
        await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(hold(),), daemon=True)
    thread.start()
    loop, stop = ready.result(timeout=THREAD_TIMEOUT_S)
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=THREAD_TIMEOUT_S)


@contextlib.contextmanager
def serving_app(
    app: web.Application, *, ssl_context: ssl.SSLContext | None = None
) -> Iterator[str]:
    """A purpose-built aiohttp app on a free 127.0.0.1 port, in a thread (`loop_in_thread`);
    yields its base URL, `http://127.0.0.1:PORT/v1` (`https://` with `ssl_context`).
    The app is the caller's, `client_max_size` and all; no access log is kept."""
    with loop_in_thread() as loop:

        def call(step: Coroutine[Any, Any, None]) -> None:
            asyncio.run_coroutine_threadsafe(step, loop).result(timeout=THREAD_TIMEOUT_S)

        runner = web.AppRunner(app, access_log=None)
        call(runner.setup())
        try:
            call(web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start())
            scheme = "https" if ssl_context else "http"
            yield f"{scheme}://127.0.0.1:{runner.addresses[0][1]}/v1"
        finally:
            call(runner.cleanup())


def toml_value(value: Any) -> str:
    """Enough TOML for tests: JSON strings, numbers and booleans are valid TOML too."""
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def write_job(
    directory: Path,
    rows: Sequence[Mapping[str, Any]] | pl.DataFrame,
    *,
    input_name: str = "input.csv",
    output: str = "out.parquet",
    request: Mapping[str, Any] | None = None,
    template: Mapping[str, Any] | None = None,
    limits: Mapping[str, Any] | None = None,
    tables: Mapping[str, Mapping[str, Any]] | None = None,
    top: Mapping[str, Any] | None = None,
) -> Path:
    """Write an input table and a job over it; return the job file's path."""
    frame = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(list(rows))
    table = directory / input_name
    if input_name.endswith(".parquet"):
        frame.write_parquet(table)
    else:
        frame.write_csv(table)
    sections: dict[str, Mapping[str, Any]] = {
        "input": {"path": input_name},
        "output": {"path": output},
        "request": {"model": "gpt-4o-mini", "max_tokens": 32, **(request or {})},
        "template": template or {"user": "{{ text }}"},
        "limits": {"concurrency": 8, "backoff_s": 0.01, "backoff_max_s": 0.05, **(limits or {})},
        **(tables or {}),
    }
    lines = [f"{k} = {toml_value(v)}" for k, v in (top or {}).items()]
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
    job = directory / "job.toml"
    job.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return job


def invoke(*args: str | Path, env: Mapping[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], env=dict(env or {}))


def run_job(job: Path, sim: Server, *args: str, env: Mapping[str, str] | None = None) -> Result:
    return invoke("run", job, "--base-url", sim.url, *args, env=env)


def read_output(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)


def spawn_run(job: Path, url: str, *args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    """`pipeline run JOB --base-url URL ARGS` as a child process (to signal or kill),
    without the developer's OpenAI variables; its stderr is piped, as text."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(job), "--base-url", url, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )


def in_virtual_time(
    scenario: Callable[[Limiter], Awaitable[None]],
    *,
    headers: Mapping[str, str] | None = None,
    **limits: int | None,
) -> float:
    """Run `scenario` with a Limiter (set by `limits`, then following `headers` if
    given) on a loop whose clock moves 1 ms per turn; return the virtual seconds.

    aiolimiter schedules by loop.time(), so its waits end at once in real time and the
    result is the same on any machine.
    """

    async def main() -> float:
        loop = asyncio.get_running_loop()
        now = [0.0]
        loop.time = lambda: now[0]  # type: ignore[method-assign]
        running = True

        async def tick() -> None:
            while running:
                now[0] += 0.001
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        limiter = Limiter(rpm=limits.get("rpm"), tpm=limits.get("tpm"), clock=lambda: now[0])
        if headers is not None:
            limiter.observe(headers, tokens=20)
        try:
            await scenario(limiter)
        finally:
            running = False
            await ticker
        return now[0]

    return asyncio.run(main())


def post_json(
    url: str, body: bytes | Any, headers: Mapping[str, str] | None = None
) -> tuple[int, Any, CIMultiDict[str]]:
    """POST a JSON body (bytes as they are): (status, parsed answer, headers), whatever
    the status."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    sent = {"content-type": "application/json", **(headers or {})}

    async def send() -> tuple[int, Any, CIMultiDict[str]]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=data, headers=sent) as response,
        ):
            return (
                response.status,
                orjson.loads(await response.read()),
                CIMultiDict(response.headers),
            )

    return asyncio.run(send())
