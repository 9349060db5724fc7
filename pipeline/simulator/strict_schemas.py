"""What strict Structured Outputs refuses in a JSON schema, as the API words it.

    strict_problem({"type": "object", "properties": {"a": {}}}, ())
    # "In context=(), 'additionalProperties' is required to be supplied and to be false."

A strict schema (chat's `response_format`, the Responses API's `text.format`, a strict
function tool's parameters) must close every object (`additionalProperties: false`)
and require every property it lists, at every depth.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


def strict_problem(schema: Mapping[str, Any], path: tuple[str, ...]) -> str | None:
    """What strict Structured Outputs would reject in this schema, or None."""
    if schema.get("type") == "object" or "properties" in schema:
        context = f"In context=({', '.join(repr(p) for p in path)})"
        if schema.get("additionalProperties") is not False:
            return f"{context}, 'additionalProperties' is required to be supplied and to be false."
        required = schema.get("required")
        required = required if isinstance(required, list) else []
        missing = [key for key in schema.get("properties") or {} if key not in required]
        if missing:
            return (
                f"{context}, 'required' is required to be supplied and to be an array "
                f"including every key in properties. Missing '{missing[0]}'."
            )
    for key, sub in _subschemas(schema):
        problem = strict_problem(sub, (*path, key))
        if problem:
            return problem
    return None


def _subschemas(schema: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    properties = schema.get("properties")
    if isinstance(properties, dict):
        yield from ((name, sub) for name, sub in properties.items() if isinstance(sub, dict))
    if isinstance(schema.get("items"), dict):
        yield "items", schema["items"]
    for key in ("anyOf", "$defs", "definitions"):
        group = schema.get(key)
        subs = group.items() if isinstance(group, dict) else enumerate(group or ())
        for name, sub in subs:
            if isinstance(sub, dict):
                yield f"{key}/{name}", sub
