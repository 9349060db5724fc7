"""Issue 10, class 3 and class 4's render limits: nothing fails after the money is spent
that could have been caught before.

A schema the API (or the output) would refuse, an input the output writer cannot hold,
a template that never ends and a prompt that renders blank are all found before the
first request: the run exits 2 with zero requests at the server, or the row fails
before it is sent.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest
from aiohttp import web
from conftest import Server, invoke, read_output, run_job, serving_app, spawn_run, write_job

from pipeline.render import MAX_RENDER_CHARS, MAX_RENDER_S

ROWS = [{"id": 1, "text": "hello"}, {"id": 2, "text": "world"}]


def refused(result: Any, sim: Server, *fragments: str) -> str:
    """Exit 2, one error line holding every fragment, nothing sent."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert sim.sim.stats.requests == 0
    return str(lines[0])


def schema_job(directory: Path, schema: dict[str, Any], **json_schema: Any) -> Path:
    return write_job(
        directory,
        ROWS,
        request={"response_format": "json_schema"},
        tables={"request.json_schema": {"name": "answer", "schema": schema, **json_schema}},
    )


def schema_file_job(directory: Path, schema: dict[str, Any]) -> Path:
    """A job whose schema is a file (keys such as `$defs` are not bare TOML keys)."""
    (directory / "answer.schema.json").write_bytes(orjson.dumps(schema))
    return write_job(
        directory,
        ROWS,
        request={"response_format": "json_schema"},
        tables={"request.json_schema": {"file": "answer.schema.json"}},
    )


def obj(**properties: Any) -> dict[str, Any]:
    """A strict-mode object schema with these properties."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


# --- the JSON schema ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["status", "error", "cost_usd", "model", "response"])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_schema_property_named_like_a_result_column_is_refused(
    tmp_path: Path, sim: Server, command: str, name: str
) -> None:
    job = schema_job(tmp_path, obj(**{name: {"type": "string"}}))

    line = refused(invoke(command, job, "--base-url", sim.url), sim, f"property `{name}`")

    assert "rename the property" in line
    assert not (tmp_path / "out.parquet").exists()


def test_schema_property_named_like_an_input_column_needs_a_prefix(
    tmp_path: Path, sim: Server
) -> None:
    job = schema_job(tmp_path, obj(text={"type": "string"}))

    refused(run_job(job, sim), sim, "text", "[output] prefix")


@pytest.mark.parametrize(
    ("schema", "where", "fragment"),
    [
        pytest.param(obj(a={"type": "strng"}), "at properties/a/type", "valid types", id="strng"),
        pytest.param(
            {**obj(a={"type": "string"}), "required": "a"},
            "at required",
            "is not of type 'array'",
            id="required-not-a-list",
        ),
        pytest.param(
            obj(a={"type": "integer", "minimum": "zero"}),
            "at properties/a/minimum",
            "is not of type 'number'",
            id="minimum-not-a-number",
        ),
        pytest.param(
            {**obj(a={"type": "string"}), "additionalProperties": "no"},
            "at additionalProperties",
            "",
            id="additional-properties-not-a-schema",
        ),
    ],
)
def test_invalid_json_schema_is_refused_before_sending(
    tmp_path: Path, sim: Server, schema: dict[str, Any], where: str, fragment: str
) -> None:
    job = schema_job(tmp_path, schema, strict=False)

    for command in ("validate", "estimate", "run"):
        refused(invoke(command, job, "--base-url", sim.url), sim, "not a valid JSON schema", where)
    assert fragment in invoke("validate", job).stderr


def test_invalid_schema_file_names_the_file(tmp_path: Path, sim: Server) -> None:
    (tmp_path / "answer.schema.json").write_bytes(orjson.dumps(obj(a={"type": "strng"})))
    job = write_job(
        tmp_path,
        ROWS,
        request={"response_format": "json_schema"},
        tables={"request.json_schema": {"file": "answer.schema.json"}},
    )

    refused(run_job(job, sim), sim, "answer.schema.json", "properties/a/type")


def test_invalid_tool_parameters_are_refused(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, ROWS)
    job.write_text(
        job.read_text() + '[[request.tools]]\nname = "lookup"\nparameters = { type = "objekt" }\n'
    )

    refused(run_job(job, sim), sim, "tool `lookup`", "not a valid JSON schema")


# --- what the output writer cannot hold --------------------------------------------------


def ndjson(directory: Path, lines: list[str]) -> str:
    (directory / "input.ndjson").write_text("".join(f"{line}\n" for line in lines))
    return "input.ndjson"


UNWRITABLE = [
    pytest.param(
        ['{"id": 1, "text": "a", "big": 123456789012345678901234}'],
        "out.parquet",
        ["input column `big` (Int128)", "do not fit in 64 bits", "--output x.csv"],
        id="ndjson-int-past-64-bits",
    ),
    pytest.param(
        ['{"id": 1, "text": "a", "meta": {"tags": {}}}'],
        "out.parquet",
        ["input column `meta`", "objects with no fields", "write CSV"],
        id="ndjson-empty-object",
    ),
]


@pytest.mark.parametrize(("lines", "output", "fragments"), UNWRITABLE)
def test_input_the_output_cannot_hold_is_refused_before_sending(
    tmp_path: Path, sim: Server, lines: list[str], output: str, fragments: list[str]
) -> None:
    job = write_job(tmp_path, ROWS, output=output)
    job.write_text(job.read_text().replace('"input.csv"', f'"{ndjson(tmp_path, lines)}"'))

    refused(invoke("validate", job), sim, *fragments)
    refused(run_job(job, sim), sim, *fragments)
    assert not (tmp_path / output).exists()
    assert not (tmp_path / "out.journal.sqlite").exists(), "nothing started"


@pytest.mark.parametrize(
    ("column", "dtype"),
    [
        pytest.param(pl.Series("blob", [b"\x00\xff", b"\x01"]), "Binary", id="binary"),
        pytest.param(pl.Series("wait", [1, 2], dtype=pl.Duration("us")), "Duration", id="duration"),
    ],
)
def test_parquet_types_a_csv_output_cannot_hold(
    tmp_path: Path, sim: Server, column: pl.Series, dtype: str
) -> None:
    frame = pl.DataFrame(ROWS).with_columns(column)
    job = write_job(tmp_path, frame, input_name="input.parquet", output="out.csv")

    refused(run_job(job, sim), sim, f"input column `{column.name}` ({dtype}", "--output x.parquet")


def test_schema_object_with_no_properties_is_refused(tmp_path: Path, sim: Server) -> None:
    job = schema_job(tmp_path, obj(meta={"type": "object"}), strict=False)

    refused(run_job(job, sim), sim, "property `meta`", "give that object `properties`")


def test_odd_inputs_the_check_passes_are_written(tmp_path: Path, sim: Server) -> None:
    """The other side of the check: what it lets through, the writer writes."""
    lines = [
        '{"id": 1, "text": "a", "n": null, "mixed": 1, "nested": {"a": [1, 2]}, "l": [1]}',
        '{"id": 2, "text": "b", "n": null, "mixed": "x", "nested": {"a": []}, "l": []}',
    ]
    for output in ("out.parquet", "out.csv"):
        job = write_job(tmp_path, ROWS, output=output)
        job.write_text(job.read_text().replace('"input.csv"', f'"{ndjson(tmp_path, lines)}"'))

        result = run_job(job, sim, "--fresh")

        assert result.exit_code == 0, result.output
        assert read_output(tmp_path / output)["status"].to_list() == ["ok", "ok"]


# --- CSV values as written -----------------------------------------------------------------


@contextlib.contextmanager
def recording_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A minimal chat-completions server that keeps every request body it is sent."""
    bodies: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.json_response(
            {
                "id": f"chatcmpl-{len(bodies)}",
                "object": "chat.completion",
                "model": "gpt-4o-mini",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    with serving_app(app) as url:
        yield url, bodies


def test_csv_values_reach_the_prompt_and_the_output_as_written(tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        ROWS,
        template={"user": "{{ id }}|{{ zip }}|{{ big }}|{{ version }}|{{ flag }}"},
    )
    (tmp_path / "input.csv").write_text(
        "id,zip,big,version,flag\n007,01234,12345678901234567890,1.10,TRUE\n008,00000,-0,1e3,yes\n"
    )
    job.write_text(job.read_text().replace("[input]\n", '[input]\nkey = "id"\n'))

    with recording_server() as (url, bodies):
        result = invoke("run", job, "--base-url", url, "--price", "0,0")

    assert result.exit_code == 0, result.output
    prompts = sorted(b["messages"][-1]["content"] for b in bodies)
    assert prompts == ["007|01234|12345678901234567890|1.10|TRUE", "008|00000|-0|1e3|yes"]
    out = read_output(tmp_path / "out.parquet")
    assert out["id"].to_list() == ["007", "008"]
    assert out["zip"].to_list() == ["01234", "00000"]
    assert out["big"].to_list() == ["12345678901234567890", "-0"]
    assert out["version"].to_list() == ["1.10", "1e3"]


# --- render limits and blank prompts -------------------------------------------------------

NESTED_LOOPS = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ text }}"
)


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        pytest.param(NESTED_LOOPS, f"render time limit ({MAX_RENDER_S:g} s)", id="nested-loops"),
        pytest.param(
            "{{ text * 1000000000 }}", f"render size limit ({MAX_RENDER_CHARS:,}", id="huge-repeat"
        ),
        pytest.param(
            "{% set ns = namespace(s=text) %}{% for i in range(64) %}"
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
            "render size limit",
            id="doubling",
        ),
        pytest.param(
            "{% for i in range(100000) %}{{ text * 100000 }}{% endfor %}",
            "render size limit",
            id="output-grows",
        ),
    ],
)
def test_runaway_template_fails_its_rows_before_sending(
    tmp_path: Path, sim: Server, template: str, fragment: str
) -> None:
    job = write_job(tmp_path, ROWS[:1], template={"user": template})

    result = run_job(job, sim)

    assert result.exit_code == 1, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["failed"]
    assert out["error_type"].to_list() == ["invalid_row"]
    assert fragment in out["error"][0]
    assert sim.sim.stats.requests == 0

    checked = invoke("validate", job)
    assert checked.exit_code == 2
    assert "1 of 1 rows would fail before sending" in checked.stderr
    assert fragment in checked.stderr


def test_validate_stops_checking_a_template_that_always_loops(tmp_path: Path) -> None:
    rows = [{"id": i, "text": f"row {i}"} for i in range(20)]
    job = write_job(tmp_path, rows, template={"user": NESTED_LOOPS})

    result = invoke("validate", job, "--rows", "0")

    assert result.exit_code == 2
    assert "3 of 3 rows would fail" in result.stderr
    assert "stopped after 3 of 20 rows" in result.stderr


def test_validate_checks_on_past_runaway_rows_that_are_not_in_a_row(tmp_path: Path) -> None:
    # Every other row runs past the size limit (found at once, no time limit to wait
    # out): never LIMIT_ROWS in a row, so every row is checked, as a run would send them.
    rows = [{"id": i, "text": f"row {i}"} for i in range(10)]
    every_other = "{% if id|int is even %}{{ text * 1000000000 }}{% else %}{{ text }}{% endif %}"
    job = write_job(tmp_path, rows, template={"user": every_other})

    result = invoke("validate", job, "--rows", "0")

    assert result.exit_code == 2
    assert "5 of 10 rows would fail" in result.stderr
    assert "stopped after" not in result.stderr


def test_ctrl_c_ends_a_run_while_renders_loop(tmp_path: Path, sim: Server) -> None:
    # Every other row loops, so the run never meets LIMIT_ROWS runaway rows in a row
    # (which halts it by itself) and is still rendering when Ctrl-C comes.
    rows = [{"id": i, "text": f"row {i}"} for i in range(200)]
    every_other = "{% if id|int is even %}" + NESTED_LOOPS + "{% else %}{{ text }}{% endif %}"
    job = write_job(tmp_path, rows, template={"user": every_other})

    proc = spawn_run(job, sim.url)
    assert proc.stderr is not None
    assert "200 rows" in proc.stderr.readline()  # "job: 200 rows from ..."
    # The first progress line comes from inside the run (PLAIN_INTERVAL_S in): the
    # signal handlers are in place and the renders have been looping for seconds.
    progress = proc.stderr.readline()
    assert progress, "the run printed its progress"
    proc.send_signal(signal.SIGINT)
    try:
        _, rest = proc.communicate(timeout=60)  # 200 rows at MAX_RENDER_S each: 200 s
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the run did not end after Ctrl-C while rendering")

    assert proc.returncode == 130, rest
    assert "Traceback" not in rest
    out = read_output(tmp_path / "out.parquet")
    assert out.height == 200
    assert out["status"].to_list().count("pending") > 100, "it stopped rendering"
    assert out["status"].to_list().count("ok") == sim.sim.stats.requests


@pytest.mark.parametrize(
    ("rows", "template"),
    [
        pytest.param(
            [{"id": 1, "text": ""}, {"id": 2, "text": "  \n\t"}, {"id": 3, "text": "ok"}],
            {"user": "{{ text }}"},
            id="blank-values",
        ),
        pytest.param(
            [{"id": 1, "text": None}, {"id": 2, "text": " "}, {"id": 3, "text": "ok"}],
            {"system": "You summarise.", "user": "{{ text }}\n"},
            id="system-but-blank-user",
        ),
    ],
)
def test_blank_prompt_is_a_row_failure_not_a_paid_request(
    tmp_path: Path, sim: Server, rows: list[dict[str, Any]], template: dict[str, str]
) -> None:
    job = write_job(tmp_path, rows, template=template)

    result = run_job(job, sim)

    assert result.exit_code == 1, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["failed", "failed", "ok"]
    assert out["error_type"].to_list()[:2] == ["invalid_row", "invalid_row"]
    assert all("the prompt is empty" in e for e in out["error"].to_list()[:2])
    assert sim.sim.stats.requests == 1


def test_embeddings_blank_text_fails_before_sending(tmp_path: Path, sim: Server) -> None:
    rows = [{"id": 1, "text": "a"}, {"id": 2, "text": " "}]
    job = write_job(
        tmp_path, rows, request={"endpoint": "embeddings", "model": "text-embedding-3-small"}
    )

    result = run_job(job, sim)

    assert result.exit_code == 1, result.output
    assert read_output(tmp_path / "out.parquet")["status"].to_list() == ["ok", "failed"]
    assert sim.sim.stats.requests == 1


def test_any_error_a_template_raises_is_its_rows_failure(tmp_path: Path, sim: Server) -> None:
    rows = [{"id": 1, "text": "2"}, {"id": 2, "text": "0"}]
    job = write_job(tmp_path, rows, template={"user": "{{ 10 / (text | int) }}"})

    result = run_job(job, sim)

    assert result.exit_code == 1, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok", "failed"]
    assert "ZeroDivisionError" in out["error"][1]
    assert sim.sim.stats.requests == 1


@pytest.mark.parametrize(
    ("prop", "fragment"),
    [
        pytest.param({}, "(root)/x admits any JSON value", id="untyped"),
        pytest.param({"type": "array"}, "(root)/x is an array with no `items`", id="no-items"),
        pytest.param(
            {"type": ["string", "object"]},
            "(root)/x admits object values as well as string",
            id="string-or-object",
        ),
        pytest.param(
            {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            "(root)/x admits string values as well as integer",
            id="any-of-integer-or-string",
        ),
        pytest.param(
            {"type": "array", "items": {"type": ["boolean", "number"]}},
            "(root)/x/items admits number values as well as boolean",
            id="items-boolean-or-number",
        ),
    ],
)
def test_schema_values_a_typed_column_cannot_hold_are_refused(
    tmp_path: Path, sim: Server, prop: dict[str, Any], fragment: str
) -> None:
    """The answer would pass the schema, then fail to decode into its column at the end."""
    job = schema_job(tmp_path, obj(x=prop), strict=False)

    refused(run_job(job, sim), sim, fragment, "give it one `type`")


def test_schema_refs_type_their_columns(tmp_path: Path, sim: Server) -> None:
    schema = {
        **obj(
            item={"$ref": "#/$defs/Item"}, tags={"type": "array", "items": {"$ref": "#/$defs/Tag"}}
        ),
        "$defs": {"Item": obj(name={"type": "string"}), "Tag": {"type": "string"}},
    }
    job = schema_file_job(tmp_path, schema)

    result = run_job(job, sim)

    assert result.exit_code in (0, 1), result.output
    out = read_output(tmp_path / "out.parquet")
    assert out.schema["item"] == pl.Struct({"name": pl.String})
    assert out.schema["tags"] == pl.List(pl.String)


def test_recursive_schema_ref_is_refused(tmp_path: Path, sim: Server) -> None:
    node = obj(child={"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]})
    job = schema_file_job(tmp_path, {**obj(root={"$ref": "#/$defs/Node"}), "$defs": {"Node": node}})

    refused(run_job(job, sim), sim, "is recursive")


def test_input_column_named_like_a_temporary_one(tmp_path: Path, sim: Server) -> None:
    (tmp_path / "input.ndjson").write_text('{"text": "a", "__fields": 1}\n')
    job = schema_job(tmp_path, obj(a={"type": "string"}))
    job.write_text(job.read_text().replace('"input.csv"', '"input.ndjson"'))

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["__fields"].to_list() == [1]
    assert out["status"].to_list() == ["ok"]


def test_estimate_stops_on_a_template_that_always_loops(tmp_path: Path, sim: Server) -> None:
    rows = [{"id": i, "text": f"row {i}"} for i in range(20)]
    job = write_job(tmp_path, rows, template={"user": NESTED_LOOPS})

    refused(invoke("estimate", job), sim, "3 rows ran past the render limits")
