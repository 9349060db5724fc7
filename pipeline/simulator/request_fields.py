"""Reading an OpenAI request's body and its common fields, with the API's 400s.

payload = load_json(body)                        # a dict, or the 400 for bad JSON
model = model_field(payload)                     # required, a string
n = positive_int(payload, "n", most=128) or 1    # None when left out
key = given_key(request.headers)                 # Azure's api-key, else the bearer token
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from pipeline.simulator.api_errors import invalid, missing, wrong_type


def load_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or the API's 400."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise invalid(
            "We could not parse the JSON body of your request. The OpenAI API expects a "
            "JSON payload, but what was sent was not valid JSON."
        ) from None
    if not isinstance(payload, dict):
        raise invalid(f"The request body must be a JSON object, got {type(payload).__name__}.")
    return payload


def model_field(payload: Mapping[str, Any]) -> str:
    """The required `model`, a string."""
    model = payload.get("model")
    if model is None:
        raise missing("model")
    if not isinstance(model, str):
        raise wrong_type("model", "a string", model)
    return model


def positive_int(payload: Mapping[str, Any], name: str, *, most: int | None = None) -> int | None:
    """An optional integer field from 1 to `most`; None when left out."""
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise wrong_type(name, "an integer", value)
    if value < 1:
        raise invalid(
            f"Invalid '{name}': integer below minimum value. Expected a value >= 1, "
            f"but got {value} instead.",
            name,
            "integer_below_min_value",
        )
    if most is not None and value > most:
        raise invalid(
            f"Invalid '{name}': integer above maximum value. Expected a value <= {most}, "
            f"but got {value} instead.",
            name,
            "integer_above_max_value",
        )
    return value


def given_key(headers: Mapping[str, str]) -> str:
    """The key a request carries: Azure's `api-key`, else `Authorization: Bearer`."""
    return (
        headers.get("api-key") or headers.get("Authorization", "").removeprefix("Bearer ")
    ).strip()
