"""Faults that will not clear stop the run early, with a diagnosis, and leave rows pending.

Each fault is met over a real socket (a closed port, a name under `.invalid`, a TLS
server with a certificate nobody signed, the simulator misbehaving), run as a user
would: the `pipeline` command in a child process. A 429 storm runs the real dispatcher
and limiter against the simulator in virtual time, since it lasts minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import THREAD_TIMEOUT_S, loop_in_thread, read_output, serving, serving_app, write_job
from multidict import CIMultiDict

from pipeline.dispatch import Dispatcher, RetryPolicy
from pipeline.endpoints import ChatCompletions
from pipeline.errors import ConnectFailed, Fatal, NotAnApi, RequestFailure
from pipeline.faults import FIRST_OUTAGES, RATE_LIMIT_HALT_S, RATE_LIMIT_PAUSE_MAX_S
from pipeline.limits import Limiter
from pipeline.records import HttpRequest, HttpResponse, Outcome, Work
from pipeline.spec import RequestSpec
from pipeline.transport import AiohttpTransport, classify, map_exception

#: Bound on every child run: each of these ends in a few seconds.
RUN_TIMEOUT_S = 60
ROWS = 40
CONCURRENCY = 4


def rows(n: int = ROWS) -> list[dict[str, object]]:
    return [{"id": i, "text": f"row {i}"} for i in range(n)]


def run_cli(
    job: Path, url: str, *args: str, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`pipeline run JOB --base-url URL`, as a user runs it, with no proxy or key (but
    those in `env_extra`)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OPENAI_") and "proxy" not in k.lower()
    }
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(job), "--base-url", url, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=RUN_TIMEOUT_S,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def all_pending(job_dir: Path, n: int = ROWS) -> None:
    """Nothing failed for the fault: every row is waiting for a resume."""
    out = read_output(job_dir / "out.parquet")
    assert out.height == n
    assert out["status"].to_list() == ["pending"] * n


def job_in(tmp_path: Path, **request: object) -> Path:
    return write_job(
        tmp_path,
        rows(),
        request={"connect_timeout_s": 5, **request},
        limits={"concurrency": CONCURRENCY, "backoff_s": 0.01, "backoff_max_s": 0.05},
    )


def test_refused_port_halts_at_once_with_rows_pending(tmp_path: Path) -> None:
    with socket.socket() as s:  # a real port, closed again: nobody listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    result = run_cli(job_in(tmp_path), f"http://127.0.0.1:{port}/v1")

    assert result.returncode == 4, result.stderr
    line = one_line_error(result)
    assert "connection refused" in line
    assert "is the server running" in line
    assert "--base-url" in line
    assert "run the same command again" in line
    all_pending(tmp_path)


def test_unresolvable_host_halts_with_the_name(tmp_path: Path) -> None:
    # .invalid never resolves (RFC 6761), with or without a network.
    result = run_cli(job_in(tmp_path), "https://pipeline-test.invalid/v1")

    assert result.returncode == 4, result.stderr
    line = one_line_error(result)
    assert "pipeline-test.invalid" in line or "timed out connecting" in line
    assert "--base-url" in line
    all_pending(tmp_path)


@pytest.fixture
def self_signed(tmp_path: Path) -> Iterator[tuple[str, list[int]]]:
    """An HTTPS server on 127.0.0.1 whose certificate nobody signed; and its hit count."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    hits = [0]

    async def answer(request: web.Request) -> web.Response:
        hits[0] += 1
        return web.json_response({"never": "reached"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    with serving_app(app, ssl_context=context) as url:
        yield url, hits


def test_untrusted_tls_certificate_halts_at_the_first_request(
    tmp_path: Path, self_signed: tuple[str, list[int]]
) -> None:
    url, hits = self_signed

    result = run_cli(job_in(tmp_path), url)

    assert result.returncode == 4, result.stderr
    line = one_line_error(result)
    assert "TLS certificate of 127.0.0.1 is not trusted" in line
    assert "SSL_CERT_FILE" in line
    assert hits[0] == 0  # no request got past the handshake
    all_pending(tmp_path)


def test_html_page_with_200_halts_after_a_few_requests_and_resumes(tmp_path: Path) -> None:
    job = job_in(tmp_path)
    with serving(fault_rate=1.0, faults=("html",)) as portal:
        result = run_cli(job, portal.url)
        sent = portal.sim.stats.requests

    assert result.returncode == 4, result.stderr
    line = one_line_error(result)
    assert "HTML page" in line
    assert "Sign in to the network" in line
    assert "/v1" in line
    assert "HTTPS_PROXY" in line
    assert sent <= CONCURRENCY + FIRST_OUTAGES, "halted early, not after every row"
    all_pending(tmp_path)

    with serving() as api:  # the fault fixed: the same command finishes the job
        resumed = run_cli(job, api.url)
        assert api.sim.stats.requests == ROWS

    assert resumed.returncode == 0, resumed.stderr
    assert read_output(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * ROWS


def test_server_that_never_answers_halts_with_rows_pending(tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        rows(),
        request={"timeout_s": 0.3},
        limits={"concurrency": CONCURRENCY, "backoff_s": 0.01, "max_attempts": 3},
    )
    with serving(fault_rate=1.0, faults=("silent",)) as silent:
        result = run_cli(job, silent.url)
        sent = silent.sim.stats.requests

    assert result.returncode == 4, result.stderr
    line = one_line_error(result)
    assert "no answer before the request deadline" in line
    assert "request.timeout_s" in line
    assert sent <= CONCURRENCY + FIRST_OUTAGES
    all_pending(tmp_path)


def test_server_going_down_mid_run_halts_when_a_row_has_tried_it_all(tmp_path: Path) -> None:
    # Answers first, then refuses: the halt waits for a row to use every attempt.
    # The server runs on this test's own loop, not in serving_app's thread, so that its port
    # closes the moment the last answer is out, before the run can be answered once more.
    job = write_job(
        tmp_path,
        rows(),
        limits={"concurrency": 1, "backoff_s": 0.01, "backoff_max_s": 0.02, "max_attempts": 3},
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    answered = 5

    async def main() -> None:
        hits = 0
        stop = asyncio.Event()

        async def answer(request: web.Request) -> web.Response:
            nonlocal hits
            hits += 1
            if hits == answered:
                stop.set()
            body = {
                "id": f"c{hits}",
                "object": "chat.completion",
                "model": "gpt-4o-mini",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
            return web.json_response(body)

        app = web.Application()
        app.router.add_post("/v1/chat/completions", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pipeline",
            "run",
            str(job),
            "--base-url",
            f"http://127.0.0.1:{port}/v1",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
        )
        await asyncio.wait_for(stop.wait(), RUN_TIMEOUT_S)
        await runner.cleanup()  # the port closes: every later connect is refused
        _, stderr = await asyncio.wait_for(child.communicate(), RUN_TIMEOUT_S)
        assert child.returncode == 4, stderr
        text = stderr.decode()
        assert "since the last answer" in text
        assert "connection refused" in text

    asyncio.run(main())
    status = read_output(tmp_path / "out.parquet")["status"].to_list()
    assert status.count("failed") == 0
    assert answered - 1 <= status.count("ok") <= answered
    assert status.count("pending") == ROWS - status.count("ok")


# A 429 storm: minutes of 429s, run in virtual time.

ENDPOINT = ChatCompletions(RequestSpec(model="gpt-4o-mini"), None, "max_tokens")


def test_429_storm_pauses_longer_each_time_then_halts_as_rate_limited() -> None:
    with serving(fault_rate=1.0, faults=("429",)) as storm:
        outcomes, halted, took = asyncio.run(_storm(storm.url))
        sent = storm.sim.stats.requests

    assert outcomes == [], "no row failed: every one stays pending"
    assert halted is not None
    assert "persistently rate limited" in halted
    assert "--rpm" in halted
    assert "run the same command again" in halted
    assert RATE_LIMIT_HALT_S <= took < RATE_LIMIT_HALT_S + 2 * RATE_LIMIT_PAUSE_MAX_S
    # Without growth the 200 ms retry-after would allow ~3,000 requests per worker.
    assert sent <= CONCURRENCY * 30, sent


async def _storm(url: str) -> tuple[list[Outcome], str | None, float]:
    """Send ROWS rows through the real dispatcher on a loop whose clock runs ahead."""
    loop = asyncio.get_running_loop()
    now = [0.0]
    loop.time = lambda: now[0]  # type: ignore[method-assign]
    running = True

    async def tick() -> None:
        while running:
            now[0] += 0.01
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    limiter = Limiter(rpm=None, tpm=None, clock=lambda: now[0])
    outcomes: list[Outcome] = []

    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    request = HttpRequest(
        "POST", f"{url}/chat/completions", {"content-type": "application/json"}, body
    )
    inbox: asyncio.Queue[Work | None] = asyncio.Queue()
    for row in range(ROWS):
        inbox.put_nowait(Work((row,), request, 10))
    for _ in range(CONCURRENCY):
        inbox.put_nowait(None)
    try:
        async with AiohttpTransport(timeout_s=600, connect_timeout_s=60) as transport:
            dispatcher = Dispatcher(
                transport,
                ENDPOINT,
                limiter,
                RetryPolicy(max_attempts=6, backoff_s=0.5, backoff_max_s=30),
                lambda answer: answer,
                clock=lambda: now[0],
            )

            async def worker() -> None:  # as the online engine's workers do
                while (work := await inbox.get()) is not None:
                    if not dispatcher.stopped and (outcome := await dispatcher.send(work)):
                        outcomes.append(outcome)

            async with asyncio.TaskGroup() as tg:
                for _ in range(CONCURRENCY):
                    tg.create_task(worker())
    finally:
        running = False
        await ticker
    reason = dispatcher.stop_reason
    return outcomes, str(reason) if reason is not None else None, now[0]


def test_gateway_errors_without_end_halt_as_a_server_down_not_a_wrong_request(
    tmp_path: Path,
) -> None:
    # A 503 can be a passing blip, so it gets a row's whole retry cycle; then the run
    # halts with the rows pending, not 25 rows failed as "the request is wrong".
    job = write_job(
        tmp_path,
        rows(),
        limits={"concurrency": CONCURRENCY, "backoff_s": 0.01, "max_attempts": 3},
    )
    with serving(fault_rate=1.0, faults=("503",)) as down:
        result = run_cli(job, down.url)
        sent = down.sim.stats.requests

    assert result.returncode == 4, result.stderr
    line = one_line_error(result)
    assert "the server is not serving" in line
    assert "HTTP 503" in line
    assert sent <= CONCURRENCY * 3
    all_pending(tmp_path)


@pytest.mark.parametrize(
    ("content_type", "body", "what"),
    [
        pytest.param("text/html", b"<html><title>Log in</title></html>", '"Log in"', id="html"),
        pytest.param("", b"  <!DOCTYPE html><html></html>", "an HTML page", id="html-untyped"),
        pytest.param("text/plain", b"Service moved", "a text/plain body", id="plain-text"),
        pytest.param("application/xml", b"<?xml ?><e/>", "application/xml", id="xml"),
    ],
)
def test_a_2xx_that_is_not_json_is_not_the_api(content_type: str, body: bytes, what: str) -> None:
    headers = CIMultiDict({"content-type": content_type} if content_type else {})

    failure = classify(HttpResponse(200, headers, body), ENDPOINT, request_tokens=1)

    assert isinstance(failure, NotAnApi)
    assert what in failure.message
    assert failure.outage
    assert not failure.maybe_billed


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        pytest.param("application/json", b'{"choices": [', id="cut-json-is-a-read-failure"),
        pytest.param("text/plain; charset=utf-8", b'{"choices": []}', id="json-as-text"),
        pytest.param("", b"", id="untyped-empty"),
    ],
)
def test_a_2xx_that_may_be_json_is_left_to_the_parser(content_type: str, body: bytes) -> None:
    headers = CIMultiDict({"content-type": content_type} if content_type else {})

    assert classify(HttpResponse(200, headers, body), ENDPOINT, request_tokens=1) is None


CONN_KEY = aiohttp.client_reqrep.ConnectionKey("api.example", 443, True, True, None, None, None)


@pytest.mark.parametrize(
    ("exc", "expected", "says"),
    [
        pytest.param(
            aiohttp.ClientConnectorDNSError(CONN_KEY, OSError(-2, "Name or service not known")),
            ConnectFailed,
            "cannot resolve the host name 'api.example'",
            id="dns",
        ),
        pytest.param(
            aiohttp.ClientConnectorCertificateError(
                CONN_KEY, ssl.SSLCertVerificationError(1, "self-signed certificate")
            ),
            Fatal,
            "TLS certificate of api.example is not trusted",
            id="certificate",
        ),
        pytest.param(
            aiohttp.ClientConnectorSSLError(CONN_KEY, ssl.SSLError(1, "wrong version number")),
            Fatal,
            "http:// for a server without TLS",
            id="tls-to-plain-http",
        ),
        pytest.param(
            aiohttp.ClientConnectorError(CONN_KEY, ConnectionRefusedError(111, "refused")),
            ConnectFailed,
            "connection refused: is the server running on that port?",
            id="refused",
        ),
    ],
)
def test_connect_failures_name_their_cause(
    exc: BaseException, expected: type[RequestFailure], says: str
) -> None:
    failure = map_exception(exc)

    assert type(failure) is expected
    assert says in failure.message
    assert "--base-url" in failure.message


@pytest.fixture
def refusing_proxy() -> Iterator[tuple[str, list[bytes]]]:
    """An HTTP proxy on 127.0.0.1 that refuses every tunnel (407); the request lines it got."""
    heard: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.append((await reader.readline()).strip())
        writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    with loop_in_thread() as loop:
        start = asyncio.start_server(serve, "127.0.0.1", 0)
        server = asyncio.run_coroutine_threadsafe(start, loop).result(timeout=THREAD_TIMEOUT_S)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}", heard
        finally:
            loop.call_soon_threadsafe(server.close)


def test_https_proxy_from_the_environment_is_used_and_its_refusal_named(
    tmp_path: Path, refusing_proxy: tuple[str, list[bytes]]
) -> None:
    proxy, heard = refusing_proxy
    job = job_in(tmp_path)
    url = "https://api.example.invalid/v1"

    through = run_cli(job, url, env_extra={"HTTPS_PROXY": proxy})
    tunnels = len(heard)
    around = run_cli(job, url, env_extra={"HTTPS_PROXY": proxy, "NO_PROXY": "api.example.invalid"})

    assert through.returncode == 4, through.stderr
    line = one_line_error(through)
    assert "the proxy refused to connect to the API (407" in line
    assert heard[0] == b"CONNECT api.example.invalid:443 HTTP/1.1"
    assert tunnels <= CONCURRENCY + FIRST_OUTAGES
    assert around.returncode == 4, around.stderr
    assert "proxy" not in one_line_error(around)
    assert len(heard) == tunnels, "NO_PROXY: the host is reached without the proxy"
    all_pending(tmp_path)


# The server check before the first row (preflight.py)


@contextlib.contextmanager
def plain_server(
    routes: Callable[[web.Application, list[str]], None],
) -> Iterator[tuple[str, list[str]]]:
    """A purpose-built aiohttp server on 127.0.0.1; each request's 'METHOD path' heard."""
    heard: list[str] = []
    app = web.Application()
    routes(app, heard)
    with serving_app(app) as url:
        yield url, heard


def captive_portal(app: web.Application, heard: list[str]) -> None:
    async def page(request: web.Request) -> web.Response:
        heard.append(f"{request.method} {request.path}")
        return web.Response(
            text="<html><title>Hotel Wi-Fi</title></html>", content_type="text/html"
        )

    app.router.add_route("*", "/{tail:.*}", page)


def chat_only(app: web.Application, heard: list[str]) -> None:
    """A server with no /models at all (its 404 for it is aiohttp's plain text)."""

    async def chat(request: web.Request) -> web.Response:
        heard.append(f"{request.method} {request.path}")
        return web.json_response(
            {
                "id": "c",
                "object": "chat.completion",
                "model": "gpt-4o-mini",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
        )

    app.router.add_post("/v1/chat/completions", chat)


def test_html_at_models_halts_before_any_row_and_nothing_is_in_flight(tmp_path: Path) -> None:
    job = job_in(tmp_path)
    with plain_server(captive_portal) as (url, heard):
        result = run_cli(job, url)

    assert result.returncode == 4, result.stderr
    line = one_line_error(result)
    assert "before sending any row, GET" in line
    assert '"Hotel Wi-Fi"' in line
    assert heard == ["GET /v1/models"], "no row was sent"
    all_pending(tmp_path)

    with serving() as api:
        resumed = run_cli(job, api.url)
    assert resumed.returncode == 0, resumed.stderr
    assert "in flight" not in resumed.stderr, "nothing was sent, so nothing can be billed twice"


def test_wrong_key_halts_at_the_models_check_with_no_row_sent(tmp_path: Path) -> None:
    job = job_in(tmp_path)
    with serving(api_key="test-right-key-0123456789") as api:
        result = run_cli(job, api.url, env_extra={"OPENAI_API_KEY": "test-wrong-key-0123456789"})
        stats = api.sim.stats

    assert result.returncode == 4, result.stderr
    line = one_line_error(result)
    assert "authentication failed" in line
    assert "test-wrong-key-0123456789" not in result.stderr
    assert (stats.requests, stats.listings) == (0, 1)
    all_pending(tmp_path)


def test_a_server_without_models_is_not_refused_for_it(tmp_path: Path) -> None:
    job = job_in(tmp_path)
    with plain_server(chat_only) as (url, heard):
        result = run_cli(job, url)

    assert result.returncode == 0, result.stderr
    assert heard.count("POST /v1/chat/completions") == ROWS


def test_a_key_echoed_back_in_a_401_goes_no_further(tmp_path: Path) -> None:
    canary = "sk-canary-" + "Qx7" * 12
    job = job_in(tmp_path)
    with serving(fault_rate=1.0, faults=("echokey",)) as echo:
        result = run_cli(job, echo.url, env_extra={"OPENAI_API_KEY": canary})
        sent = echo.sim.stats.requests

    assert result.returncode == 4, result.stderr
    assert "authentication failed" in one_line_error(result)
    assert sent <= CONCURRENCY
    assert canary not in result.stderr + result.stdout
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert canary.encode() not in path.read_bytes(), path
