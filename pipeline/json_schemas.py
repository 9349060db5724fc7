"""The job's JSON schemas, checked before a request is sent, and the typed columns they give.

    schema = job.json_schema()
    check_schemas(job, schema)                   # SpecError if the API would refuse one
    fields = answer_fields(job, schema)          # pl.Struct of the answer's columns, or None
    check_field_names(OutputShape(fields=fields))  # none named like a result column

A schema the API (or our own validator) would refuse, a `$ref` that cannot be followed, a
property whose values its typed output column could not hold, a property named like a
result column: each is a job error here, before the answers are paid for, and not a
failed write after them.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from pipeline.errors import SpecError
from pipeline.parse import OutputShape, fields_dtype, strict_schema_problem
from pipeline.spec import Job


def check_schemas(job: Job, schema: dict[str, Any] | None) -> None:
    """A JSON schema the API (or our own validator) would refuse is a job error, here."""
    if schema is not None:
        spec = job.request.json_schema
        where = (
            f"{spec.file}"
            if spec is not None and spec.file is not None
            else ("[request.json_schema] schema")
        )
        _check_schema(schema, where)
    for tool in job.request.tools:
        _check_schema(tool.parameters, f"the parameters of tool `{tool.name}`")


#: JSON schema's `type` names, for the message about one that is not.
_JSON_TYPES = "string, number, integer, boolean, object, array, null"


def _check_schema(schema: dict[str, Any], where: str) -> None:
    # Imported only for a job with a schema: jsonschema costs 0.07 s of start-up.
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        at = list(exc.absolute_path)
        path = "/".join(str(p) for p in at) or "(root)"
        valid = f" (valid types: {_JSON_TYPES})" if "type" in at[-2:] else ""
        raise SpecError(
            f"{where}: not a valid JSON schema at {path}: {_one_line(exc.message)}{valid}; "
            "see https://json-schema.org/understanding-json-schema/reference"
        ) from None


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else f"{line[:limit]}..."


def check_field_names(shape: OutputShape) -> None:
    """A JSON answer's fields become top-level columns: none may be named like another one."""
    if shape.fields is None:
        return
    others = set(OutputShape(answer=shape.answer, tool_calls=shape.tool_calls).columns())
    for name in (f.name for f in shape.fields.fields):
        if name in others or not name.strip():
            what = "a result column" if name.strip() else "no column name at all"
            raise SpecError(
                f"the JSON schema's property `{name}` would be written as a top-level output "
                f"column, and `{name}` is {what}: rename the property in the schema "
                "([output] prefix renames the result columns and the fields alike, so it "
                "cannot part them)"
            )


def answer_fields(job: Job, schema: dict[str, Any] | None) -> pl.Struct | None:
    """The JSON answer's typed columns; a schema the API would refuse is a job error."""
    if schema is None:
        return None
    spec = job.request.json_schema
    if spec is not None and spec.strict and (problem := strict_schema_problem(schema)):
        raise SpecError(
            f"the JSON schema breaks OpenAI's strict mode rules at {problem}; "
            "or set strict = false in [request.json_schema]"
        )
    inlined = _inline_refs(schema, schema)
    try:
        fields = fields_dtype(inlined)
    except ValueError as exc:
        raise SpecError(f"the JSON schema: {exc}") from None
    if problem := _loose_field(inlined, "(root)"):
        raise SpecError(
            f"the JSON schema at {problem}, which its typed output column cannot hold (the "
            "output could not be written after the answers were paid for): give it one "
            '`type`, e.g. "type": "string", and arrays their `items`'
        )
    return fields


#: How deep `$ref`s are followed to type the output's columns; deeper is recursive.
MAX_REF_DEPTH = 16
#: What an answer's value of each JSON type decodes into without error, by column type.
_DECODES: dict[str, set[str]] = {
    "string": {"string", "number", "integer", "boolean"},
    "integer": {"integer", "number"},
    "number": {"integer", "number"},
    "boolean": {"boolean"},
    "object": {"object"},
    "array": {"array"},
}
_JSON_KIND = {str: "string", bool: "boolean", int: "integer", float: "number", dict: "object"}


def _inline_refs(schema: Any, root: dict[str, Any], depth: int = 0) -> Any:
    """The schema with its local `$ref`s replaced by what they point at, to type columns."""
    if isinstance(schema, list):
        return [_inline_refs(item, root, depth) for item in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str):
        if depth >= MAX_REF_DEPTH or not ref.startswith("#"):
            raise SpecError(
                f"the JSON schema's `$ref` {ref!r} is recursive or not in the schema itself: "
                "its answers cannot be typed as output columns; inline it, or make that "
                'property a string ("type": "string")'
            )
        target: Any = root
        for part in ref.removeprefix("#").strip("/").split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            raise SpecError(f"the JSON schema's `$ref` {ref!r} points at nothing in the schema")
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        return _inline_refs({**target, **rest}, root, depth + 1)
    return {k: _inline_refs(v, root, depth) for k, v in schema.items()}


def _admits(schema: dict[str, Any]) -> set[str] | None:
    """The JSON types (null aside) a schema admits; None for any."""
    kind = schema.get("type")
    if kind is not None:
        kinds = set(kind) if isinstance(kind, list) else {kind}
    elif isinstance(options := schema.get("anyOf") or schema.get("oneOf"), list):
        kinds = set()
        for option in options:
            sub = _admits(option) if isinstance(option, dict) else None
            if sub is None:
                return None
            kinds |= sub
    elif isinstance(values := schema.get("enum"), list) or "const" in schema:
        values = values if isinstance(values, list) else [schema["const"]]
        kinds = {_JSON_KIND.get(type(v), "array") for v in values if v is not None}
    else:
        return None
    return kinds - {"null"}


def _loose_field(schema: Any, where: str) -> str | None:
    """Where a schema admits a value its column type (as `fields_dtype` picks it) cannot
    decode, said as 'PATH admits ...'; None if nowhere."""
    if not isinstance(schema, dict):
        return None
    admitted = _admits(schema)
    if admitted is None:
        return f"{where} admits any JSON value (it has no `type`)"
    typed = schema
    if "type" not in schema and isinstance(
        options := schema.get("anyOf") or schema.get("oneOf"), list
    ):
        typed = next((o for o in options if isinstance(o, dict) and o.get("type") != "null"), {})
    kind = typed.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    kind = kind if isinstance(kind, str) else "string"
    extra = admitted - _DECODES.get(kind, {"string"})
    if extra:
        return f"{where} admits {' and '.join(sorted(extra))} values as well as {kind}"
    if kind == "object":
        for name, sub in (typed.get("properties") or {}).items():
            if problem := _loose_field(sub, f"{where}/{name}"):
                return problem
    if kind == "array":
        items = typed.get("items")
        if not isinstance(items, dict):
            return f"{where} is an array with no `items` schema"
        return _loose_field(items, f"{where}/items")
    return None
