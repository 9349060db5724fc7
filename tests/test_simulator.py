"""The simulator over real sockets: shapes, determinism, limits, directives, faults."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import math
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import jsonschema
import orjson
import pytest

from pipeline.simulator import SimConfig, Simulator, count_text, running_in_thread
from pipeline.simulator.rate_limits import go_duration
from pipeline.tokens import text_counter

# Transcribed from the OpenAI OpenAPI description (components/schemas), keeping every
# required key and the type of each property the simulator sends. The spec is 3.1, so
# these are plain JSON Schema 2020-12.
NULL = {"type": "null"}
ERROR_RESPONSE = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message", "param", "code"],
            "properties": {
                "code": {"anyOf": [{"type": "string"}, NULL]},
                "message": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, NULL]},
                "type": {"type": "string"},
            },
        }
    },
}
COMPLETION_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "completion_tokens": {"type": "integer"},
        "prompt_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
        "completion_tokens_details": {
            "type": "object",
            "properties": {
                key: {"type": "integer"}
                for key in (
                    "accepted_prediction_tokens",
                    "audio_tokens",
                    "reasoning_tokens",
                    "rejected_prediction_tokens",
                )
            },
        },
        "prompt_tokens_details": {
            "type": "object",
            "properties": {
                "audio_tokens": {"type": "integer"},
                "cached_tokens": {"type": "integer"},
            },
        },
    },
}
CHAT_COMPLETION_RESPONSE = {
    "type": "object",
    "required": ["choices", "created", "id", "model", "object"],
    "properties": {
        "id": {"type": "string"},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["finish_reason", "index", "message", "logprobs"],
                "properties": {
                    "finish_reason": {
                        "type": "string",
                        "enum": ["stop", "length", "tool_calls", "content_filter", "function_call"],
                    },
                    "index": {"type": "integer"},
                    "message": {
                        "type": "object",
                        "required": ["role", "content", "refusal"],
                        "properties": {
                            "content": {"anyOf": [{"type": "string"}, NULL]},
                            "refusal": {"anyOf": [{"type": "string"}, NULL]},
                            "role": {"type": "string", "enum": ["assistant"]},
                        },
                    },
                    "logprobs": {"anyOf": [{"type": "object"}, NULL]},
                },
            },
        },
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "service_tier": {"type": "string"},
        "system_fingerprint": {"type": "string"},
        "object": {"type": "string", "enum": ["chat.completion"]},
        "usage": COMPLETION_USAGE,
    },
}
CREATE_EMBEDDING_RESPONSE = {
    "type": "object",
    "required": ["object", "model", "data", "usage"],
    "properties": {
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "object", "embedding"],
                "properties": {
                    "index": {"type": "integer"},
                    "embedding": {"type": "array", "items": {"type": "number"}},
                    "object": {"type": "string", "enum": ["embedding"]},
                },
            },
        },
        "model": {"type": "string"},
        "object": {"type": "string", "enum": ["list"]},
        "usage": {
            "type": "object",
            "required": ["prompt_tokens", "total_tokens"],
            "properties": {
                "prompt_tokens": {"type": "integer"},
                "total_tokens": {"type": "integer"},
            },
        },
    },
}
MODEL = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "created": {"type": "integer"},
        "object": {"type": "string", "enum": ["model"]},
        "owned_by": {"type": "string"},
    },
}
LIST_MODELS_RESPONSE = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"type": "string", "enum": ["list"]},
        "data": {"type": "array", "items": MODEL},
    },
}


def validate(instance: Any, schema: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(schema).validate(instance)


class FakeClock:
    """Time for the rate-limit buckets, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Client:
    """A simulator on the test's own loop and a session pointed at it."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, sim: Simulator) -> None:
        self.base_url = base_url
        self.session = session
        self.sim = sim

    async def post(
        self, path: str, body: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, Any]:
        """(status, parsed body, headers); the body is sent exactly as orjson writes it."""
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        async with self.session.post(self.base_url + path, data=raw, headers=all_headers) as resp:
            return resp.status, orjson.loads(await resp.read()), resp.headers

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        async with self.session.get(self.base_url + path, headers=headers) as resp:
            return resp.status, orjson.loads(await resp.read()), resp.headers

    async def chat(self, text: str = "hello", **params: Any) -> tuple[int, Any, Any]:
        return await self.post("/chat/completions", chat_body(text, **params))


def chat_body(text: str = "hello", **params: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    return body | params


@contextlib.asynccontextmanager
async def simulated(
    config: SimConfig | None = None, clock: Callable[[], float] | None = None
) -> AsyncIterator[Client]:
    config = config or SimConfig()
    sim = Simulator(config, clock=clock) if clock else Simulator(config)
    async with sim as base_url, aiohttp.ClientSession() as session:
        yield Client(base_url, session, sim)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def content(answer: dict[str, Any], index: int = 0) -> str:
    text = answer["choices"][index]["message"]["content"]
    assert isinstance(text, str)
    return text


# --- shapes -------------------------------------------------------------------------


def test_chat_completion_has_the_openapi_shape() -> None:
    async def scenario() -> None:
        async with simulated() as client:
            status, answer, headers = await client.chat("Summarise: the cat sat on the mat.")
        assert status == 200
        validate(answer, CHAT_COMPLETION_RESPONSE)
        assert answer["id"].startswith("chatcmpl-")
        assert answer["model"] == "gpt-4o-mini"
        assert answer["choices"][0]["message"]["refusal"] is None
        usage = answer["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert usage["completion_tokens"] == len(content(answer).split())
        assert headers["x-request-id"].startswith("req_")
        assert int(headers["openai-processing-ms"]) >= 0
        assert "x-ratelimit-limit-requests" not in headers  # no limits configured

    run(scenario())


def test_prompt_tokens_are_counted_as_openai_documents() -> None:
    # OpenAI's cookbook: "tiktoken is great!" is six cl100k_base tokens; each message
    # adds 4 (3 of framing, 1 of role) and the reply's priming 3.
    documented = [{"role": "user", "content": "tiktoken is great!"}]
    # A model whose encoding the simulator lacks: about four bytes of UTF-8 a token.
    heuristic: list[dict[str, object]] = [
        {"role": "system", "content": "x" * 10},  # ceil(10/4) + 4 = 7
        {"role": "user", "content": [{"type": "text", "text": "é" * 4}]},  # 8 bytes: 2 + 4
    ]

    async def scenario() -> None:
        async with simulated() as client:
            body = {"model": "gpt-4", "messages": documented}
            _, exact, _ = await client.post("/chat/completions", body)
            body = {"model": "local-llama", "messages": heuristic}
            _, estimated, _ = await client.post("/chat/completions", body)
        assert exact["usage"]["prompt_tokens"] == 6 + 4 + 3
        assert estimated["usage"]["prompt_tokens"] == 7 + 6 + 3

    run(scenario())


def test_answers_are_5_to_40_words_with_some_non_ascii() -> None:
    async def scenario() -> list[str]:
        async with simulated() as client:
            return [content((await client.chat(f"row {i}"))[1]) for i in range(60)]

    texts = run(scenario())
    assert all(5 <= len(text.split()) <= 40 for text in texts)
    assert any(not text.isascii() for text in texts)
    assert len(set(texts)) > 50


def test_same_seed_gives_same_answers_and_another_seed_differs() -> None:
    prompts = [f"question {i}" for i in range(5)]

    async def answers(seed: int) -> list[str]:
        async with simulated(SimConfig(seed=seed)) as client:
            return [content((await client.chat(p))[1]) for p in prompts]

    first, again, other = run(answers(3)), run(answers(3)), run(answers(4))
    assert first == again
    assert first != other


def test_max_tokens_cuts_the_answer_with_finish_reason_length() -> None:
    async def scenario() -> None:
        async with simulated() as client:
            _, free, _ = await client.chat("long")
            _, cut, _ = await client.chat("long", max_tokens=3)
            _, newer, _ = await client.chat("long", max_completion_tokens=3)
        assert free["choices"][0]["finish_reason"] == "stop"
        for answer in (cut, newer):
            assert answer["choices"][0]["finish_reason"] == "length"
            assert answer["usage"]["completion_tokens"] == 3
            assert len(content(answer).split()) == 3

    run(scenario())


def test_n_gives_n_choices_and_sums_their_tokens() -> None:
    async def scenario() -> None:
        async with simulated() as client:
            _, answer, _ = await client.chat("pick", n=3)
        assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
        words = sum(len(content(answer, i).split()) for i in range(3))
        assert answer["usage"]["completion_tokens"] == words

    run(scenario())


def test_reasoning_models_report_reasoning_tokens() -> None:
    async def scenario() -> None:
        async with simulated() as client:
            _, plain, _ = await client.chat("think", model="gpt-4o-mini")
            _, reasoned, _ = await client.chat("think", model="o3-mini")
            status, refused, _ = await client.chat("think", model="o3-mini", max_tokens=10)
        assert plain["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
        usage = reasoned["usage"]
        reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
        assert 0 < reasoning <= usage["completion_tokens"]
        assert (status, refused["error"]["param"]) == (400, "max_tokens")

    run(scenario())


def test_prompt_caching_reports_cached_tokens_for_a_repeated_long_system_prompt() -> None:
    system = {"role": "system", "content": "policy " * 1500}  # a token each: 1500 + 4

    async def scenario() -> None:
        async with simulated() as client:
            answers = []
            for question in ("first", "second"):
                messages = [system, {"role": "user", "content": question}]
                body = {"model": "gpt-4o-mini", "messages": messages}
                answers.append((await client.post("/chat/completions", body))[1]["usage"])
            await client.chat("short prompt")
            _, short_again, _ = await client.chat("short prompt")
        first, second = answers
        assert first["prompt_tokens_details"]["cached_tokens"] == 0
        expected = (second["prompt_tokens"] // 2) // 128 * 128
        assert second["prompt_tokens_details"]["cached_tokens"] == expected > 0
        assert short_again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

    run(scenario())


# --- JSON answers -------------------------------------------------------------------

ARTICLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["title", "year", "score", "draft", "nothing", "lang", "tags", "author", "note"],
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "score": {"type": "number"},
        "draft": {"type": "boolean"},
        "nothing": {"type": "null"},
        "lang": {"enum": ["en", "fr", "de"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "author": {"$ref": "#/$defs/person"},
        "note": {"anyOf": [{"type": "null"}, {"type": "string"}]},
        "editor": {"type": ["null", "object"], "properties": {"name": {"type": "string"}}},
    },
    "$defs": {
        "person": {
            "type": "object",
            "required": ["name", "age"],
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        }
    },
}


def json_schema_format(schema: dict[str, Any], *, strict: bool = False) -> dict[str, Any]:
    spec = {"name": "article", "schema": schema, "strict": strict}
    return {"type": "json_schema", "json_schema": spec}


def test_json_schema_answers_parse_and_match_the_schema() -> None:
    async def scenario() -> list[Any]:
        async with simulated() as client:
            fmt = json_schema_format(ARTICLE_SCHEMA)
            return [(await client.chat(f"row {i}", response_format=fmt))[1] for i in range(20)]

    for answer in run(scenario()):
        value = orjson.loads(content(answer))
        validate(value, ARTICLE_SCHEMA)
        assert 1 <= len(value["tags"]) <= 3
        assert isinstance(value["note"], str)  # anyOf: the first non-null option
        assert isinstance(value["editor"], dict)  # type list: the first non-null type
        assert answer["choices"][0]["finish_reason"] == "stop"


def test_json_schema_answer_cut_by_max_tokens_is_invalid_json_with_length() -> None:
    async def scenario() -> Any:
        async with simulated() as client:
            fmt = json_schema_format(ARTICLE_SCHEMA)
            return (await client.chat("row", response_format=fmt, max_tokens=5))[1]

    answer = run(scenario())
    assert answer["choices"][0]["finish_reason"] == "length"
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(content(answer))


def test_json_object_answer_is_an_object() -> None:
    async def scenario() -> Any:
        async with simulated() as client:
            return (await client.chat("row", response_format={"type": "json_object"}))[1]

    value = orjson.loads(content(run(scenario())))
    assert isinstance(value["answer"], str)


@pytest.mark.parametrize(
    ("schema", "complaint"),
    [
        pytest.param(
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
            "additionalProperties",
            id="no-additional-properties",
        ),
        pytest.param(
            {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "required": [],
                "additionalProperties": False,
            },
            "Missing 'a'",
            id="property-not-required",
        ),
    ],
)
def test_strict_schema_that_openai_rejects_is_a_400(schema: dict[str, Any], complaint: str) -> None:
    async def scenario() -> tuple[int, Any, Any]:
        async with simulated() as client:
            return await client.chat("row", response_format=json_schema_format(schema, strict=True))

    status, body, _ = run(scenario())
    assert status == 400
    assert body["error"]["code"] == "invalid_json_schema"
    assert complaint in body["error"]["message"]


# --- request validation --------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        pytest.param("/chat/completions", b"{not json", None, id="chat-not-json"),
        pytest.param("/chat/completions", {"messages": []}, "model", id="chat-no-model"),
        pytest.param("/chat/completions", {"model": "m"}, "messages", id="chat-no-messages"),
        pytest.param(
            "/chat/completions",
            {"model": "m", "messages": [{"content": "hi"}]},
            "messages[0].role",
            id="chat-no-role",
        ),
        pytest.param(
            "/chat/completions", chat_body(max_tokens=0), "max_tokens", id="chat-max-tokens-0"
        ),
        pytest.param("/embeddings", {"input": "x"}, "model", id="embeddings-no-model"),
        pytest.param("/embeddings", {"model": "m"}, "input", id="embeddings-no-input"),
        pytest.param(
            "/embeddings",
            {"model": "text-embedding-3-small", "input": ["x"] * 2049},
            "input",
            id="embeddings-too-many-inputs",
        ),
    ],
)
def test_bad_requests_are_400_naming_the_field(path: str, body: Any, param: str | None) -> None:
    async def scenario() -> tuple[int, Any, Any]:
        async with simulated() as client:
            return await client.post(path, body)

    status, answer, _ = run(scenario())
    assert status == 400
    validate(answer, ERROR_RESPONSE)
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == param
    if param is not None:
        assert param.split("[")[0] in answer["error"]["message"]


def test_models_list_and_lookup_and_unknown_paths() -> None:
    async def scenario() -> None:
        async with simulated() as client:
            status, models, _ = await client.get("/models")
            assert status == 200
            validate(models, LIST_MODELS_RESPONSE)
            assert "o3-mini" in {m["id"] for m in models["data"]}
            status, model, _ = await client.get("/models/gpt-4o")
            assert status == 200
            validate(model, MODEL)
            status, missing, _ = await client.get("/models/gpt-9")
            assert (status, missing["error"]["code"]) == (404, "model_not_found")
            status, unknown, _ = await client.post("/chat/completion", chat_body())
            assert status == 404
            validate(unknown, ERROR_RESPONSE)
            assert unknown["error"]["code"] == "unknown_url"
            assert unknown["error"]["type"] == "invalid_request_error"

    run(scenario())


# --- embeddings -----------------------------------------------------------------------


def test_embeddings_shape_dimensions_and_determinism() -> None:
    async def scenario() -> None:
        async with simulated() as client:
            body = {"model": "text-embedding-3-small", "input": ["alpha", "beta"]}
            status, small, _ = await client.post("/embeddings", body)
            assert status == 200
            validate(small, CREATE_EMBEDDING_RESPONSE)
            _, alone, _ = await client.post("/embeddings", body | {"input": "beta"})
            _, large, _ = await client.post(
                "/embeddings", body | {"model": "text-embedding-3-large"}
            )
            _, short, _ = await client.post("/embeddings", body | {"dimensions": 256})
            _, tokens, _ = await client.post("/embeddings", body | {"input": [[1, 2, 3], [4]]})
        vectors = [item["embedding"] for item in small["data"]]
        assert [len(v) for v in vectors] == [1536, 1536]
        assert all(math.isclose(math.fsum(x * x for x in v), 1.0) for v in vectors)
        assert vectors[0] != vectors[1]
        assert alone["data"][0]["embedding"] == vectors[1]  # a text's vector, wherever it sits
        assert len(large["data"][0]["embedding"]) == 3072
        assert len(short["data"][0]["embedding"]) == 256
        assert small["usage"] == {"prompt_tokens": 2, "total_tokens": 2}  # a cl100k token each
        assert tokens["usage"]["prompt_tokens"] == 4

    run(scenario())


def test_embeddings_base64_is_little_endian_float32_of_the_same_vector() -> None:
    async def scenario() -> tuple[Any, Any]:
        async with simulated() as client:
            body = {"model": "text-embedding-3-small", "input": "alpha", "dimensions": 8}
            floats = (await client.post("/embeddings", body))[1]
            packed = (await client.post("/embeddings", body | {"encoding_format": "base64"}))[1]
            return floats, packed

    floats, packed = run(scenario())
    raw = base64.b64decode(packed["data"][0]["embedding"])
    decoded = struct.unpack("<8f", raw)
    assert decoded == pytest.approx(floats["data"][0]["embedding"], rel=1e-6)


# --- rate limits ------------------------------------------------------------------------


def test_rpm_limit_answers_429_with_openai_headers_once_the_bucket_is_empty() -> None:
    clock = FakeClock()

    async def scenario() -> None:
        async with simulated(SimConfig(rpm=3), clock) as client:
            for i in range(3):
                status, _, headers = await client.chat(f"row {i}")
                assert status == 200
            assert headers["x-ratelimit-limit-requests"] == "3"
            assert headers["x-ratelimit-remaining-requests"] == "0"
            assert headers["x-ratelimit-reset-requests"] == "1m0s"  # 3 requests at 20 s each
            status, body, headers = await client.chat("row 3")
            assert status == 429
            validate(body, ERROR_RESPONSE)
            assert body["error"]["type"] == "requests"
            assert body["error"]["code"] == "rate_limit_exceeded"
            assert body["error"]["message"].startswith("Rate limit reached for gpt-4o-mini")
            assert headers["retry-after-ms"] == "20000"
            assert headers["retry-after"] == "20"
            assert headers["x-request-id"].startswith("req_")
            clock.advance(20)
            status, _, headers = await client.chat("row 3")
            assert status == 200
            assert headers["x-ratelimit-reset-requests"] == "1m0s"
        assert (client.sim.stats.ok, client.sim.stats.rate_limited) == (4, 1)

    run(scenario())


def test_tpm_limit_charges_prompt_plus_max_tokens_and_not_rejected_requests() -> None:
    clock = FakeClock()
    # "hi": one o200k token + 4 + 3 = 8 prompt tokens; plus max_tokens 42 = 50 per request.

    async def scenario() -> None:
        async with simulated(SimConfig(tpm=100), clock) as client:
            for _ in range(2):
                status, _, headers = await client.chat("hi", max_tokens=42)
                assert status == 200
            assert headers["x-ratelimit-remaining-tokens"] == "0"
            assert headers["x-ratelimit-reset-tokens"] == "1m0s"
            for _ in range(3):  # refused requests must not dig the bucket deeper
                status, body, headers = await client.chat("hi", max_tokens=42)
                assert (status, body["error"]["type"]) == (429, "tokens")
                assert headers["retry-after-ms"] == "30000"  # 50 tokens at 100/60 per s
            clock.advance(15)
            assert (await client.chat("hi", max_tokens=42))[2]["retry-after-ms"] == "15000"
            clock.advance(15)
            status, _, headers = await client.chat("hi", max_tokens=42)
            assert status == 200
            assert headers["x-ratelimit-remaining-tokens"] == "0"
            # What the admitted requests were charged, for a bench to measure TPM used.
            assert client.sim.stats.as_dict()["tokens"] == 3 * 50

    run(scenario())


def test_request_larger_than_the_whole_tpm_limit_is_request_too_large() -> None:
    async def scenario() -> tuple[int, Any, Any]:
        async with simulated(SimConfig(tpm=100)) as client:
            return await client.chat("hi", max_tokens=500)

    status, body, headers = run(scenario())
    assert status == 429
    assert "Request too large" in body["error"]["message"]
    assert (body["error"]["type"], body["error"]["code"]) == ("tokens", "rate_limit_exceeded")
    assert "retry-after-ms" not in headers  # waiting cannot help


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        pytest.param(0, "0s", id="zero"),
        pytest.param(0.02, "20ms", id="ms"),
        pytest.param(1, "1s", id="one-second"),
        pytest.param(1.5, "1.5s", id="fraction"),
        pytest.param(360, "6m0s", id="minutes"),
        pytest.param(3723.25, "1h2m3.25s", id="hours"),
    ],
)
def test_reset_durations_are_go_style(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


# --- directives and faults ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "error_type", "code"),
    [
        pytest.param("400", 400, "invalid_request_error", None, id="400"),
        pytest.param(
            "400ctx", 400, "invalid_request_error", "context_length_exceeded", id="400ctx"
        ),
        pytest.param("401", 401, "invalid_request_error", "invalid_api_key", id="401"),
        pytest.param("403", 403, "permission_denied", None, id="403"),
        pytest.param("404model", 404, "invalid_request_error", "model_not_found", id="404model"),
        pytest.param("413", 413, "invalid_request_error", None, id="413"),
        pytest.param("422", 422, "invalid_request_error", None, id="422"),
        pytest.param("429", 429, "requests", "rate_limit_exceeded", id="429"),
        pytest.param("429quota", 429, "insufficient_quota", "insufficient_quota", id="429quota"),
        pytest.param("500", 500, "server_error", None, id="500"),
        pytest.param("500noretry", 500, "server_error", None, id="500noretry"),
        pytest.param("503", 503, "server_error", None, id="503"),
    ],
)
def test_directive_answers_with_the_openai_error(
    kind: str, status: int, error_type: str, code: str | None
) -> None:
    async def scenario() -> tuple[int, Any, Any]:
        async with simulated(SimConfig(rpm=1)) as client:
            await client.chat("use up the only request")
            return await client.chat(f"row <<sim:{kind}>>")  # directives skip the limiter

    got_status, body, headers = run(scenario())
    assert got_status == status
    validate(body, ERROR_RESPONSE)
    assert (body["error"]["type"], body["error"]["code"]) == (error_type, code)
    assert headers["x-request-id"].startswith("req_")
    if kind == "429":
        assert headers["retry-after-ms"] == "100"
    if kind == "500noretry":
        assert headers["x-should-retry"] == "false"
    if kind == "404model":
        assert "`gpt-4o-mini` does not exist" in body["error"]["message"]


def test_529_directive_is_an_anthropic_style_overload() -> None:
    async def scenario() -> tuple[int, Any, Any]:
        async with simulated() as client:
            return await client.chat("row <<sim:529>>")

    status, body, _ = run(scenario())
    assert status == 529
    assert body["error"]["type"] == "overloaded_error"


def test_counted_directive_fails_n_times_then_answers() -> None:
    async def scenario() -> None:
        async with simulated() as client:
            statuses = [(await client.chat("row 7 <<sim:500:2>>"))[0] for _ in range(3)]
            assert statuses == [500, 500, 200]
            other = [
                (await client.post("/embeddings", {"model": "e", "input": "x <<sim:503:1>>"}))[0]
                for _ in range(2)
            ]
            assert other == [503, 200]
            key = hashlib.sha256(orjson.dumps(chat_body("row 7 <<sim:500:2>>"))).hexdigest()
            assert client.sim.stats.by_body[key] == 3

    run(scenario())


def test_unknown_directive_is_a_400_listing_the_kinds() -> None:
    async def scenario() -> tuple[int, Any, Any]:
        async with simulated() as client:
            return await client.chat("row <<sim:teapot>>")

    status, body, _ = run(scenario())
    assert status == 400
    assert "teapot" in body["error"]["message"]
    assert "429quota" in body["error"]["message"]


async def send_raw(
    client: Client, text: str, client_timeout: aiohttp.ClientTimeout | None = None
) -> bytes:
    url = client.base_url + "/chat/completions"
    async with client.session.post(url, json=chat_body(text), timeout=client_timeout) as resp:
        assert resp.status == 200
        return await resp.read()


def test_reset_directive_drops_the_connection() -> None:
    async def scenario() -> None:
        async with simulated() as client:
            with pytest.raises(aiohttp.ClientConnectionError):
                await send_raw(client, "row <<sim:reset>>")
            assert await send_raw(client, "the next request is fine")

    run(scenario())


def test_truncated_directive_is_a_payload_error() -> None:
    async def scenario() -> None:
        async with simulated() as client:
            with pytest.raises(aiohttp.ClientPayloadError):
                await send_raw(client, "row <<sim:truncated>>")

    run(scenario())


def test_malformed_directive_is_a_200_that_does_not_parse() -> None:
    async def scenario() -> bytes:
        async with simulated() as client:
            return await send_raw(client, "row <<sim:malformed>>")

    body = run(scenario())
    assert body.startswith(b'{"id":"chatcmpl-')
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(body)


def test_slow_directive_trips_a_client_read_timeout() -> None:
    async def scenario() -> None:
        async with simulated() as client:
            with pytest.raises(asyncio.TimeoutError):
                await send_raw(client, "row <<sim:slow>>", aiohttp.ClientTimeout(sock_read=0.2))

    run(scenario())


def test_fault_rate_one_faults_every_request_with_the_configured_kind() -> None:
    async def scenario() -> None:
        async with simulated(SimConfig(fault_rate=1.0, faults=("503",))) as client:
            statuses = [(await client.chat(f"row {i}"))[0] for i in range(5)]
        assert statuses == [503] * 5
        assert client.sim.stats.faults == 5

    run(scenario())


def test_fault_sequence_is_reproducible_from_the_seed() -> None:
    config = SimConfig(seed=11, fault_rate=0.5, faults=("500", "503", "429"))

    async def statuses() -> list[int]:
        async with simulated(config) as client:
            return [(await client.chat(f"row {i}"))[0] for i in range(30)]

    first = run(statuses())
    assert first == run(statuses())
    assert {200, 500, 503, 429} <= set(first)


def test_injected_429_has_retry_after_ms_200() -> None:
    async def scenario() -> tuple[int, Any, Any]:
        async with simulated(SimConfig(fault_rate=1.0, faults=("429",))) as client:
            return await client.chat("row")

    status, body, headers = run(scenario())
    assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded")
    assert headers["retry-after-ms"] == "200"


# --- auth, stats, running ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param({}, 401, id="missing"),
        pytest.param({"Authorization": "Bearer sk-wrong-key-123"}, 401, id="wrong"),
        pytest.param({"Authorization": "Bearer sk-right"}, 200, id="bearer"),
        pytest.param({"api-key": "sk-right"}, 200, id="azure-style"),
    ],
)
def test_api_key_is_enforced_when_set(headers: dict[str, str], status: int) -> None:
    async def scenario() -> tuple[int, Any, Any]:
        async with simulated(SimConfig(api_key="sk-right")) as client:
            return await client.post("/chat/completions", chat_body(), headers)

    got, body, _ = run(scenario())
    assert got == status
    if status == 401:
        assert body["error"]["code"] == "invalid_api_key"
        assert "sk-wrong-key-123" not in body["error"]["message"]  # keys are masked


def test_stats_endpoint_counts_requests_per_body() -> None:
    with running_in_thread(SimConfig(rpm=2)) as (base_url, sim):

        async def scenario() -> Any:
            async with aiohttp.ClientSession() as session:
                client = Client(base_url, session, sim)
                for text in ("a", "a", "b", "c <<sim:500>>"):
                    await client.chat(text)
                await client.post("/chat/completions", b"not json")
                stats_url = base_url.removesuffix("/v1") + "/_sim/stats"
                async with client.session.get(stats_url) as resp:
                    return orjson.loads(await resp.read())

        stats = run(scenario())
    assert stats == sim.stats.as_dict()
    assert (stats["requests"], stats["ok"], stats["rate_limited"]) == (5, 2, 1)
    assert (stats["faults"], stats["errors"]) == (1, 1)
    key = hashlib.sha256(orjson.dumps(chat_body("a"))).hexdigest()
    assert stats["by_body"][key] == 2
    assert sum(stats["by_body"].values()) == 5


def test_stats_stamp_the_first_request_not_the_listing_before_it() -> None:
    """`first_request_at`: the wall clock of the first API call, which a benchmark
    subtracts its spawn time from; a client's `GET /models` check does not set it."""

    async def scenario() -> tuple[float | None, float, float | None, float, float | None]:
        async with simulated() as client:
            await client.get("/models")
            listed = client.sim.stats.first_request_at
            before = time.time()
            await client.chat("first")
            after = time.time()
            first = client.sim.stats.first_request_at
            await client.chat("second")
            return listed, before, first, after, client.sim.stats.as_dict()["first_request_at"]

    listed, before, first, after, reported = run(scenario())
    assert listed is None
    assert first is not None
    assert before <= first <= after
    assert reported == first, "a later request leaves the stamp as it was"


def test_track_bodies_off_still_counts_directive_bodies() -> None:
    async def scenario() -> Simulator:
        async with simulated(SimConfig(track_bodies=False)) as client:
            await client.chat("plain")
            await client.chat("x <<sim:500:1>>")
            assert (await client.chat("x <<sim:500:1>>"))[0] == 200
            return client.sim

    sim = run(scenario())
    assert list(sim.stats.by_body.values()) == [2]


def test_serve_prints_its_url_and_stops_on_sigterm() -> None:
    code = "from pipeline.simulator import SimConfig, serve; serve(SimConfig(), port=0)"
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("simulator listening on http://127.0.0.1:")
        assert line.rstrip().endswith("/v1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.parametrize(
    ("config", "complaint"),
    [
        pytest.param({"fault_rate": 1.5}, "fault_rate", id="rate-above-one"),
        pytest.param({"faults": ("500", "boom")}, "boom", id="unknown-kind"),
        pytest.param({"rpm": 0}, "rpm", id="zero-rpm"),
    ],
)
def test_bad_config_is_refused(config: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        SimConfig(**config)


def test_the_simulator_imports_nothing_of_the_client() -> None:
    # In a fresh interpreter: serve one chat request, then list what was imported.
    code = """
import json, sys, urllib.request
from pipeline.simulator import SimConfig, running_in_thread
body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
with running_in_thread(SimConfig()) as (base_url, sim):
    request = urllib.request.Request(
        base_url + "/chat/completions", json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=10).read()
print(" ".join(sorted(m for m in sys.modules if m.startswith("pipeline"))))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = done.stdout.split()

    assert "pipeline.simulator.chat" in loaded
    assert [m for m in loaded if m != "pipeline" and not m.startswith("pipeline.simulator")] == []


@pytest.mark.parametrize(
    "model",
    ["gpt-4o-mini", "gpt-4.1", "o3-mini", "gpt-4", "gpt-35-turbo", "text-embedding-3-small",
     "ft:gpt-4o-mini:org::id", "claude-3-5-haiku", "llama3", ""],
)  # fmt: skip
def test_the_simulator_counts_text_as_the_client_does(model: str) -> None:
    # Written apart (the simulator imports nothing of the client), they must still agree:
    # the client calibrates its limiter from the usage the simulator reports.
    texts = ["", "Hello, world", "café naïve Straße 日本 данные θάλασσα " * 40, "{}\n\t" * 7]

    assert [count_text(t, model) for t in texts] == [text_counter(model)(t) for t in texts]
