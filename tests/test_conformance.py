"""Every request body we build validates against the official OpenAI OpenAPI description.

The description lives beside the repository (../shared/reference/openai-openapi/); where
it is absent these tests skip, saying so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from pipeline.endpoints import Endpoint, Prompt, make_endpoint
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
