"""Chat completions: POST {base_url}/chat/completions.

Request and response shapes follow CreateChatCompletionRequest / Response in the
OpenAI OpenAPI description.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.endpoints.base import Answer, Endpoint, Usage
from pipeline.spec import RequestSpec

#: What a server lets a completion run to when max_tokens is not set; the TPM limiter
#: must reserve something, and most chat answers in bulk jobs are well under this.
DEFAULT_MAX_OUTPUT_TOKENS = 1024


class ChatCompletions(Endpoint):
    path = "/chat/completions"

    def __init__(self, spec: RequestSpec, schema: dict[str, Any] | None, max_tokens_param: str):
        self._spec = spec
        self._static = _static_fields(spec, schema, max_tokens_param)

    def body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        return {"model": self._spec.model, "messages": messages, **self._static}

    def max_output_tokens(self) -> int:
        return self._spec.max_tokens or DEFAULT_MAX_OUTPUT_TOKENS

    def answer(self, data: Mapping[str, Any], headers: Mapping[str, str]) -> Answer:
        choice = data["choices"][0]
        message = choice["message"]
        extra: dict[str, Any] = {}
        if message.get("tool_calls"):
            extra["tool_calls"] = message["tool_calls"]
        if message.get("refusal"):
            extra["refusal"] = message["refusal"]
        return Answer(
            text=message.get("content"),
            finish_reason=choice.get("finish_reason"),
            usage=_usage(data.get("usage") or {}),
            request_id=headers.get("x-request-id") or data.get("id"),
            model=data.get("model"),
            extra=extra,
        )


def _static_fields(
    spec: RequestSpec, schema: dict[str, Any] | None, max_tokens_param: str
) -> dict[str, Any]:
    """The body fields that are the same for every row, built once."""
    fields: dict[str, Any] = {}
    if spec.max_tokens is not None:
        fields[max_tokens_param] = spec.max_tokens
    for name in ("temperature", "top_p", "stop", "seed"):
        value = getattr(spec, name)
        if value is not None:
            fields[name] = value
    if spec.response_format == "json_object":
        fields["response_format"] = {"type": "json_object"}
    elif spec.response_format == "json_schema" and spec.json_schema is not None:
        fields["response_format"] = {
            "type": "json_schema",
            "json_schema": {
                "name": spec.json_schema.name,
                "schema": schema,
                "strict": spec.json_schema.strict,
            },
        }
    return {**fields, **spec.extra_body}


def _usage(raw: Mapping[str, Any]) -> Usage:
    prompt_details = raw.get("prompt_tokens_details") or {}
    completion_details = raw.get("completion_tokens_details") or {}
    return Usage(
        prompt_tokens=int(raw.get("prompt_tokens") or 0),
        completion_tokens=int(raw.get("completion_tokens") or 0),
        cached_tokens=int(prompt_details.get("cached_tokens") or 0),
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
    )
