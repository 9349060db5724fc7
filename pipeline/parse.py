"""Response -> result columns: the answer text, a JSON answer's typed fields, usage.

    check = AnswerCheck(schema)          # once per run
    check(answer)                        # per row: raises ResponseInvalid if it does not fit
    fields_dtype(schema)                 # the polars Struct the JSON fields decode to

A JSON answer is validated when it arrives, so a row whose answer breaks the schema is
a failed row (keeping the raw text), not a surprise when the output is written.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import orjson
import polars as pl

from pipeline.cost import Pricer
from pipeline.errors import AnswerFiltered, ResponseInvalid
from pipeline.records import Answer, Outcome, RowResult, Usage

#: The result columns every output has, after the input columns, with their types.
RESULT_SCHEMA: dict[str, pl.DataType] = {
    "status": pl.String(),
    "error_type": pl.String(),
    "error": pl.String(),
    "http_status": pl.Int32(),
    "attempts": pl.Int32(),
    "finish_reason": pl.String(),
    "response": pl.String(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
    "cached_tokens": pl.Int64(),
    "reasoning_tokens": pl.Int64(),
    "cost_usd": pl.Float64(),
    "latency_ms": pl.Float64(),
    "request_id": pl.String(),
    "model": pl.String(),
    # When the answer (or the failure) was recorded, in seconds since the epoch (the
    # output has it as a UTC timestamp), and which run of the job recorded it: a row
    # reused from an earlier run keeps that run's, so "answered by this run" is
    # `run == the latest`, what `--new-only` writes.
    "answered_at": pl.Float64(),
    "run": pl.Int32(),
}
#: Where a JSON answer's fields go, between `response` and the usage columns.
FIELDS_AFTER = "response"


@dataclass(frozen=True)
class OutputShape:
    """Which answer columns a job's output has, besides RESULT_SCHEMA's."""

    #: A JSON answer's typed fields, after `response`.
    fields: pl.Struct | None = None
    #: What `response` is written as: "response" (text), "embedding" (list[f32]),
    #: "image_path" (the file the image was written to).
    answer: str = "response"
    #: A `tool_calls` column (JSON text), after the answer.
    tool_calls: bool = False

    def columns(self) -> list[str]:
        """The result column names, in order."""
        names = [self.answer if n == FIELDS_AFTER else n for n in RESULT_SCHEMA]
        at = names.index(self.answer) + 1
        extra = [f.name for f in self.fields.fields] if self.fields is not None else []
        if self.tool_calls:
            extra.append("tool_calls")
        names[at:at] = extra
        return names


def to_results(
    outcome: Outcome, pricer: Pricer, *, answered_at: float | None = None, run: int | None = None
) -> list[RowResult]:
    """The stored result of each row of a request: its answer's columns, its failure's, or
    both; recorded at `answered_at` by the job's run number `run`."""
    failure = outcome.failure
    answers = outcome.answers
    if answers is None and isinstance(failure, ResponseInvalid) and failure.answer is not None:
        answers = [failure.answer]  # type: ignore[list-item]
    work = outcome.work
    results = []
    for index, row in enumerate(work.rows):
        result = RowResult(
            row=row,
            request_hash=work.digests[index],
            status="ok" if failure is None else "failed",
            attempts=outcome.attempts,
            http_status=outcome.http_status,
            latency_ms=outcome.latency_ms,
            answered_at=answered_at,
            run=run,
        )
        if failure is not None:
            result.error_type, result.error = failure.kind, failure.message
        if answers is not None:
            _fill_answer(result, answers[index], pricer)
        results.append(result)
    return results


def _fill_answer(result: RowResult, answer: Answer, pricer: Pricer) -> None:
    usage = answer.usage
    result.finish_reason = answer.finish_reason
    result.response = answer.text
    calls = answer.extra.get("tool_calls")
    if calls:
        result.tool_calls = orjson.dumps(calls).decode()
    result.request_id = answer.request_id
    result.model = answer.model
    if usage == _NO_USAGE and not pricer.per_request:
        # An answer without `usage` (a proxy or server that drops it) was generated and
        # billed all the same: its tokens and cost are unknown, not zero.
        return
    result.prompt_tokens = usage.prompt_tokens
    result.completion_tokens = usage.completion_tokens
    result.cached_tokens = usage.cached_tokens
    result.reasoning_tokens = usage.reasoning_tokens
    # A failed answer (bad JSON) was still generated, and billed.
    result.cost_usd = pricer.cost(usage)


#: What an answer whose body has no `usage` reads as.
_NO_USAGE = Usage()


class AnswerCheck:
    """Does an answer satisfy the job? JSON modes need a JSON object; a schema, a match."""

    def __init__(self, schema: dict[str, Any] | None, *, json_object: bool = False) -> None:
        self._validator = None
        if schema is not None:
            # Imported only for a job with a schema: jsonschema costs 0.07 s of start-up.
            from jsonschema import Draft202012Validator

            self._validator = Draft202012Validator(schema)
        self._json = json_object or schema is not None

    def __call__(self, answer: Answer) -> Answer:
        """The answer, its JSON normalised if need be; raise ResponseInvalid if it fails."""
        if answer.data is not None:
            return answer  # a file (a generated image): its path becomes the text once written
        if answer.text is None:
            refusal = answer.extra.get("refusal")
            if refusal:
                raise ResponseInvalid(f"the model refused: {refusal}")
            if answer.finish_reason == "content_filter":
                raise AnswerFiltered(
                    "the provider's content filter withheld the answer (finish_reason "
                    "content_filter); only this row fails. Change its text to send it"
                )
            if not answer.extra.get("tool_calls"):
                raise ResponseInvalid("the answer has no content")
            return answer
        if not self._json:
            return answer
        value, answer = _json_value(answer)
        if self._validator is None:
            if not isinstance(value, dict):
                raise ResponseInvalid("the answer is JSON but not an object")
            return answer
        error = next(iter(self._validator.iter_errors(value)), None)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            raise ResponseInvalid(
                f"the answer does not match the schema at {where}: {error.message}"
            )
        return answer


def _json_value(answer: Answer) -> tuple[Any, Answer]:
    """The answer's JSON value, and the answer with JSON any parser reads.

    Some servers' JSON grammars (llama-cpp-python's) let a raw newline or tab into a
    string, which strict JSON forbids; such an answer is read leniently and stored
    re-serialised, so the typed columns decode it.
    """
    assert answer.text is not None
    try:
        return orjson.loads(answer.text), answer
    except orjson.JSONDecodeError as exc:
        error = exc
    try:
        value = json.loads(answer.text, strict=False)
    except json.JSONDecodeError:
        cut = " (cut off by max_tokens)" if answer.finish_reason == "length" else ""
        raise ResponseInvalid(f"the answer is not valid JSON{cut}: {error}") from None
    return value, dataclasses.replace(answer, text=orjson.dumps(value).decode())


def strict_schema_problem(schema: Any, where: str = "(root)") -> str | None:
    """Why OpenAI would refuse `schema` in strict mode, or None.

    Strict structured outputs need every object to list all its properties in
    `required` and to set `additionalProperties: false`; the API answers 400 otherwise,
    on every row. Found here, it costs nothing.
    """
    if not isinstance(schema, dict):
        return None
    if schema.get("type") == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        if schema.get("additionalProperties") is not False:
            return f'{where}: set "additionalProperties": false'
        missing = sorted(set(props) - set(schema.get("required") or ()))
        if missing:
            return (
                f'{where}: list every property in "required" (missing: {", ".join(missing)}); '
                'make optional ones nullable, e.g. "type": ["string", "null"]'
            )
        for name, sub in props.items():
            if problem := strict_schema_problem(sub, f"{where}/{name}"):
                return problem
    for key in ("items", "anyOf", "oneOf", "allOf", "$defs", "definitions"):
        sub = schema.get(key)
        subs = (
            sub.values()
            if isinstance(sub, dict) and key in ("$defs", "definitions")
            else (sub if isinstance(sub, list) else [sub])
        )
        for item in subs:
            if problem := strict_schema_problem(item, f"{where}/{key}"):
                return problem
    return None


def fields_dtype(schema: dict[str, Any]) -> pl.Struct:
    """The polars type a JSON answer decodes to, from its schema's properties."""
    dtype = _dtype(schema)
    if not isinstance(dtype, pl.Struct):
        raise ValueError("a JSON schema for structured output must describe an object")
    return dtype


def _dtype(schema: dict[str, Any]) -> pl.DataType:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind is None:
        options = schema.get("anyOf") or schema.get("oneOf") or []
        typed = [o for o in options if isinstance(o, dict) and o.get("type") != "null"]
        if typed:
            return _dtype(typed[0])
        kind = "string"
    if kind == "object":
        props = schema.get("properties") or {}
        return pl.Struct({name: _dtype(sub) for name, sub in props.items()})
    if kind == "array":
        return pl.List(_dtype(schema.get("items") or {}))
    return _SCALARS.get(kind, pl.String())


_SCALARS: dict[str, pl.DataType] = {
    "string": pl.String(),
    "integer": pl.Int64(),
    "number": pl.Float64(),
    "boolean": pl.Boolean(),
}
