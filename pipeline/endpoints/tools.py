"""Tool calls: the job's functions offered to the model, and the bounded loop that runs them.

    runner = ToolRunner.load(Path("jobs/lookup.py"), ("get_weather",))
    runner.call_all([{"id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}])
    # [{"id": "c1", "name": "get_weather", "content": '{"temp_c": 4}'}]

Every endpoint reads tool calls into one shape, `{"id", "name", "arguments"}` with the
arguments as the JSON text the model wrote; that shape is the `tool_calls` column.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from pipeline.errors import SpecError
from pipeline.spec import ToolSpec


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


class ToolRunner:
    """The job's Python functions, called by name with the model's arguments."""

    def __init__(self, functions: dict[str, Callable[..., Any]]) -> None:
        self._functions = functions

    @classmethod
    def load(cls, module: Path, names: Sequence[str]) -> ToolRunner:
        """Import `module` and find a function for every tool; SpecError names what lacks."""
        if not module.is_file():
            raise SpecError(
                f"run_tools = true: the tool functions' module {module} does not exist; "
                "write a function per tool there, or set tools_module"
            )
        spec = importlib.util.spec_from_file_location(f"pipeline_tools_{module.stem}", module)
        if spec is None or spec.loader is None:
            raise SpecError(f"cannot import the tool functions from {module}")
        loaded = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(loaded)
        except Exception as exc:  # the user's code: any error is a job error
            raise SpecError(f"importing {module} failed: {type(exc).__name__}: {exc}") from None
        functions = {}
        for name in names:
            function = getattr(loaded, name, None)
            if not callable(function):
                raise SpecError(f"{module} has no function `{name}` for the tool of that name")
            functions[name] = function
        return cls(functions)

    def call_all(self, calls: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each call's result as text. A failing call's error goes back to the model."""
        return [{**call, "content": self._call(call)} for call in calls]

    def _call(self, call: dict[str, Any]) -> str:
        function = self._functions.get(call["name"])
        if function is None:
            return f"error: there is no tool named {call['name']!r}"
        try:
            arguments = orjson.loads(call.get("arguments") or "{}")
        except orjson.JSONDecodeError as exc:
            return f"error: the arguments are not valid JSON: {exc}"
        if not isinstance(arguments, dict):
            return "error: the arguments must be a JSON object"
        try:
            inspect.signature(function).bind(**arguments)
        except TypeError as exc:
            return f"error: wrong arguments for {call['name']}: {exc}"
        try:
            result = function(**arguments)
        except Exception as exc:  # reported to the model, which may try again
            return f"error: {type(exc).__name__}: {exc}"
        if isinstance(result, str):
            return result
        return orjson.dumps(result, default=str).decode()
