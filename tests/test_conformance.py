"""Every request body we build validates against the official OpenAI OpenAPI description.

The description lives beside the repository (../shared/reference/openai-openapi/); where
it is absent these tests skip, saying so.
"""

from __future__ import annotations

import contextlib
import email.message
import email.parser
import email.policy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession, web
from conftest import invoke, post_json, serving_app
from jsonschema import Draft202012Validator, ValidationError, validators
from PIL import Image
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from pipeline.endpoints import Endpoint, make_endpoint
from pipeline.records import Answer, Prompt, Usage
from pipeline.simulator import SimConfig, running_in_thread
from pipeline.spec import RequestSpec, TemplateSpec

SPEC = (
    Path(__file__).resolve().parents[2] / "shared" / "reference" / "openai-openapi" / "openapi.yaml"
)
URI = "urn:openai-openapi"


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    if not SPEC.exists():
        pytest.skip(f"the OpenAPI description is not at {SPEC}")
    yaml = pytest.importorskip("yaml")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with SPEC.open("rb") as handle:
        spec: dict[str, Any] = yaml.load(handle, Loader=loader)
    return spec


def validator(openapi: dict[str, Any], name: str) -> Draft202012Validator:
    """A validator for components/schemas/NAME, its $refs resolved within the document."""
    resource = Resource.from_contents(openapi, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(URI, resource)
    return Draft202012Validator({"$ref": f"{URI}#/components/schemas/{name}"}, registry=registry)


SCHEMA = {
    "type": "object",
    "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative"]}},
    "required": ["sentiment"],
    "additionalProperties": False,
}
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Summarise: ünïcödé text"},
]


def body_of(endpoint: Endpoint, prompt: Prompt | None = None) -> Any:
    """The JSON body the endpoint sends for one row."""
    body, _ = endpoint.encode([endpoint.item(prompt or Prompt(MESSAGES)).payload])
    return orjson.loads(body)


@pytest.mark.parametrize(
    ("request_spec", "base_url"),
    [
        pytest.param({"model": "gpt-4o-mini"}, "https://api.openai.com/v1", id="minimal"),
        pytest.param(
            {
                "model": "gpt-4o-mini",
                "max_tokens": 64,
                "temperature": 0.2,
                "top_p": 0.9,
                "stop": ["\n\n", "END"],
                "seed": 7,
            },
            "https://api.openai.com/v1",
            id="sampling-parameters",
        ),
        pytest.param(
            {"model": "gpt-4o-mini", "max_tokens": 64, "stop": "END"},
            "http://127.0.0.1:8000/v1",
            id="max-tokens-for-compatible-servers",
        ),
        pytest.param(
            {"model": "gpt-4o-mini", "response_format": "json_object"},
            "https://api.openai.com/v1",
            id="json-object",
        ),
        pytest.param(
            {
                "model": "gpt-4o-mini",
                "response_format": "json_schema",
                "json_schema": {"name": "facts", "schema": SCHEMA},
            },
            "https://api.openai.com/v1",
            id="json-schema",
        ),
        pytest.param(
            {"model": "gpt-4o-mini", "extra_body": {"logprobs": True, "top_logprobs": 2}},
            "https://api.openai.com/v1",
            id="extra-body",
        ),
    ],
)
def test_chat_completion_bodies_match_the_openapi_description(
    openapi: dict[str, Any], request_spec: dict[str, Any], base_url: str
) -> None:
    spec = RequestSpec.model_validate(request_spec)
    schema = SCHEMA if spec.response_format == "json_schema" else None
    body = body_of(make_endpoint(spec, TemplateSpec(user="x"), base_url, schema, Path(".")))

    errors = list(validator(openapi, "CreateChatCompletionRequest").iter_errors(body))

    assert not errors, [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def test_an_invalid_body_is_caught(openapi: dict[str, Any]) -> None:
    """The validator is live: a body OpenAI would refuse fails it."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "robot", "content": "hi"}]}

    assert list(validator(openapi, "CreateChatCompletionRequest").iter_errors(body))


# --- Responses API -------------------------------------------------------------------


def discriminated_validator(openapi: dict[str, Any], name: str) -> Draft202012Validator:
    """Like `validator`, but a `oneOf` that names a `discriminator` takes any one match.

    OpenAPI picks a discriminated oneOf's branch by the discriminator property; JSON
    Schema's oneOf demands exactly one match, which the Responses schemas cannot give:
    a message with content parts is both an EasyInputMessage and an InputMessage.
    """
    one_of = Draft202012Validator.VALIDATORS["oneOf"]

    def discriminated(
        validator: Any, choices: list[Any], instance: Any, schema: dict[str, Any]
    ) -> Iterator[ValidationError]:
        if "discriminator" not in schema:
            yield from one_of(validator, choices, instance, schema)
            return
        if not any(
            next(validator.descend(instance, choice, schema_path=i), None) is None
            for i, choice in enumerate(choices)
        ):
            yield ValidationError(f"{instance!r} matches none of the discriminated schemas")

    # `extend` has no annotations, in typeshed's types-jsonschema stubs too (4.26).
    extended = validators.extend(Draft202012Validator, {"oneOf": discriminated})  # type: ignore[no-untyped-call]
    resource = Resource.from_contents(openapi, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(URI, resource)
    checker: Draft202012Validator = extended(
        {"$ref": f"{URI}#/components/schemas/{name}"}, registry=registry
    )
    return checker


def problems(checker: Draft202012Validator, instance: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in checker.iter_errors(instance)
    ]


TOOL = {
    "name": "lookup",
    "description": "Find a city's weather.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
RESPONSES = {"model": "gpt-4.1-mini", "endpoint": "responses"}


def responses_endpoint(request_spec: dict[str, Any]) -> Endpoint:
    spec = RequestSpec.model_validate({**RESPONSES, **request_spec})
    schema = SCHEMA if spec.response_format == "json_schema" else None
    return make_endpoint(
        spec, TemplateSpec(user="x"), "https://api.openai.com/v1", schema, Path(".")
    )


@pytest.mark.parametrize(
    "request_spec",
    [
        pytest.param({}, id="minimal"),
        pytest.param({"max_tokens": 64, "temperature": 0.2, "top_p": 0.9}, id="sampling"),
        pytest.param(
            {"response_format": "json_schema", "json_schema": {"name": "facts", "schema": SCHEMA}},
            id="json-schema",
        ),
        pytest.param({"response_format": "json_object"}, id="json-object"),
        pytest.param({"tools": [TOOL], "tool_choice": "auto"}, id="tools"),
        pytest.param({"tools": [TOOL], "tool_choice": "lookup"}, id="tool-choice-named"),
        pytest.param({"tools": [{**TOOL, "strict": True}]}, id="strict-tool"),
        pytest.param({"extra_body": {"store": True, "metadata": {"job": "x"}}}, id="extra-body"),
    ],
)
def test_responses_bodies_match_the_openapi_description(
    openapi: dict[str, Any], request_spec: dict[str, Any]
) -> None:
    body = body_of(responses_endpoint(request_spec))

    assert not problems(discriminated_validator(openapi, "CreateResponse"), body)
    assert body["instructions"] == "Be brief."
    assert body["store"] is (request_spec.get("extra_body", {}).get("store", False))


def test_responses_body_with_images_matches_the_openapi_description(
    openapi: dict[str, Any], tmp_path: Path
) -> None:
    Image.new("RGB", (64, 32), "red").save(tmp_path / "red.png")
    endpoint = responses_endpoint({})
    endpoint.base_dir = tmp_path
    prompt = Prompt(MESSAGES, images=("https://example.com/cat.jpg", "red.png"))

    body = body_of(endpoint, prompt)

    assert not problems(discriminated_validator(openapi, "CreateResponse"), body)
    parts = body["input"][-1]["content"]
    assert [p["type"] for p in parts] == ["input_text", "input_image", "input_image"]
    assert parts[2]["image_url"].startswith("data:image/png;base64,")


def test_responses_tool_follow_up_matches_the_openapi_description(
    openapi: dict[str, Any],
) -> None:
    endpoint = responses_endpoint({"tools": [TOOL]})
    payload = endpoint.item(Prompt(MESSAGES)).payload
    call = {"id": "call_1", "name": "lookup", "arguments": '{"city": "Oslo"}'}
    answer = Answer("Looking.", "tool_calls", Usage(), None, None, extra={"tool_calls": [call]})

    body = endpoint.follow_up(payload, answer, [{**call, "content": '{"temp_c": 4}'}])

    assert not problems(discriminated_validator(openapi, "CreateResponse"), body)
    kinds = [i.get("type", i.get("role")) for i in body["input"][-3:]]
    assert kinds == ["assistant", "function_call", "function_call_output"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"input": [{"role": "robot", "content": "hi"}]}, id="bad-role"),
        pytest.param({"input": "hi", "max_output_tokens": 8}, id="max-output-under-16"),
        pytest.param(
            {"input": [{"type": "function_call_output", "call_id": "c1"}]}, id="output-missing"
        ),
        pytest.param(
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            id="image-without-detail",
        ),
    ],
)
def test_an_invalid_responses_body_is_caught(openapi: dict[str, Any], body: dict[str, Any]) -> None:
    """The relaxed oneOf still refuses what OpenAI would refuse."""
    checker = discriminated_validator(openapi, "CreateResponse")

    assert problems(checker, {"model": "gpt-4.1-mini", **body})


def post(url: str, body: Any) -> Any:
    status, answer, _ = post_json(url, body)
    assert status == 200, answer
    return answer


@pytest.mark.parametrize(
    ("request_spec", "text", "status"),
    [
        pytest.param({}, "Summarise: a quiet river.", "completed", id="text"),
        pytest.param(
            {"response_format": "json_schema", "json_schema": {"name": "facts", "schema": SCHEMA}},
            "Summarise.",
            "completed",
            id="json-schema",
        ),
        pytest.param({"tools": [TOOL]}, "Weather in Oslo?", "completed", id="function-call"),
        pytest.param({"model": "o3-mini", "max_tokens": 16}, "Think.", "incomplete", id="cut"),
        pytest.param({}, "<<sim:refusal>>", "completed", id="refusal"),
        pytest.param({}, "<<sim:failed>>", "failed", id="failed"),
    ],
)
def test_simulated_responses_match_the_openapi_description(
    openapi: dict[str, Any], request_spec: dict[str, Any], text: str, status: str
) -> None:
    endpoint = responses_endpoint(request_spec)
    body, _ = endpoint.encode([endpoint.item(Prompt([{"role": "user", "content": text}])).payload])

    with running_in_thread(SimConfig()) as (url, _):
        answer = post(f"{url}/responses", body)

    assert not problems(discriminated_validator(openapi, "Response"), answer)
    assert answer["status"] == status


# --- images and audio -----------------------------------------------------------------

AUDIO = Path(__file__).resolve().parents[1] / "samples" / "audio" / "a440.wav"
IMAGE_PROMPT = Prompt([{"role": "user", "content": "A red fox asleep in fresh snow"}])


@pytest.mark.parametrize(
    "request_spec",
    [
        pytest.param({"model": "gpt-image-1"}, id="gpt-image-minimal"),
        pytest.param(
            {"model": "gpt-image-1", "size": "1536x1024", "quality": "low"}, id="gpt-image-sized"
        ),
        pytest.param(
            {
                "model": "gpt-image-1",
                "extra_body": {"output_format": "webp", "background": "transparent"},
            },
            id="gpt-image-extra-body",
        ),
        pytest.param(
            {"model": "dall-e-3", "size": "1792x1024", "quality": "hd"}, id="dall-e-3-asks-b64"
        ),
    ],
)
def test_image_bodies_match_the_openapi_description(
    openapi: dict[str, Any], request_spec: dict[str, Any]
) -> None:
    spec = RequestSpec.model_validate({"endpoint": "images.generations", **request_spec})
    template = TemplateSpec(user="x")
    endpoint = make_endpoint(spec, template, "https://api.openai.com/v1", None, Path("."))
    body = body_of(endpoint, IMAGE_PROMPT)

    errors = list(validator(openapi, "CreateImageRequest").iter_errors(body))

    assert not errors, [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    assert body["prompt"] == "A red fox asleep in fresh snow"
    assert body["n"] == 1
    # GPT image models refuse response_format; DALL-E must be asked for base64.
    assert body.get("response_format") == ("b64_json" if spec.model == "dall-e-3" else None)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"model": "gpt-image-1"}, id="no-prompt"),
        pytest.param({"model": "gpt-image-1", "prompt": "x", "n": 11}, id="n-over-10"),
        pytest.param({"model": "dall-e-3", "prompt": "x", "quality": "ultra"}, id="bad-quality"),
    ],
)
def test_an_invalid_image_body_is_caught(openapi: dict[str, Any], body: dict[str, Any]) -> None:
    assert list(validator(openapi, "CreateImageRequest").iter_errors(body))


def form_fields(openapi: dict[str, Any], body: bytes, content_type: str) -> dict[str, Any]:
    """A multipart body parsed back (by the standard library) into the request's fields.

    The file is a string of its bytes, as the description types it (string, binary),
    and is also kept whole under `_upload`; `name[]` parts make an array; numbers are
    numbers where the description says so.
    """
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    assert isinstance(message, email.message.EmailMessage)
    declared = openapi["components"]["schemas"]["CreateTranscriptionRequest"]["properties"]
    form: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        assert isinstance(name, str)
        raw = part.get_payload(decode=True)
        assert isinstance(raw, bytes)
        if part.get_filename() is not None:
            form[name] = raw.decode("latin-1")
            form["_upload"] = (part.get_filename(), part.get_content_type(), raw)
        elif name.endswith("[]"):
            form.setdefault(name[:-2], []).append(raw.decode())
        elif declared.get(name, {}).get("type") in ("number", "integer", "boolean"):
            form[name] = orjson.loads(raw)
        else:
            form[name] = raw.decode()
    return form


@pytest.mark.parametrize(
    ("request_spec", "user"),
    [
        pytest.param({"model": "whisper-1"}, None, id="whisper-minimal"),
        pytest.param(
            {"model": "gpt-4o-transcribe", "language": "en", "temperature": 0.2},
            "Names: Zoë, Siobhán",
            id="language-temperature-prompt",
        ),
        pytest.param(
            {
                "model": "whisper-1",
                "extra_body": {
                    "response_format": "verbose_json",
                    "timestamp_granularities": ["word", "segment"],
                },
            },
            None,
            id="extra-body-arrays",
        ),
        pytest.param(
            {"model": "gpt-4o-transcribe", "extra_body": {"include": ["logprobs"]}},
            None,
            id="include-logprobs",
        ),
    ],
)
def test_transcription_forms_match_the_openapi_description(
    openapi: dict[str, Any], request_spec: dict[str, Any], user: str | None
) -> None:
    spec = RequestSpec.model_validate({"endpoint": "audio.transcriptions", **request_spec})
    template = TemplateSpec(file="{{ path }}", user=user)
    endpoint = make_endpoint(spec, template, "https://api.openai.com/v1", None, Path("."))
    prompt = Prompt([{"role": "user", "content": user or ""}], file=str(AUDIO))
    body, content_type = endpoint.encode([endpoint.item(prompt).payload])

    form = form_fields(openapi, body, content_type)
    filename, file_type, raw = form.pop("_upload")
    errors = list(validator(openapi, "CreateTranscriptionRequest").iter_errors(form))

    assert not errors, [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    assert content_type.startswith("multipart/form-data; boundary=")
    assert (filename, file_type, raw) == ("audio.wav", "audio/wav", AUDIO.read_bytes())
    assert form["model"] == spec.model
    assert form.get("prompt") == user
    expected = request_spec.get("extra_body", {}).get("response_format", "json")
    assert form["response_format"] == expected


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"model": None}, id="no-model"),
        pytest.param({"response_format": "yaml"}, id="bad-response-format"),
        pytest.param({"voice": "alloy"}, id="unknown-field"),
    ],
)
def test_an_invalid_transcription_form_is_caught(
    openapi: dict[str, Any], change: dict[str, Any]
) -> None:
    form = {"file": "RIFF....WAVE", "model": "whisper-1", "response_format": "json", **change}
    form = {k: v for k, v in form.items() if v is not None}

    assert list(validator(openapi, "CreateTranscriptionRequest").iter_errors(form))


# --- chat completions: tools, images, tool follow-ups ----------------------------------


def chat_endpoint(request_spec: dict[str, Any], base_dir: Path = Path(".")) -> Endpoint:
    spec = RequestSpec.model_validate({"model": "gpt-4o-mini", **request_spec})
    template = TemplateSpec(user="x", image_detail="high")
    return make_endpoint(spec, template, "https://api.openai.com/v1", None, base_dir)


@pytest.mark.parametrize(
    "request_spec",
    [
        pytest.param({"tools": [TOOL]}, id="tools"),
        pytest.param({"tools": [TOOL], "tool_choice": "auto"}, id="tool-choice-auto"),
        pytest.param({"tools": [TOOL], "tool_choice": "required"}, id="tool-choice-required"),
        pytest.param({"tools": [TOOL], "tool_choice": "none"}, id="tool-choice-none"),
        pytest.param({"tools": [TOOL], "tool_choice": "lookup"}, id="tool-choice-named"),
        pytest.param({"tools": [{**TOOL, "strict": True}]}, id="strict-tool"),
        pytest.param({"tools": [{"name": "ping"}]}, id="tool-without-parameters"),
    ],
)
def test_chat_bodies_with_tools_match_the_openapi_description(
    openapi: dict[str, Any], request_spec: dict[str, Any]
) -> None:
    body = body_of(chat_endpoint(request_spec))

    assert not problems(discriminated_validator(openapi, "CreateChatCompletionRequest"), body)
    assert body["tools"][0]["type"] == "function"


def test_chat_body_with_images_matches_the_openapi_description(
    openapi: dict[str, Any], tmp_path: Path
) -> None:
    Image.new("RGB", (64, 32), "red").save(tmp_path / "red.png")
    Image.new("RGB", (10, 10), "blue").save(tmp_path / "blue.jpg")
    prompt = Prompt(MESSAGES, images=("https://example.com/cat.jpg", "red.png", "blue.jpg"))

    body = body_of(chat_endpoint({}, tmp_path), prompt)

    assert not problems(discriminated_validator(openapi, "CreateChatCompletionRequest"), body)
    parts = body["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url", "image_url"]
    assert parts[1]["image_url"] == {"url": "https://example.com/cat.jpg", "detail": "high"}
    assert parts[2]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[3]["image_url"]["url"].startswith("data:image/jpeg;base64,")


@pytest.mark.parametrize(
    "text", [pytest.param(None, id="no-text"), pytest.param("Let me look.", id="with-text")]
)
def test_chat_tool_follow_up_matches_the_openapi_description(
    openapi: dict[str, Any], text: str | None
) -> None:
    endpoint = chat_endpoint({"tools": [TOOL]})
    payload = endpoint.item(Prompt(MESSAGES)).payload
    calls = [
        {"id": "call_1", "name": "lookup", "arguments": '{"city": "Oslo"}'},
        {"id": "call_2", "name": "lookup", "arguments": '{"city": "Lima"}'},
    ]
    answer = Answer(text, "tool_calls", Usage(), None, None, extra={"tool_calls": calls})
    results = [{**c, "content": f'{{"temp_c": {i}}}'} for i, c in enumerate(calls)]

    body = endpoint.follow_up(payload, answer, results)

    assert not problems(discriminated_validator(openapi, "CreateChatCompletionRequest"), body)
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool"]
    assert [m["tool_call_id"] for m in body["messages"][-2:]] == ["call_1", "call_2"]
    # The simulator takes it as the real API would: calls answered, text comes back.
    with running_in_thread(SimConfig()) as (url, _):
        reply = post(f"{url}/chat/completions", orjson.dumps(body))
    assert reply["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    "message",
    [
        pytest.param({"role": "tool", "content": "4"}, id="tool-message-without-call-id"),
        pytest.param(
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]},
            id="call-without-function",
        ),
    ],
)
def test_an_invalid_chat_tool_message_is_caught(
    openapi: dict[str, Any], message: dict[str, Any]
) -> None:
    body = {"model": "gpt-4o-mini", "messages": [*MESSAGES, message]}

    assert problems(discriminated_validator(openapi, "CreateChatCompletionRequest"), body)


@pytest.mark.parametrize(
    ("request_spec", "finish"),
    [
        pytest.param({"tools": [TOOL]}, "tool_calls", id="tool-call"),
        pytest.param({"tools": [TOOL], "tool_choice": "lookup"}, "stop", id="forced-call"),
    ],
)
def test_simulated_tool_calls_match_the_openapi_description(
    openapi: dict[str, Any], request_spec: dict[str, Any], finish: str
) -> None:
    endpoint = chat_endpoint(request_spec)
    body, _ = endpoint.encode([endpoint.item(Prompt(MESSAGES)).payload])

    with running_in_thread(SimConfig()) as (url, _):
        answer = post(f"{url}/chat/completions", body)

    assert not problems(discriminated_validator(openapi, "CreateChatCompletionResponse"), answer)
    choice = answer["choices"][0]
    assert choice["finish_reason"] == finish
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "lookup"


# --- Payloads recorded at a server, from every OpenAI sample job ---------------------

ROOT = Path(__file__).resolve().parents[1]
#: The OpenAPI request schema of each path a sample job posts to.
REQUEST_SCHEMAS = {
    "/v1/chat/completions": "CreateChatCompletionRequest",
    "/v1/responses": "CreateResponse",
    "/v1/embeddings": "CreateEmbeddingRequest",
    "/v1/images/generations": "CreateImageRequest",
    "/v1/audio/transcriptions": "CreateTranscriptionRequest",
}
#: jobs/extract_local.toml is left out on purpose: it sends llama-cpp-python's
#: `json_object` + `schema`, which is not OpenAI's shape (test_run runs it offline).
SAMPLE_JOBS = (
    "summarise",
    "extract",
    "embed",
    "responses_extract",
    "describe_images",
    "tools",
    "images",
    "transcribe",
)


class Recorder:
    """A loopback server that records each request as it arrives, then hands it on to
    the simulator and its answer back: what the wire carried, nothing re-encoded."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removesuffix("/v1")
        self.requests: list[tuple[str, str, bytes]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        content_type = request.headers.get("content-type", "")
        self.requests.append((request.path, content_type, body))
        headers = {"content-type": content_type}
        async with (
            ClientSession() as session,
            session.post(self.upstream + request.path_qs, data=body, headers=headers) as answer,
        ):
            return web.Response(
                status=answer.status, body=await answer.read(), headers=answer.headers.copy()
            )


@contextlib.contextmanager
def recording(upstream: str) -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder(upstream)
    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/{tail:.*}", recorder.handle)
    with serving_app(app) as url:
        yield url, recorder


@pytest.mark.parametrize("job", SAMPLE_JOBS)
def test_every_sample_jobs_payloads_as_recorded_match_the_openapi_description(
    openapi: dict[str, Any], tmp_path: Path, job: str
) -> None:
    with (
        running_in_thread(SimConfig(latency_ms=0)) as (upstream, _),
        recording(upstream) as (url, recorder),
    ):
        result = invoke(
            "run", ROOT / "jobs" / f"{job}.toml", "--base-url", url, "--limit", "6",
            "--output", tmp_path / "out.parquet",
        )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert recorder.requests, "the job sent nothing"
    for path, content_type, body in recorder.requests:
        name = REQUEST_SCHEMAS[path]
        if content_type.startswith("multipart/form-data"):
            payload = form_fields(openapi, body, content_type)
            payload.pop("_upload")
        else:
            assert content_type == "application/json"
            payload = orjson.loads(body)
        found = problems(discriminated_validator(openapi, name), payload)
        assert not found, f"{job}: {path}: {found}"
