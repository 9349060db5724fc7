"""Anthropic's Messages API end to end: the adapter's bodies and answers against the
simulator's /v1/messages, Anthropic's errors, rate-limit headers and prices, and runs."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import (
    Server,
    in_virtual_time,
    invoke,
    post_json,
    read_output,
    run_job,
    serving,
    write_job,
)
from genai_prices import Usage as PriceUsage
from genai_prices import calc_price
from jsonschema import Draft202012Validator
from multidict import CIMultiDict
from PIL import Image

from pipeline.cost import make_pricer
from pipeline.dispatch import Dispatcher, RetryPolicy
from pipeline.endpoints import AnthropicMessages, Endpoint, make_endpoint, make_provider
from pipeline.errors import (
    Fatal,
    RateLimited,
    RequestFailure,
    RowFailed,
    RowProblem,
    ServerError,
    SpecError,
)
from pipeline.limits import Limiter, parse_timestamp
from pipeline.parse import AnswerCheck
from pipeline.prompt_images import anthropic_image_tokens
from pipeline.records import HttpRequest, HttpResponse, Prompt, Usage, Work
from pipeline.simulator import SimConfig, running_in_thread
from pipeline.spec import RequestSpec, TemplateSpec, ToolSpec
from pipeline.transport import AiohttpTransport, classify

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-anthropic-key-0123456789"
MODEL = "claude-haiku-4-5"
ANTHROPIC = {"provider": "anthropic", "model": MODEL}
WEATHER = ToolSpec(
    name="get_weather",
    description="The weather in a city now.",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
)
FACTS = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
    },
    "required": ["sentiment", "score"],
    "additionalProperties": False,
}


@pytest.fixture
def keyed() -> Iterator[Server]:
    """A simulator that wants KEY, in Anthropic's `x-api-key` on /v1/messages."""
    with serving(api_key=KEY) as server:
        yield server


def endpoint(schema: dict[str, Any] | None = None, **request: Any) -> Endpoint:
    spec = RequestSpec.model_validate({**ANTHROPIC, **request})
    return make_endpoint(spec, TemplateSpec(user="-"), "http://x/v1", schema, Path("."))


def body(ep: Endpoint, prompt: Prompt) -> dict[str, Any]:
    payload = ep.item(prompt).payload
    return orjson.loads(payload) if isinstance(payload, bytes) else dict(payload)


def user(text: str, system: str | None = None) -> Prompt:
    messages = [{"role": "system", "content": system}] if system else []
    return Prompt([*messages, {"role": "user", "content": text}])


def post(
    server: Server, payload: bytes | Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> tuple[int, Any, CIMultiDict[str]]:
    """POST to the simulator's /v1/messages with Anthropic's headers (or the ones given)."""
    if headers is None:
        headers = make_provider(RequestSpec.model_validate(ANTHROPIC)).headers(KEY)
    return post_json(f"{server.url}/messages", payload, headers)


def ask(server: Server, ep: Endpoint, prompt: Prompt) -> tuple[Any, dict[str, Any]]:
    """The adapter's request for `prompt`, answered by the simulator and read back."""
    item = ep.item(prompt)
    status, data, headers = post(server, item.payload)
    assert status == 200, data
    (answer,) = ep.answers(data, headers, [item.tokens])
    return answer, data


# --- the request body -------------------------------------------------------------------


def test_body_has_system_on_top_alternating_turns_and_anthropic_parameters(
    keyed: Server,
) -> None:
    ep = endpoint(
        max_tokens=200,
        temperature=0.3,
        top_p=0.9,
        stop="END",
        extra_body={"metadata": {"user_id": "u1"}, "top_k": 5},
    )
    prompt = Prompt(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "First."},
            {"role": "user", "content": "Second."},
            {"role": "assistant", "content": "Noted."},
            {"role": "developer", "content": "In English."},
            {"role": "user", "content": "Go."},
        ]
    )

    sent = body(ep, prompt)
    answer, data = ask(keyed, ep, prompt)

    assert sent == {
        "model": MODEL,
        "max_tokens": 200,
        "system": "Be brief.\n\nIn English.",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "First."},
                    {"type": "text", "text": "Second."},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Noted."}]},
            {"role": "user", "content": [{"type": "text", "text": "Go."}]},
        ],
        "temperature": 0.3,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u1"},
        "top_k": 5,
    }
    assert data["type"] == "message"
    assert data["id"].startswith("msg_")
    assert answer.text == data["content"][0]["text"]
    assert answer.text
    assert answer.finish_reason == "stop"
    assert answer.usage.prompt_tokens == data["usage"]["input_tokens"] > 0
    assert answer.usage.completion_tokens == data["usage"]["output_tokens"] > 0
    assert answer.request_id.startswith("req_")  # the request-id header, not the msg_ id
    assert answer.model == MODEL


def test_max_tokens_is_always_sent() -> None:
    ep = endpoint()

    assert body(ep, user("hi"))["max_tokens"] == 1024 == ep.max_output_tokens()
    assert "system" not in body(ep, user("hi"))


def test_images_go_first_in_the_last_user_turn(tmp_path: Path, keyed: Server) -> None:
    Image.new("RGB", (300, 200), "red").save(tmp_path / "red.png")
    ep = AnthropicMessages(RequestSpec.model_validate(ANTHROPIC), None, base_dir=tmp_path)
    url = "https://example.com/cat.jpg"
    prompt = Prompt([{"role": "user", "content": "What is this?"}], images=("red.png", url))

    item = ep.item(prompt)
    sent = orjson.loads(item.payload)
    answer, _ = ask(keyed, ep, prompt)

    (turn,) = sent["messages"]
    png = base64.b64encode((tmp_path / "red.png").read_bytes()).decode()
    assert turn["content"] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
        {"type": "image", "source": {"type": "url", "url": url}},
        {"type": "text", "text": "What is this?"},
    ]
    without = ep.item(Prompt([{"role": "user", "content": "What is this?"}])).tokens
    assert item.tokens == without + anthropic_image_tokens((300, 200)) + anthropic_image_tokens(
        None
    )
    assert answer.text


def test_an_image_of_a_type_anthropic_cannot_read_fails_the_row() -> None:
    bmp = "data:image/bmp;base64," + base64.b64encode(b"BM" + bytes(60)).decode()

    with pytest.raises(RowProblem, match="image/bmp; Anthropic reads image/jpeg"):
        endpoint().item(Prompt([{"role": "user", "content": "x"}], images=(bmp,)))


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        pytest.param({"seed": 7}, "`seed` is not a parameter", id="seed"),
        pytest.param({"temperature": 1.5}, "Anthropic takes 0 to 1", id="temperature-over-1"),
        pytest.param(
            {
                "tools": [WEATHER.model_dump(exclude_none=True)],
                "response_format": "json_schema",
                "json_schema": {"schema": FACTS},
            },
            "leaves no room for the job's own `tools`",
            id="json-schema-with-tools",
        ),
        pytest.param(
            {"response_format": "json_object", "extra_body": {"thinking": {"type": "enabled"}}},
            "refuses a forced tool with extended thinking",
            id="json-with-thinking",
        ),
    ],
)
def test_what_anthropic_would_refuse_on_every_row_is_a_job_error(
    request_: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        endpoint(FACTS if "json_schema" in request_ else None, **request_)


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        pytest.param("auto", {"type": "auto"}, id="auto"),
        pytest.param("none", {"type": "none"}, id="none"),
        pytest.param("required", {"type": "any"}, id="required-is-any"),
        pytest.param("get_weather", {"type": "tool", "name": "get_weather"}, id="by-name"),
    ],
)
def test_tools_and_tool_choice_in_anthropic_shape(
    keyed: Server, choice: str, expected: dict[str, Any]
) -> None:
    ep = endpoint(tools=[WEATHER.model_dump(exclude_none=True)], tool_choice=choice)

    sent = body(ep, user("Weather in Oslo?"))
    status, data, _ = post(keyed, sent)

    assert sent["tools"] == [
        {
            "name": "get_weather",
            "description": "The weather in a city now.",
            "input_schema": WEATHER.parameters,
        }
    ]
    assert sent["tool_choice"] == expected
    assert status == 200, data
    called = [b["type"] for b in data["content"]].count("tool_use")
    assert called == (0 if choice == "none" else 1)


def test_a_tool_call_is_read_and_its_result_sent_back(keyed: Server) -> None:
    ep = endpoint(tools=[WEATHER.model_dump(exclude_none=True)])
    prompt = user("Weather in Oslo?")

    answer, data = ask(keyed, ep, prompt)
    (call,) = answer.extra["tool_calls"]
    result = {"id": call["id"], "name": call["name"], "content": '{"temp_c": 4}'}
    follow = ep.follow_up(ep.item(prompt).payload, answer, [result])
    status, final, _ = post(keyed, follow)

    assert answer.finish_reason == "tool_calls"
    tool_use = next(b for b in data["content"] if b["type"] == "tool_use")
    assert call == {
        "id": tool_use["id"],
        "name": "get_weather",
        "arguments": json.dumps(tool_use["input"], separators=(",", ":")),
    }
    assert set(json.loads(call["arguments"])) == {"city"}
    assert follow["messages"][-2:] == [
        {"role": "assistant", "content": data["content"]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call["id"], "content": '{"temp_c": 4}'}
            ],
        },
    ]
    assert status == 200, final
    assert final["stop_reason"] == "end_turn"
    assert [b["type"] for b in final["content"]] == ["text"]


@pytest.mark.parametrize(
    ("request_", "schema", "tool"),
    [
        pytest.param(
            {"response_format": "json_schema", "json_schema": {"name": "facts", "schema": FACTS}},
            FACTS,
            "facts",
            id="json_schema",
        ),
        pytest.param({"response_format": "json_object"}, None, "json_answer", id="json_object"),
    ],
)
def test_json_answers_come_from_a_forced_tool(
    keyed: Server, request_: dict[str, Any], schema: dict[str, Any] | None, tool: str
) -> None:
    ep = endpoint(schema, **request_)

    sent = body(ep, user("Rate this: good."))
    answer, data = ask(keyed, ep, user("Rate this: good."))

    assert sent["tool_choice"] == {"type": "tool", "name": tool}
    assert [t["name"] for t in sent["tools"]] == [tool]
    assert data["stop_reason"] == "tool_use"
    assert answer.finish_reason == "stop"
    assert "tool_calls" not in answer.extra
    value = json.loads(answer.text)
    assert isinstance(value, dict)
    if schema is not None:
        assert list(Draft202012Validator(schema).iter_errors(value)) == []
    AnswerCheck(schema, json_object=schema is None)(answer)  # the run's own check passes


def message(content: list[dict[str, Any]], stop: str, **usage: int) -> dict[str, Any]:
    """An answer body as Anthropic documents it."""
    return {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": 100, "output_tokens": 20, **usage},
    }


TEXT = [{"type": "text", "text": "Hello"}]


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        pytest.param("end_turn", "stop", id="end_turn"),
        pytest.param("stop_sequence", "stop", id="stop_sequence"),
        pytest.param("max_tokens", "length", id="max_tokens"),
        pytest.param("tool_use", "tool_calls", id="tool_use"),
        pytest.param("pause_turn", "pause_turn", id="unknown-kept"),
    ],
)
def test_stop_reasons_map_to_finish_reasons(stop: str, finish: str) -> None:
    (answer,) = endpoint().answers(message(TEXT, stop), {}, [1])

    assert answer.finish_reason == finish
    assert answer.request_id == "msg_01XFDUDYJgAACzvnptvVoYEL"  # no request-id header


def test_a_refusal_fails_the_row_as_a_refusal() -> None:
    (answer,) = endpoint().answers(message(TEXT, "refusal"), {}, [1])

    assert (answer.text, answer.finish_reason) == (None, "content_filter")
    with pytest.raises(Exception, match="the model refused: Hello"):
        AnswerCheck(None)(answer)


def test_cache_reads_and_writes_count_in_the_prompt_and_apart() -> None:
    data = message(TEXT, "end_turn", cache_read_input_tokens=3000, cache_creation_input_tokens=500)

    (answer,) = endpoint().answers(data, {"request-id": "req_1"}, [1])

    assert answer.usage == Usage(
        prompt_tokens=100 + 3000 + 500,
        completion_tokens=20,
        cached_tokens=3000,
        cache_write_tokens=500,
    )
    assert answer.request_id == "req_1"


def test_the_simulator_caches_a_prefix_up_to_its_cache_control(keyed: Server) -> None:
    long = "Background for every row. " * 400  # about 2,600 tokens
    system = [{"type": "text", "text": long, "cache_control": {"type": "ephemeral"}}]
    ep = endpoint(extra_body={"system": system})

    first, _ = ask(keyed, ep, user("Row one."))
    second, _ = ask(keyed, ep, user("Row two, a little longer."))

    assert first.usage.cache_write_tokens > 1024
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens == first.usage.cache_write_tokens
    assert second.usage.cache_write_tokens == 0
    assert second.usage.prompt_tokens > second.usage.cached_tokens
    pricer = make_pricer(MODEL, None)
    assert pricer.cost(first.usage) > pricer.cost(second.usage)  # writing dearer than reading


# --- the simulator's dialect --------------------------------------------------------------


def error_of(data: Any) -> tuple[str, str]:
    assert data["type"] == "error"
    return data["error"]["type"], data["error"]["message"]


VERSION = {"anthropic-version": "2023-06-01"}


@pytest.mark.parametrize(
    ("headers", "status", "expected"),
    [
        pytest.param(
            VERSION, 401, ("authentication_error", "x-api-key header is required"), id="no-key"
        ),
        pytest.param(
            {"x-api-key": "wrong-anthropic-key", **VERSION},
            401,
            ("authentication_error", "invalid x-api-key"),
            id="wrong-key",
        ),
        pytest.param(
            {"authorization": f"Bearer {KEY}", **VERSION},
            401,
            ("authentication_error", "x-api-key header is required"),
            id="openai-bearer-is-not-anthropics",
        ),
        pytest.param(
            {"x-api-key": KEY},
            400,
            ("invalid_request_error", "anthropic-version: header is required"),
            id="no-version",
        ),
    ],
)
def test_the_simulator_wants_anthropics_headers(
    keyed: Server, headers: dict[str, str], status: int, expected: tuple[str, str]
) -> None:
    got, data, response_headers = post(keyed, body(endpoint(), user("hi")), headers)

    assert got == status
    assert error_of(data) == expected
    assert response_headers["request-id"].startswith("req_")
    assert "x-request-id" not in response_headers


OK_BODY = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"max_tokens": None}, "max_tokens: Field required", id="no-max-tokens"),
        pytest.param(
            {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]},
            'Unexpected role "system"',
            id="system-role",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            "roles must alternate",
            id="same-role-twice",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]},
            "text content blocks must be non-empty",
            id="empty-text-block",
        ),
        pytest.param({"seed": 1}, "seed: Extra inputs are not permitted", id="openai-seed"),
        pytest.param(
            {"response_format": {"type": "json_object"}},
            "response_format: Extra inputs are not permitted",
            id="openai-response-format",
        ),
        pytest.param({"temperature": 1.5}, "temperature: Input should be", id="temperature"),
        pytest.param(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}],
                    },
                    {"role": "user", "content": "and?"},
                ]
            },
            "`tool_use` ids were found without `tool_result` blocks",
            id="unanswered-tool-use",
        ),
    ],
)
def test_the_simulator_checks_the_body_as_anthropic_does(
    keyed: Server, change: dict[str, Any], message: str
) -> None:
    sent = {k: v for k, v in {**OK_BODY, **change}.items() if v is not None}

    status, data, _ = post(keyed, sent)

    assert status == 400
    kind, text = error_of(data)
    assert kind == "invalid_request_error"
    assert message in text


def test_simulator_faults_speak_anthropic(keyed: Server) -> None:
    overloaded = post(keyed, {**OK_BODY, "messages": [{"role": "user", "content": "<<sim:529>>"}]})
    limited = post(keyed, {**OK_BODY, "messages": [{"role": "user", "content": "<<sim:429>>"}]})
    unknown = post(
        keyed, {**OK_BODY, "messages": [{"role": "user", "content": "<<sim:404model>>"}]}
    )
    broke = post(keyed, {**OK_BODY, "messages": [{"role": "user", "content": "<<sim:429quota>>"}]})

    assert overloaded[0] == 529
    assert error_of(overloaded[1]) == ("overloaded_error", "Overloaded")
    assert limited[0] == 429
    assert error_of(limited[1])[0] == "rate_limit_error"
    assert limited[2]["retry-after"] == "1"  # whole seconds, Anthropic's only wait header
    assert "retry-after-ms" not in limited[2]
    assert unknown[0] == 404
    assert error_of(unknown[1]) == ("not_found_error", f"model: {MODEL}")
    assert broke[0] == 402
    assert error_of(broke[1])[0] == "billing_error"


def test_rate_limit_headers_are_anthropics_with_rfc3339_resets() -> None:
    with running_in_thread(SimConfig(rpm=60, tpm=10_000)) as (url, simulator):
        _, _, headers = post(Server(url, simulator), OK_BODY)

    assert not [h for h in headers if h.lower().startswith("x-ratelimit")]
    assert headers["anthropic-ratelimit-requests-limit"] == "60"
    assert headers["anthropic-ratelimit-requests-remaining"] == "59"
    assert headers["anthropic-ratelimit-tokens-limit"] == "10000"
    reset = parse_timestamp(headers["anthropic-ratelimit-requests-reset"])
    assert reset is not None
    assert headers["anthropic-ratelimit-requests-reset"].endswith("Z")


# --- errors -------------------------------------------------------------------------------


def anthropic_error(status: int, type_: str, message: str, **headers: str) -> HttpResponse:
    data = {"type": "error", "error": {"type": type_, "message": message}}
    return HttpResponse(
        status,
        CIMultiDict({k.replace("_", "-"): v for k, v in headers.items()}),
        orjson.dumps(data),
    )


@pytest.mark.parametrize(
    ("response", "expected", "retry", "says"),
    [
        pytest.param(
            anthropic_error(529, "overloaded_error", "Overloaded"),
            ServerError,
            True,
            "Overloaded",
            id="529-overloaded",
        ),
        pytest.param(
            anthropic_error(500, "api_error", "Internal server error"),
            ServerError,
            True,
            "Internal",
            id="500-api-error",
        ),
        pytest.param(
            anthropic_error(429, "rate_limit_error", "Number of requests...", retry_after="7"),
            RateLimited,
            True,
            "rate limited",
            id="429-rate-limit",
        ),
        pytest.param(
            anthropic_error(401, "authentication_error", "invalid x-api-key"),
            Fatal,
            False,
            "invalid x-api-key",
            id="401-authentication",
        ),
        pytest.param(
            anthropic_error(403, "permission_error", "no access"),
            Fatal,
            False,
            "permission denied",
            id="403-permission",
        ),
        pytest.param(
            anthropic_error(402, "billing_error", "Your credit balance is too low"),
            Fatal,
            False,
            "credit balance",
            id="402-billing",
        ),
        pytest.param(
            anthropic_error(404, "not_found_error", "model: claude-nope"),
            Fatal,
            False,
            "unknown model (model: claude-nope): check `request.model`",
            id="404-model",
        ),
        pytest.param(
            anthropic_error(404, "not_found_error", "Not Found"),
            Fatal,
            False,
            "check --base-url",
            id="404-url",
        ),
        pytest.param(
            anthropic_error(
                400, "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"
            ),
            RowFailed,
            False,
            "prompt is too long",
            id="400-prompt-too-long",
        ),
        pytest.param(
            anthropic_error(413, "request_too_large", "Request exceeds the maximum size"),
            RowFailed,
            False,
            "maximum size",
            id="413-too-large",
        ),
    ],
)
def test_anthropic_errors_are_classified(
    response: HttpResponse, expected: type[RequestFailure], retry: bool, says: str
) -> None:
    failure = classify(response, endpoint(), request_tokens=500)

    assert type(failure) is expected
    assert failure is not None
    assert failure.should_retry is retry
    assert says in failure.message
    if isinstance(failure, ServerError):
        assert failure.slow_down is (response.status == 529)
    if isinstance(failure, RateLimited):
        assert failure.retry_after == 7.0


# --- rate limits --------------------------------------------------------------------------


def anthropic_headers(**values: str) -> CIMultiDict[str]:
    return CIMultiDict({f"anthropic-ratelimit-{k.replace('_', '-')}": v for k, v in values.items()})


def test_input_and_output_limits_are_learned_from_anthropics_headers_apart() -> None:
    limiter = Limiter(rpm=None, tpm=200_000)

    limiter.observe(
        anthropic_headers(
            requests_limit="1000",
            requests_remaining="999",
            input_tokens_limit="450000",
            input_tokens_remaining="449000",
            output_tokens_limit="90000",
            output_tokens_remaining="90000",
        ),
        tokens=500,
    )

    # Input is paced by the job's own 200,000 (under Anthropic's 450,000), output apart.
    assert (limiter.rpm, limiter.tpm, limiter.otpm) == (1000, 200_000, 90_000)
    assert limiter.paused_for == 0


def test_only_a_combined_token_limit_paces_input_and_output_together() -> None:
    limiter = Limiter(rpm=None, tpm=None)

    limiter.observe(anthropic_headers(requests_limit="50", tokens_limit="40000"), tokens=500)

    assert (limiter.rpm, limiter.tpm, limiter.otpm) == (50, 40_000, None)


def test_separate_output_limit_paces_each_side_at_its_own_rate() -> None:
    """1,000 input/s and 200 output/s: a 100-in, 20-out request fits 10 times a second
    on each side; charged whole against the output limit it would fit under 2."""
    headers = anthropic_headers(
        requests_limit="100000", input_tokens_limit="60000", output_tokens_limit="12000"
    )

    async def twenty(limiter: Limiter) -> None:
        for _ in range(20):
            await limiter.acquire(120, output=20)

    apart = in_virtual_time(twenty, headers=headers)
    together = in_virtual_time(twenty, tpm=12_000)  # both charged against the smaller

    assert apart == pytest.approx(20 / 9.85, rel=0.1)
    assert together == pytest.approx(20 * 120 / (200 * 0.985), rel=0.1)


@pytest.mark.parametrize(
    ("kind", "reset_in", "limit", "need", "pause"),
    [
        pytest.param("requests", 3, 600, 1, 0.1, id="requests-refill-before-reset"),
        pytest.param("requests", 0, 600, 1, 0.0, id="reset-already-passed"),
        pytest.param("tokens", 59, 6000, 300, 2.0, id="tokens-missing-200"),
        pytest.param("output-tokens", 1, 6000, 300, 1.0, id="output-tokens-reset-first"),
        pytest.param("input-tokens", None, 6000, 300, 2.0, id="unreadable-reset"),
    ],
)
def test_an_empty_anthropic_bucket_pauses_until_its_refill_or_reset(
    kind: str, reset_in: int | None, limit: int, need: int, pause: float
) -> None:
    now = [100.0]
    wall = 1_795_572_651.0  # 2026-11-25T02:10:51Z
    limiter = Limiter(rpm=None, tpm=None, clock=lambda: now[0], wall=lambda: wall)
    reset = "soon" if reset_in is None else _rfc3339(wall + reset_in)
    remaining = 0 if kind == "requests" else 100
    headers = anthropic_headers(requests_limit="600", requests_remaining="599")
    headers[f"anthropic-ratelimit-{kind}-limit"] = str(limit)
    headers[f"anthropic-ratelimit-{kind}-remaining"] = str(remaining)
    headers[f"anthropic-ratelimit-{kind}-reset"] = reset

    limiter.observe(headers, tokens=need)

    assert limiter.paused_for == pytest.approx(pause)


def _rfc3339(when: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_the_simulators_headers_pace_a_limiter_that_set_no_limits() -> None:
    with running_in_thread(SimConfig(rpm=600, tpm=1_000_000)) as (url, simulator):
        _, _, headers = post(Server(url, simulator), OK_BODY)

    async def twenty(limiter: Limiter) -> None:
        for _ in range(20):
            await limiter.acquire(1)

    # The 600 RPM the headers give: 10/s at 98.5%.
    assert in_virtual_time(twenty, headers=headers) == pytest.approx(20 / 9.85, rel=0.03)


def test_an_exhausted_simulator_bucket_pauses_the_limiter_until_the_refill() -> None:
    with running_in_thread(SimConfig(rpm=2)) as (url, simulator):
        server = Server(url, simulator)
        post(server, OK_BODY)
        _, _, headers = post(server, OK_BODY)  # the last request this minute allows
    limiter = Limiter(rpm=None, tpm=None)

    limiter.observe(headers, tokens=20)

    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert limiter.rpm == 2
    assert 29.0 <= limiter.paused_for <= 30.5  # one request refills in 30 s


# --- prices -------------------------------------------------------------------------------

# USD per million tokens (input, output, cache read, cache write) as genai-prices lists
# them, for Anthropic's published prices.
PRICES = {
    "claude-haiku-4-5": (1.0, 5.0, 0.10, 1.25),
    "claude-3-5-haiku": (0.8, 4.0, 0.08, 1.0),
    "claude-sonnet-4-5": (3.0, 15.0, 0.30, 3.75),  # under 200k prompt tokens
}


@pytest.mark.parametrize("model", list(PRICES))
def test_claude_usage_is_priced_with_cache_reads_cheaper_and_writes_dearer(model: str) -> None:
    usage = Usage(
        prompt_tokens=10_000, completion_tokens=500, cached_tokens=3_000, cache_write_tokens=2_000
    )
    input_, output, read, write = PRICES[model]

    cost = make_pricer(model, None).cost(usage)

    expected = (5_000 * input_ + 3_000 * read + 2_000 * write + 500 * output) / 1e6
    assert cost == pytest.approx(expected)
    genai = calc_price(
        PriceUsage(
            input_tokens=10_000,
            cache_read_tokens=3_000,
            cache_write_tokens=2_000,
            output_tokens=500,
        ),
        model_ref=model,
    )
    assert cost == pytest.approx(float(genai.total_price))
    plain = make_pricer(model, None).cost(Usage(prompt_tokens=10_000, completion_tokens=500))
    assert plain == pytest.approx((10_000 * input_ + 500 * output) / 1e6)


# --- runs ---------------------------------------------------------------------------------


def test_sample_job_runs_offline_with_every_row_ok_and_priced(tmp_path: Path) -> None:
    out = tmp_path / "anthropic.parquet"

    result = invoke(
        "run", ROOT / "jobs" / "anthropic_summarise.toml", "--simulate", "--output", out
    )

    assert result.exit_code == 0, result.output
    frame = read_output(out)
    assert frame.height == 50
    assert frame["status"].unique().to_list() == ["ok"]
    assert frame["finish_reason"].unique().to_list() == ["stop"]
    assert frame["model"].unique().to_list() == [MODEL]
    assert (frame["prompt_tokens"] > 0).all()
    assert (frame["completion_tokens"] > 0).all()
    assert frame["response"].str.len_chars().min() > 0  # type: ignore[operator]
    input_, output, _, _ = PRICES[MODEL]
    for row in frame.iter_rows(named=True):
        expected = (row["prompt_tokens"] * input_ + row["completion_tokens"] * output) / 1e6
        assert row["cost_usd"] == pytest.approx(expected)
    summary = json.loads(out.with_name("anthropic.summary.json").read_text())
    assert summary["cost_usd"] > 0
    assert summary["ok"] == 50


def rows(n: int, text: str = "") -> list[dict[str, object]]:
    return [{"id": i, "text": f"Weather in city {i}? {text}".strip()} for i in range(n)]


def run_anthropic(job: Path, server: Server, key: str = KEY, *args: str) -> Any:
    return run_job(job, server, *args, env={"ANTHROPIC_API_KEY": key})


def test_a_tool_calling_job_records_the_calls(tmp_path: Path, keyed: Server) -> None:
    job = write_job(
        tmp_path,
        rows(5),
        request={
            **ANTHROPIC,
            "tools": [WEATHER.model_dump(exclude_none=True)],
            "tool_choice": "required",
        },
    )

    result = run_anthropic(job, keyed)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 5
    assert out["finish_reason"].unique().to_list() == ["tool_calls"]
    for calls in out["tool_calls"]:
        (call,) = json.loads(calls)
        assert call["name"] == "get_weather"
        assert call["id"].startswith("toolu_")
        assert set(json.loads(call["arguments"])) == {"city"}


def test_a_tool_loop_runs_the_functions_and_sends_the_results_back(
    tmp_path: Path, keyed: Server
) -> None:
    (tmp_path / "job.py").write_text(
        "def get_weather(city):\n    return {'city': city, 'temp_c': 4}\n", encoding="utf-8"
    )
    job = write_job(
        tmp_path,
        rows(4),
        request={**ANTHROPIC, "tools": [WEATHER.model_dump(exclude_none=True)], "run_tools": True},
    )

    result = run_anthropic(job, keyed)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 4
    assert out["finish_reason"].unique().to_list() == ["stop"]
    # The calls the loop ran, with what the function returned, go with the final answer.
    for text in out["tool_calls"]:
        (call,) = orjson.loads(text)
        assert set(call) == {"id", "name", "arguments", "result"}
    assert keyed.sim.stats.ok == 8  # a call, then the answer, per row
    single = ask(
        keyed, endpoint(tools=[WEATHER.model_dump(exclude_none=True)]), user("Weather in city 0?")
    )[0]
    assert out["prompt_tokens"][0] > single.usage.prompt_tokens  # both rounds counted


def test_an_overload_529_is_retried_and_slows_the_limiter(keyed: Server) -> None:
    ep = endpoint(max_tokens=16)
    item = ep.item(user("Row <<sim:529:1>>"))
    spec = RequestSpec.model_validate(ANTHROPIC)
    headers = {**make_provider(spec).headers(KEY), "content-type": "application/json"}
    request = HttpRequest("POST", f"{keyed.url}/messages", headers, item.payload)
    limiter = Limiter(rpm=600, tpm=None)

    async def send() -> Any:
        async with AiohttpTransport(timeout_s=10, connect_timeout_s=5) as transport:
            dispatcher = Dispatcher(
                transport, ep, limiter, RetryPolicy(3, 0.01, 0.02), AnswerCheck(None)
            )
            return await dispatcher.send(
                Work((0,), request, item.tokens + 16, (1,), (item.tokens,))
            )

    outcome = asyncio.run(send())

    assert outcome.failure is None
    assert outcome.attempts == 2
    assert outcome.answers[0].text
    assert limiter.scale == 0.5  # halved by the 529; recovery waits RECOVERY_S
    assert keyed.sim.stats.faults == 1


def test_an_overloaded_row_recovers_in_a_run(tmp_path: Path, keyed: Server) -> None:
    job = write_job(tmp_path, rows(3, "<<sim:529:2>>"), request=ANTHROPIC)

    result = run_anthropic(job, keyed)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 3
    assert out["attempts"].to_list() == [3, 3, 3]


def test_a_wrong_key_halts_the_run_with_exit_code_4(tmp_path: Path, keyed: Server) -> None:
    job = write_job(tmp_path, rows(40), request=ANTHROPIC, limits={"concurrency": 2})

    result = run_anthropic(job, keyed, "wrong-anthropic-key-000000")

    assert result.exit_code == 4, result.output
    assert "authentication failed (invalid x-api-key)" in result.output
    assert keyed.sim.stats.requests <= 2  # stopped at the first answers, not 40 rows
    assert "wrong-anthropic-key-000000" not in result.output


def test_an_unknown_model_halts_naming_it(tmp_path: Path, keyed: Server) -> None:
    job = write_job(tmp_path, rows(3, "<<sim:404model>>"), request=ANTHROPIC)

    result = run_anthropic(job, keyed)

    assert result.exit_code == 4, result.output
    assert f"unknown model (model: {MODEL})" in result.output
