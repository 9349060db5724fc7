"""Chat completions: POST {base_url}/chat/completions.

Request and response shapes follow CreateChatCompletionRequest / Response in the
OpenAI OpenAPI description. Images go with the last user message as `image_url`
parts; tools as `function` tools, their calls read back into the common shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from pipeline.endpoints.base import Endpoint, Item, definition_tokens, with_image_parts
from pipeline.prompt_images import load_images
from pipeline.records import Answer, Prompt, Usage
from pipeline.spec import RequestSpec, ToolSpec
from pipeline.tokens import estimate_tokens

#: What a server lets a completion run to when max_tokens is not set; the TPM limiter
#: must reserve something, and most chat answers in bulk jobs are well under this.
DEFAULT_MAX_OUTPUT_TOKENS = 1024


class ChatCompletions(Endpoint):
    path = "/chat/completions"

    def __init__(
        self,
        spec: RequestSpec,
        schema: dict[str, Any] | None,
        max_tokens_param: str,
        *,
        base_dir: Path = Path("."),
        image_detail: str = "auto",
    ):
        self._spec = spec
        self._static = _static_fields(spec, schema, max_tokens_param)
        self.base_dir = base_dir
        self._detail = image_detail
        # Servers count the tools' definitions as prompt, in every request.
        self._tools_tokens = definition_tokens(self._static.get("tools"), self.count)

    def item(self, prompt: Prompt) -> Item:
        messages: list[dict[str, Any]] = prompt.messages
        tokens = estimate_tokens(prompt.messages, self.count) + self._tools_tokens
        if prompt.images:
            images, image_tokens = load_images(
                prompt.images, self.base_dir, self._detail, self._spec.model
            )
            parts = [
                {"type": "image_url", "image_url": {"url": i.url, "detail": self._detail}}
                for i in images
            ]
            messages = with_image_parts(messages, parts, "text")
            tokens += image_tokens
        body = orjson.dumps({"model": self._spec.model, "messages": messages, **self._static})
        return Item(body, tokens, body)

    def max_output_tokens(self) -> int:
        return self._spec.max_tokens or DEFAULT_MAX_OUTPUT_TOKENS

    def answers(
        self, data: Any, headers: Mapping[str, str], weights: Sequence[int]
    ) -> list[Answer]:
        choice = data["choices"][0]
        message = choice["message"]
        extra: dict[str, Any] = {}
        if message.get("tool_calls"):
            extra["tool_calls"] = [
                {
                    "id": call.get("id"),
                    "name": call["function"]["name"],
                    "arguments": call["function"].get("arguments") or "{}",
                }
                for call in message["tool_calls"]
            ]
        if message.get("refusal"):
            extra["refusal"] = message["refusal"]
        answer = Answer(
            text=message.get("content"),
            finish_reason=choice.get("finish_reason"),
            usage=_usage(data.get("usage") or {}),
            request_id=headers.get("x-request-id") or data.get("id"),
            model=data.get("model"),
            extra=extra,
        )
        return [answer]

    def follow_up(self, payload: Any, answer: Answer, results: list[dict[str, Any]]) -> Any:
        body = orjson.loads(payload) if isinstance(payload, bytes) else dict(payload)
        calls = [
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": call["name"], "arguments": call["arguments"]},
            }
            for call in answer.extra.get("tool_calls", ())
        ]
        body["messages"] = [
            *body["messages"],
            {"role": "assistant", "content": answer.text, "tool_calls": calls},
            *({"role": "tool", "tool_call_id": r["id"], "content": r["content"]} for r in results),
        ]
        return body


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
    if spec.tools:
        fields["tools"] = chat_tools(spec.tools)
    if spec.tool_choice is not None:
        fields["tool_choice"] = chat_tool_choice(spec.tool_choice)
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


def chat_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """Chat completions' `tools`: {"type": "function", "function": {...}}."""
    return [{"type": "function", "function": _function(t)} for t in tools]


def _function(tool: ToolSpec) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters}
    if tool.description:
        function["description"] = tool.description
    if tool.strict is not None:
        function["strict"] = tool.strict
    return function


def chat_tool_choice(choice: str) -> str | dict[str, Any]:
    if choice in ("auto", "none", "required"):
        return choice
    return {"type": "function", "function": {"name": choice}}
