"""Issue 10, class 1: a key goes only where the user sends it, and never comes back out.

A purpose-built loopback server echoes the key it receives (whole, a prefix, upper-cased,
a slice, inside an answer) the way servers and proxies do in error bodies; the real
`pipeline` command runs against it in a child process with a canary key, and every
file the run wrote, and its stdout and stderr, is searched for the canary.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from conftest import invoke, read_output, serving_app, write_job

from pipeline.errors import SpecError, Untrusted
from pipeline.plan import RunOptions, make_plan
from pipeline.redact import REDACTED, redact
from pipeline.spec import load_job
from pipeline.trust import TRUST_ENV, is_loopback

#: Mixed case, so that an upper-cased echo differs from the key; unique, to grep for.
CANARY = "test-CanaryQ7xW2mZp9RtVb4Kc8NdLs3HyJf6GaUe1"  # not sk-: scanners
#: The canary's 8-character prefix: found in any file, some part of the key leaked.
PREFIX = CANARY[:8].lower()


@dataclass
class Echo:
    """What the echo server saw: every request's credentials, in order."""

    url: str
    keys: list[str | None] = field(default_factory=list)


def _key(request: web.Request) -> str | None:
    bearer = request.headers.get("authorization")
    if bearer is not None:
        return bearer.removeprefix("Bearer ")
    return request.headers.get("x-api-key") or request.headers.get("api-key")


def _echoes(key: str) -> dict[str, str]:
    """The ways servers hand a key back."""
    return {
        "whole": f"Incorrect API key provided: {key}.",
        "prefix": f"Incorrect API key provided: {key[:12]}***************{key[-4:]}.",
        "upper": f"invalid token {key.upper()}",
        "slice": f"token fragment {key[9:27]} rejected",
    }


async def _chat(request: web.Request, seen: Echo, status: int) -> web.Response:
    key = _key(request)
    seen.keys.append(key)
    body = await request.json()
    content = body["messages"][-1]["content"]
    if isinstance(content, list):  # Anthropic's content blocks
        content = "".join(block.get("text", "") for block in content)
    prompt = str(content)
    shown = key or "no-key"
    if prompt in _echoes(shown) or status != 200:
        message = _echoes(shown).get(prompt, _echoes(shown)["prefix"])
        error = {"message": message, "type": "invalid_request_error", "code": "bad_key"}
        return web.json_response({"error": error}, status=400 if status == 200 else status)
    answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"you sent {shown.swapcase()}"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }
    return web.json_response(answer, headers={"x-request-id": f"req-{shown}"})


@contextlib.contextmanager
def echo_server(status: int = 200) -> Iterator[Echo]:
    """A loopback OpenAI-style chat server that echoes the key it receives; every
    request answers `status` (200: the prompt picks an echo, or an answer that
    carries the key)."""
    seen = Echo("")

    async def chat(request: web.Request) -> web.Response:
        return await _chat(request, seen, status)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/messages", chat)  # Anthropic: the key in x-api-key
    with serving_app(app) as url:
        seen.url = url
        yield seen


def pipeline_command(
    *args: str | Path, env: Mapping[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The real `pipeline` command in a child process, with only `env`'s keys."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.endswith(("API_KEY", "BASE_URL", "_ENDPOINT")) and k != TRUST_ENV
    }
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=100,
        cwd=cwd,
    )


def leaks(text: str) -> list[str]:
    """The canary's traces in `text`: the key in any case, or its prefix."""
    folded = text.lower()
    return [part for part in (CANARY.lower(), PREFIX) if part in folded]


def written_text(path: Path) -> str:
    """A file as text a person could read: Parquet decoded (it is compressed)."""
    if path.suffix == ".parquet":
        frame = pl.read_parquet(path)
        metadata = pq.read_schema(path).metadata or {}
        return frame.write_csv() + repr(metadata)
    return path.read_bytes().decode("latin-1")


def rows(*texts: str) -> list[dict[str, object]]:
    return [{"id": i, "text": t} for i, t in enumerate(texts)]


# --- the canary ---------------------------------------------------------------------


def test_an_echoed_key_is_in_no_file_and_no_output_of_the_run(tmp_path: Path) -> None:
    job = write_job(tmp_path, rows("whole", "prefix", "upper", "slice", "answer"))

    with echo_server() as server:
        result = pipeline_command(
            "run", job, "--base-url", server.url, env={"OPENAI_API_KEY": CANARY}
        )

    assert result.returncode == 1, result.stderr  # the four echo rows failed
    assert server.keys == [CANARY] * 5, "the user's --base-url got the key"
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["failed"] * 4 + ["ok"]
    assert all(REDACTED in e for e in out["error"].to_list()[:4])
    assert REDACTED in out["response"][4]
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert {p.name for p in written} >= {"out.parquet", "out.summary.json"}
    assert any(p.name.startswith("out.journal.sqlite") for p in written)
    for path in written:
        assert not leaks(written_text(path)), path
    assert not leaks(result.stdout + result.stderr)


def test_an_anthropic_key_echoed_from_x_api_key_is_written_nowhere(tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        rows("whole", "prefix", "upper", "slice"),
        request={"provider": "anthropic", "model": "claude-3-5-haiku-latest"},
    )

    with echo_server() as server:
        result = pipeline_command(
            "run", job, "--base-url", server.url, env={"ANTHROPIC_API_KEY": CANARY}
        )

    assert result.returncode == 1, result.stderr
    assert server.keys == [CANARY] * 4
    out = read_output(tmp_path / "out.parquet")
    assert all(REDACTED in e for e in out["error"].to_list())
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        assert not leaks(written_text(path)), path
    assert not leaks(result.stdout + result.stderr)


def test_a_key_echoed_in_a_halt_is_not_in_stderr_or_the_summary(tmp_path: Path) -> None:
    job = write_job(tmp_path, rows("one", "two"), limits={"concurrency": 1})

    with echo_server(status=401) as server:
        result = pipeline_command(
            "run", job, "--base-url", server.url, env={"OPENAI_API_KEY": CANARY}
        )

    assert result.returncode == 4, result.stderr
    assert "authentication failed" in result.stderr
    assert REDACTED in result.stderr
    assert not leaks(result.stdout + result.stderr)
    summary = (tmp_path / "out.summary.json").read_text()
    assert REDACTED in summary
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        assert not leaks(written_text(path)), path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(f"key {CANARY}.", f"key {REDACTED}.", id="whole"),
        pytest.param(f"key {CANARY.upper()}!", f"key {REDACTED}!", id="upper-case"),
        pytest.param(f"key {CANARY.lower()}", f"key {REDACTED}", id="lower-case"),
        pytest.param(f"{CANARY[:8]}***{CANARY[-4:]}", f"{REDACTED}***{CANARY[-4:]}", id="prefix-8"),
        pytest.param(f"a {CANARY[:20]}...", f"a {REDACTED}...", id="prefix-20"),
        pytest.param(f"a {CANARY[11:26]} b", f"a {REDACTED} b", id="slice-15"),
        pytest.param(f"{CANARY}{CANARY}", f"{REDACTED}{REDACTED}", id="twice"),
        pytest.param(f"a {CANARY[:7]} b", f"a {CANARY[:7]} b", id="prefix-7-kept"),
        pytest.param("nothing to see", "nothing to see", id="no-echo"),
    ],
)
def test_redact_catches_the_key_whole_in_part_and_in_any_case(text: str, expected: str) -> None:
    assert redact(text, CANARY) == expected


def test_redact_leaves_text_alone_for_a_short_or_missing_key() -> None:
    assert redact("abc1234 here", "abc1234") == "abc1234 here"
    assert redact("text", None) == "text"


# --- who may send a key where -------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "validate", "estimate"])
def test_a_job_files_host_gets_no_key_without_confirmation(tmp_path: Path, command: str) -> None:
    with echo_server() as server:
        job = write_job(tmp_path, rows("a", "b"), request={"base_url": server.url})
        result = invoke(command, job, env={"OPENAI_API_KEY": CANARY})

    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("error: ")
    assert "127.0.0.1" in message
    assert str(job) in message
    assert "--trust-job-hosts" in message
    assert f"{TRUST_ENV}=1" in message
    assert "--base-url" in message
    assert server.keys == [], "refused before sending"
    assert not (tmp_path / "out.parquet").exists()
    assert not leaks(result.output)


@pytest.mark.parametrize(
    ("flags", "env"),
    [
        pytest.param(["--trust-job-hosts"], {}, id="flag"),
        pytest.param([], {TRUST_ENV: "1"}, id="environment"),
    ],
)
def test_a_confirmed_job_host_gets_the_key(
    tmp_path: Path, flags: list[str], env: dict[str, str]
) -> None:
    with echo_server() as server:
        job = write_job(tmp_path, rows("answer"), request={"base_url": server.url})
        result = pipeline_command("run", job, *flags, env={"OPENAI_API_KEY": CANARY, **env})

    assert result.returncode == 0, result.stderr
    assert server.keys == [CANARY]


def test_a_keyless_local_server_named_by_the_job_needs_no_confirmation(tmp_path: Path) -> None:
    with echo_server() as server:
        job = write_job(tmp_path, rows("answer", "answer too"), request={"base_url": server.url})
        result = invoke("run", job)

    assert result.exit_code == 0, result.output
    assert server.keys == [None, None]


def test_the_users_base_url_variable_is_the_users_choice(tmp_path: Path) -> None:
    job = write_job(tmp_path, rows("answer"), request={"base_url": "https://elsewhere.example/v1"})
    with echo_server() as server:
        result = invoke("run", job, env={"OPENAI_API_KEY": CANARY, "OPENAI_BASE_URL": server.url})

    assert result.exit_code == 0, result.output
    assert server.keys == [CANARY]


@pytest.mark.parametrize(
    "variable", ["AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "API_KEY_BACKUP", "openai_api_key"]
)
def test_api_key_env_names_only_api_key_variables(tmp_path: Path, variable: str) -> None:
    with echo_server() as server:
        job = write_job(tmp_path, rows("a"), request={"api_key_env": variable})
        result = invoke("run", job, "--base-url", server.url, env={variable: CANARY})

    assert result.exit_code == 2, result.output
    assert "request.api_key_env" in result.output
    assert variable in result.output
    assert "API_KEY" in result.output
    assert server.keys == []
    assert not leaks(result.output)


def test_an_api_key_variable_of_the_users_own_naming_is_sent(tmp_path: Path) -> None:
    with echo_server() as server:
        job = write_job(tmp_path, rows("answer"), request={"api_key_env": "MY_SERVER_API_KEY"})
        result = invoke("run", job, "--base-url", server.url, env={"MY_SERVER_API_KEY": CANARY})

    assert result.exit_code == 0, result.output
    assert server.keys == [CANARY]


@pytest.mark.parametrize(
    ("chosen", "url"),
    [
        pytest.param("flag", "http://10.255.255.1:8000/v1", id="flag-private-ip"),
        pytest.param("env", "http://llm.example.com/v1", id="environment"),
        pytest.param("job", "http://llm.example.com/v1", id="job-file"),
    ],
)
def test_plain_http_to_another_machine_is_refused_whoever_chose_it(
    tmp_path: Path, chosen: str, url: str
) -> None:
    job = write_job(tmp_path, rows("a"), request={"base_url": url} if chosen == "job" else {})
    args = ["--base-url", url] if chosen == "flag" else []
    env = {"OPENAI_BASE_URL": url} if chosen == "env" else {}

    for keys in ({}, {"OPENAI_API_KEY": CANARY}):
        result = invoke("run", job, *args, "--trust-job-hosts", env={**env, **keys})
        assert result.exit_code == 2, result.output
        assert "plain http://" in result.output
        assert "https://" in result.output
        assert not (tmp_path / "out.parquet").exists()


# The decision table, on the plan that `run`, `validate` and `estimate` make.
REFUSED, SENT = "refused", "sent"


@pytest.mark.parametrize(
    ("provider", "base_url", "key", "expected"),
    [
        pytest.param("openai", "https://evil.example/v1", "OPENAI_API_KEY", REFUSED, id="job-host"),
        pytest.param("openai", "https://evil.example/v1", None, SENT, id="job-host-no-key"),
        pytest.param(
            "openai", "http://localhost:8000/v1", "OPENAI_API_KEY", REFUSED, id="loopback"
        ),
        pytest.param("openai", "http://localhost:8000/v1", None, SENT, id="loopback-no-key"),
        pytest.param("openai", "https://api.openai.com/v1", "OPENAI_API_KEY", SENT, id="default"),
        pytest.param(
            "openai", "https://api.openai.com:8443/v1", "OPENAI_API_KEY", REFUSED, id="other-port"
        ),
        pytest.param(
            "openai",
            "https://api.openai.com@evil.example/v1",
            "OPENAI_API_KEY",
            REFUSED,
            id="userinfo-disguise",
        ),
        pytest.param(
            "anthropic", "https://api.anthropic.com/v1", "ANTHROPIC_API_KEY", SENT, id="anthropic"
        ),
        pytest.param(
            "azure",
            "https://someone.openai.azure.com",
            "AZURE_OPENAI_API_KEY",
            REFUSED,
            id="azure-resource",
        ),
        pytest.param(None, None, "OPENAI_API_KEY", SENT, id="no-base-url"),
    ],
)
def test_who_may_send_a_key_where(
    tmp_path: Path, provider: str | None, base_url: str | None, key: str | None, expected: str
) -> None:
    request: dict[str, Any] = {"provider": provider or "openai"}
    if base_url is not None:
        request["base_url"] = base_url
    if provider == "anthropic":
        request["model"] = "claude-3-5-haiku-latest"
    job = load_job(write_job(tmp_path, rows("a"), request=request))
    env = {key: CANARY} if key else {}

    def plan(opts: RunOptions, extra: Mapping[str, str] = {}) -> None:
        make_plan(job, opts, env={**env, **extra})

    if expected == SENT:
        plan(RunOptions())
        return
    with pytest.raises(Untrusted, match="--trust-job-hosts") as refused:
        plan(RunOptions())
    assert "the key in $" in str(refused.value)
    plan(RunOptions(trust_job_hosts=True))
    plan(RunOptions(), {TRUST_ENV: "yes"})
    with pytest.raises(Untrusted):
        plan(RunOptions(), {TRUST_ENV: "0"})


def test_the_simulator_needs_no_confirmation(tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path, rows("a"), request={"base_url": "https://evil.example/v1"}))

    make_plan(job, RunOptions(simulate=True), env={"OPENAI_API_KEY": CANARY})


def test_a_base_url_with_no_host_is_refused(tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path, rows("a")))

    with pytest.raises(SpecError, match="names no host"):
        make_plan(job, RunOptions(base_url="https:///v1"), env={})


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        pytest.param("127.0.0.1", True, id="ipv4"),
        pytest.param("127.8.9.10", True, id="ipv4-block"),
        pytest.param("::1", True, id="ipv6"),
        pytest.param("[::1]", True, id="ipv6-bracketed"),
        pytest.param("::ffff:127.0.0.1", True, id="ipv4-mapped"),
        pytest.param("localhost", True, id="localhost"),
        pytest.param("api.localhost", True, id="dot-localhost"),
        pytest.param("10.0.0.1", False, id="private"),
        pytest.param("0.0.0.0", False, id="unspecified"),
        pytest.param("localhost.example.com", False, id="lookalike"),
        pytest.param("127.0.0.1.nip.io", False, id="dns-to-loopback"),
    ],
)
def test_loopback_is_this_machine_by_name_or_address(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
