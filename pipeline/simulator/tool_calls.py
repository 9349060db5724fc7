"""Function tools in chat requests: checked as the API checks them, and called.

    call = tool_to_call(payload, messages)    # None: answer in text
    call.choice(index=0, max_tokens=64, rng=rng)   # (choice, completion tokens, reasoning)

When a request offers tools and its last message is not a tool result, the simulated
model calls one: the forced one, or else the first, with arguments faked from its
parameters schema. After a tool result it answers in text, unless `tool_choice` is
"required" or names a function: those force a call every turn, as they do on the real
API (a tool loop with them never ends by itself; max_tool_rounds must end it).
Like the real API, a named `tool_choice` answers with finish_reason "stop", the others
with "tool_calls".

Messages are checked as the API checks them: a `tool` message must answer a call of
the assistant message before it, and every call must be answered.
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from pipeline.simulator.api_errors import (
    FUNCTION_NAME,
    ApiError,
    bad_name,
    invalid,
    missing,
    not_one_of,
    wrong_type,
)
from pipeline.simulator.fake_answers import fake_json
from pipeline.simulator.text_tokens import by_four, count_text

_CHOICES: Final = ("none", "auto", "required")
_ID_CHARS: Final = string.ascii_letters + string.digits


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The call the simulated model makes to answer this request."""

    name: str
    parameters: Mapping[str, Any]
    #: A named tool_choice: the real API then says finish_reason "stop".
    forced: bool

    def choice(
        self, index: int, max_tokens: int | None, rng: random.Random
    ) -> tuple[dict[str, Any], int, int]:
        """One choice calling the tool, its completion tokens and reasoning tokens (0)."""
        try:
            arguments = orjson.dumps(fake_json(self.parameters, rng)).decode()
        except (LookupError, TypeError, ValueError, AttributeError) as error:
            raise invalid(
                f"Invalid schema for function '{self.name}': {error!r}",
                "tools",
                "invalid_function_parameters",
            ) from None
        finish = "stop" if self.forced else "tool_calls"
        tokens = by_four(len(arguments)) + 1
        if max_tokens is not None and tokens > max_tokens:
            # Cut mid-arguments, as the real API cuts a long call: the JSON is broken.
            arguments, tokens, finish = (
                arguments[: max(max_tokens - 1, 0) * 4],
                max_tokens,
                "length",
            )
        call = {
            "id": call_id(rng),
            "type": "function",
            "function": {"name": self.name, "arguments": arguments},
        }
        message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
        return (
            {"index": index, "message": message, "finish_reason": finish, "logprobs": None},
            tokens,
            0,
        )


def tool_to_call(payload: Mapping[str, Any], messages: list[dict[str, Any]]) -> ToolCall | None:
    """The call the model makes now, or None for a text answer; 400 for a bad request."""
    check_tool_messages(messages)
    tools = _tools(payload.get("tools"))
    choice = payload.get("tool_choice")
    if choice is not None and not tools:
        raise invalid(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' "
            "are specified.",
            "tool_choice",
        )
    if not tools:
        return None
    named = _named(choice, tools)
    if choice == "none":
        return None
    answered = messages[-1].get("role") == "tool"
    if answered and choice in (None, "auto"):
        return None
    function = named or tools[0]
    return ToolCall(function["name"], function.get("parameters") or {}, forced=named is not None)


def tools_tokens(payload: Mapping[str, Any], model: str) -> int:
    """What the offered tools add to the prompt: the tokens of their JSON."""
    tools = payload.get("tools")
    return count_text(orjson.dumps(tools).decode(), model) if tools else 0


def _tools(raw: Any) -> list[dict[str, Any]]:
    """The tools' `function` objects, checked."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise wrong_type("tools", "an array", raw)
    if not raw:
        raise invalid(
            "Invalid 'tools': empty array. Expected an array with minimum length 1, but got "
            "an empty array instead.",
            "tools",
            "empty_array",
        )
    functions = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict):
            raise wrong_type(f"tools[{i}]", "an object", tool)
        if tool.get("type") != "function":
            raise not_one_of(tool.get("type"), ("function", "custom"), f"tools[{i}].type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise missing(f"tools[{i}].function")
        name = function.get("name")
        if name is None:
            raise missing(f"tools[{i}].function.name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise bad_name(f"tools[{i}].function.name")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise wrong_type(f"tools[{i}].function.parameters", "an object", parameters)
        functions.append(function)
    return functions


def _named(choice: Any, tools: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The function a tool_choice forces, None for "none"/"auto"/"required"; 400 if bad."""
    if choice is None or choice in _CHOICES:
        return None
    if isinstance(choice, str):
        raise not_one_of(choice, _CHOICES, "tool_choice")
    if not isinstance(choice, dict) or choice.get("type") != "function":
        raise wrong_type("tool_choice", "a string or a function tool choice object", choice)
    name = (choice.get("function") or {}).get("name")
    if name is None:
        raise missing("tool_choice.function.name")
    found = next((f for f in tools if f["name"] == name), None)
    if found is None:
        raise invalid(
            f"Invalid value for 'tool_choice': function '{name}' is not one of the 'tools'.",
            "tool_choice",
        )
    return found


def check_tool_messages(messages: list[dict[str, Any]]) -> None:
    """Every `tool` message answers a call of the assistant before it; every call is answered."""
    waiting: dict[str, int] = {}  # call id -> index of the assistant message that made it
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id is None:
                raise missing(f"messages[{i}].tool_call_id")
            if call_id not in waiting:
                raise invalid(
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'.",
                    f"messages.[{i}].role",
                )
            del waiting[call_id]
            continue
        if waiting:
            raise _unanswered(waiting)
        if role == "assistant":
            waiting = {call_id: i for call_id in _call_ids(message, i)}
    if waiting:
        raise _unanswered(waiting)


def _call_ids(message: Mapping[str, Any], index: int) -> list[str]:
    calls = message.get("tool_calls")
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise wrong_type(f"messages[{index}].tool_calls", "an array", calls)
    ids = []
    for j, call in enumerate(calls):
        where = f"messages[{index}].tool_calls[{j}]"
        if not isinstance(call, dict):
            raise wrong_type(where, "an object", call)
        for field in ("id", "function"):
            if field not in call:
                raise missing(f"{where}.{field}")
        function = call["function"]
        if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
            raise missing(f"{where}.function.arguments")
        ids.append(str(call["id"]))
    return ids


def _unanswered(waiting: Mapping[str, int]) -> ApiError:
    index = next(iter(waiting.values()))
    return invalid(
        "An assistant message with 'tool_calls' must be followed by tool messages responding "
        "to each 'tool_call_id'. The following tool_call_ids did not have response messages: "
        + ", ".join(waiting),
        f"messages.[{index}].role",
    )


def call_id(rng: random.Random) -> str:
    """A tool call's id as OpenAI writes them ("call_" + 24 letters and digits), drawn
    from the answer's own random stream so the same request gets the same id."""
    return "call_" + "".join(rng.choices(_ID_CHARS, k=24))
