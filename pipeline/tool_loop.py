"""The tool loop: the job's functions run for the model's calls, and the results sent back,
round after round, above the dispatcher's retry loop.

    runner = ToolRunner.load(Path("jobs/lookup.py"), ("get_weather",))
    runner.call_all([{"id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}])
    # [{"id": "c1", "name": "get_weather", "content": '{"temp_c": 4}'}]

    loop = ToolLoop(dispatcher, runner, endpoint, build, max_rounds=5)
    outcome = await loop.send(work)   # each round is one dispatcher.send, with its retries

Every endpoint reads tool calls into one shape, `{"id", "name", "arguments"}` with the
arguments as the JSON text the model wrote; that shape is the `tool_calls` column. The
row's answer is the last round's, with the usage of every round (all of it was billed)
and the calls that led to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import orjson

from pipeline.dispatch import Dispatcher
from pipeline.endpoints import Endpoint
from pipeline.errors import ResponseInvalid, SpecError
from pipeline.records import Answer, HttpRequest, Outcome, Usage, Work


class Build(Protocol):
    """Builds the HTTP request for payloads (prepare.RequestBuilder)."""

    def __call__(self, payloads: Sequence[Any], /) -> HttpRequest: ...


class ToolLoop:
    """A row's rounds: send, run the calls its answer asks for, send their results back,
    until an answer with no calls, or `max_rounds` rounds of them (then the row fails)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        tools: ToolRunner,
        endpoint: Endpoint,
        build: Build,
        *,
        max_rounds: int,
    ) -> None:
        self._dispatcher = dispatcher
        self._tools = tools
        self._endpoint = endpoint
        self._build = build
        self.max_rounds = max_rounds

    async def send(self, work: Work) -> Outcome | None:
        """All rounds for one row. None when the run stopped before it was done."""
        outcome = await self._dispatcher.send(work)
        attempts, rounds = 0, 0
        spent = Usage()  # by earlier rounds
        made: list[dict[str, Any]] = []  # the calls those rounds ran, with their results
        while outcome is not None:
            attempts += outcome.attempts
            outcome.attempts = attempts
            if outcome.failure is not None or not outcome.answers:
                return outcome
            answer = _with_usage(outcome.answers[0], spent)
            outcome.answers = [answer]
            if not answer.extra.get("tool_calls"):
                if made:  # the final answer: the calls that led to it go with it
                    extra = {**answer.extra, "tool_calls": made}
                    outcome.answers = [dataclasses.replace(answer, extra=extra)]
                return outcome
            if rounds >= self.max_rounds:
                outcome.failure = ResponseInvalid(
                    f"the model still called tools after {rounds} rounds "
                    "(max_tool_rounds): no final answer"
                )
                return outcome
            rounds += 1
            spent = answer.usage
            # In a thread: the job's functions may block.
            work, ran = await asyncio.to_thread(self._next_work, work, answer)
            made.extend(ran)
            outcome = await self._dispatcher.send(work, follow_up=True)
        return None

    def _next_work(self, work: Work, answer: Answer) -> tuple[Work, list[dict[str, Any]]]:
        """The row's next request, and the calls run with their results."""
        calls = list(answer.extra.get("tool_calls") or ())
        results = self._tools.call_all(calls)
        payload = self._endpoint.follow_up(work.payload, answer, results)
        # The last prompt, plus the model's message with its calls and a message per
        # result. Not the body's length: it carries images as base64, not counted so.
        count = self._endpoint.count
        added = count(answer.text or "") + 4 + sum(count(c["name"] + c["arguments"]) for c in calls)
        added += sum(count(str(r["content"])) + 4 for r in results)
        prompt = work.weights[0] + added
        out = self._endpoint.max_output_tokens()
        ran = [{**call, "result": r["content"]} for call, r in zip(calls, results, strict=True)]
        following = dataclasses.replace(
            work,
            request=self._build([payload]),
            tokens=prompt + out,
            weights=(prompt,),
            payload=payload,
        )
        return following, ran


def _with_usage(answer: Answer, earlier: Usage) -> Answer:
    """The answer with the usage of the loop's earlier rounds added: all was billed."""
    total = {
        f.name: getattr(answer.usage, f.name) + getattr(earlier, f.name)
        for f in dataclasses.fields(Usage)
    }
    return dataclasses.replace(answer, usage=Usage(**total))


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
