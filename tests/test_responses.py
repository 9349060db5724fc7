"""OpenAI's Responses API end to end: job file -> /v1/responses on a real simulator -> output.

Rows carry `<<sim:KIND>>` directives the Responses simulator knows: `refusal`, `failed`
(invalid_prompt), `failedserver` (server_error) and `filtered` (content_filter).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest
from conftest import Server, invoke, post_json, read_output, run_job, write_job

from pipeline.endpoints import Endpoint, make_endpoint
from pipeline.records import Prompt
from pipeline.spec import RequestSpec, TemplateSpec
from pipeline.tool_loop import ToolRunner

ROOT = Path(__file__).resolve().parent.parent
RESPONSES = {"endpoint": "responses", "model": "gpt-4.1-mini"}
LOOKUP = {
    "name": "lookup",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
TOOLS_MODULE = """
from pathlib import Path


def lookup(city):
    with Path(__file__).with_name("calls.txt").open("a", encoding="utf-8") as calls:
        calls.write(city + "\\n")
    return {"city": city, "temp_c": 4}
"""


def texts(n: int, directive: str = "") -> list[dict[str, object]]:
    """n rows; with a directive, the second row carries it."""
    return [
        {"id": i, "text": f"row {i}: ünïcödé words {directive if i == 1 else ''}".strip()}
        for i in range(n)
    ]


def test_sample_job_runs_offline_with_typed_fields_usage_and_cost(tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"

    result = invoke(
        "run",
        ROOT / "jobs" / "responses_extract.toml",
        "--simulate",
        "--output",
        output,
        "--rpm",
        "60000",
    )

    assert result.exit_code == 0, result.output
    out = read_output(output)
    source = pl.read_csv(ROOT / "samples" / "articles.csv")
    assert out.height == source.height
    assert out["status"].to_list() == ["ok"] * source.height
    assert out.filter(pl.col("body").is_null()).height > 0, "rows with no body are sent too"
    assert out["finish_reason"].unique().to_list() == ["stop"]
    assert out.schema["sentiment"] == pl.String
    assert out.schema["topics"] == pl.List(pl.String)
    assert out.schema["key_number"] == pl.Float64
    assert out.schema["is_local_news"] == pl.Boolean
    assert set(out["sentiment"].to_list()) <= {"positive", "neutral", "negative"}
    assert (out["prompt_tokens"] > 0).all()
    assert (out["completion_tokens"] > 0).all()
    assert (out["cost_usd"] > 0).all()
    assert out["request_id"].null_count() == 0
    assert out["model"].unique().to_list() == ["gpt-4.1-mini"]
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["ok"] == source.height
    assert summary["cost_usd"] == pytest.approx(out["cost_usd"].sum())


def test_max_output_tokens_cut_is_finish_reason_length(tmp_path: Path, sim: Server) -> None:
    # Plain answers are 5 to 40 words, a token each: some fit in 16, some are cut.
    job = write_job(tmp_path, texts(30), request={**RESPONSES, "max_tokens": 16})

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].unique().to_list() == ["ok"]
    cut = out.filter(pl.col("finish_reason") == "length")
    whole = out.filter(pl.col("finish_reason") == "stop")
    assert cut.height > 0
    assert whole.height > 0
    assert cut.height + whole.height == 30
    assert cut["completion_tokens"].unique().to_list() == [16]
    assert (whole["completion_tokens"] <= 16).all()
    assert (cut["response"].str.split(" ").list.len() == 16).all()
    assert json.loads((tmp_path / "out.summary.json").read_text())["cut_off_by_max_tokens"] == (
        cut.height
    )


def send(url: str, body: Any) -> tuple[int, dict[str, Any]]:
    """POST a JSON body: (status, parsed answer), whatever the status."""
    status, data, _ = post_json(url, body)
    return status, data


def post(url: str, body: Any) -> dict[str, Any]:
    status, data = send(url, body)
    assert status == 200, data
    return data


def by_hand(endpoint: Endpoint, tools: ToolRunner, url: str, text: str) -> tuple[int, int]:
    """(prompt, completion) tokens of one row's two rounds, sent one by one."""
    payload = endpoint.item(Prompt([{"role": "user", "content": text}])).payload
    first = post(f"{url}/responses", payload)
    (answer,) = endpoint.answers(first, {}, [0])
    results = tools.call_all(list(answer.extra["tool_calls"]))
    second = post(f"{url}/responses", endpoint.follow_up(payload, answer, results))
    assert second["output"][0]["type"] == "message"
    rounds = (first["usage"], second["usage"])
    return sum(u["input_tokens"] for u in rounds), sum(u["output_tokens"] for u in rounds)


def test_tool_loop_runs_the_function_and_sums_usage_over_the_rounds(
    tmp_path: Path, sim: Server
) -> None:
    rows = texts(5)
    (tmp_path / "job.py").write_text(TOOLS_MODULE, encoding="utf-8")
    request = {**RESPONSES, "tools": [LOOKUP], "run_tools": True, "max_tokens": 100}
    job = write_job(tmp_path, rows, request=request)

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 5
    assert out["finish_reason"].to_list() == ["stop"] * 5
    assert out["response"].str.len_chars().min() > 0  # type: ignore[operator]
    # The calls the loop ran, with what the function returned, go with the final answer.
    for text in out["tool_calls"]:
        calls = orjson.loads(text)
        assert len(calls) == 1
        assert set(calls[0]) == {"id", "name", "arguments", "result"}
    assert len((tmp_path / "calls.txt").read_text().splitlines()) == 5
    assert sim.sim.stats.ok == 10, "two requests a row: the call, then the final answer"
    # The same rounds sent by hand: the row's usage is both rounds' usage added up.
    spec = RequestSpec.model_validate(request)
    endpoint = make_endpoint(spec, TemplateSpec(user="x"), sim.url, None, tmp_path)
    tools = ToolRunner.load(tmp_path / "job.py", ["lookup"])
    for row in out.iter_rows(named=True):
        prompt, completion = by_hand(endpoint, tools, sim.url, str(row["text"]))
        assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
        assert row["cost_usd"] > 0


def test_tool_calls_without_run_tools_are_the_answer(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(3), request={**RESPONSES, "tools": [LOOKUP]})

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["finish_reason"].to_list() == ["tool_calls"] * 3
    assert out["response"].null_count() == 3
    for calls in out["tool_calls"].to_list():
        (call,) = json.loads(calls)
        assert call["name"] == "lookup"
        assert call["id"].startswith("call_")
        assert isinstance(json.loads(call["arguments"])["city"], str)


@pytest.mark.parametrize(
    ("directive", "error_type", "complaint", "attempts"),
    [
        pytest.param(
            "<<sim:failed>>", "content_filter", "failed (invalid_prompt)", 1, id="failed-row"
        ),
        pytest.param(
            "<<sim:failedserver>>", "read", "failed (server_error)", 2, id="failed-retried"
        ),
        pytest.param(
            "<<sim:refusal>>", "invalid_response", "the model refused: I'm sorry", 1, id="refusal"
        ),
    ],
)
def test_unusable_responses_fail_their_row(
    tmp_path: Path, sim: Server, directive: str, error_type: str, complaint: str, attempts: int
) -> None:
    job = write_job(tmp_path, texts(3, directive), request=RESPONSES, limits={"max_attempts": 2})

    result = run_job(job, sim)

    assert result.exit_code == 1
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok", "failed", "ok"]
    failed = out.row(1, named=True)
    assert failed["error_type"] == error_type
    assert complaint in failed["error"]
    assert failed["attempts"] == attempts
    assert failed["http_status"] == 200
    if error_type != "read":  # the answer came and was billed: it is kept
        assert failed["prompt_tokens"] > 0


def test_many_flagged_rows_fail_one_by_one_without_halting_the_run(
    tmp_path: Path, sim: Server
) -> None:
    # More rows failing alike than would halt the run for a job error: flagged prompts
    # are each row's own content, so every row is tried and fails on its own.
    rows = [{"id": i, "text": f"row {i} <<sim:failed>>"} for i in range(30)]
    job = write_job(tmp_path, rows, request=RESPONSES, limits={"concurrency": 1})

    result = run_job(job, sim)

    assert result.exit_code == 1, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["failed"] * 30
    assert out["error_type"].unique().to_list() == ["content_filter"]
    assert sim.sim.stats.ok == 30


def test_content_filter_is_its_finish_reason(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, texts(3, "<<sim:filtered>>"), request=RESPONSES)

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["finish_reason"].to_list() == ["stop", "content_filter", "stop"]


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        pytest.param({"stop": ["END"]}, "stop is set, but", id="stop"),
        pytest.param({"seed": 7}, "seed is set, but", id="seed"),
        pytest.param({"max_tokens_param": "max_tokens"}, "max_tokens_param is set", id="param"),
        pytest.param({"max_tokens": 8}, "at least 16", id="max-tokens-under-16"),
    ],
)
def test_chat_only_settings_are_a_job_error_before_sending(
    tmp_path: Path, sim: Server, setting: dict[str, Any], complaint: str
) -> None:
    job = write_job(tmp_path, texts(2), request={**RESPONSES, **setting})

    result = run_job(job, sim)

    assert result.exit_code == 2
    assert complaint in result.output
    assert 'endpoint = "responses"' in result.output or "Responses API" in result.output
    assert sim.sim.stats.requests == 0


def test_answer_joins_text_parts_and_skips_other_items() -> None:
    spec = RequestSpec.model_validate(RESPONSES)
    endpoint = make_endpoint(spec, TemplateSpec(user="x"), "", None, Path("."))
    data = {
        "id": "resp_1",
        "status": "completed",
        "model": "gpt-4.1-mini-2025-04-14",
        "output": [
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {
                "type": "message",
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": "Hello, ", "annotations": []},
                    {"type": "output_text", "text": "world.", "annotations": []},
                ],
            },
        ],
        "usage": {
            "input_tokens": 20,
            "input_tokens_details": {"cached_tokens": 8},
            "output_tokens": 30,
            "output_tokens_details": {"reasoning_tokens": 12},
        },
    }

    (answer,) = endpoint.answers(data, {}, [20])

    assert answer.text == "Hello, world."
    assert answer.finish_reason == "stop"
    assert answer.request_id == "resp_1"
    assert answer.model == "gpt-4.1-mini-2025-04-14"
    usage = answer.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (20, 30)
    assert (usage.cached_tokens, usage.reasoning_tokens) == (8, 12)


STRICT_BREAKING = {"type": "object", "properties": {"a": {"type": "string"}}}
CALL = {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{}"}
OUTPUT = {"type": "function_call_output", "call_id": "call_1", "output": "4 C"}
USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("body", "param", "complaint"),
    [
        pytest.param({"stop": ["x"]}, "stop", "Unknown parameter", id="stop"),
        pytest.param({"seed": 1}, "seed", "Unknown parameter", id="seed"),
        pytest.param(
            {"response_format": {"type": "json_object"}}, "response_format", "text.format", id="rf"
        ),
        pytest.param({"input": None}, "input", "Missing required", id="no-input"),
        pytest.param({"input": []}, "input", "empty array", id="empty-input"),
        pytest.param(
            {"input": [{"role": "robot", "content": "hi"}]}, "input[0].role", "'robot'", id="role"
        ),
        pytest.param(
            {"input": [{"role": "assistant", "content": [{"type": "input_text", "text": "x"}]}]},
            "input[0].content[0].type",
            "'output_text'",
            id="assistant-input-text",
        ),
        pytest.param(
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "https://x"}]}
                ]
            },
            "input[0].content[0].detail",
            "Missing required",
            id="image-without-detail",
        ),
        pytest.param({"input": [USER, OUTPUT]}, "input", "No tool call found", id="orphan-output"),
        pytest.param({"input": [USER, CALL]}, "input", "No tool output found", id="unanswered"),
        pytest.param(
            {"max_output_tokens": 8}, "max_output_tokens", ">= 16", id="max-output-under-16"
        ),
        pytest.param(
            {
                "text": {
                    "format": {
                        "type": "json_schema",
                        "name": "a",
                        "schema": STRICT_BREAKING,
                        "strict": True,
                    }
                }
            },
            "text.format.schema",
            "additionalProperties",
            id="strict-schema",
        ),
        pytest.param(
            {"text": {"format": {"type": "json_object"}}}, "input", "'json'", id="json-unsaid"
        ),
        pytest.param(
            {"tools": [{"type": "function", "name": "a b", "parameters": None, "strict": None}]},
            "tools[0].name",
            "pattern",
            id="tool-name",
        ),
        pytest.param(
            {
                "tools": [
                    {"type": "function", "name": "a", "parameters": STRICT_BREAKING, "strict": True}
                ]
            },
            "tools[0].parameters",
            "additionalProperties",
            id="strict-tool",
        ),
        pytest.param(
            {"tool_choice": {"type": "function", "name": "nope"}},
            "tool_choice",
            "not found",
            id="tool-choice",
        ),
        pytest.param(
            {"previous_response_id": "resp_1"}, "previous_response_id", "not found", id="previous"
        ),
    ],
)
def test_simulator_refuses_what_the_api_refuses(
    sim: Server, body: dict[str, Any], param: str, complaint: str
) -> None:
    request = {"model": "gpt-4.1-mini", "input": "hi", **body}
    if request["input"] is None:
        del request["input"]

    status, answer = send(f"{sim.url}/responses", request)

    assert status == 400, answer
    assert answer["error"]["param"] == param
    assert complaint in answer["error"]["message"]
    assert sim.sim.stats.ok == 0


def test_simulator_answers_reasoning_models_with_a_reasoning_item(sim: Server) -> None:
    answer = post(f"{sim.url}/responses", {"model": "o3-mini", "input": "Think."})

    assert [item["type"] for item in answer["output"]] == ["reasoning", "message"]
    usage = answer["usage"]
    reasoning = usage["output_tokens_details"]["reasoning_tokens"]
    text = answer["output"][1]["content"][0]["text"]
    assert reasoning > 0
    assert usage["output_tokens"] == reasoning + len(text.split())
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_simulator_caches_a_repeated_long_instructions_prefix(sim: Server) -> None:
    instructions = "Answer carefully. " * 600  # over 1,024 tokens
    body = {"model": "gpt-4.1-mini", "instructions": instructions}

    first = post(f"{sim.url}/responses", {**body, "input": "one"})
    second = post(f"{sim.url}/responses", {**body, "input": "two"})

    assert first["usage"]["input_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["input_tokens_details"]["cached_tokens"]
    assert cached > 0
    assert cached % 128 == 0
