"""Anthropic's Messages API: POST {base_url}/messages.

    endpoint = AnthropicMessages(spec, schema, base_dir=Path("data"))
    endpoint.item(prompt).payload   # b'{"model":"claude-haiku-4-5","max_tokens":1024,...}'

How the job's request maps onto Anthropic's shape:

- `max_tokens` is required by Anthropic: the job's, else DEFAULT_MAX_OUTPUT_TOKENS.
- System (and "developer") messages go to the top-level `system` field, wherever they
  stand in the template; Anthropic has no system role in `messages`. Consecutive
  messages of one role are merged into one turn, so the turns alternate.
- Images go with the last user message as `image` blocks, before its text (Anthropic
  advises images first): local files and data: URLs as base64, http(s) URLs as `url`.
- `stop` becomes `stop_sequences`. `seed` does not exist there and a `temperature`
  above 1 is refused: both are job errors here, before anything is sent.
- Tools are `{"name", "description", "input_schema"}`; tool_choice "required" is
  Anthropic's "any", a tool's name is `{"type": "tool", "name": ...}`.

Anthropic has no JSON mode, so `response_format = "json_schema"` is served with a
forced tool: one tool named after the schema, whose `input_schema` is the job's
schema, and `tool_choice` naming it. The model must then answer with a call whose
`input` is an object following the schema, on every Claude model, without a beta
header; that input, as JSON text, is the row's answer (and is validated against the
schema like any JSON answer). `json_object` is the same with `{"type": "object"}` as the
schema. A forced tool leaves no room for the job's own tools, so json modes and
`tools` together are refused, as is extended thinking (via `extra_body`), which
Anthropic does not allow with a forced tool.

Answers: text blocks joined; `tool_use` blocks become the common tool-call shape;
`stop_reason` maps to finish_reason ("end_turn"/"stop_sequence" -> "stop",
"max_tokens" -> "length", "tool_use" -> "tool_calls", "refusal" -> "content_filter"
with the row failed as a refusal). Usage counts cache reads and writes in the prompt
tokens, as OpenAI's `prompt_tokens` does, and keeps them apart for pricing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from pipeline.endpoints.base import Endpoint, Item, definition_tokens
from pipeline.errors import RowProblem, SpecError
from pipeline.prompt_images import anthropic_image_tokens, load_image
from pipeline.records import Answer, Prompt, Usage
from pipeline.spec import RequestSpec, ToolSpec
from pipeline.tokens import TextCounter, estimate_tokens

#: Anthropic requires max_tokens; this is what is sent when the job sets none. Bulk
#: answers are mostly far shorter, and the TPM limiter reserves this much per request.
DEFAULT_MAX_OUTPUT_TOKENS = 1024
#: The tokens of the system prompt Anthropic adds when tools are offered (Claude 4
#: models: 346 with tool_choice auto/none, 313 with any/tool); counted for the limiter.
TOOL_PROMPT_TOKENS = 346
#: Anthropic refuses images over 5 MB (the file, before base64).
MAX_IMAGE_BYTES = 5 * 2**20
#: The image types the Messages API reads.
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
#: The forced tool's name when response_format = "json_object" (no schema, no name).
JSON_OBJECT_TOOL = "json_answer"

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_SYSTEM_ROLES = ("system", "developer")
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class AnthropicMessages(Endpoint):
    path = "/messages"

    def __init__(
        self, spec: RequestSpec, schema: dict[str, Any] | None, *, base_dir: Path = Path(".")
    ) -> None:
        self._spec = spec
        self._max_tokens = spec.max_tokens or DEFAULT_MAX_OUTPUT_TOKENS
        #: The forced tool that carries a JSON answer, when the job wants JSON.
        self._answer_tool = _answer_tool(spec, schema)
        self._static = _static_fields(spec, schema, self._answer_tool)
        self._tool_tokens = _tool_tokens(self._static.get("tools"), self.count)
        self.base_dir = base_dir

    def item(self, prompt: Prompt) -> Item:
        system, turns = _split(prompt.messages)
        tokens = estimate_tokens(prompt.messages, self.count) + self._tool_tokens
        if prompt.images:
            blocks = []
            for reference in prompt.images:
                block, image_tokens = self._image(reference)
                blocks.append(block)
                tokens += image_tokens
            turns = _with_images(turns, blocks)
        if not turns:
            raise RowProblem(
                "the messages rendered empty for this row, and Anthropic refuses empty "
                "messages: check the columns the `user` template uses"
            )
        body: dict[str, Any] = {"model": self._spec.model, "max_tokens": self._max_tokens}
        if system:
            body["system"] = system
        body["messages"] = turns
        encoded = orjson.dumps({**body, **self._static})
        return Item(encoded, tokens, encoded)

    def _image(self, reference: str) -> tuple[dict[str, Any], int]:
        image = load_image(reference, self.base_dir)
        if image.data is None:
            source: dict[str, Any] = {"type": "url", "url": image.url}
        else:
            if image.media_type not in IMAGE_TYPES:
                raise RowProblem(
                    f"the image {reference[:80]} is {image.media_type or 'of unknown type'}; "
                    f"Anthropic reads {', '.join(IMAGE_TYPES)}"
                )
            if len(image.data) * 3 // 4 > MAX_IMAGE_BYTES:
                raise RowProblem(f"the image {reference[:80]} is over 5 MB, Anthropic's limit")
            source = {"type": "base64", "media_type": image.media_type, "data": image.data}
        return {"type": "image", "source": source}, anthropic_image_tokens(image.size)

    def max_output_tokens(self) -> int:
        return self._max_tokens

    def answers(
        self, data: Any, headers: Mapping[str, str], weights: Sequence[int]
    ) -> list[Answer]:
        blocks: list[dict[str, Any]] = data["content"]
        texts = [b["text"] for b in blocks if b.get("type") == "text"]
        calls = [b for b in blocks if b.get("type") == "tool_use"]
        text: str | None = "".join(texts) if texts else None
        stop_reason = data.get("stop_reason")
        finish = _FINISH.get(stop_reason, stop_reason)
        extra: dict[str, Any] = {}
        answer_call = next((c for c in calls if c["name"] == self._answer_tool), None)
        if self._answer_tool is not None:
            # The JSON answer is the forced call's input; cut off, it is whatever came.
            if answer_call is not None:
                text = orjson.dumps(answer_call["input"]).decode()
                finish = "stop" if finish == "tool_calls" else finish
            else:
                text = text or ""
        elif calls:
            extra["tool_calls"] = [
                {"id": c["id"], "name": c["name"], "arguments": orjson.dumps(c["input"]).decode()}
                for c in calls
            ]
            # Sent back as they came in a tool loop (thinking blocks must be, signed).
            extra["content_blocks"] = blocks
        if stop_reason == "refusal":
            extra["refusal"] = text or "the model declined to answer (stop_reason refusal)"
            text = None
        answer = Answer(
            text=text,
            finish_reason=finish,
            usage=_usage(data.get("usage") or {}),
            request_id=headers.get("request-id") or data.get("id"),
            model=data.get("model"),
            extra=extra,
        )
        return [answer]

    def follow_up(self, payload: Any, answer: Answer, results: list[dict[str, Any]]) -> Any:
        body = orjson.loads(payload) if isinstance(payload, bytes) else dict(payload)
        content = answer.extra.get("content_blocks") or _blocks_of(answer)
        outcomes = [
            {"type": "tool_result", "tool_use_id": r["id"], "content": r["content"]}
            for r in results
        ]
        body["messages"] = [
            *body["messages"],
            {"role": "assistant", "content": content},
            {"role": "user", "content": outcomes},
        ]
        return body


def _blocks_of(answer: Answer) -> list[dict[str, Any]]:
    """The assistant turn of a tool-calling answer, rebuilt from its text and calls."""
    blocks: list[dict[str, Any]] = [{"type": "text", "text": answer.text}] if answer.text else []
    for call in answer.extra.get("tool_calls", ()):
        arguments = orjson.loads(call["arguments"] or "{}")
        blocks.append(
            {"type": "tool_use", "id": call["id"], "name": call["name"], "input": arguments}
        )
    return blocks


def _split(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The system text, and the other messages as alternating turns of text blocks."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] in _SYSTEM_ROLES)
    turns: list[dict[str, Any]] = []
    for message in messages:
        role, text = message["role"], message["content"]
        if role in _SYSTEM_ROLES or not text:
            continue  # Anthropic refuses empty text blocks
        block = {"type": "text", "text": text}
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].append(block)
        else:
            turns.append({"role": role, "content": [block]})
    return system.strip(), turns


def _with_images(turns: list[dict[str, Any]], images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The turns with the images put first in the last user turn (a new one if none)."""
    last = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=None)
    if last is None:
        return [*turns, {"role": "user", "content": images}]
    turn = turns[last]
    return [*turns[:last], {**turn, "content": [*images, *turn["content"]]}, *turns[last + 1 :]]


def _answer_tool(spec: RequestSpec, schema: dict[str, Any] | None) -> str | None:
    """The forced tool's name for a JSON answer, or None; SpecError for what conflicts."""
    if spec.response_format == "text":
        return None
    if spec.tools or spec.tool_choice is not None:
        raise SpecError(
            f'response_format = "{spec.response_format}" with Anthropic is served by forcing '
            "a tool whose input is the answer, which leaves no room for the job's own `tools` "
            "/ `tool_choice`: remove one or the other"
        )
    if "thinking" in spec.extra_body:
        raise SpecError(
            f'response_format = "{spec.response_format}" with Anthropic forces a tool, and '
            "Anthropic refuses a forced tool with extended thinking: remove `thinking` from "
            'extra_body, or ask for JSON in the prompt with response_format = "text"'
        )
    if spec.response_format == "json_object":
        return JSON_OBJECT_TOOL
    assert spec.json_schema is not None
    name = spec.json_schema.name
    if not _valid_tool_name(name):
        raise SpecError(
            f"[request.json_schema] name {name!r} becomes an Anthropic tool's name, which "
            'takes 1 to 64 letters, digits, _ or -: rename it, e.g. name = "answer"'
        )
    return name


def _valid_tool_name(name: str) -> bool:
    return _TOOL_NAME.fullmatch(name) is not None


def _static_fields(
    spec: RequestSpec, schema: dict[str, Any] | None, answer_tool: str | None
) -> dict[str, Any]:
    """The body fields that are the same for every row, built once."""
    if spec.seed is not None:
        raise SpecError(
            "`seed` is not a parameter of Anthropic's Messages API (it would be refused "
            "with a 400 on every row): remove it from [request]"
        )
    if spec.temperature is not None and spec.temperature > 1:
        raise SpecError(
            f"temperature = {spec.temperature}: Anthropic takes 0 to 1; set it within that range"
        )
    fields: dict[str, Any] = {}
    if spec.temperature is not None:
        fields["temperature"] = spec.temperature
    if spec.top_p is not None:
        fields["top_p"] = spec.top_p
    if spec.stop is not None:
        fields["stop_sequences"] = [spec.stop] if isinstance(spec.stop, str) else list(spec.stop)
    if answer_tool is not None:
        if schema is None:  # json_object: any object will do
            schema = {"type": "object", "additionalProperties": True}
        description = "Record the answer. Its input is the answer, as JSON."
        fields["tools"] = [
            {"name": answer_tool, "description": description, "input_schema": schema}
        ]
        fields["tool_choice"] = {"type": "tool", "name": answer_tool}
    if spec.tools:
        fields["tools"] = [_tool(t) for t in spec.tools]
    if spec.tool_choice is not None:
        fields["tool_choice"] = _tool_choice(spec.tool_choice)
    return {**fields, **spec.extra_body}


def _tool(tool: ToolSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": tool.name}
    if tool.description:
        out["description"] = tool.description
    out["input_schema"] = tool.parameters
    return out


def _tool_choice(choice: str) -> dict[str, Any]:
    if choice in ("auto", "none"):
        return {"type": choice}
    if choice == "required":
        return {"type": "any"}
    return {"type": "tool", "name": choice}


def _tool_tokens(tools: Any, count: TextCounter) -> int:
    """The tools' definitions and the tool-use system prompt, as prompt tokens."""
    return TOOL_PROMPT_TOKENS + definition_tokens(tools, count) if tools else 0


def _usage(raw: Mapping[str, Any]) -> Usage:
    read = int(raw.get("cache_read_input_tokens") or 0)
    written = int(raw.get("cache_creation_input_tokens") or 0)
    return Usage(
        prompt_tokens=int(raw.get("input_tokens") or 0) + read + written,
        completion_tokens=int(raw.get("output_tokens") or 0),
        cached_tokens=read,
        cache_write_tokens=written,
    )
