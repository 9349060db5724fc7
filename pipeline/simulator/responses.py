"""POST /v1/responses: OpenAI's Responses API, checked and answered as the real one does.

`Simulator._app` registers `responses_route(simulator)`; requests go through the same
`_post` as chat completions (key, `<<sim:...>>` directives, rate limits, faults), and
are counted and cut like them: the same prompt estimate, one token per word of a plain
answer, four characters per token of a JSON one, reasoning tokens for o-models.

The body is checked like the real API checks it: unknown parameters and chat-only ones
(`response_format`, `max_tokens`, `messages`, `stop`, `seed`) are a 400 naming them;
`input` is a string or a list of message, function_call and function_call_output
items with valid roles and content parts; every function call has its output and
every output its call; `text.format` json_schema follows the strict rules; function
tools have valid names and, when strict, valid parameter schemas.

The answer is a Response: a `message` with an `output_text` part (JSON made from the
schema with text.format json_schema), or, when tools are given and the input holds no
function_call_output yet, a `function_call` with arguments made from the tool's
parameters; once the outputs are there, the final message. `max_output_tokens` cuts
the output and makes the status "incomplete". A request whose last user message holds
one of these is answered, every time, with a Response of that kind (and so are the
later rounds of its tool loop, which carry that message on):

    <<sim:refusal>>        a message whose one part is a refusal
    <<sim:failed>>         status "failed", error code invalid_prompt
    <<sim:failedserver>>   status "failed", error code server_error
    <<sim:filtered>>       status "incomplete" for content_filter, the text cut short
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from pipeline.simulator import (
    _REASONING_TOKENS,
    DEFAULT_COMPLETION_COST,
    FUNCTION_NAME,
    Simulator,
    _bad_name,
    _content_text,
    _fake_json,
    _invalid,
    _is_reasoning,
    _missing,
    _model,
    _not_one_of,
    _schema_answer,
    _sentence_tokens,
    _strict_problem,
    _text_tokens,
    _wrong_type,
    count_text,
)
from pipeline.simulator.tools import call_id, tools_tokens
from pipeline.simulator.vision import REMOTE_SIZE, ImageProblem, image_part_tokens, tokens_for

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
_REFUSAL: Final = "I'm sorry, but I can't help with that request."
_FAILURES: Final = {
    "failed": (
        "invalid_prompt",
        "Invalid prompt: your prompt was flagged as potentially violating our usage policy.",
    ),
    "failedserver": (
        "server_error",
        "The server had an error while processing your request. Sorry about that!",
    ),
}
_NO_PARAMETERS: Final = {"type": "object", "properties": {}}


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


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def responses_route(simulator: Simulator) -> Handler:
    """The handler for POST /v1/responses on `simulator`."""

    def answer(job: ResponsesJob, digest: bytes) -> dict[str, Any]:
        return answer_responses(simulator, job, digest)

    async def handle(request: web.Request) -> web.StreamResponse:
        return await simulator._guarded(
            request, lambda started: simulator._post(request, started, parse_responses, answer)
        )

    return handle


# ---------------------------------------------------------------------------------------
# The request


def parse_responses(payload: dict[str, Any]) -> ResponsesJob:
    """Check a CreateResponse body as the API does; raise the 400 it would send."""
    _check_parameters(payload)
    model = _model(payload)
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
        prompt_tokens=_prompt_tokens(instructions, items, model) + tools_tokens(payload, model),
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
            raise _invalid(
                f"Unsupported parameter: '{name}'. In the Responses API, this parameter has "
                f"moved to '{_MOVED[name]}'. Try again with the new parameter.",
                name,
                "unsupported_parameter",
            )
        if name not in _PARAMETERS:
            raise _invalid(f"Unknown parameter: '{name}'.", name, "unknown_parameter")


def _refuse_unsupported(payload: Mapping[str, Any]) -> None:
    """What the real API takes but the simulator cannot do: a 400 that says so."""
    for name, why in (
        ("stream", "does not stream"),
        ("background", "answers in the foreground only"),
        ("conversation", "keeps no conversations"),
        ("prompt", "has no stored prompts"),
    ):
        if payload.get(name):
            raise _invalid(
                f"The simulator {why}; send the request without '{name}'.",
                name,
                "unsupported_parameter",
            )
    previous = payload.get("previous_response_id")
    if previous is not None:
        # The simulator stores nothing, as the real API with store = false.
        raise _invalid(
            f"Previous response with id '{previous}' not found.",
            "previous_response_id",
            "previous_response_not_found",
        )


def _optional(payload: Mapping[str, Any], name: str, kind: type, expected: str) -> Any:
    value = payload.get(name)
    if value is not None and not isinstance(value, kind):
        raise _wrong_type(name, expected, value)
    return value


def _number(payload: Mapping[str, Any], name: str, most: float) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _wrong_type(name, "a number", value)
    if not 0 <= value <= most:
        raise _invalid(
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
        raise _wrong_type("max_output_tokens", "an integer", value)
    if value < _MIN_OUTPUT_TOKENS:
        raise _invalid(
            "Invalid 'max_output_tokens': integer below minimum value. Expected a value >= "
            f"{_MIN_OUTPUT_TOKENS}, but got {value} instead.",
            "max_output_tokens",
            "integer_below_min_value",
        )
    return value


def _input(raw: Any) -> list[dict[str, Any]]:
    if raw is None:
        raise _missing("input")
    if isinstance(raw, str):
        return [{"type": "message", "role": "user", "content": raw}]
    if not isinstance(raw, list):
        raise _wrong_type("input", "a string or an array of input items", raw)
    if not raw:
        raise _invalid(
            "Invalid 'input': empty array. Expected an array with minimum length 1.",
            "input",
            "empty_array",
        )
    return [_item(item, f"input[{i}]") for i, item in enumerate(raw)]


def _item(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise _wrong_type(where, "an object", item)
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
            raise _missing(f"{where}.output")
        if not isinstance(output, str | list):
            raise _wrong_type(f"{where}.output", "a string or an array of content parts", output)
    elif kind is None:
        raise _missing(f"{where}.role")
    else:
        raise _invalid(
            f"Invalid value: '{kind}'. The simulator takes input items of type 'message', "
            "'function_call' and 'function_call_output'.",
            f"{where}.type",
            "invalid_value",
        )
    return {**item, "type": kind}


def _string(item: Mapping[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if value is None:
        raise _missing(f"{where}.{key}")
    if not isinstance(value, str):
        raise _wrong_type(f"{where}.{key}", "a string", value)
    return value


def _message(item: Mapping[str, Any], where: str) -> None:
    role = item.get("role")
    if role is None:
        raise _missing(f"{where}.role")
    if role not in _ROLES:
        raise _not_one_of(role, _ROLES, f"{where}.role")
    content = item.get("content")
    if content is None:
        raise _missing(f"{where}.content")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _wrong_type(f"{where}.content", "a string or an array of content parts", content)
    allowed = _OUTPUT_PARTS if role == "assistant" else _INPUT_PARTS
    for index, part in enumerate(content):
        _part(part, allowed, f"{where}.content[{index}]")


def _part(part: Any, allowed: tuple[str, ...], where: str) -> None:
    if not isinstance(part, dict):
        raise _wrong_type(where, "an object", part)
    kind = part.get("type")
    if kind not in allowed:
        raise _not_one_of(kind, allowed, f"{where}.type")
    if kind in ("input_text", "output_text"):
        _string(part, "text", where)
    elif kind == "refusal":
        _string(part, "refusal", where)
    else:
        _image(part, where)


def _image(part: Mapping[str, Any], where: str) -> None:
    url, file_id = part.get("image_url"), part.get("file_id")
    if url is None and file_id is None:
        raise _missing(f"{where}.image_url")
    if url is not None and (
        not isinstance(url, str) or not url.startswith(("http://", "https://", "data:image/"))
    ):
        raise _invalid(
            f"Invalid '{where}.image_url'. Expected a valid URL, but got a value with an "
            "invalid format.",
            f"{where}.image_url",
            "invalid_value",
        )
    detail = part.get("detail")
    if detail is None:
        raise _missing(f"{where}.detail")
    if detail not in _DETAILS:
        raise _not_one_of(detail, _DETAILS, f"{where}.detail")


def _check_calls_paired(items: list[dict[str, Any]]) -> None:
    """Every function call has its output after it, and every output its call before it."""
    called: set[str] = set()
    answered: set[str] = set()
    for item in items:
        if item["type"] == "function_call":
            called.add(item["call_id"])
        elif item["type"] == "function_call_output":
            if item["call_id"] not in called:
                raise _invalid(
                    f"No tool call found for function call output with call_id {item['call_id']}.",
                    "input",
                )
            answered.add(item["call_id"])
    missing = sorted(called - answered)
    if missing:
        raise _invalid(f"No tool output found for function call {missing[0]}.", "input")


def _last_message_text(items: list[dict[str, Any]]) -> str:
    """Where directives are read: the last user message's text, which a tool loop's
    later rounds carry on (their calls and outputs, and what the model said, follow it)."""
    messages = [i for i in items if i["type"] == "message"]
    users = [m for m in messages if m["role"] == "user"] or messages
    return _content_text(users[-1]["content"]) if users else ""


def _text_format(
    text: Any, instructions: str | None, items: list[dict[str, Any]]
) -> dict[str, Any]:
    if text is None:
        return {"type": "text"}
    if not isinstance(text, dict):
        raise _wrong_type("text", "an object", text)
    fmt = text.get("format")
    if fmt is None:
        return {"type": "text"}
    if not isinstance(fmt, dict):
        raise _wrong_type("text.format", "an object", fmt)
    kind = fmt.get("type")
    if kind not in _FORMATS:
        raise _not_one_of(kind, _FORMATS, "text.format.type")
    if kind == "json_schema":
        _check_schema_format(fmt)
    if kind == "json_object" and not _mentions_json(instructions, items):
        raise _invalid(
            "Response input messages must contain the word 'json' in some form to use "
            "'text.format' of type 'json_object'.",
            "input",
        )
    return fmt


def _check_schema_format(fmt: Mapping[str, Any]) -> None:
    name = _string(fmt, "name", "text.format")
    schema = fmt.get("schema")
    if schema is None:
        raise _missing("text.format.schema")
    if not isinstance(schema, dict):
        raise _wrong_type("text.format.schema", "an object", schema)
    if fmt.get("strict") and (problem := _strict_problem(schema, ())):
        raise _invalid(
            f"Invalid schema for response_format '{name}': {problem}",
            "text.format.schema",
            "invalid_json_schema",
        )


def _mentions_json(instructions: str | None, items: list[dict[str, Any]]) -> bool:
    texts = [instructions or ""]
    texts += [_content_text(i["content"]) for i in items if i["type"] == "message"]
    return any("json" in t.lower() for t in texts)


def _tools(raw: Any) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _wrong_type("tools", "an array of tools", raw)
    return [_tool(tool, f"tools[{index}]") for index, tool in enumerate(raw)]


def _tool(tool: Any, where: str) -> dict[str, Any]:
    """A function tool, as the Response echoes it back (strict filled in)."""
    if not isinstance(tool, dict):
        raise _wrong_type(where, "an object", tool)
    if tool.get("type") != "function":
        raise _invalid(
            f"Invalid value: {tool.get('type')!r}. The simulator serves tools of type "
            "'function' only.",
            f"{where}.type",
            "invalid_value",
        )
    name = _string(tool, "name", where)
    if not FUNCTION_NAME.fullmatch(name):
        raise _bad_name(f"{where}.name")
    parameters = tool.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise _wrong_type(f"{where}.parameters", "an object", parameters)
    strict = tool.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _wrong_type(f"{where}.strict", "a boolean", strict)
    if strict and parameters is not None and (problem := _strict_problem(parameters, ())):
        raise _invalid(
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
            raise _invalid(
                "Tool choice 'required' must be specified with 'tools' parameter.", "tool_choice"
            )
        return str(raw)
    if isinstance(raw, dict) and raw.get("type") == "function":
        name = raw.get("name")
        if not any(t["name"] == name for t in tools):
            raise _invalid(
                f"Tool choice '{name}' not found in 'tools' parameter.",
                "tool_choice",
                "invalid_value",
            )
        return {"type": "function", "name": name}
    raise _invalid(
        "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
        "{'type': 'function', 'name': ...}.",
        "tool_choice",
        "invalid_value",
    )


def _prompt_tokens(instructions: str | None, items: list[dict[str, Any]], model: str) -> int:
    """As chat completions counts: each item's tokens + 4, and 3 for the reply.

    Images count by their size, as on chat completions; the tools are added by the caller.
    """
    total = 3
    if instructions is not None:
        total += count_text(instructions, model) + 4
    for item in items:
        kind = item["type"]
        if kind == "message":
            total += _parts_tokens(item["content"], model) + 4
        elif kind == "function_call":
            total += count_text(item["name"] + item["arguments"], model) + 4
        else:
            total += count_text(_content_text(item["output"]), model) + 4
    return total


def _parts_tokens(content: str | list[dict[str, Any]], model: str) -> int:
    """The tokens of a message's content: its texts', and its images' by their size."""
    if isinstance(content, str):
        return count_text(content, model)
    total = 0
    for part in content:
        if part["type"] == "input_image":
            total += _image_tokens(part, model)
        else:
            total += count_text(str(part.get("text") or part.get("refusal") or ""), model)
    return total


def _image_tokens(part: Mapping[str, Any], model: str) -> int:
    """An `input_image` part's tokens, by chat completions' rules for an `image_url` one."""
    # "original" keeps the full resolution: at least what "high" costs.
    detail = "high" if part["detail"] == "original" else part["detail"]
    url = part.get("image_url")
    if url is None:  # an uploaded file (file_id): its size is unknown here
        return tokens_for(REMOTE_SIZE, detail, model)
    try:
        return image_part_tokens({"image_url": {"url": url, "detail": detail}}, model)
    except ImageProblem as problem:
        raise _invalid(str(problem), "input", problem.code) from None


# ---------------------------------------------------------------------------------------
# The answer


def answer_responses(sim: Simulator, job: ResponsesJob, digest: bytes) -> dict[str, Any]:
    """The Response for a checked request: a pure function of the seed and the body."""
    rng = sim._rng(digest)
    if job.outcome in _FAILURES:
        code, message = _FAILURES[job.outcome]
        usage = _usage(sim, job, 0, 0)
        return _response(sim, job, "failed", [], usage, error={"code": code, "message": message})
    reasoning = rng.randint(*_REASONING_TOKENS) if _is_reasoning(job.model) else 0
    budget = None
    if job.max_output_tokens is not None:
        reasoning = min(reasoning, job.max_output_tokens)
        budget = job.max_output_tokens - reasoning
    tool = _tool_to_call(job)
    tokens = _output_tokens(job, tool, rng)
    status, reason = "completed", None
    if job.outcome == "filtered":
        tokens, status, reason = tokens[: len(tokens) // 2], "incomplete", "content_filter"
    if budget is not None and len(tokens) > budget:
        # Cut like the real API: mid-sentence, mid-JSON; a reasoning model whose thinking
        # ate the whole budget leaves no message at all.
        tokens, status, reason = tokens[:budget], "incomplete", "max_output_tokens"
    output: list[dict[str, Any]] = []
    if reasoning:
        output.append({"id": _id(sim, "rs"), "type": "reasoning", "summary": []})
    if tokens or status == "completed":
        item_status = "completed" if status == "completed" else "incomplete"
        output.append(_output_item(sim, job, tool, "".join(tokens), item_status, rng))
    usage = _usage(sim, job, len(tokens) + reasoning, reasoning)
    return _response(sim, job, status, output, usage, reason=reason)


def _tool_to_call(job: ResponsesJob) -> dict[str, Any] | None:
    """The function the model calls now, or None for a message.

    The first tool is called (the forced one, if named) until the outputs are in the
    input; a forced choice (a named function, or "required") calls again every time,
    as on the real API and on the simulator's chat completions.
    """
    choice = job.tool_choice
    if not job.tools or choice == "none" or job.outcome == "refusal":
        return None
    if isinstance(choice, dict):
        return next(t for t in job.tools if t["name"] == choice["name"])
    if job.tools_answered and choice != "required":
        return None
    return job.tools[0]


def _output_tokens(job: ResponsesJob, tool: dict[str, Any] | None, rng: random.Random) -> list[str]:
    if tool is not None:
        try:
            arguments = _fake_json(tool["parameters"] or _NO_PARAMETERS, rng)
        except (LookupError, TypeError, ValueError, AttributeError) as error:
            raise _invalid(
                f"Invalid schema for function '{tool['name']}': {error!r}",
                "tools",
                "invalid_function_parameters",
            ) from None
        return _text_tokens(orjson.dumps(arguments).decode())
    if job.outcome == "refusal":
        return _text_tokens(_REFUSAL)
    fmt = job.text_format
    if fmt["type"] == "json_schema":
        return _text_tokens(orjson.dumps(_schema_answer(fmt, rng)).decode())
    if fmt["type"] == "json_object":
        return _text_tokens(orjson.dumps({"answer": "".join(_sentence_tokens(rng))}).decode())
    return _sentence_tokens(rng)


def _output_item(
    sim: Simulator,
    job: ResponsesJob,
    tool: dict[str, Any] | None,
    text: str,
    status: str,
    rng: random.Random,
) -> dict[str, Any]:
    if tool is not None:
        return {
            "id": _id(sim, "fc"),
            "type": "function_call",
            "status": status,
            # Drawn from the body's stream, not counted: the call id goes back in the next
            # request, whose answer then stays a pure function of the seed and the rows.
            "call_id": call_id(rng),
            "name": tool["name"],
            "arguments": text,
        }
    part: dict[str, Any]
    if job.outcome == "refusal":
        part = {"type": "refusal", "refusal": text}
    else:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {
        "id": _id(sim, "msg"),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [part],
    }


def _id(sim: Simulator, prefix: str) -> str:
    return f"{prefix}_{sim._id_prefix}{next(sim._ids):012x}"


def _usage(sim: Simulator, job: ResponsesJob, output: int, reasoning: int) -> dict[str, Any]:
    prompt = job.prompt_tokens
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": _cached(sim, job), "cache_write_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + output,
    }


def _cached(sim: Simulator, job: ResponsesJob) -> int:
    """The cached share, once the same instructions (or, without them, the same first
    input item) were answered: the prefix a cache would hold."""
    prefix = job.items[0] if job.instructions is None else job.instructions
    return sim.cached_share(prefix, job.prompt_tokens)


def _response(
    sim: Simulator,
    job: ResponsesJob,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any],
    *,
    error: dict[str, str] | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    now = int(time.time())
    settings = job.settings
    return {
        "id": _id(sim, "resp"),
        "object": "response",
        "created_at": now,
        "status": status,
        "background": False,
        "completed_at": now if status == "completed" else None,
        "error": error,
        "incomplete_details": {"reason": reason} if reason else None,
        "instructions": job.instructions,
        "max_output_tokens": job.max_output_tokens,
        "max_tool_calls": None,
        "model": job.model,
        "output": output,
        "parallel_tool_calls": settings["parallel_tool_calls"] is not False,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": settings["store"] is not False,
        "temperature": 1.0 if settings["temperature"] is None else settings["temperature"],
        "text": {"format": job.text_format, "verbosity": "medium"},
        "tool_choice": job.tool_choice,
        "tools": job.tools,
        "top_p": 1.0 if settings["top_p"] is None else settings["top_p"],
        "truncation": "disabled",
        "usage": usage,
        "metadata": settings["metadata"],
    }
