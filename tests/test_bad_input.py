"""Issue 10, class 8: no raw traceback, ever, from input a user can type.

Every bad input file, option value, template, checkpoint path and job key ends with one
line on stderr and exit 2, and nothing is sent: the simulator counts zero requests.
The fuzz tests at the end throw generated options and job keys at the command and hold
it to the same rule.
"""

from __future__ import annotations

import codecs
import gzip
import io
import os
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import Result
from conftest import Server, invoke, read_output, run_job, toml_value, write_job
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROWS = [{"id": 1, "text": "hello"}, {"id": 2, "text": "world"}]


def one_line_error(result: Result, *fragments: str) -> str:
    """The run was refused with exit 2 and one line on stderr holding every fragment."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"one line, not {len(lines)}: {result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def input_file(directory: Path, name: str, content: bytes) -> Path:
    path = directory / name
    path.write_bytes(content)
    return path


def xlsx_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("xl/workbook.xml", "<workbook/>")
    return buffer.getvalue()


def parquet_bytes() -> bytes:
    buffer = io.BytesIO()
    pl.DataFrame(ROWS).write_parquet(buffer)
    return buffer.getvalue()


CSV = "id,text\n1,hello\n2,world\n"

BAD_FILES = [
    pytest.param(
        gzip.compress(CSV.encode()), ["is gzip-compressed", "gunzip -k"], id="gzip-named-csv"
    ),
    pytest.param(xlsx_bytes(), ["ZIP archive", "xlsx", "CSV UTF-8"], id="xlsx-named-csv"),
    pytest.param(
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(64), ["Excel .xls"], id="xls-named-csv"
    ),
    pytest.param(parquet_bytes(), ["is a Parquet file", 'format = "parquet"'], id="parquet-csv"),
    pytest.param(
        CSV.encode("utf-16-le"),
        ["UTF-16LE text without a byte-order mark", "iconv -f utf-16le -t utf-8"],
        id="utf16-no-bom",
    ),
    pytest.param(
        CSV.encode("utf-16-be"), ["UTF-16BE text without a byte-order mark"], id="utf16be-no-bom"
    ),
    pytest.param(
        codecs.BOM_UTF16_LE + CSV.encode("utf-16-le"),
        ["is UTF-16 text", "iconv -f utf-16"],
        id="utf16-bom",
    ),
    pytest.param(
        "id,text\n1,café\n".encode("latin-1"),
        ["row 1 (line 2), column `text`", "byte 0xE9", "iconv -f latin1"],
        id="latin1",
    ),
    pytest.param(b"", ["is empty"], id="empty-file"),
    pytest.param(b"id,text\n", ["has no rows, only a header"], id="header-only"),
    pytest.param(
        b"id;text\n1;hello\n",
        ["looks `;`-separated", 'set [input] separator = ";"'],
        id="semicolon-separated",
    ),
    pytest.param(
        b"id\ttext\n1\thello\n",
        ["looks `\\t`-separated", 'separator = "\\t"'],
        id="tab-separated",
    ),
]


@pytest.mark.parametrize(("content", "fragments"), BAD_FILES)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_input_file_is_one_line_and_sends_nothing(
    tmp_path: Path, sim: Server, command: str, content: bytes, fragments: list[str]
) -> None:
    job = write_job(tmp_path, ROWS)
    input_file(tmp_path, "input.csv", content)

    result = invoke(command, job, "--base-url", sim.url)

    one_line_error(result, *fragments)
    assert sim.sim.stats.requests == 0


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        pytest.param(lambda d: d / "nope.csv", ["no such file"], id="missing"),
        pytest.param(lambda d: d, ["is a directory"], id="directory"),
    ],
)
def test_input_path_that_is_not_a_file(
    tmp_path: Path, sim: Server, make: Callable[[Path], Path], fragments: list[str]
) -> None:
    job = write_job(tmp_path, ROWS)

    result = invoke("run", job, "--base-url", sim.url, "--input", make(tmp_path))

    one_line_error(result, *fragments)
    assert sim.sim.stats.requests == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_input(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, ROWS)
    (tmp_path / "input.csv").chmod(0)

    one_line_error(invoke("run", job, "--base-url", sim.url), "cannot be read")
    assert sim.sim.stats.requests == 0


def test_the_separator_key_reads_a_semicolon_file(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, ROWS)
    input_file(tmp_path, "input.csv", b"id;text\n007;hello, world\n008;bye\n")
    job.write_text(job.read_text().replace("[input]\n", '[input]\nseparator = ";"\n'))

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["id"].to_list() == ["007", "008"]
    assert out["text"].to_list() == ["hello, world", "bye"]


@pytest.mark.parametrize(
    ("separator", "fragment"),
    [
        pytest.param(";;", "give one ASCII character", id="two-characters"),
        pytest.param('"', "give one ASCII character", id="quote"),
        pytest.param("é", "give one ASCII character", id="not-ascii"),
    ],
)
def test_a_bad_separator_is_a_job_error(tmp_path: Path, separator: str, fragment: str) -> None:
    job = write_job(tmp_path, ROWS)
    job.write_text(job.read_text().replace("[input]\n", f"[input]\nseparator = {separator!r}\n"))

    result = invoke("validate", job)

    assert result.exit_code == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.output


# --- templates ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "fragments"),
    [
        pytest.param("{{ text | nosuch }}", ["No filter named 'nosuch'"], id="unknown-filter"),
        pytest.param(
            "{{ text | uper }}", ["No filter named 'uper'", "did you mean `upper`?"], id="typo"
        ),
        pytest.param(
            "{% if text is nosuch %}x{% endif %}{{ text }}",
            ["No test named 'nosuch'"],
            id="unknown-test",
        ),
        pytest.param("{{ text ", ["template `user`, line 1"], id="syntax"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "run", "estimate"])
def test_template_errors_are_found_at_load(
    tmp_path: Path, sim: Server, command: str, template: str, fragments: list[str]
) -> None:
    job = write_job(tmp_path, ROWS, template={"user": template})

    result = invoke(command, job, "--base-url", sim.url)

    one_line_error(result, *fragments)
    assert sim.sim.stats.requests == 0


# --- options -----------------------------------------------------------------------------


@pytest.mark.parametrize("rows", ["-1", "x", "1.5", ""])
def test_validate_rows_must_be_a_count(tmp_path: Path, rows: str) -> None:
    job = write_job(tmp_path, ROWS)

    one_line_error(invoke("validate", job, "--rows", rows), "--rows", "pipeline validate --help")


def test_unknown_option_is_one_line(tmp_path: Path) -> None:
    job = write_job(tmp_path, ROWS)

    one_line_error(invoke("run", job, "--rpn", "5"), "No such option", "--rpm")


# --- checkpoints ---------------------------------------------------------------------------


def other_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: p.write_bytes(b"not a database at all" * 100), id="garbage"),
        pytest.param(lambda p: p.write_bytes(b""), id="empty"),
        pytest.param(other_sqlite, id="another-programs-sqlite"),
        pytest.param(lambda p: p.mkdir(), id="directory"),
    ],
)
def test_status_of_a_foreign_checkpoint_is_one_line(
    tmp_path: Path, make: Callable[[Path], None]
) -> None:
    job = write_job(tmp_path, ROWS)
    foreign = tmp_path / "foreign.sqlite"
    make(foreign)

    result = invoke("status", job, "--journal", foreign)

    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert str(foreign) in result.stderr


# --- validate ------------------------------------------------------------------------------


def test_validate_counts_failing_rows_over_the_whole_input_without_a_key(
    tmp_path: Path, sim: Server
) -> None:
    rows = [{"id": i, "text": None if i in (5, 8) else f"row {i}"} for i in range(10)]
    job = write_job(tmp_path, rows, template={"user": "{{ text }}", "nulls": "fail"})

    result = invoke("validate", job)  # no OPENAI_API_KEY: validate sends nothing

    line = one_line_error(result, "2 of 10 rows would fail before sending", "row 5")
    assert "column `text` is null" in line
    assert "row 8:" in result.stdout, "the failing rows are listed, not just the shown ones"
    assert "note: no API key" in result.stdout
    assert sim.sim.stats.requests == 0


def test_validate_passes_clean_rows_without_a_key(tmp_path: Path) -> None:
    result = invoke("validate", write_job(tmp_path, ROWS))

    assert result.exit_code == 0, result.output
    assert "all 2 rows render" in result.stdout


# --- as a user would: the released command in a child process -----------------------------


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        pytest.param(gzip.compress(CSV.encode()), "is gzip-compressed", id="gzip"),
        pytest.param(b"id;text\n1;a\n", "looks `;`-separated", id="semicolon"),
        pytest.param(CSV.encode("utf-16-le"), "UTF-16LE", id="utf16-no-bom"),
    ],
)
def test_the_command_says_one_line(tmp_path: Path, content: bytes, fragment: str) -> None:
    job = write_job(tmp_path, ROWS)
    input_file(tmp_path, "input.csv", content)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}

    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", str(job)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )

    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert fragment in done.stderr
    assert "Traceback" not in done.stderr


# --- fuzz: whatever a user types -----------------------------------------------------------

#: Exit codes a command that sends nothing may end with: fine, or refused.
QUIET_EXITS = {0, 2}

option_values = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.text(max_size=12),
    st.sampled_from(["", "0", "-1", "1e9", "nan", "inf", "0,0", "1,2,3", "-0.5,1", "a,b"]),
)
OPTIONS = ["--rows", "--limit", "--rpm", "--tpm", "--price", "--model", "--output", "--input"]


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def check_quiet(result: Result) -> None:
    """Any outcome but a traceback: exit 0 or 2, and a refusal is `error:` lines only."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code in QUIET_EXITS, result.output
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        first = result.stderr.strip().splitlines()[0]
        assert first.startswith("error: "), result.stderr


@fuzz_settings(60)
@given(
    command=st.sampled_from(["validate", "estimate"]),
    options=st.lists(st.tuples(st.sampled_from(OPTIONS), option_values), max_size=3),
)
def test_fuzzed_options_never_raise(
    tmp_path: Path, command: str, options: list[tuple[str, str]]
) -> None:
    job = write_job(tmp_path, ROWS)
    args: list[str] = [command, str(job)]
    for name, value in options:
        if command == "estimate" and name == "--rows":
            continue
        if name in ("--output", "--input"):
            value = str(tmp_path / value.replace("/", "_").replace("\x00", ""))
        args += [name, value]

    check_quiet(invoke(*args))


job_values = st.recursive(
    st.one_of(
        st.text(max_size=20),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(),
        st.sampled_from(["{{ text }}", "{{ nosuch }}", "{% for %}", "{{ text | int }}", ""]),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=4,
)
JOB_KEYS = {
    "input": ["path", "format", "key", "separator"],
    "output": ["path", "prefix"],
    "request": [
        "model",
        "max_tokens",
        "temperature",
        "response_format",
        "endpoint",
        "provider",
        "stop",
        "extra_body",
        "base_url",
    ],
    "template": ["user", "system", "nulls", "images"],
    "limits": ["rpm", "tpm", "concurrency", "max_attempts", "max_cost"],
}
jinja = st.text(alphabet=st.sampled_from(list("{}%|~()[]. _'-+*019ext")), max_size=30)
#: Values close to valid ones, so that the fuzz gets past the job file's checks.
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "path": st.sampled_from(["input.csv", "missing.csv", ".", "x.parquet", "out.txt", ""]),
    "format": st.sampled_from(["csv", "parquet", "ndjson", "xlsx"]),
    "key": st.sampled_from(["id", "text", "nosuch", ""]),
    "separator": st.sampled_from([",", ";", "\t", "|", "x"]),
    "prefix": st.sampled_from(["", "llm_", "__", " ", "a.b"]),
    "model": st.sampled_from(["gpt-4o-mini", "gpt-4o", "my-local-model", ""]),
    "max_tokens": st.integers(min_value=-5, max_value=10**7),
    "temperature": st.floats(min_value=-1, max_value=3),
    "response_format": st.sampled_from(["text", "json_object", "json_schema", "xml"]),
    "endpoint": st.sampled_from(
        ["chat.completions", "responses", "embeddings", "images.generations", "messages"]
    ),
    "provider": st.sampled_from(["openai", "azure", "anthropic"]),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=5)),
    "extra_body": st.dictionaries(st.text(max_size=6), st.integers() | st.text(max_size=6)),
    "user": jinja,
    "system": jinja,
    "nulls": st.sampled_from(["empty", "fail", "skip"]),
    "images": st.lists(st.sampled_from(["{{ text }}", "https://x.test/a.png", "", "a.png"])),
    "rpm": st.integers(min_value=-1, max_value=10**9),
    "tpm": st.integers(min_value=-1, max_value=10**9),
    "concurrency": st.integers(min_value=-1, max_value=10**5),
    "max_attempts": st.integers(min_value=-1, max_value=1000),
    "max_cost": st.floats(min_value=-1, max_value=10),
}
job_keys = st.sampled_from([(t, k) for t, keys in JOB_KEYS.items() for k in keys])
job_changes = job_keys.flatmap(
    lambda tk: st.tuples(st.just(tk), st.one_of(PLAUSIBLE.get(tk[1], job_values), job_values))
)


@fuzz_settings(120)
@given(changes=st.lists(job_changes, min_size=1, max_size=3))
def test_fuzzed_job_keys_never_raise(changes: list[tuple[tuple[str, str], Any]]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        tables: dict[str, dict[str, Any]] = {
            "input": {"path": "input.csv"},
            "output": {"path": "out.parquet"},
            "request": {"model": "gpt-4o-mini", "max_tokens": 16},
            "template": {"user": "{{ text }}"},
            "limits": {},
        }
        for (table, key), value in changes:
            tables[table][key] = value
        pl.DataFrame(ROWS).write_csv(directory / "input.csv")
        lines = []
        for table, values in tables.items():
            lines.append(f"[{table}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
        job = directory / "job.toml"
        job.write_text("\n".join(lines) + "\n", encoding="utf-8")

        check_quiet(invoke("validate", job))


@fuzz_settings(60)
@given(
    template=st.text(
        alphabet=st.sampled_from(list("{}%#|~()[]. _x'\"-+*0123456789abtr")), max_size=40
    )
)
def test_fuzzed_templates_never_raise(template: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        job = write_job(Path(folder), ROWS, template={"user": template or "x"})

        check_quiet(invoke("validate", job))


@fuzz_settings(30)
@given(changes=st.lists(job_changes, min_size=1, max_size=2))
def test_fuzzed_job_keys_run_to_a_documented_end(
    changes: list[tuple[tuple[str, str], Any]],
) -> None:
    """The same keys through `run --simulate`: rows may fail (1), never a traceback."""
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        tables: dict[str, dict[str, Any]] = {
            "input": {"path": "input.csv"},
            "output": {"path": "out.parquet"},
            "request": {"model": "gpt-4o-mini", "max_tokens": 16},
            "template": {"user": "{{ text }}"},
            "limits": {"backoff_s": 0.01, "backoff_max_s": 0.02, "max_attempts": 2},
        }
        for (table, key), value in changes:
            # Not here: a base URL leaves the simulator, and rate limits too low to
            # admit a request stall the run (class 4's, not this test's, to settle).
            if key not in ("base_url", "rpm", "tpm"):
                tables[table][key] = value
        pl.DataFrame(ROWS).write_csv(directory / "input.csv")
        lines = []
        for table, values in tables.items():
            lines.append(f"[{table}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
        job = directory / "job.toml"
        job.write_text("\n".join(lines) + "\n", encoding="utf-8")

        result = invoke("run", job, "--simulate")

        assert result.exception is None or isinstance(result.exception, SystemExit), repr(
            result.exception
        )
        # The documented ends: done, rows failed, refused, budget, halted by the API.
        assert result.exit_code in {0, 1, 2, 3, 4}, result.output
        assert "Traceback" not in result.output


def test_output_that_is_a_directory_is_refused_before_sending(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, ROWS)
    (tmp_path / "taken.parquet").mkdir()

    result = invoke("run", job, "--base-url", sim.url, "--output", tmp_path / "taken.parquet")

    one_line_error(result, "is a directory")
    assert sim.sim.stats.requests == 0


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        pytest.param(["--faults", "500,bogus"], "unknown fault kinds ['bogus']", id="fault-kind"),
        pytest.param(["--host", "999.1.1.1", "--port", "0"], "cannot listen on", id="bad-host"),
        pytest.param(["--port", "70000"], "--port", id="port-range"),
    ],
)
def test_simulate_options_are_one_line(args: list[str], fragment: str) -> None:
    one_line_error(invoke("simulate", *args), fragment)


def test_a_separator_on_a_file_that_is_not_csv_is_refused(tmp_path: Path) -> None:
    job = write_job(tmp_path, pl.DataFrame(ROWS), input_name="input.parquet")
    job.write_text(job.read_text().replace("[input]\n", '[input]\nseparator = ";"\n'))

    one_line_error(invoke("validate", job), "separator is for CSV only")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        pytest.param("job.toml", None, id="job-file"),
        pytest.param("answer.schema.json", b'{"type": "object", "x": "caf\xe9"}', id="schema"),
    ],
)
def test_latin1_job_and_schema_files_are_one_line(
    tmp_path: Path, name: str, content: bytes | None
) -> None:
    job = write_job(
        tmp_path,
        ROWS,
        request={"response_format": "json_schema"},
        tables={"request.json_schema": {"file": "answer.schema.json"}},
    )
    if content is None:
        job.write_bytes(job.read_bytes() + b"# caf\xe9\n")
    else:
        (tmp_path / name).write_bytes(content)

    one_line_error(invoke("validate", job), "byte 0xE9", "is not UTF-8")


@fuzz_settings(80)
@given(
    suffix=st.sampled_from([".csv", ".ndjson", ".parquet"]),
    content=st.one_of(
        st.binary(max_size=200),
        st.lists(
            st.sampled_from(
                [
                    b"id,text\n",
                    b"1,a\n",
                    b'"',
                    b",",
                    b";",
                    b"\r",
                    b"\n",
                    b"\x00",
                    b"\xff",
                    b'{"text": 1}\n',
                    b"{",
                    b"PAR1",
                    b"\xef\xbb\xbf",
                    b"text\n",
                    b"\t",
                ]
            ),
            max_size=12,
        ).map(b"".join),
    ),
)
def test_fuzzed_input_bytes_never_raise(suffix: str, content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        job = write_job(Path(folder), ROWS, template={"user": "{{ text }}"})
        (Path(folder) / f"input{suffix}").write_bytes(content)
        job.write_text(job.read_text().replace('"input.csv"', f'"input{suffix}"'))

        check_quiet(invoke("validate", job))


@fuzz_settings(60)
@given(noise=st.binary(max_size=40), where=st.integers(min_value=0, max_value=200))
def test_fuzzed_job_file_bytes_never_raise(noise: bytes, where: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        job = write_job(Path(folder), ROWS)
        text = job.read_bytes()
        job.write_bytes(text[:where] + noise + text[where:])

        check_quiet(invoke("validate", job))
