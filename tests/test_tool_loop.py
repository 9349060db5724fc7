"""Chat tool calls end to end: recorded without run_tools; with it, the job's functions
run and their results go back until the model answers, within max_tool_rounds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import Server, invoke, post_json, read_output, run_job, write_job

from pipeline.plan import RunOptions, make_plan
from pipeline.spec import load_job
from pipeline.tokens import text_counter
from pipeline.tool_loop import ToolRunner

ROOT = Path(__file__).resolve().parent.parent
CITIES = ["Oslo", "Lima", "Hanoi"]
WEATHER = {
    "name": "get_weather",
    "description": "Today's weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": CITIES}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
TIME = {
    "name": "get_time",
    "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
MODULE = """
def get_weather(city):
    return {"city": city, "sky": "clear", "temp_c": 21}

def get_time(city):
    return "12:00"
"""


def questions(n: int) -> list[dict[str, object]]:
    return [{"id": i, "text": f"What is the weather like today, question {i}?"} for i in range(n)]


def tool_job(tmp_path: Path, n: int = 3, module: str | None = MODULE, **request: Any) -> Path:
    if module is not None:
        (tmp_path / "job.py").write_text(module, encoding="utf-8")
    # max_tokens above the simulator's longest answer (40): final answers end in "stop".
    request = {"tools": [WEATHER, TIME], "max_tokens": 64, **request}
    return write_job(tmp_path, questions(n), request=request)


MODEL = "gpt-4o-mini"  # write_job's


def count(text: str) -> int:
    """Tokens of `text` as the simulator counts them for the jobs' model."""
    return text_counter(MODEL)(text)


# --- without run_tools: the calls are the answer ------------------------------------------


def test_without_run_tools_the_calls_land_in_the_tool_calls_column(
    tmp_path: Path, sim: Server
) -> None:
    job = tool_job(tmp_path, module=None)

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 3
    assert out["response"].to_list() == [None] * 3
    assert out["finish_reason"].to_list() == ["tool_calls"] * 3
    for text in out["tool_calls"]:
        (call,) = json.loads(text)
        assert call["name"] == "get_weather"  # the first tool, as tool_choice is auto
        assert call["id"].startswith("call_")
        assert json.loads(call["arguments"])["city"] in CITIES  # faked from the schema
    assert sim.sim.stats.requests == 3


def test_a_named_tool_choice_forces_that_tool(tmp_path: Path, sim: Server) -> None:
    job = tool_job(tmp_path, module=None, tool_choice="get_time")

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert {json.loads(t)[0]["name"] for t in out["tool_calls"]} == {"get_time"}
    # As on the real API, a forced call finishes with "stop", not "tool_calls".
    assert out["finish_reason"].unique().to_list() == ["stop"]


def test_tool_choice_none_answers_in_text(tmp_path: Path, sim: Server) -> None:
    job = tool_job(tmp_path, module=None, tool_choice="none")

    assert run_job(job, sim).exit_code == 0
    out = read_output(tmp_path / "out.parquet")
    assert out["tool_calls"].to_list() == [None] * 3
    assert out["response"].null_count() == 0


def test_the_estimate_counts_the_tool_definitions_as_the_server_does(
    tmp_path: Path, sim: Server
) -> None:
    job = tool_job(tmp_path, module=None)

    assert run_job(job, sim).exit_code == 0

    plan = make_plan(load_job(job), RunOptions(base_url=sim.url))
    estimated = [
        plan.endpoint.item(plan.renderer.render(row)).tokens
        for row in plan.source.head(3).iter_rows(named=True)
    ]
    assert read_output(tmp_path / "out.parquet")["prompt_tokens"].to_list() == estimated


# --- with run_tools: the loop ----------------------------------------------------------------


def one_round(tmp_path: Path, sim: Server) -> tuple[list[int], list[int], list[dict[str, Any]]]:
    """Prompt and completion tokens of the first round alone, and its calls."""
    first = tmp_path / "first"
    first.mkdir()
    assert run_job(tool_job(first, module=None), sim).exit_code == 0
    out = read_output(first / "out.parquet")
    calls = [json.loads(t)[0] for t in out["tool_calls"]]
    return out["prompt_tokens"].to_list(), out["completion_tokens"].to_list(), calls


def test_the_loop_ends_in_a_final_answer_with_usage_summed_over_rounds(
    tmp_path: Path, sim: Server
) -> None:
    prompts, completions, calls = one_round(tmp_path, sim)
    job = tool_job(tmp_path, run_tools=True)

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 3
    assert out["finish_reason"].to_list() == ["stop"] * 3
    assert out["response"].null_count() == 0
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["requests_sent"] == 6  # two rounds a row
    for row, call in enumerate(calls):
        result_text = orjson.dumps({"city": json.loads(call["arguments"])["city"],
                                    "sky": "clear", "temp_c": 21}).decode()  # fmt: skip
        # Round two's prompt: round one's, the model's call, and the function's result.
        second = prompts[row] + count(call["name"] + call["arguments"]) + 4
        second += count(result_text) + 4
        assert out["prompt_tokens"][row] == prompts[row] + second
        assert out["completion_tokens"][row] > completions[row]  # the call's, and the text's
        # The call the loop ran, and what the function gave back, go with the final answer.
        (ran,) = json.loads(out["tool_calls"][row])
        assert ran == {**call, "result": result_text}
    assert out["cost_usd"].sum() == pytest.approx(summary["cost_usd"])


def test_a_function_that_raises_is_reported_to_the_model_not_a_crash(
    tmp_path: Path, sim: Server
) -> None:
    prompts, _, calls = one_round(tmp_path, sim)
    module = "def get_weather(city):\n    raise ValueError(f'no station in {city}')\n"
    job = tool_job(
        tmp_path, module=module + "\ndef get_time(city):\n    return ''\n", run_tools=True
    )

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 3
    for row, call in enumerate(calls):
        city = json.loads(call["arguments"])["city"]
        sent = f"error: ValueError: no station in {city}"  # what the model was told
        second = prompts[row] + count(call["name"] + call["arguments"]) + 4 + count(sent) + 4
        assert out["prompt_tokens"][row] == prompts[row] + second


@pytest.mark.parametrize(
    ("call", "told"),
    [
        pytest.param({"name": "boom", "arguments": "{}"}, "error: RuntimeError: no", id="raises"),
        pytest.param(
            {"name": "nowhere", "arguments": "{}"},
            "error: there is no tool named 'nowhere'",
            id="unknown-tool",
        ),
        pytest.param(
            {"name": "echo", "arguments": '{"x": '},
            "error: the arguments are not valid JSON: unexpected end of data: line 1 column 7 "
            "(char 6)",
            id="broken-json",
        ),
        pytest.param(
            {"name": "echo", "arguments": '{"y": 1}'},
            "error: wrong arguments for echo: missing a required argument: 'x'",
            id="wrong-arguments",
        ),
        pytest.param({"name": "echo", "arguments": '{"x": [1]}'}, "[1]", id="json-result"),
    ],
)
def test_every_way_a_call_goes_wrong_is_told_to_the_model(
    tmp_path: Path, call: dict[str, str], told: str
) -> None:
    module = tmp_path / "fns.py"
    module.write_text(
        "def boom():\n    raise RuntimeError('no')\n\ndef echo(x):\n    return x\n",
        encoding="utf-8",
    )
    runner = ToolRunner.load(module, ["boom", "echo"])

    (answered,) = runner.call_all([{"id": "c1", **call}])

    assert answered == {"id": "c1", **call, "content": told}


@pytest.mark.parametrize(
    ("module", "complaint"),
    [
        pytest.param(None, "the tool functions' module {path} does not exist", id="no-module"),
        pytest.param(
            "def get_weather(city):\n    return 1\n",
            "{path} has no function `get_time` for the tool of that name",
            id="no-function",
        ),
        pytest.param(
            "import no_such_package_anywhere\n",
            "importing {path} failed: ModuleNotFoundError",
            id="import-fails",
        ),
    ],
)
def test_a_missing_tools_module_or_function_is_a_job_error(
    tmp_path: Path, sim: Server, module: str | None, complaint: str
) -> None:
    job = tool_job(tmp_path, module=module, run_tools=True)

    result = run_job(job, sim)

    assert result.exit_code == 2, result.output
    assert complaint.format(path=tmp_path / "job.py") in result.output
    assert sim.sim.stats.requests == 0


def test_max_tool_rounds_exceeded_fails_the_row_clearly(tmp_path: Path, sim: Server) -> None:
    # "required" forces a call every turn, as on the real API: the loop never ends itself.
    job = tool_job(tmp_path, run_tools=True, tool_choice="required", max_tool_rounds=2)

    result = run_job(job, sim)

    assert result.exit_code == 1, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["failed"] * 3
    assert out["error_type"].unique().to_list() == ["invalid_response"]
    assert out["error"].unique().to_list() == [
        "the model still called tools after 2 rounds (max_tool_rounds): no final answer"
    ]
    assert out["tool_calls"].null_count() == 0  # the calls it still wanted to make
    assert (out["cost_usd"] > 0).all()  # three rounds were billed
    assert json.loads((tmp_path / "out.summary.json").read_text())["requests_sent"] == 9


def test_sample_job_runs_offline_with_the_tool_loop(tmp_path: Path) -> None:
    out = tmp_path / "tools.parquet"

    result = invoke("run", ROOT / "jobs" / "tools.toml", "--simulate", "--output", out)

    assert result.exit_code == 0, result.output
    frame = read_output(out)
    assert frame["status"].to_list() == ["ok"] * 6
    assert frame["response"].null_count() == 0
    summary = json.loads(out.with_name("tools.summary.json").read_text())
    assert summary["requests_sent"] == 12


# --- the simulator checks tool messages as the API does ---------------------------------


def chat(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    status, answer, _ = post_json(f"{url}/chat/completions", {"model": "gpt-4o-mini", **body})
    return status, answer


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
USER = {"role": "user", "content": "What time is it?"}
TOOLS = [{"type": "function", "function": TIME}]


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        pytest.param(
            {"messages": [USER, {"role": "tool", "tool_call_id": "call_9", "content": "12"}]},
            "messages.[1].role",
            "messages with role 'tool' must be a response to a preceeding message",
            id="tool-answers-nothing",
        ),
        pytest.param(
            {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [CALL]}]},
            "messages.[1].role",
            "The following tool_call_ids did not have response messages: call_1",
            id="call-unanswered",
        ),
        pytest.param(
            {"messages": [USER], "tool_choice": "auto"},
            "tool_choice",
            "'tool_choice' is only allowed when 'tools' are specified",
            id="tool-choice-without-tools",
        ),
        pytest.param(
            {
                "messages": [USER],
                "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            },
            "tool_choice",
            "function 'get_weather' is not one of the 'tools'",
            id="forced-tool-not-offered",
        ),
        pytest.param(
            {"messages": [USER], "tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools[0].function.name",
            "string does not match pattern",
            id="bad-function-name",
        ),
    ],
)
def test_the_simulator_refuses_tool_messages_the_api_refuses(
    sim: Server, body: dict[str, Any], param: str, message: str
) -> None:
    status, answer = chat(sim.url, body)

    assert status == 400
    assert answer["error"]["param"] == param
    assert message in answer["error"]["message"]


def test_after_a_tool_result_the_simulator_answers_in_text(sim: Server) -> None:
    messages = [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]

    status, answer = chat(sim.url, {"messages": messages, "tools": TOOLS})

    assert status == 200
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"]
    assert "tool_calls" not in choice["message"]
