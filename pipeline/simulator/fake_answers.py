"""What the simulated model says, drawn from a seeded random stream: sentences, JSON
that follows a schema, embedding vectors.

    rng = random.Random(7)
    "".join(sentence_tokens(rng))    # "Quiet river the signal ... data."
    fake_json({"type": "object", "properties": {"n": {"type": "integer"}}}, rng)
    vector(seed=0, item="some text", dimensions=1536)   # a unit vector, the same each time

A plain answer is 5 to 40 words, one word a completion token; a JSON answer counts four
characters a token (`chunk_tokens`). The caller makes the stream from the seed and the
request body, so the same request always gets the same answer.
"""

from __future__ import annotations

import base64
import math
import random
import re
import sys
import uuid
from array import array
from collections.abc import Mapping
from hashlib import sha256
from typing import Any, Final

import orjson

from pipeline.simulator.api_errors import invalid

# The answer is 5 to 40 words; one word counts as one completion token.
_MIN_WORDS: Final = 5
_MAX_WORDS: Final = 40
# Completion tokens charged to the TPM bucket when a request sets no max_tokens. OpenAI
# does not publish its estimate; the longest plain answer the simulator gives is fair.
DEFAULT_COMPLETION_COST: Final = _MAX_WORDS
# Reasoning models ("o1", "o3-mini", ...) spend this many hidden tokens per choice.
REASONING_TOKENS: Final = (8, 64)
_REASONING_MODEL: Final = re.compile(r"o\d")

_VOCABULARY: Final = (
    "the", "a", "river", "quiet", "signal", "model", "answer", "light", "data", "table",
    "every", "row", "stone", "garden", "swift", "careful", "number", "window", "paper",
    "token", "cloud", "bridge", "morning", "simple", "green", "echo", "harbor", "little",
    "engine", "forest", "is", "and", "of", "to", "with", "under", "between", "again",
    "café", "naïve", "Straße", "über", "niño", "façade", "日本", "данные", "θάλασσα",
)  # fmt: skip


def is_reasoning(model: str) -> bool:
    """An o-series model, which spends hidden reasoning tokens."""
    return _REASONING_MODEL.match(model) is not None


def sentence_tokens(rng: random.Random) -> list[str]:
    """A sentence as tokens whose concatenation is the text: one word, one token."""
    words = rng.choices(_VOCABULARY, k=rng.randint(_MIN_WORDS, _MAX_WORDS))
    words[0] = words[0].capitalize()
    words[-1] += "."
    return [words[0], *(" " + w for w in words[1:])]


def chunk_tokens(text: str) -> list[str]:
    """JSON answers are counted at four characters a token, like the prompt estimate."""
    return [text[i : i + 4] for i in range(0, len(text), 4)]


def schema_answer(spec: Mapping[str, Any], rng: random.Random) -> Any:
    """A value for a `json_schema` format ({"name", "schema"}); 400 if it cannot be made."""
    try:
        return fake_json(spec.get("schema", {"type": "object"}), rng)
    except (LookupError, TypeError, ValueError, AttributeError) as error:
        # A schema the faker cannot follow (a dangling $ref, an empty enum) is the
        # client's mistake, so it gets a 400 as the real API would give, not a 500.
        raise invalid(
            f"Invalid schema for response_format '{spec.get('name', '')}': {error!r}",
            "response_format",
            "invalid_json_schema",
        ) from None


def fake_json(schema: Mapping[str, Any], rng: random.Random) -> Any:
    """A value that matches a JSON schema: every property, 1-3 array items, first anyOf.

    >>> fake_json({"type": "object", "properties": {"n": {"type": "integer"}}}, Random(0))
    {'n': 49}

    Supports type (and type lists), enum, const, properties, items, anyOf/oneOf/allOf,
    $ref into $defs/definitions, min/max bounds and common string formats; not pattern.
    """
    return _Faker(schema, rng).value(schema, 0)


class _Faker:
    # Past this depth a recursive schema gets its minimum: required keys, minItems items,
    # null where null is allowed. A schema that still goes deeper cannot be satisfied.
    MAX_DEPTH: Final = 6
    GIVE_UP_DEPTH: Final = 64

    def __init__(self, root: Mapping[str, Any], rng: random.Random) -> None:
        self.root = root
        self.rng = rng

    def value(self, schema: Mapping[str, Any], depth: int) -> Any:
        if depth > self.GIVE_UP_DEPTH:
            raise ValueError("the schema nests deeper than 64 levels or has no finite value")
        if "$ref" in schema:
            return self.value(self.resolve(schema["$ref"]), depth + 1)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return self.rng.choice(schema["enum"])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.value(self.option(schema[key], depth), depth)
        if "allOf" in schema:
            merged: dict[str, Any] = {}
            for part in schema["allOf"]:
                merged |= self.resolve(part["$ref"]) if "$ref" in part else part
            return self.value(merged, depth)
        return self.typed(_type_of(schema, prefer_null=depth >= self.MAX_DEPTH), schema, depth)

    def option(self, options: list[Mapping[str, Any]], depth: int) -> Mapping[str, Any]:
        """The first non-null option; deep in a recursive schema, null if allowed."""
        nulls = [o for o in options if o.get("type") == "null"]
        if nulls and depth >= self.MAX_DEPTH:
            return nulls[0]
        return next((o for o in options if o.get("type") != "null"), options[0])

    def typed(self, kind: str, schema: Mapping[str, Any], depth: int) -> Any:
        if kind == "object":
            return self.object(schema, depth)
        if kind == "array":
            return self.array(schema, depth)
        if kind == "string":
            return self.string(schema)
        if kind == "integer":
            low, high = _bounds(schema, 0, 100, 1)
            return self.rng.randint(math.ceil(low), max(math.ceil(low), math.floor(high)))
        if kind == "number":
            low, high = _bounds(schema, 0.0, 100.0, 0.01)
            return min(max(round(self.rng.uniform(low, high), 2), low), high)
        if kind == "boolean":
            return self.rng.random() < 0.5
        return None

    def object(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        properties: Mapping[str, Any] = schema.get("properties", {})
        required = schema.get("required", [])
        names = required if depth >= self.MAX_DEPTH else [*properties, *required]
        out: dict[str, Any] = {}
        for name in names:
            if name not in out:
                out[name] = self.value(properties.get(name, {"type": "string"}), depth + 1)
        return out

    def array(self, schema: Mapping[str, Any], depth: int) -> list[Any]:
        low = int(schema.get("minItems", 0))
        if depth >= self.MAX_DEPTH:
            count = low
        else:
            high = max(low, 3)
            if "maxItems" in schema:
                high = min(high, int(schema["maxItems"]))
            count = self.rng.randint(min(max(low, 1), high), high)
        items = schema.get("items", {})
        return [self.value(items, depth + 1) for _ in range(count)]

    def string(self, schema: Mapping[str, Any]) -> str:
        fmt = schema.get("format")
        rng = self.rng
        if fmt in ("date", "date-time"):
            date = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
            return date if fmt == "date" else f"{date}T12:{rng.randint(0, 59):02d}:00Z"
        if fmt == "email":
            return f"user{rng.randint(1, 999)}@example.com"
        if fmt == "uri":
            return f"https://example.com/{rng.randint(1, 999)}"
        if fmt == "uuid":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        text = " ".join(rng.choices(_VOCABULARY, k=rng.randint(1, 4)))
        text = text[: schema.get("maxLength", len(text))]
        return text.ljust(schema.get("minLength", 0), "x")

    def resolve(self, ref: str) -> Mapping[str, Any]:
        node: Any = self.root
        for part in ref.removeprefix("#/").split("/"):
            if part:
                node = node[part.replace("~1", "/").replace("~0", "~")]
        return node  # type: ignore[no-any-return]


def _type_of(schema: Mapping[str, Any], *, prefer_null: bool = False) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        if prefer_null and "null" in kind:
            return "null"
        return next((k for k in kind if k != "null"), "null")
    if isinstance(kind, str):
        return kind
    if "properties" in schema:
        return "object"
    return "array" if "items" in schema else "string"


def _bounds(schema: Mapping[str, Any], low: float, span: float, step: float) -> tuple[float, float]:
    """[minimum, maximum] of a numeric schema; an exclusive bound moves in by `step`."""
    lo = schema.get("minimum")
    if lo is None and "exclusiveMinimum" in schema:
        lo = schema["exclusiveMinimum"] + step
    hi = schema.get("maximum")
    if hi is None and "exclusiveMaximum" in schema:
        hi = schema["exclusiveMaximum"] - step
    if lo is None:
        lo = low if hi is None else min(low, hi - span)
    if hi is None:
        hi = lo + span
    return lo, max(lo, hi)


def vector(seed: int, item: str | list[int], dimensions: int) -> list[float]:
    """A deterministic unit vector: random int16 components, normalised."""
    key = item.encode() if isinstance(item, str) else b"\x00" + orjson.dumps(item)
    rng = random.Random((seed << 512) | int.from_bytes(sha256(key).digest()))
    components = memoryview(rng.randbytes(dimensions * 2)).cast("h")
    scale = 1.0 / (math.hypot(*components) or 1.0)
    return [c * scale for c in components]


def base64_floats(vector: list[float]) -> str:
    """A vector as the API's `encoding_format: "base64"` sends it: little-endian float32."""
    packed = array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()  # the API sends little-endian float32
    return base64.b64encode(packed.tobytes()).decode()
