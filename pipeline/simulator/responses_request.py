"""OpenAI's Responses API requests (`POST /v1/responses`), checked as the real API does.

    job = parse_responses(payload)    # a ResponsesJob, or the API's 400
    job.prompt_tokens, job.outcome    # counted as chat counts; a `<<sim:refusal>>`-like kind

Unknown parameters and chat-only ones (`response_format`, `max_tokens`, `messages`,
`stop`, `seed`) are a 400 naming them; `input` is a string or a list of message,
function_call and function_call_output items with valid roles and content parts;
every function call has its output and every output its call; `text.format`
json_schema follows the strict rules; function tools have valid names and, when
strict, valid parameter schemas. The prompt counts as chat completions' does
(prompt_tokens.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from pipeline.simulator.api_errors import (
    FUNCTION_NAME,
    bad_name,
    invalid,
    missing,
    not_one_of,
    wrong_type,
)
from pipeline.simulator.fake_answers import DEFAULT_COMPLETION_COST
from pipeline.simulator.prompt_tokens import content_text, items_tokens
from pipeline.simulator.request_fields import model_field
from pipeline.simulator.strict_schemas import strict_problem
from pipeline.simulator.tool_calls import tools_tokens

#: CreateResponse's parameters in the OpenAPI description; any other is a 400.
_PARAMETERS: Final = frozenset(
    {
        "background", "context_management", "conversation", "include", "input",
        "instructions", "max_output_tokens", "max_tool_calls", "metadata", "model",
        "moderation", "parallel_tool_calls", "previous_response_id", "prompt",
        "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention", "reasoning",
        "safety_identifier", "service_tier", "store", "stream", "stream_options",
        "temperature", "text", "tool_choice", "tools", "top_logprobs", "top_p",
        "truncation", "user",
    }
)  # fmt: skip
#: Chat-completion parameters and where the Responses API moved them.
_MOVED: Final = {
    "response_format": "text.format",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "messages": "input",
}
_ROLES: Final = ("user", "assistant", "system", "developer")
# Content parts by role: what a person or a system says, and what the model said.
_INPUT_PARTS: Final = ("input_text", "input_image")
_OUTPUT_PARTS: Final = ("output_text", "refusal")
_DETAILS: Final = ("low", "high", "auto", "original")
_TOOL_CHOICES: Final = ("none", "auto", "required")
_FORMATS: Final = ("text", "json_object", "json_schema")
_MIN_OUTPUT_TOKENS: Final = 16
_OUTCOME: Final = re.compile(r"<<sim:(refusal|failed|failedserver|filtered)>>")


@dataclass(frozen=True, slots=True)
class ResponsesJob:
    """A checked CreateResponse body: what the answer is made from."""

    model: str
    instructions: str | None
    #: The input as items, each with its `type` ("message" when it was left out).
    items: list[dict[str, Any]]
    prompt_tokens: int
    max_output_tokens: int | None
    text_format: dict[str, Any]
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    #: The input carries function_call_output items: the tools have answered.
    tools_answered: bool
    #: Settings the Response echoes back.
    settings: dict[str, Any]
    directive_text: str
    #: A `<<sim:...>>` kind only Responses have ("refusal", "failed", ...), or None.
    outcome: str | None

    @property
    def cost(self) -> int:
        completion = self.max_output_tokens
        return self.prompt_tokens + (DEFAULT_COMPLETION_COST if completion is None else completion)


def parse_responses(payload: dict[str, Any]) -> ResponsesJob:
    """Check a CreateResponse body as the API does; raise the 400 it would send."""
    _check_parameters(payload)
    model = model_field(payload)
    _refuse_unsupported(payload)
    instructions = _optional(payload, "instructions", str, "a string")
    items = _input(payload.get("input"))
    _check_calls_paired(items)
    tools = _tools(payload.get("tools"))
    text = _last_message_text(items)
    outcome = _OUTCOME.search(text)
    settings = {
        "temperature": _number(payload, "temperature", 2.0),
        "top_p": _number(payload, "top_p", 1.0),
        "store": _optional(payload, "store", bool, "a boolean"),
        "metadata": _optional(payload, "metadata", dict, "an object") or {},
        "parallel_tool_calls": _optional(payload, "parallel_tool_calls", bool, "a boolean"),
    }
    return ResponsesJob(
        model=model,
        instructions=instructions,
        items=items,
        prompt_tokens=items_tokens(instructions, items, model) + tools_tokens(payload, model),
        max_output_tokens=_max_output_tokens(payload),
        text_format=_text_format(payload.get("text"), instructions, items),
        tools=tools,
        tool_choice=_tool_choice(payload.get("tool_choice"), tools),
        tools_answered=any(i["type"] == "function_call_output" for i in items),
        settings=settings,
        directive_text=_OUTCOME.sub("", text),
        outcome=outcome.group(1) if outcome else None,
    )


def _check_parameters(payload: Mapping[str, Any]) -> None:
    for name in payload:
        if name in _MOVED:
            raise invalid(
                f"Unsupported parameter: '{name}'. In the Responses API, this parameter has "
                f"moved to '{_MOVED[name]}'. Try again with the new parameter.",
                name,
                "unsupported_parameter",
            )
        if name not in _PARAMETERS:
            raise invalid(f"Unknown parameter: '{name}'.", name, "unknown_parameter")


def _refuse_unsupported(payload: Mapping[str, Any]) -> None:
    """What the real API takes but the simulator cannot do: a 400 that says so."""
    for name, why in (
        ("stream", "does not stream"),
        ("background", "answers in the foreground only"),
        ("conversation", "keeps no conversations"),
        ("prompt", "has no stored prompts"),
    ):
        if payload.get(name):
            raise invalid(
                f"The simulator {why}; send the request without '{name}'.",
                name,
                "unsupported_parameter",
            )
    previous = payload.get("previous_response_id")
    if previous is not None:
        # The simulator stores nothing, as the real API with store = false.
        raise invalid(
            f"Previous response with id '{previous}' not found.",
            "previous_response_id",
            "previous_response_not_found",
        )


def _optional(payload: Mapping[str, Any], name: str, kind: type, expected: str) -> Any:
    value = payload.get(name)
    if value is not None and not isinstance(value, kind):
        raise wrong_type(name, expected, value)
    return value


def _number(payload: Mapping[str, Any], name: str, most: float) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise wrong_type(name, "a number", value)
    if not 0 <= value <= most:
        raise invalid(
            f"Invalid '{name}': expected a number between 0 and {most:g}, but got {value} instead.",
            name,
            "invalid_value",
        )
    return float(value)


def _max_output_tokens(payload: Mapping[str, Any]) -> int | None:
    value = payload.get("max_output_tokens")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise wrong_type("max_output_tokens", "an integer", value)
    if value < _MIN_OUTPUT_TOKENS:
        raise invalid(
            "Invalid 'max_output_tokens': integer below minimum value. Expected a value >= "
            f"{_MIN_OUTPUT_TOKENS}, but got {value} instead.",
            "max_output_tokens",
            "integer_below_min_value",
        )
    return value


def _input(raw: Any) -> list[dict[str, Any]]:
    if raw is None:
        raise missing("input")
    if isinstance(raw, str):
        return [{"type": "message", "role": "user", "content": raw}]
    if not isinstance(raw, list):
        raise wrong_type("input", "a string or an array of input items", raw)
    if not raw:
        raise invalid(
            "Invalid 'input': empty array. Expected an array with minimum length 1.",
            "input",
            "empty_array",
        )
    return [_item(item, f"input[{i}]") for i, item in enumerate(raw)]


def _item(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise wrong_type(where, "an object", item)
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        _message(item, where)
    elif kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            _string(item, key, where)
    elif kind == "function_call_output":
        _string(item, "call_id", where)
        output = item.get("output")
        if output is None:
            raise missing(f"{where}.output")
        if not isinstance(output, str | list):
            raise wrong_type(f"{where}.output", "a string or an array of content parts", output)
    elif kind is None:
        raise missing(f"{where}.role")
    else:
        raise invalid(
            f"Invalid value: '{kind}'. The simulator takes input items of type 'message', "
            "'function_call' and 'function_call_output'.",
            f"{where}.type",
            "invalid_value",
        )
    return {**item, "type": kind}


def _string(item: Mapping[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if value is None:
        raise missing(f"{where}.{key}")
    if not isinstance(value, str):
        raise wrong_type(f"{where}.{key}", "a string", value)
    return value


def _message(item: Mapping[str, Any], where: str) -> None:
    role = item.get("role")
    if role is None:
        raise missing(f"{where}.role")
    if role not in _ROLES:
        raise not_one_of(role, _ROLES, f"{where}.role")
    content = item.get("content")
    if content is None:
        raise missing(f"{where}.content")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise wrong_type(f"{where}.content", "a string or an array of content parts", content)
    allowed = _OUTPUT_PARTS if role == "assistant" else _INPUT_PARTS
    for index, part in enumerate(content):
        _part(part, allowed, f"{where}.content[{index}]")


def _part(part: Any, allowed: tuple[str, ...], where: str) -> None:
    if not isinstance(part, dict):
        raise wrong_type(where, "an object", part)
    kind = part.get("type")
    if kind not in allowed:
        raise not_one_of(kind, allowed, f"{where}.type")
    if kind in ("input_text", "output_text"):
        _string(part, "text", where)
    elif kind == "refusal":
        _string(part, "refusal", where)
    else:
        _image(part, where)


def _image(part: Mapping[str, Any], where: str) -> None:
    url, file_id = part.get("image_url"), part.get("file_id")
    if url is None and file_id is None:
        raise missing(f"{where}.image_url")
    if url is not None and (
        not isinstance(url, str) or not url.startswith(("http://", "https://", "data:image/"))
    ):
        raise invalid(
            f"Invalid '{where}.image_url'. Expected a valid URL, but got a value with an "
            "invalid format.",
            f"{where}.image_url",
            "invalid_value",
        )
    detail = part.get("detail")
    if detail is None:
        raise missing(f"{where}.detail")
    if detail not in _DETAILS:
        raise not_one_of(detail, _DETAILS, f"{where}.detail")


def _check_calls_paired(items: list[dict[str, Any]]) -> None:
    """Every function call has its output after it, and every output its call before it."""
    called: set[str] = set()
    answered: set[str] = set()
    for item in items:
        if item["type"] == "function_call":
            called.add(item["call_id"])
        elif item["type"] == "function_call_output":
            if item["call_id"] not in called:
                raise invalid(
                    f"No tool call found for function call output with call_id {item['call_id']}.",
                    "input",
                )
            answered.add(item["call_id"])
    missing = sorted(called - answered)
    if missing:
        raise invalid(f"No tool output found for function call {missing[0]}.", "input")


def _last_message_text(items: list[dict[str, Any]]) -> str:
    """Where directives are read: the last user message's text, which a tool loop's
    later rounds carry on (their calls and outputs, and what the model said, follow it)."""
    messages = [i for i in items if i["type"] == "message"]
    users = [m for m in messages if m["role"] == "user"] or messages
    return content_text(users[-1]["content"]) if users else ""


def _text_format(
    text: Any, instructions: str | None, items: list[dict[str, Any]]
) -> dict[str, Any]:
    if text is None:
        return {"type": "text"}
    if not isinstance(text, dict):
        raise wrong_type("text", "an object", text)
    fmt = text.get("format")
    if fmt is None:
        return {"type": "text"}
    if not isinstance(fmt, dict):
        raise wrong_type("text.format", "an object", fmt)
    kind = fmt.get("type")
    if kind not in _FORMATS:
        raise not_one_of(kind, _FORMATS, "text.format.type")
    if kind == "json_schema":
        _check_schema_format(fmt)
    if kind == "json_object" and not _mentions_json(instructions, items):
        raise invalid(
            "Response input messages must contain the word 'json' in some form to use "
            "'text.format' of type 'json_object'.",
            "input",
        )
    return fmt


def _check_schema_format(fmt: Mapping[str, Any]) -> None:
    name = _string(fmt, "name", "text.format")
    schema = fmt.get("schema")
    if schema is None:
        raise missing("text.format.schema")
    if not isinstance(schema, dict):
        raise wrong_type("text.format.schema", "an object", schema)
    if fmt.get("strict") and (problem := strict_problem(schema, ())):
        raise invalid(
            f"Invalid schema for response_format '{name}': {problem}",
            "text.format.schema",
            "invalid_json_schema",
        )


def _mentions_json(instructions: str | None, items: list[dict[str, Any]]) -> bool:
    texts = [instructions or ""]
    texts += [content_text(i["content"]) for i in items if i["type"] == "message"]
    return any("json" in t.lower() for t in texts)


def _tools(raw: Any) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise wrong_type("tools", "an array of tools", raw)
    return [_tool(tool, f"tools[{index}]") for index, tool in enumerate(raw)]


def _tool(tool: Any, where: str) -> dict[str, Any]:
    """A function tool, as the Response echoes it back (strict filled in)."""
    if not isinstance(tool, dict):
        raise wrong_type(where, "an object", tool)
    if tool.get("type") != "function":
        raise invalid(
            f"Invalid value: {tool.get('type')!r}. The simulator serves tools of type "
            "'function' only.",
            f"{where}.type",
            "invalid_value",
        )
    name = _string(tool, "name", where)
    if not FUNCTION_NAME.fullmatch(name):
        raise bad_name(f"{where}.name")
    parameters = tool.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise wrong_type(f"{where}.parameters", "an object", parameters)
    strict = tool.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise wrong_type(f"{where}.strict", "a boolean", strict)
    if strict and parameters is not None and (problem := strict_problem(parameters, ())):
        raise invalid(
            f"Invalid schema for function '{name}': {problem}",
            f"{where}.parameters",
            "invalid_function_parameters",
        )
    return {
        "type": "function",
        "name": name,
        "description": tool.get("description"),
        "parameters": parameters,
        # Left out, the API makes a function strict (and its schema strict-shaped).
        "strict": True if strict is None else strict,
    }


def _tool_choice(raw: Any, tools: list[dict[str, Any]]) -> str | dict[str, Any]:
    if raw is None:
        return "auto"
    if raw in _TOOL_CHOICES:
        if raw == "required" and not tools:
            raise invalid(
                "Tool choice 'required' must be specified with 'tools' parameter.", "tool_choice"
            )
        return str(raw)
    if isinstance(raw, dict) and raw.get("type") == "function":
        name = raw.get("name")
        if not any(t["name"] == name for t in tools):
            raise invalid(
                f"Tool choice '{name}' not found in 'tools' parameter.",
                "tool_choice",
                "invalid_value",
            )
        return {"type": "function", "name": name}
    raise invalid(
        "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
        "{'type': 'function', 'name': ...}.",
        "tool_choice",
        "invalid_value",
    )
