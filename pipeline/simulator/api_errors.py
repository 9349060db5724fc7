"""The simulator's answers other than 200, as OpenAI spells them on the wire.

    raise invalid("Invalid 'n': expected an integer.", "n", "invalid_type")
    raise canned("503", model, retry_ms=200)      # an injected fault's answer

An `ApiError` is raised from anywhere in a request and sent by the exchange
(exchange.py) as its status, JSON body and headers; `tally` names the `SimStats`
counter it counts in. Other API families (Anthropic's, Azure's) respell these errors
in their dialects. The canned answers are those of the fault kinds that are plain
error bodies (fault_injection.py has the kinds that misbehave instead).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

RATE_LIMIT_DOCS: Final = "Visit https://platform.openai.com/account/rate-limits to learn more."
ORGANIZATION: Final = "org-simulator"

#: What a function (tool) name may be, on every API.
FUNCTION_NAME: Final = re.compile(r"[a-zA-Z0-9_-]{1,64}")

# The SimStats counter an error answer is counted in.
Tally = Literal["errors", "faults", "rate_limited"]


class ApiError(Exception):
    """An answer other than 200, raised from deep in a request and sent by the handler."""

    def __init__(
        self,
        status: int,
        body: Mapping[str, Any],
        *,
        tally: Tally = "errors",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.tally = tally
        self.headers = headers or {}


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """The API's 400 `invalid_request_error`."""
    return ApiError(400, error_body(message, "invalid_request_error", code, param))


def not_one_of(value: object, allowed: Sequence[str], param: str) -> ApiError:
    """The API's 400 for a value outside an enumeration, listing the allowed ones."""
    listed = [f"'{a}'" for a in allowed]
    said = listed[0] if len(listed) == 1 else f"{', '.join(listed[:-1])}, and {listed[-1]}"
    return invalid(
        f"Invalid value: '{value}'. Supported values are: {said}.", param, "invalid_value"
    )


def bad_name(param: str) -> ApiError:
    """The API's 400 for a function name outside ^[a-zA-Z0-9_-]+$ (1 to 64 characters)."""
    return invalid(
        f"Invalid '{param}': string does not match pattern. Expected a string that matches "
        "the pattern '^[a-zA-Z0-9_-]+$'.",
        param,
        "invalid_value",
    )


def missing(param: str) -> ApiError:
    """The API's 400 for a required parameter left out."""
    return invalid(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def wrong_type(param: str, expected: str, got: object) -> ApiError:
    """The API's 400 for a parameter of the wrong JSON type."""
    message = f"Invalid type for '{param}': expected {expected}, but got {type(got).__name__}."
    return invalid(message, param, "invalid_type")


def model_not_found(model: str, *, tally: Tally) -> ApiError:
    """The API's 404 for a model it does not serve."""
    message = f"The model `{model}` does not exist or you do not have access to it."
    body = error_body(message, "invalid_request_error", "model_not_found")
    return ApiError(404, body, tally=tally)


def retry_headers(ms: int) -> dict[str, str]:
    """A 429's `retry-after-ms`, and `retry-after` in whole seconds rounded up."""
    return {"retry-after-ms": str(ms), "retry-after": str(math.ceil(ms / 1000))}


# ---------------------------------------------------------------------------------------
# Canned error answers, for fault injection and directives


def canned(kind: str, model: str, retry_ms: int) -> ApiError:
    """The error answer for an injected fault or directive of this kind."""
    if kind == "404model":
        return model_not_found(model, tally="faults")
    status, body, headers = CANNED[kind]
    if kind == "429":
        headers = retry_headers(retry_ms)
    return ApiError(status, body, tally="faults", headers=headers)


_SERVER_ERROR: Final = error_body(
    "The server had an error while processing your request.", "server_error"
)
#: The kinds answered with a fixed error: (status, body, headers).
CANNED: Final[dict[str, tuple[int, dict[str, Any], dict[str, str]]]] = {
    "429": (
        429,
        error_body(
            f"Rate limit reached for requests (injected by the simulator). {RATE_LIMIT_DOCS}",
            "requests",
            "rate_limit_exceeded",
        ),
        {},  # retry-after headers added by canned()
    ),
    "500": (500, _SERVER_ERROR, {}),
    "500noretry": (500, _SERVER_ERROR, {"x-should-retry": "false"}),
    "503": (
        503,
        error_body("The engine is currently overloaded, please try again later", "server_error"),
        {},
    ),
    "529": (
        529,
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        {},
    ),
    "400": (
        400,
        error_body(
            "Invalid request (rejected by the simulator directive).", "invalid_request_error"
        ),
        {},
    ),
    "400ctx": (
        400,
        error_body(
            "This model's maximum context length is 128000 tokens. However, your messages "
            "resulted in 130000 tokens. Please reduce the length of the messages.",
            "invalid_request_error",
            "context_length_exceeded",
            "messages",
        ),
        {},
    ),
    "401": (
        401,
        error_body(
            "Incorrect API key provided. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            "invalid_api_key",
        ),
        {},
    ),
    "403": (
        403,
        error_body("You are not allowed to sample from this model.", "permission_denied"),
        {},
    ),
    "413": (
        413,
        error_body("The request body is too large.", "invalid_request_error"),
        {},
    ),
    "422": (
        422,
        error_body("The request could not be processed.", "invalid_request_error"),
        {},
    ),
    "429quota": (
        429,
        error_body(
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            "insufficient_quota",
        ),
        {},
    ),
}
