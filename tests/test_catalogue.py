"""The catalogue of bad inputs and server faults, run as a user runs them.

Every case runs the installed `pipeline` command in a child process, with a canary API
key in its environment, against a simulator (or a dead port, or a name that never
resolves) on this machine, and must end in one of the documented states:

    0 done · 1 rows failed · 2 refused before sending · 3 budget · 4 halted
    130 interrupted (SIGINT) · 143 terminated (SIGTERM)

What every case must show, whatever its fault:
- its exit code, and for a non-zero one exactly one `error:` line and no traceback;
- zero requests at the server (model listings included) when it is refused before
  sending;
- every answer the server gave in the output, as an `ok` row: nothing paid is lost;
- the canary key in no file the run wrote and not on its stdout or stderr, looked for
  case-folded and by its prefix (Parquet files decoded first).

The per-class tests (test_secrets, test_output_safety, test_presend, test_bad_input,
test_bounds, test_faults, test_checkpoint_trust, test_money) go deeper into each class;
this file is the one list a reader can check the issue against.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import Server, serving, write_job

#: Every child run ends in seconds; this bounds a hung one.
RUN_TIMEOUT_S = 90
ROWS = 6
#: The canary's prefix is looked for too: servers echo "sk-cat-ab12..." back.
PREFIX_CHARS = 12


def command() -> list[str]:
    """The released command: the console script installed beside this Python."""
    script = Path(sys.executable).with_name("pipeline")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]


def rows(n: int = ROWS, **special: str) -> list[dict[str, object]]:
    """n rows of text; `special` maps a row number (as "r1") to its text."""
    return [{"id": i, "text": special.get(f"r{i}", f"row number {i}")} for i in range(n)]


@dataclass(frozen=True)
class Setup:
    """What a case prepared: its job file, the folder to run in, the CLI's arguments."""

    job: Path
    args: tuple[str, ...] = ()
    cwd: Path | None = None
    #: Run this command instead of `run` (validate, estimate).
    verb: str = "run"
    #: Leave out `--base-url SIM`: the job file names the host (or the case gives one).
    own_url: bool = False


@dataclass(frozen=True)
class Case:
    make: Callable[[Path, str], Setup]
    exit: int
    #: A regular expression the one `error:` line must match (exit 0: none is printed).
    says: str = ""
    #: SimConfig settings of the server the case runs against.
    sim: Mapping[str, Any] = field(default_factory=dict)
    #: Refused before sending: the server sees nothing at all.
    refused: bool = False
    #: Checks of the case's own, on its folder, once the run ended.
    then: Callable[[Path], None] | None = None
    #: Send this signal once the server has answered a first request.
    signal: int | None = None


def job(tmp: Path, data: Any = None, **kwargs: Any) -> Path:
    return write_job(tmp, rows() if data is None else data, **kwargs)


def plain(tmp: Path, url: str, *args: str, **kwargs: Any) -> Setup:
    return Setup(job(tmp, **kwargs), args)


# -- secrets ---------------------------------------------------------------------------


def job_names_its_host(tmp: Path, url: str) -> Setup:
    return Setup(job(tmp, request={"base_url": url}), own_url=True)


def job_names_its_host_trusted(tmp: Path, url: str) -> Setup:
    return Setup(job(tmp, request={"base_url": url}), ("--trust-job-hosts",), own_url=True)


def key_from_any_variable(tmp: Path, url: str) -> Setup:
    return Setup(job(tmp, request={"api_key_env": "AWS_SECRET_ACCESS_KEY"}))


def plain_http_to_another_machine(tmp: Path, url: str) -> Setup:
    return Setup(job(tmp), ("--base-url", "http://pipeline-test.invalid/v1"), own_url=True)


# -- the output ------------------------------------------------------------------------


def output_is_a_link(tmp: Path, url: str) -> Setup:
    precious = tmp / "precious.txt"
    precious.write_text("keep me\n")
    (tmp / "out.parquet").symlink_to(precious)
    return Setup(job(tmp))


def precious_kept(tmp: Path) -> None:
    assert (tmp / "precious.txt").read_text() == "keep me\n"


def output_outside_the_jobs_folder(tmp: Path, url: str) -> Setup:
    (tmp / "jobs").mkdir()
    (tmp / "elsewhere").mkdir()
    (tmp / "cwd").mkdir()
    return Setup(job(tmp / "jobs", output="../elsewhere/out.parquet"), cwd=tmp / "cwd")


def output_no_run_wrote(tmp: Path, url: str) -> Setup:
    (tmp / "out.parquet").write_bytes(b"someone else's report\n")
    return Setup(job(tmp))


def foreign_output_kept(tmp: Path) -> None:
    assert (tmp / "out.parquet").read_bytes() == b"someone else's report\n"


# -- caught before the money is spent ----------------------------------------------------


def schema_job(tmp: Path, properties: Mapping[str, Any]) -> Path:
    return job(
        tmp,
        request={"response_format": "json_schema"},
        tables={
            "request.json_schema": {
                "name": "answer",
                "schema": {
                    "type": "object",
                    "properties": properties,
                    "required": list(properties),
                    "additionalProperties": False,
                },
            }
        },
    )


def schema_property_clashes(tmp: Path, url: str) -> Setup:
    return Setup(schema_job(tmp, {"status": {"type": "string"}}))


def schema_is_invalid(tmp: Path, url: str) -> Setup:
    return Setup(schema_job(tmp, {"label": {"type": "strng"}}))


def csv_values_as_written(tmp: Path, url: str) -> Setup:
    spec = job(tmp, tables={"input": {"path": "input.csv", "key": "id"}})
    (tmp / "input.csv").write_text(
        "id,code,big,text\n007,01234,12345678901234567890,hello\n008,00099,1,there\n"
    )
    return Setup(spec)


def values_kept(tmp: Path) -> None:
    out = pl.read_parquet(tmp / "out.parquet")
    assert out["id"].to_list() == ["007", "008"]
    assert out["code"].to_list() == ["01234", "00099"]
    assert out["big"].to_list() == ["12345678901234567890", "1"]


# -- bounded everything ------------------------------------------------------------------


def one_empty_prompt(tmp: Path, url: str) -> Setup:
    return Setup(job(tmp, rows(r2="   ")))


def one_row_over_the_tpm(tmp: Path, url: str) -> Setup:
    return Setup(job(tmp, rows(r3="many words " * 4000), limits={"tpm": 5000}))


def a_template_that_loops(tmp: Path, url: str) -> Setup:
    loop = (
        '{% if id == "1" %}{% for i in range(100000) %}{% for j in range(100000) %}x'
        "{% endfor %}{% endfor %}{% endif %}{{ text }}"
    )
    return Setup(job(tmp, template={"user": loop}))


def a_template_that_always_loops(tmp: Path, url: str) -> Setup:
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
    return Setup(job(tmp, rows(40), template={"user": loop}))


def three_failed_the_rest_pending(tmp: Path) -> None:
    out = pl.read_parquet(tmp / "out.parquet")
    assert out["status"].value_counts().sort("status").rows() == [("failed", 3), ("pending", 37)]


def a_gzip_bomb(tmp: Path, url: str) -> Setup:
    return Setup(job(tmp, rows(r4="row 4 <<sim:bomb>>")))


def concurrency_over_the_cap(tmp: Path, url: str) -> Setup:
    return Setup(job(tmp), ("--concurrency", "1000000"))


def row_failed(n: int, kind: str) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        out = pl.read_parquet(tmp / "out.parquet")
        failed = out.filter(pl.col("status") == "failed")
        assert failed["id"].to_list() == [str(n)]  # CSV values are text, as written
        assert failed["error_type"].to_list() == [kind]
        assert failed["attempts"].to_list() == [0 if kind != "response_too_large" else 1]

    return check


# -- faults that will not clear ------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:  # bound, then closed: nobody listens there
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def connection_refused(tmp: Path, url: str) -> Setup:
    return Setup(job(tmp), ("--base-url", f"http://127.0.0.1:{closed_port()}/v1"), own_url=True)


def name_that_never_resolves(tmp: Path, url: str) -> Setup:
    # .invalid never resolves (RFC 6761), with or without a network.
    return Setup(job(tmp), ("--base-url", "https://pipeline-test.invalid/v1"), own_url=True)


def rows_pending(tmp: Path) -> None:
    out = pl.read_parquet(tmp / "out.parquet")
    assert set(out["status"].to_list()) == {"pending"}


# -- the checkpoint ------------------------------------------------------------------------


def checkpoint_of(tmp: Path, content: bytes) -> Setup:
    spec = job(tmp)
    (tmp / "out.journal.sqlite").write_bytes(content)
    return Setup(spec)


def garbage_checkpoint(tmp: Path, url: str) -> Setup:
    return checkpoint_of(tmp, secrets.token_bytes(8192))


def empty_checkpoint(tmp: Path, url: str) -> Setup:
    return checkpoint_of(tmp, b"")


def another_programs_database(tmp: Path, url: str) -> Setup:
    spec = job(tmp)
    with sqlite3.connect(tmp / "out.journal.sqlite") as db:
        db.execute("create table photos (id integer primary key, path text)")
    return Setup(spec)


# -- money -----------------------------------------------------------------------------------


def budget_below_the_prompts(tmp: Path, url: str) -> Setup:
    return Setup(job(tmp, rows(r0="word " * 2000)), ("--max-cost", "0.0000001"))


def budget_reached_mid_run(tmp: Path, url: str) -> Setup:
    return Setup(job(tmp, rows(40)), ("--max-cost", "0.0002"))


def some_done_the_rest_pending(tmp: Path) -> None:
    statuses = pl.read_parquet(tmp / "out.parquet")["status"].to_list()
    assert 0 < statuses.count("ok") < 40
    assert statuses.count("failed") == 0


# -- input a user can type ---------------------------------------------------------------------


def unknown_filter(tmp: Path, url: str) -> Setup:
    return Setup(job(tmp, template={"user": "{{ text | shout }}"}))


def semicolon_csv(tmp: Path, url: str) -> Setup:
    spec = job(tmp)
    (tmp / "input.csv").write_text("id;text\n0;hello\n1;there\n")
    return Setup(spec)


def xlsx_named_csv(tmp: Path, url: str) -> Setup:
    spec = job(tmp)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as book:
        book.writestr("[Content_Types].xml", "<Types/>")
        book.writestr("xl/workbook.xml", "<workbook/>")
    (tmp / "input.csv").write_bytes(buffer.getvalue())
    return Setup(spec)


def gzip_named_csv(tmp: Path, url: str) -> Setup:
    spec = job(tmp)
    (tmp / "input.csv").write_bytes(gzip.compress(b"id,text\n0,hello\n1,there\n"))
    return Setup(spec)


def utf16_without_bom(tmp: Path, url: str) -> Setup:
    spec = job(tmp)
    (tmp / "input.csv").write_bytes("id,text\n0,hello\n1,there\n".encode("utf-16-le"))
    return Setup(spec)


def validate_with_bad_rows_option(tmp: Path, url: str) -> Setup:
    return Setup(job(tmp), ("--rows", "-3"), verb="validate")


def validate_with_failing_rows(tmp: Path, url: str) -> Setup:
    return Setup(job(tmp, rows(r1="  ")), verb="validate")


CASES = [
    # 1. secrets go only where the user sends them
    pytest.param(
        Case(job_names_its_host, 2, r"trust-job-hosts", refused=True), id="job-names-a-host"
    ),
    pytest.param(Case(job_names_its_host_trusted, 0), id="job-names-a-host-trusted"),
    pytest.param(
        Case(key_from_any_variable, 2, r"AWS_SECRET_ACCESS_KEY.*API_KEY", refused=True),
        id="api-key-env-names-another-secret",
    ),
    pytest.param(
        Case(plain_http_to_another_machine, 2, r"plain http://", refused=True),
        id="plain-http-to-another-machine",
    ),
    pytest.param(
        Case(plain, 4, r"authentication failed", sim={"fault_rate": 1.0, "faults": ("echokey",)}),
        id="server-echoes-the-key",
    ),
    # 2. the output never destroys what it should not
    pytest.param(
        Case(output_is_a_link, 2, r"symbolic link", refused=True, then=precious_kept),
        id="output-is-a-symlink",
    ),
    pytest.param(
        Case(output_outside_the_jobs_folder, 2, r"outside the job's folder", refused=True),
        id="job-output-outside-its-folder",
    ),
    pytest.param(
        Case(output_no_run_wrote, 2, r"out\.parquet", refused=True, then=foreign_output_kept),
        id="existing-output-no-run-wrote",
    ),
    # 3. caught before the money is spent
    pytest.param(
        Case(schema_property_clashes, 2, r"status.*prefix", refused=True),
        id="schema-property-clashes-with-a-result-column",
    ),
    pytest.param(Case(schema_is_invalid, 2, r"strng", refused=True), id="schema-type-strng"),
    pytest.param(Case(csv_values_as_written, 0, then=values_kept), id="csv-values-kept-as-written"),
    # 4. bounded everything
    pytest.param(
        Case(one_empty_prompt, 1, r"1 row", then=row_failed(2, "invalid_row")),
        id="empty-prompt-fails-its-row-unsent",
    ),
    pytest.param(
        Case(one_row_over_the_tpm, 1, r"1 row", then=row_failed(3, "too_large")),
        id="row-over-the-tpm-fails-unsent",
    ),
    pytest.param(
        Case(a_template_that_loops, 1, r"1 row", then=row_failed(1, "invalid_row")),
        id="template-that-loops-fails-its-row",
    ),
    pytest.param(
        Case(a_template_that_always_loops, 4, r"render limits", then=three_failed_the_rest_pending),
        id="template-that-always-loops-halts-the-run",
    ),
    pytest.param(
        Case(a_gzip_bomb, 1, r"1 row", then=row_failed(4, "response_too_large")),
        id="gzip-bomb-fails-its-row",
    ),
    pytest.param(
        Case(concurrency_over_the_cap, 2, r"concurrency", refused=True),
        id="concurrency-flag-over-the-cap",
    ),
    # 5. faults that will not clear stop the run early
    pytest.param(
        Case(connection_refused, 4, r"connection refused", then=rows_pending),
        id="connection-refused",
    ),
    pytest.param(
        Case(name_that_never_resolves, 4, r"pipeline-test\.invalid|timed out", then=rows_pending),
        id="dns-failure",
    ),
    pytest.param(
        Case(plain, 4, r"HTML", sim={"fault_rate": 1.0, "faults": ("html",)}),
        id="html-page-with-200",
    ),
    # 6. the checkpoint is trusted only when it is sound
    pytest.param(
        Case(garbage_checkpoint, 2, r"journal\.sqlite", refused=True), id="garbage-checkpoint"
    ),
    pytest.param(
        Case(empty_checkpoint, 2, r"journal\.sqlite", refused=True), id="empty-checkpoint"
    ),
    pytest.param(
        Case(another_programs_database, 2, r"journal\.sqlite", refused=True),
        id="another-programs-database-as-checkpoint",
    ),
    # 7. money messages are true
    pytest.param(
        Case(budget_below_the_prompts, 2, r"max-cost", refused=True),
        id="budget-below-the-prompts-cost",
    ),
    pytest.param(
        Case(budget_reached_mid_run, 3, r"budget", then=some_done_the_rest_pending),
        id="budget-reached-mid-run",
    ),
    # 8. no raw traceback from input a user can type
    pytest.param(Case(unknown_filter, 2, r"shout", refused=True), id="unknown-jinja-filter"),
    pytest.param(Case(semicolon_csv, 2, r"separator", refused=True), id="semicolon-separated-csv"),
    pytest.param(Case(xlsx_named_csv, 2, r"xlsx|Excel", refused=True), id="xlsx-named-csv"),
    pytest.param(Case(gzip_named_csv, 2, r"gzip", refused=True), id="gzip-named-csv"),
    pytest.param(Case(utf16_without_bom, 2, r"UTF-16", refused=True), id="utf16-without-bom"),
    pytest.param(
        Case(validate_with_bad_rows_option, 2, r"rows", refused=True),
        id="validate-rows-negative",
    ),
    pytest.param(
        Case(validate_with_failing_rows, 2, r"1 of 6 rows would fail", refused=True),
        id="validate-exits-non-zero-when-rows-would-fail",
    ),
    # interrupted: the documented exit codes, the answers so far kept
    pytest.param(
        Case(plain, 143, r"interrupted|terminated", sim={"latency_ms": 300}, signal=signal.SIGTERM),
        id="sigterm-mid-run",
    ),
    pytest.param(
        Case(plain, 130, r"interrupted", sim={"latency_ms": 300}, signal=signal.SIGINT),
        id="sigint-mid-run",
    ),
]


@pytest.fixture
def canary() -> str:
    # Made at run time, so that no tracked file holds anything shaped like a key.
    return "sk-cat-" + secrets.token_hex(20)


@pytest.mark.parametrize("case", CASES)
def test_every_fault_ends_in_its_documented_state(tmp_path: Path, canary: str, case: Case) -> None:
    with serving(**case.sim) as server:
        setup = case.make(tmp_path, server.url)
        result = run_as_a_user(setup, server, canary, case.signal)
        stats = server.sim.stats
        requests, answered = stats.requests + stats.listings, stats.ok

    assert result.returncode == case.exit, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    if case.exit == 0:
        assert errors == [], result.stderr
    else:
        assert len(errors) == 1, result.stderr
        # A job file's problems are listed under their one line, a line each.
        message = result.stderr[result.stderr.index(errors[0]) :]
        assert re.search(case.says, message), message
    if case.refused:
        assert requests == 0, "refused before sending, yet the server was asked"
    output = setup.job.parent / "out.parquet"
    if not case.refused and output.exists() and not output.is_symlink():
        ok = pl.read_parquet(output).filter(pl.col("status") == "ok").height
        assert ok == answered, "every answer the server gave is in the output"
    if case.then is not None:
        case.then(tmp_path)
    assert_no_canary(tmp_path, canary, result)


def run_as_a_user(
    setup: Setup, server: Server, canary: str, sig: int | None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PIPELINE_"))}
    env = {k: v for k, v in env.items() if "proxy" not in k.lower()}
    env["OPENAI_API_KEY"] = canary
    url = () if setup.own_url else ("--base-url", server.url)
    args = [*command(), setup.verb, str(setup.job), *url, *setup.args]
    if sig is None:
        return subprocess.run(
            args, capture_output=True, text=True, env=env, cwd=setup.cwd, timeout=RUN_TIMEOUT_S
        )
    child = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=setup.cwd
    )
    for _ in range(RUN_TIMEOUT_S * 20):  # bounded: the first answer comes in under a second
        if server.sim.stats.ok or child.poll() is not None:
            break
        time.sleep(0.05)
    child.send_signal(sig)
    out, err = child.communicate(timeout=RUN_TIMEOUT_S)
    return subprocess.CompletedProcess(args, child.returncode, out, err)


def assert_no_canary(folder: Path, canary: str, result: subprocess.CompletedProcess[str]) -> None:
    """The key, whole or by prefix, in any case, is in nothing the run wrote or printed."""
    needles = (canary.lower(), canary[:PREFIX_CHARS].lower())
    texts = {"stdout": result.stdout, "stderr": result.stderr}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            texts[str(path)] = readable(path)
    for name, text in texts.items():
        folded = text.lower()
        assert not any(n in folded for n in needles), f"the key is in {name}"


def readable(path: Path) -> str:
    """A file's text as a reader would get it: Parquet decoded, the rest as bytes."""
    raw = path.read_bytes().decode("utf-8", "replace")
    if path.suffix == ".parquet" and raw.startswith("PAR1"):
        return raw + pl.read_parquet(path).write_csv()
    return raw
