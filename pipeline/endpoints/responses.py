"""OpenAI's Responses API: POST {base_url}/responses.

Request and answer shapes follow CreateResponse / Response in the OpenAI OpenAPI
description. A row becomes one request:

    {"model": "gpt-4.1-mini", "instructions": "<system>", "store": false,
     "input": [{"role": "user", "content": "<user>"}],
     "max_output_tokens": 200, "text": {"format": {"type": "json_schema", ...}}}

The system message goes in `instructions`, not in `input`: OpenAI's migration guide
maps Chat Completions' system message to it ("use instructions for system-level
guidance"), the API gives it priority over the input, and its one caveat (instructions
are not carried over by `previous_response_id`) cannot bite a job that sends every
row's whole context each time. Only a leading system or developer message moves
there; any later ones stay in `input` with their roles, in their places.

`store` is false unless the job's extra_body says otherwise: a bulk job should not
leave a copy of every row on OpenAI's side for 30 days just because the API's
default is to keep one.

The answer's `output` items are read into the common shape: `message` items'
`output_text` parts joined are the text, `refusal` parts the refusal, `function_call`
items the tool calls (their `call_id` is the id a result goes back under).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from pipeline.endpoints.base import Endpoint, Item, definition_tokens, with_image_parts
from pipeline.endpoints.chat import DEFAULT_MAX_OUTPUT_TOKENS
from pipeline.errors import AnswerFiltered, ReadFailed, ResponseInvalid, SpecError
from pipeline.prompt_images import load_images
from pipeline.records import Answer, Prompt, Usage
from pipeline.spec import RequestSpec, ToolSpec
from pipeline.tokens import estimate_tokens

#: The API refuses a smaller `max_output_tokens` (CreateResponse: minimum 16).
MIN_OUTPUT_TOKENS = 16
#: Error codes of a "failed" response that another attempt may not meet: the server's
#: trouble, not the row's. Every other code (a flagged prompt, a bad image) is the row's.
TRANSIENT_ERRORS = frozenset({"server_error", "rate_limit_exceeded", "vector_store_timeout"})
#: Codes for a row whose content a policy refused: the row's own doing, never the job's,
#: however many rows meet it (they do not halt the run as a repeated error would).
POLICY_ERRORS = frozenset({"invalid_prompt", "bio_policy", "image_content_policy_violation"})
#: `incomplete_details.reason` -> the finish_reason column, as chat completions says it.
_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}
#: Chat-completion parameters the Responses API does not take, and what to do instead.
_NOT_TAKEN = {
    "stop": "it has no stop sequences; cut the text after the run, or use "
    'endpoint = "chat.completions"',
    "seed": 'it has no seed; remove it, or use endpoint = "chat.completions"',
    "max_tokens_param": "it always sends max_tokens as `max_output_tokens`; remove it",
}


class Responses(Endpoint):
    path = "/responses"

    def __init__(
        self,
        spec: RequestSpec,
        schema: dict[str, Any] | None,
        *,
        base_dir: Path = Path("."),
        image_detail: str = "auto",
    ) -> None:
        _refuse_chat_only(spec)
        self._spec = spec
        self._static = _static_fields(spec, schema)
        # Servers count the tools' definitions as prompt, in every request.
        self._tools_tokens = definition_tokens(self._static.get("tools"), self.count)
        self.base_dir = base_dir
        self._detail = image_detail

    def item(self, prompt: Prompt) -> Item:
        instructions, messages = _split_instructions(prompt.messages)
        tokens = estimate_tokens(prompt.messages, self.count) + self._tools_tokens
        items: list[dict[str, Any]] = [dict(m) for m in messages]
        if prompt.images:
            images, image_tokens = load_images(
                prompt.images, self.base_dir, self._detail, self._spec.model
            )
            parts = [
                {"type": "input_image", "image_url": i.url, "detail": self._detail} for i in images
            ]
            items = with_image_parts(items, parts, "input_text")
            tokens += image_tokens
        body: dict[str, Any] = {"model": self._spec.model}
        if instructions is not None:
            body["instructions"] = instructions
        body["input"] = items
        encoded = orjson.dumps({**body, **self._static})
        return Item(encoded, tokens, encoded)

    def max_output_tokens(self) -> int:
        return self._spec.max_tokens or DEFAULT_MAX_OUTPUT_TOKENS

    def answers(
        self, data: Any, headers: Mapping[str, str], weights: Sequence[int]
    ) -> list[Answer]:
        status = data["status"]
        texts: list[str] = []
        refusals: list[str] = []
        calls: list[dict[str, Any]] = []
        for item in data["output"]:
            kind = item.get("type")
            if kind == "message":
                for part in item.get("content") or ():
                    if part.get("type") == "output_text":
                        texts.append(part.get("text") or "")
                    elif part.get("type") == "refusal":
                        refusals.append(part.get("refusal") or "")
            elif kind == "function_call" and item.get("status") != "incomplete":
                # A call cut off by max_output_tokens has half its arguments: not run.
                calls.append(
                    {
                        "id": item["call_id"],
                        "name": item["name"],
                        "arguments": item.get("arguments") or "{}",
                    }
                )
        extra: dict[str, Any] = {}
        if calls:
            extra["tool_calls"] = calls
        if refusals:
            extra["refusal"] = "\n".join(refusals)
        answer = Answer(
            text="".join(texts) if texts else None,
            finish_reason=_finish_reason(status, data.get("incomplete_details"), bool(calls)),
            usage=_usage(data.get("usage") or {}),
            request_id=headers.get("x-request-id") or data.get("id"),
            model=data.get("model"),
            extra=extra,
        )
        if status not in ("completed", "incomplete"):
            raise _unfinished(status, data.get("error"), answer)
        return [answer]

    def follow_up(self, payload: Any, answer: Answer, results: list[dict[str, Any]]) -> Any:
        body = orjson.loads(payload) if isinstance(payload, bytes) else dict(payload)
        # The calls go back without their item ids ("fc_..."): with store = false the
        # server keeps no items to refer to, and a reasoning model's call sent with its
        # id must come with the reasoning item it followed, which is not kept either.
        calls = [
            {
                "type": "function_call",
                "call_id": call["id"],
                "name": call["name"],
                "arguments": call["arguments"],
            }
            for call in answer.extra.get("tool_calls", ())
        ]
        outputs = [
            {"type": "function_call_output", "call_id": r["id"], "output": r["content"]}
            for r in results
        ]
        said = [{"role": "assistant", "content": answer.text}] if answer.text else []
        body["input"] = [*body["input"], *said, *calls, *outputs]
        return body


def _refuse_chat_only(spec: RequestSpec) -> None:
    """Chat-completion settings the Responses API lacks: a job error, before any request."""
    for name, advice in _NOT_TAKEN.items():
        if getattr(spec, name) is not None:
            raise SpecError(
                f'[request] {name} is set, but endpoint = "responses" does not take it: {advice}'
            )
    if spec.max_tokens is not None and spec.max_tokens < MIN_OUTPUT_TOKENS:
        raise SpecError(
            f"[request] max_tokens = {spec.max_tokens}: the Responses API takes "
            f"max_output_tokens of at least {MIN_OUTPUT_TOKENS}; raise it to {MIN_OUTPUT_TOKENS}"
        )


def _split_instructions(
    messages: list[dict[str, Any]],
) -> tuple[str | None, list[dict[str, Any]]]:
    """A leading system (or developer) message as `instructions`, and the rest."""
    if len(messages) > 1 and messages[0]["role"] in ("system", "developer"):
        return str(messages[0]["content"]), messages[1:]
    return None, messages


def _static_fields(spec: RequestSpec, schema: dict[str, Any] | None) -> dict[str, Any]:
    """The body fields that are the same for every row, built once."""
    fields: dict[str, Any] = {"store": False}
    if spec.max_tokens is not None:
        fields["max_output_tokens"] = spec.max_tokens
    for name in ("temperature", "top_p"):
        value = getattr(spec, name)
        if value is not None:
            fields[name] = value
    if spec.response_format == "json_object":
        fields["text"] = {"format": {"type": "json_object"}}
    elif spec.response_format == "json_schema" and spec.json_schema is not None:
        fields["text"] = {
            "format": {
                "type": "json_schema",
                "name": spec.json_schema.name,
                "schema": schema,
                "strict": spec.json_schema.strict,
            }
        }
    if spec.tools:
        fields["tools"] = [_tool(t) for t in spec.tools]
    if spec.tool_choice is not None:
        fields["tool_choice"] = _tool_choice(spec.tool_choice)
    return {**fields, **spec.extra_body}


def _tool(tool: ToolSpec) -> dict[str, Any]:
    """A function tool, flat (not nested under "function" as in chat completions).

    `strict` is always sent, as the API requires it: null when the job leaves it
    unset, which the API takes as strict, normalising the parameters' schema.
    """
    function: dict[str, Any] = {"type": "function", "name": tool.name}
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = tool.parameters
    function["strict"] = tool.strict
    return function


def _tool_choice(choice: str) -> str | dict[str, Any]:
    if choice in ("auto", "none", "required"):
        return choice
    return {"type": "function", "name": choice}


def _finish_reason(status: str, incomplete: Any, called: bool) -> str:
    """The answer's status as chat completions' finish_reason values say it."""
    if status == "incomplete":
        reason = incomplete.get("reason") if isinstance(incomplete, Mapping) else None
        return _INCOMPLETE.get(str(reason), str(reason or "incomplete"))
    if status == "completed":
        return "tool_calls" if called else "stop"
    return status


def _unfinished(status: str, error: Any, answer: Answer) -> ReadFailed | ResponseInvalid:
    """The failure for a 200 whose response did not finish: retried if it may next time."""
    code = error.get("code") if isinstance(error, Mapping) else None
    if status == "failed":
        detail = error.get("message") if isinstance(error, Mapping) else None
        message = f"the response failed ({code or 'no code'}): {detail or 'no message'}"
        if code in TRANSIENT_ERRORS:
            return ReadFailed(message)
    else:
        message = (
            f'the response is "{status}", not finished: pipeline waits for answers in the '
            "foreground only; remove `background` from [request] extra_body"
        )
    failure = AnswerFiltered(message) if code in POLICY_ERRORS else ResponseInvalid(message)
    failure.answer = answer  # its usage was billed: it is recorded with the failure
    return failure


def _usage(raw: Mapping[str, Any]) -> Usage:
    input_details = raw.get("input_tokens_details") or {}
    output_details = raw.get("output_tokens_details") or {}
    return Usage(
        prompt_tokens=int(raw.get("input_tokens") or 0),
        completion_tokens=int(raw.get("output_tokens") or 0),
        cached_tokens=int(input_details.get("cached_tokens") or 0),
        reasoning_tokens=int(output_details.get("reasoning_tokens") or 0),
        cache_write_tokens=int(input_details.get("cache_write_tokens") or 0),
    )
