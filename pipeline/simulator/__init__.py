"""An OpenAI-compatible API server for offline runs, tests and benchmarks.

The simulator answers `POST /v1/chat/completions`, `POST /v1/embeddings`,
`GET /v1/models` and `GET /v1/models/{id}` with the shapes, headers and error bodies
of the real API, enforces RPM/TPM with two token buckets as OpenAI documents it, and
injects faults at a configured rate. Answers are a pure function of the seed and the
request body, so two runs of the same job see the same text. It imports nothing else
from `pipeline`. Anthropic's `POST /v1/messages` shares the same pipeline, in
Anthropic's shapes and headers (anthropic.py); OpenAI's Responses API,
`POST /v1/responses`, does too (responses.py), and so do image generation and
audio transcription, a multipart upload (media.py), and Azure OpenAI's deployment
routes, in Azure's headers, errors and content filter (azure.py). Chat images are
counted by their pixel size (vision.py); chat tools are checked and called (tools.py).

In a test or a benchmark, run it in a thread and point any client at the URL::

    with running_in_thread(SimConfig(rpm=600, fault_rate=0.05)) as (base_url, sim):
        ...  # POST f"{base_url}/chat/completions"
        assert sim.stats.requests >= sim.stats.ok

or inside a running event loop::

    async with Simulator(SimConfig(seed=7)) as base_url:
        ...

From the command line `pipeline simulate` calls `serve(config, host, port)`.

One row can be told how to fail: a last message (or embedding input) containing
`<<sim:500>>` is answered with that fault every time, `<<sim:500:2>>` only the first
two times that exact body arrives, then normally. Besides error answers, a kind can be a
misbehaviour: "html" (a 200 with a captive portal's page), "bomb" (a gzip body that
inflates to _BOMB_BYTES), "silent" (never answers), "zerolimit" (rate-limit headers at
zero), "echokey" (a 401 that repeats the key). `GET /_sim/stats` returns the
counters as JSON for a test in another process.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import math
import os
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
import uuid
import zlib
from array import array
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeVar

import orjson
from aiohttp import web

from pipeline.simulator.vision import ImageProblem, image_part_tokens
from pipeline.tokens import text_counter

if TYPE_CHECKING:
    from pipeline.simulator.tools import ToolCall

# The answer is 5 to 40 words; one word counts as one completion token.
_MIN_WORDS: Final = 5
_MAX_WORDS: Final = 40
# Completion tokens charged to the TPM bucket when a request sets no max_tokens. OpenAI
# does not publish its estimate; the longest plain answer the simulator gives is fair.
DEFAULT_COMPLETION_COST: Final = _MAX_WORDS
# Reasoning models ("o1", "o3-mini", ...) spend this many hidden tokens per choice.
_REASONING_TOKENS: Final = (8, 64)
# Prompt caching starts at 1024 tokens and is reported in steps of 128, as OpenAI does.
_CACHE_MIN_PROMPT: Final = 1024
_CACHE_STEP: Final = 128
# The set of cached system prompts is forgotten when it grows past this, so that a
# million-row job with a distinct prompt per row does not grow the server without end.
_CACHE_MAX_PREFIXES: Final = 100_000
# A content part that is neither text nor an image (audio, a file) counts this much;
# images are counted by their size (vision.py), never by their base64 length.
_IMAGE_PART_TOKENS: Final = 85
_MAX_EMBEDDING_INPUTS: Final = 2048
_MAX_CHOICES: Final = 128
# "slow" holds the answer this long: longer than the read timeouts tests configure.
_SLOW_DELAY_S: Final = 2.0
# "silent" accepts the request and never answers (stop() cancels it).
_SILENT_S: Final = 3600.0
# "bomb" sends a gzip body this big once inflated, from about 100 KB on the wire: more
# than any client should hold for one answer.
_BOMB_BYTES: Final = 128 * 2**20
# "zerolimit" answers with remaining 0 and this reset: a client must wait, not stall.
_ZERO_LIMIT_RESET: Final = "20ms"
# "html" answers 200 with the page a captive portal or a proxy's login would send.
_HTML_PAGE: Final = (
    b"<!DOCTYPE html>\n<html><head><title>Sign in to the network</title></head>"
    b"<body><form action='/login'>Accept the terms to continue</form></body></html>\n"
)
# stop() lets in-flight requests finish this long, then cancels them (a "slow" answer
# must not hold a test's teardown for seconds).
_SHUTDOWN_GRACE_S: Final = 0.5
# retry-after-ms of an injected 429: a random fault, and a `<<sim:429>>` directive.
_FAULT_RETRY_MS: Final = 200
_DIRECTIVE_RETRY_MS: Final = 100
# Big enough for a prompt with a few base64 images.
_MAX_BODY_BYTES: Final = 64 * 1024 * 1024
_RATE_LIMIT_DOCS: Final = "Visit https://platform.openai.com/account/rate-limits to learn more."
_ORGANIZATION: Final = "org-simulator"

_VOCABULARY: Final = (
    "the", "a", "river", "quiet", "signal", "model", "answer", "light", "data", "table",
    "every", "row", "stone", "garden", "swift", "careful", "number", "window", "paper",
    "token", "cloud", "bridge", "morning", "simple", "green", "echo", "harbor", "little",
    "engine", "forest", "is", "and", "of", "to", "with", "under", "between", "again",
    "café", "naïve", "Straße", "über", "niño", "façade", "日本", "данные", "θάλασσα",
)  # fmt: skip

# (id, created, owned_by): a short list in the order the real endpoint might give it.
_MODELS: Final = (
    ("gpt-4o-mini", 1721172741, "system"),
    ("gpt-4o", 1715367049, "system"),
    ("text-embedding-3-small", 1705948997, "system"),
    ("text-embedding-3-large", 1705953180, "system"),
    ("o3-mini", 1737146383, "system"),
)
_EMBEDDING_DIMENSIONS: Final = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072}
_DEFAULT_DIMENSIONS: Final = 1536

_REASONING_MODEL = re.compile(r"o\d")
_DIRECTIVE = re.compile(r"<<sim:([A-Za-z0-9]+)(?::(\d+))?>>")
# A cheap test on the raw body before any regex; short enough to survive "<" escaped as
# \u003c by some JSON encoders.
_DIRECTIVE_MARK: Final = b"sim:"

_JSON_HEADERS: Final = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class SimConfig:
    """How the simulator behaves; the defaults are an unlimited, faultless, instant API."""

    rpm: int | None = None
    tpm: int | None = None
    latency_ms: float = 0.0
    seed: int = 0
    fault_rate: float = 0.0
    faults: tuple[str, ...] = ("500", "503", "reset", "truncated", "malformed")
    api_key: str | None = None
    # Count every body in `SimStats.by_body`. Off, only bodies carrying a `<<sim:...>>`
    # directive are counted, which keeps a multi-million-row run's memory flat.
    track_bodies: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be between 0 and 1, got {self.fault_rate}")
        unknown = [kind for kind in self.faults if kind not in _KINDS]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; valid: {sorted(_KINDS)}")
        if self.fault_rate > 0 and not self.faults:
            raise ValueError("fault_rate > 0 needs at least one kind in faults")
        for name in ("rpm", "tpm"):
            limit = getattr(self, name)
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be a positive integer or None, got {limit}")


@dataclass
class SimStats:
    """Live counters; `requests == ok + rate_limited + faults + errors` once idle.

    `rate_limited` counts the 429s the RPM/TPM buckets sent; injected 429s (a fault or
    a directive) count in `faults`, with every other injected answer, "slow" included.
    `errors` counts the requests refused for what they were: bad JSON, missing fields,
    a wrong key, an unknown path.
    """

    requests: int = 0
    ok: int = 0
    rate_limited: int = 0
    faults: int = 0
    errors: int = 0
    #: Tokens the admitted requests were charged against TPM (prompt + max output).
    tokens: int = 0
    #: GET /models and /models/{id}: not API calls, and not in `requests`.
    listings: int = 0
    by_body: collections.Counter[str] = field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, Any]:
        """The counters as plain JSON-ready values, as `GET /_sim/stats` returns them."""
        # dict() of a Counter is one C call under the GIL: safe while the server counts.
        return {
            "requests": self.requests,
            "ok": self.ok,
            "rate_limited": self.rate_limited,
            "faults": self.faults,
            "errors": self.errors,
            "tokens": self.tokens,
            "listings": self.listings,
            "by_body": dict(self.by_body),
        }


# The SimStats counter an error answer is counted in.
_Tally = Literal["errors", "faults", "rate_limited"]


class _ApiError(Exception):
    """An answer other than 200, raised from deep in a request and sent by the handler."""

    def __init__(
        self,
        status: int,
        body: Mapping[str, Any],
        *,
        tally: _Tally = "errors",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.tally = tally
        self.headers = headers or {}


class _Dialect(Protocol):
    """How another API family (Anthropic's) differs on the wire from OpenAI's, for a
    route that shares the request pipeline: its key header, error bodies, header names."""

    def authorize(self, request: web.Request, key: str | None) -> None:
        """Raise the family's 401 unless the request carries `key` (None: no key needed)."""

    def error(self, error: _ApiError) -> _ApiError:
        """The error as the family spells it: its status, body and headers."""

    def finish(self, response: web.StreamResponse, limits: _Limits) -> None:
        """Give the answer the family's rate-limit and request-id headers."""


def _error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _invalid(message: str, param: str | None = None, code: str | None = None) -> _ApiError:
    return _ApiError(400, _error_body(message, "invalid_request_error", code, param))


def _not_one_of(value: object, allowed: Sequence[str], param: str) -> _ApiError:
    """The API's 400 for a value outside an enumeration, listing the allowed ones."""
    listed = [f"'{a}'" for a in allowed]
    said = listed[0] if len(listed) == 1 else f"{', '.join(listed[:-1])}, and {listed[-1]}"
    return _invalid(
        f"Invalid value: '{value}'. Supported values are: {said}.", param, "invalid_value"
    )


def _bad_name(param: str) -> _ApiError:
    """The API's 400 for a function name outside ^[a-zA-Z0-9_-]+$ (1 to 64 characters)."""
    return _invalid(
        f"Invalid '{param}': string does not match pattern. Expected a string that matches "
        "the pattern '^[a-zA-Z0-9_-]+$'.",
        param,
        "invalid_value",
    )


#: What a function (tool) name may be, on every API.
FUNCTION_NAME: Final = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def _missing(param: str) -> _ApiError:
    return _invalid(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def _wrong_type(param: str, expected: str, got: object) -> _ApiError:
    message = f"Invalid type for '{param}': expected {expected}, but got {type(got).__name__}."
    return _invalid(message, param, "invalid_type")


# ---------------------------------------------------------------------------------------
# Canned error answers, for fault injection and directives


def _retry_headers(ms: int) -> dict[str, str]:
    return {"retry-after-ms": str(ms), "retry-after": str(math.ceil(ms / 1000))}


def _canned(kind: str, model: str, retry_ms: int) -> _ApiError:
    """The error answer for an injected fault or directive of this kind."""
    if kind == "404model":
        return _model_not_found(model, tally="faults")
    status, body, headers = _CANNED[kind]
    if kind == "429":
        headers = _retry_headers(retry_ms)
    return _ApiError(status, body, tally="faults", headers=headers)


def _model_not_found(model: str, *, tally: _Tally) -> _ApiError:
    message = f"The model `{model}` does not exist or you do not have access to it."
    body = _error_body(message, "invalid_request_error", "model_not_found")
    return _ApiError(404, body, tally=tally)


_SERVER_ERROR: Final = _error_body(
    "The server had an error while processing your request.", "server_error"
)
_CANNED: Final[dict[str, tuple[int, dict[str, Any], dict[str, str]]]] = {
    "429": (
        429,
        _error_body(
            f"Rate limit reached for requests (injected by the simulator). {_RATE_LIMIT_DOCS}",
            "requests",
            "rate_limit_exceeded",
        ),
        {},  # retry-after headers added by _canned()
    ),
    "500": (500, _SERVER_ERROR, {}),
    "500noretry": (500, _SERVER_ERROR, {"x-should-retry": "false"}),
    "503": (
        503,
        _error_body("The engine is currently overloaded, please try again later", "server_error"),
        {},
    ),
    "529": (
        529,
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        {},
    ),
    "400": (
        400,
        _error_body(
            "Invalid request (rejected by the simulator directive).", "invalid_request_error"
        ),
        {},
    ),
    "400ctx": (
        400,
        _error_body(
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
        _error_body(
            "Incorrect API key provided. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            "invalid_api_key",
        ),
        {},
    ),
    "403": (
        403,
        _error_body("You are not allowed to sample from this model.", "permission_denied"),
        {},
    ),
    "413": (
        413,
        _error_body("The request body is too large.", "invalid_request_error"),
        {},
    ),
    "422": (
        422,
        _error_body("The request could not be processed.", "invalid_request_error"),
        {},
    ),
    "429quota": (
        429,
        _error_body(
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            "insufficient_quota",
        ),
        {},
    ),
}
# Kinds that need the transport or the real answer rather than a canned body.
_TRANSPORT_KINDS: Final = frozenset(
    {"reset", "truncated", "malformed", "slow", "html", "bomb", "silent", "zerolimit", "echokey"}
)
# Every kind works as a directive and in `SimConfig.faults`.
_KINDS: Final = frozenset(_CANNED) | _TRANSPORT_KINDS | {"404model"}


# ---------------------------------------------------------------------------------------
# Rate limits


def _go_duration(seconds: float) -> str:
    """Format a duration the way OpenAI's reset headers do: "20ms", "1.5s", "6m0s"."""
    total_ms = max(math.ceil(seconds * 1000 - 1e-6), 0)
    if total_ms < 1000:
        return f"{total_ms}ms" if total_ms else "0s"
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = str(rest // 1000) + (f".{rest % 1000:03d}".rstrip("0") if rest % 1000 else "")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class _Bucket:
    """A token bucket holding up to one minute's limit, refilled at limit/60 per second."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, limit: int, now: float) -> None:
        self.capacity = float(limit)
        self.level = float(limit)
        self.rate = limit / 60.0
        self.stamp = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, amount: float) -> float:
        """Seconds until `amount` fits; 0 when it fits now."""
        # The epsilon absorbs float drift in refills: a bucket refilled to 0.9999999999
        # must not turn away a client that waited exactly the advertised time.
        return max(0.0, (amount - self.level - 1e-9) / self.rate)

    def until_full(self) -> float:
        return (self.capacity - self.level) / self.rate


class _Limits:
    """The RPM and TPM buckets; a request is charged to both or to neither."""

    def __init__(self, rpm: int | None, tpm: int | None, clock: Callable[[], float]) -> None:
        now = clock()
        self._clock = clock
        self._requests = _Bucket(rpm, now) if rpm else None
        self._tokens = _Bucket(tpm, now) if tpm else None

    def admit(self, cost: int, model: str) -> None:
        """Charge one request of `cost` tokens, or raise the 429 OpenAI would send."""
        now = self._clock()
        requests, tokens = self._requests, self._tokens
        if tokens is not None and cost > tokens.capacity:
            raise _too_large(model, int(tokens.capacity), cost)
        request_wait = token_wait = 0.0
        if requests is not None:
            requests.refill(now)
            request_wait = requests.wait(1)
        if tokens is not None:
            tokens.refill(now)
            token_wait = tokens.wait(cost)
        if request_wait or token_wait:
            raise self._rejection(model, cost, request_wait, token_wait)
        if requests is not None:
            requests.level -= 1
        if tokens is not None:
            tokens.level -= cost

    def _rejection(
        self, model: str, cost: int, request_wait: float, token_wait: float
    ) -> _ApiError:
        wait = max(request_wait, token_wait)
        if request_wait:
            assert self._requests is not None
            kind, bucket, unit, asked = "requests", self._requests, "requests per min (RPM)", 1
        else:
            assert self._tokens is not None
            kind, bucket, unit, asked = "tokens", self._tokens, "tokens per min (TPM)", cost
        used = math.ceil(bucket.capacity - bucket.level)
        message = (
            f"Rate limit reached for {model} in organization {_ORGANIZATION} on {unit}: "
            f"Limit {int(bucket.capacity)}, Used {used}, Requested {asked}. "
            f"Please try again in {_go_duration(wait)}. {_RATE_LIMIT_DOCS}"
        )
        body = _error_body(message, kind, "rate_limit_exceeded")
        ms = math.ceil(wait * 1000)
        return _ApiError(429, body, tally="rate_limited", headers=_retry_headers(ms))

    def headers(self) -> dict[str, str]:
        """The x-ratelimit-* headers for the buckets as they stand now."""
        out: dict[str, str] = {}
        for name, bucket in self.levels():
            out[f"x-ratelimit-limit-{name}"] = str(int(bucket.capacity))
            out[f"x-ratelimit-remaining-{name}"] = str(max(int(bucket.level), 0))
            out[f"x-ratelimit-reset-{name}"] = _go_duration(bucket.until_full())
        return out

    def levels(self) -> Iterator[tuple[str, _Bucket]]:
        """("requests" or "tokens", its bucket refilled to now), for each limit set."""
        now = self._clock()
        for name, bucket in (("requests", self._requests), ("tokens", self._tokens)):
            if bucket is not None:
                bucket.refill(now)
                yield name, bucket


def _too_large(model: str, limit: int, cost: int) -> _ApiError:
    # No retry-after: waiting never makes a request larger than the whole limit fit.
    message = (
        f"Request too large for {model} in organization {_ORGANIZATION} on tokens per min "
        f"(TPM): Limit {limit}, Requested {cost}. The input or output tokens must be reduced "
        f"in order to run successfully. {_RATE_LIMIT_DOCS}"
    )
    return _ApiError(
        429, _error_body(message, "tokens", "rate_limit_exceeded"), tally="rate_limited"
    )


# ---------------------------------------------------------------------------------------
# Parsing requests


class _Job(Protocol):
    """What the request pipeline needs from a parsed request, whatever the endpoint."""

    @property
    def model(self) -> str: ...
    @property
    def cost(self) -> int: ...
    @property
    def directive_text(self) -> str: ...


@dataclass(frozen=True, slots=True)
class _ChatJob:
    model: str
    messages: list[dict[str, Any]]
    prompt_tokens: int
    max_tokens: int | None
    n: int
    response_format: dict[str, Any] | None
    directive_text: str
    #: The tool the answer calls (tools.py); None: it answers in text.
    tool: ToolCall | None = None

    @property
    def cost(self) -> int:
        completion = DEFAULT_COMPLETION_COST if self.max_tokens is None else self.max_tokens
        return self.prompt_tokens + completion * self.n


@dataclass(frozen=True, slots=True)
class _EmbeddingJob:
    model: str
    inputs: list[str | list[int]]
    dimensions: int
    base64: bool
    prompt_tokens: int
    directive_text: str

    @property
    def cost(self) -> int:
        return self.prompt_tokens


def _load_json(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _invalid(
            "We could not parse the JSON body of your request. The OpenAI API expects a "
            "JSON payload, but what was sent was not valid JSON."
        ) from None
    if not isinstance(payload, dict):
        raise _invalid(f"The request body must be a JSON object, got {type(payload).__name__}.")
    return payload


def _model(payload: Mapping[str, Any]) -> str:
    model = payload.get("model")
    if model is None:
        raise _missing("model")
    if not isinstance(model, str):
        raise _wrong_type("model", "a string", model)
    return model


def _positive_int(payload: Mapping[str, Any], name: str, *, most: int | None = None) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _wrong_type(name, "an integer", value)
    if value < 1:
        raise _invalid(
            f"Invalid '{name}': integer below minimum value. Expected a value >= 1, "
            f"but got {value} instead.",
            name,
            "integer_below_min_value",
        )
    if most is not None and value > most:
        raise _invalid(
            f"Invalid '{name}': integer above maximum value. Expected a value <= {most}, "
            f"but got {value} instead.",
            name,
            "integer_above_max_value",
        )
    return value


def _ceil4(n: int) -> int:
    return -(-n // 4)


def count_text(text: str, model: str) -> int:
    """A text's tokens as OpenAI counts them: the model's own encoding (o200k_base,
    cl100k_base), or about four bytes of UTF-8 a token for models it lacks."""
    return text_counter(model)(text)


def _content_tokens(content: Any, model: str = "") -> int:
    """The tokens of a message's content: its texts', and its images' by their size."""
    if isinstance(content, str):
        return count_text(content, model)
    if not isinstance(content, list):
        return 0
    total = 0
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            total += count_text(str(part.get("text", "")), model)
        elif part.get("type") == "image_url":
            try:
                total += image_part_tokens(part, model)
            except ImageProblem as problem:
                raise _invalid(str(problem), "messages", problem.code) from None
        else:
            total += _IMAGE_PART_TOKENS
    return total


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = (p.get("text") for p in content if isinstance(p, dict))
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def _messages(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = payload.get("messages")
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array of message objects", messages)
    if not messages:
        raise _invalid(
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
            "messages",
            "empty_array",
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _wrong_type(f"messages[{i}]", "an object", message)
        if "role" not in message:
            raise _missing(f"messages[{i}].role")
    return messages


def _prompt_tokens(messages: list[dict[str, Any]], model: str = "") -> int:
    """Each message's content tokens + 4 (its framing), plus 3 for the reply's priming.

    A message's content includes the name and arguments of the tool calls it carries.
    """
    total = 3
    for message in messages:
        total += _content_tokens(message.get("content"), model) + 4
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                said = f"{function.get('name', '')}{function.get('arguments', '')}"
                total += count_text(said, model)
    return total


def _response_format(payload: Mapping[str, Any]) -> dict[str, Any] | None:
    fmt = payload.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise _wrong_type("response_format", "an object", fmt)
    kind = fmt.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise _invalid(
            f"Invalid value for 'response_format.type': got {kind!r}; "
            "valid values are 'text', 'json_object' and 'json_schema'.",
            "response_format.type",
            "invalid_value",
        )
    if kind == "json_schema":
        _check_json_schema(fmt.get("json_schema"))
    return fmt


def _check_json_schema(spec: Any) -> None:
    if spec is None:
        raise _missing("response_format.json_schema")
    if not isinstance(spec, dict):
        raise _wrong_type("response_format.json_schema", "an object", spec)
    if not isinstance(spec.get("name"), str):
        raise _missing("response_format.json_schema.name")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise _wrong_type("response_format.json_schema.schema", "an object", schema)
    if spec.get("strict"):
        problem = _strict_problem(schema, ())
        if problem:
            raise _invalid(
                f"Invalid schema for response_format '{spec['name']}': {problem}",
                "response_format",
                "invalid_json_schema",
            )


def _strict_problem(schema: Mapping[str, Any], path: tuple[str, ...]) -> str | None:
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
        problem = _strict_problem(sub, (*path, key))
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


def _parse_chat(payload: dict[str, Any]) -> _ChatJob:
    model = _model(payload)
    messages = _messages(payload)
    if payload.get("stream"):
        raise _invalid(
            "The simulator does not stream; send the request without 'stream'.",
            "stream",
            "unsupported_parameter",
        )
    if _is_reasoning(model) and "max_tokens" in payload:
        raise _invalid(
            "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead.",
            "max_tokens",
            "unsupported_parameter",
        )
    max_tokens = _positive_int(payload, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _positive_int(payload, "max_tokens")
    from pipeline.simulator import tools  # it imports this module

    return _ChatJob(
        model=model,
        messages=messages,
        prompt_tokens=_prompt_tokens(messages, model) + tools.tools_tokens(payload, model),
        max_tokens=max_tokens,
        n=_positive_int(payload, "n", most=_MAX_CHOICES) or 1,
        response_format=_response_format(payload),
        directive_text=_content_text(messages[-1].get("content")),
        tool=tools.tool_to_call(payload, messages),
    )


def _embedding_inputs(raw: Any) -> list[str | list[int]]:
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(x, int) for x in raw):
            return [raw]
        if all(isinstance(x, str) for x in raw):
            return raw
        if all(isinstance(x, list) and x and all(isinstance(t, int) for t in x) for x in raw):
            return raw
    if raw is None:
        raise _missing("input")
    raise _invalid(
        "Invalid 'input': expected a non-empty string, an array of strings, an array of "
        "tokens or an array of token arrays.",
        "input",
        "invalid_value",
    )


def _parse_embeddings(payload: dict[str, Any]) -> _EmbeddingJob:
    model = _model(payload)
    inputs = _embedding_inputs(payload.get("input"))
    if len(inputs) > _MAX_EMBEDDING_INPUTS:
        raise _invalid(
            f"Too many inputs: got {len(inputs)}, the maximum is {_MAX_EMBEDDING_INPUTS} "
            "per request.",
            "input",
        )
    native = _EMBEDDING_DIMENSIONS.get(model, _DEFAULT_DIMENSIONS)
    encoding = payload.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _invalid(
            f"Invalid value for 'encoding_format': got {encoding!r}; valid values are "
            "'float' and 'base64'.",
            "encoding_format",
            "invalid_value",
        )
    return _EmbeddingJob(
        model=model,
        inputs=inputs,
        dimensions=_positive_int(payload, "dimensions", most=native) or native,
        base64=encoding == "base64",
        prompt_tokens=sum(count_text(x, model) if isinstance(x, str) else len(x) for x in inputs),
        directive_text=next((x for x in inputs if isinstance(x, str) and "<<sim:" in x), ""),
    )


# ---------------------------------------------------------------------------------------
# Answers


def _is_reasoning(model: str) -> bool:
    return _REASONING_MODEL.match(model) is not None


def _sentence_tokens(rng: random.Random) -> list[str]:
    """A sentence as tokens whose concatenation is the text: one word, one token."""
    words = rng.choices(_VOCABULARY, k=rng.randint(_MIN_WORDS, _MAX_WORDS))
    words[0] = words[0].capitalize()
    words[-1] += "."
    return [words[0], *(" " + w for w in words[1:])]


def _text_tokens(text: str) -> list[str]:
    """JSON answers are counted at four characters a token, like the prompt estimate."""
    return [text[i : i + 4] for i in range(0, len(text), 4)]


def _answer_tokens(job: _ChatJob, rng: random.Random) -> list[str]:
    fmt = job.response_format
    kind = fmt.get("type") if fmt else "text"
    if kind == "json_schema":
        assert fmt is not None
        return _text_tokens(orjson.dumps(_schema_answer(fmt["json_schema"], rng)).decode())
    if kind == "json_object":
        assert fmt is not None
        if isinstance(fmt.get("schema"), dict):
            # llama-cpp-python's and vLLM's extension: a schema the answer must follow.
            return _text_tokens(orjson.dumps(_schema_answer(fmt, rng)).decode())
        answer = "".join(_sentence_tokens(rng))
        return _text_tokens(orjson.dumps({"answer": answer}).decode())
    return _sentence_tokens(rng)


def _schema_answer(spec: Mapping[str, Any], rng: random.Random) -> Any:
    try:
        return _fake_json(spec.get("schema", {"type": "object"}), rng)
    except (LookupError, TypeError, ValueError, AttributeError) as error:
        # A schema the faker cannot follow (a dangling $ref, an empty enum) is the
        # client's mistake, so it gets a 400 as the real API would give, not a 500.
        raise _invalid(
            f"Invalid schema for response_format '{spec.get('name', '')}': {error!r}",
            "response_format",
            "invalid_json_schema",
        ) from None


def _choice(job: _ChatJob, index: int, rng: random.Random) -> tuple[dict[str, Any], int, int]:
    """One choice, its completion tokens and its reasoning tokens."""
    if job.tool is not None:
        return job.tool.choice(index, job.max_tokens, rng)
    reasoning = rng.randint(*_REASONING_TOKENS) if _is_reasoning(job.model) else 0
    budget = None
    if job.max_tokens is not None:
        reasoning = min(reasoning, job.max_tokens)
        budget = job.max_tokens - reasoning
    tokens = _answer_tokens(job, rng)
    finish = "stop"
    if budget is not None and len(tokens) > budget:
        # Cut like the real API: mid-sentence, mid-JSON, and an o-model whose reasoning
        # ate the whole budget answers "" with finish_reason "length".
        tokens, finish = tokens[:budget], "length"
    message = {"role": "assistant", "content": "".join(tokens), "refusal": None}
    choice = {"index": index, "message": message, "finish_reason": finish, "logprobs": None}
    return choice, len(tokens) + reasoning, reasoning


def _fake_json(schema: Mapping[str, Any], rng: random.Random) -> Any:
    """A value that matches a JSON schema: every property, 1-3 array items, first anyOf.

    >>> _fake_json({"type": "object", "properties": {"n": {"type": "integer"}}}, Random(0))
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


def _vector(seed: int, item: str | list[int], dimensions: int) -> list[float]:
    """A deterministic unit vector: random int16 components, normalised."""
    key = item.encode() if isinstance(item, str) else b"\x00" + orjson.dumps(item)
    rng = random.Random((seed << 512) | int.from_bytes(sha256(key).digest()))
    components = memoryview(rng.randbytes(dimensions * 2)).cast("h")
    scale = 1.0 / (math.hypot(*components) or 1.0)
    return [c * scale for c in components]


def _base64_floats(vector: list[float]) -> str:
    packed = array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()  # the API sends little-endian float32
    return base64.b64encode(packed.tobytes()).decode()


# ---------------------------------------------------------------------------------------
# The server

_J = TypeVar("_J", bound=_Job)


class Simulator:
    """The server; `start()` it inside a running loop, or use `async with`.

    `clock` is for tests that move time by hand instead of sleeping; it drives the
    rate-limit buckets only.
    """

    def __init__(
        self, config: SimConfig = SimConfig(), *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.stats = SimStats()
        self._limits = _Limits(config.rpm, config.tpm, clock)
        # Separate streams, so that latency draws never shift which requests fault.
        self._fault_rng = random.Random(config.seed)
        self._latency_rng = random.Random(config.seed + 1)
        self._cached_prefixes: set[int] = set()
        self._ids = itertools.count()
        self._id_prefix = os.urandom(6).hex()
        self._fingerprint = f"fp_{sha256(str(config.seed).encode()).hexdigest()[:10]}"
        self._runner: web.AppRunner | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0: a free port) and return the base URL, ".../v1"."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        runner = web.AppRunner(
            self._app(),
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=_SHUTDOWN_GRACE_S,
        )
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runner = runner
        bound = sock.getsockname()[1]
        return f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{bound}/v1"

    async def stop(self) -> None:
        """Stop listening; in-flight requests get a short grace, then are cancelled."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> str:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY_BYTES)
        router = app.router
        router.add_post("/v1/chat/completions", self._chat)
        router.add_post("/v1/embeddings", self._embeddings)
        router.add_get("/v1/models", self._models)
        router.add_get("/v1/models/{model:.+}", self._model)
        from pipeline.simulator.anthropic import add_routes  # it imports this module

        add_routes(self, router)
        from pipeline.simulator import media  # it imports this module

        media.add_routes(self, router)
        from pipeline.simulator import azure  # it imports this module

        azure.add_routes(self, router)
        from pipeline.simulator.responses import responses_route  # it imports this module

        router.add_post("/v1/responses", responses_route(self))
        router.add_route("*", "/v1/{tail:.*}", self._unknown)
        router.add_get("/_sim/stats", self._stats_route)
        return app

    # -- handlers ----------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(
            request, lambda started: self._post(request, started, _parse_chat, self._chat_answer)
        )

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(
            request,
            lambda started: self._post(request, started, _parse_embeddings, self._embedding_answer),
        )

    async def _models(self, request: web.Request) -> web.StreamResponse:
        listing = {"object": "list", "data": [_model_object(*m) for m in _MODELS]}
        return await self._guarded(
            request, lambda started: self._ok(listing, started, counted=False), counted=False
        )

    async def _model(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["model"]
        found = next((m for m in _MODELS if m[0] == name), None)

        async def lookup(started: float) -> web.StreamResponse:
            if found is None:
                raise _model_not_found(name, tally="errors")
            return await self._ok(_model_object(*found), started, counted=False)

        return await self._guarded(request, lookup, counted=False)

    async def _unknown(self, request: web.Request) -> web.StreamResponse:
        async def refuse(started: float) -> web.StreamResponse:
            message = f"Invalid URL ({request.method} {request.path})"
            raise _ApiError(404, _error_body(message, "invalid_request_error", "unknown_url"))

        return await self._guarded(request, refuse)

    async def _stats_route(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=orjson.dumps(self.stats.as_dict()), headers=_JSON_HEADERS)

    # -- the request pipeline ----------------------------------------------------------

    async def _guarded(
        self,
        request: web.Request,
        work: Callable[[float], Awaitable[web.StreamResponse]],
        dialect: _Dialect | None = None,
        *,
        counted: bool = True,
    ) -> web.StreamResponse:
        """Count, check the key, run `work`, and turn an `_ApiError` into its answer.

        A `dialect` (Anthropic's) checks its own key header and respells the errors and
        headers; the answers are built as OpenAI's first. A truncated fault's head is
        written raw and keeps OpenAI's names: no client reads headers of a cut body.
        Not `counted`: listing models, which a client may do before its work (a server
        check); it counts in `listings` alone, so `requests` stays the API calls.
        """
        started = time.perf_counter()
        if counted:
            self.stats.requests += 1
        else:
            self.stats.listings += 1
        try:
            if dialect is None:
                self._authorize(request)
            else:
                dialect.authorize(request, self.config.api_key)
            response = await work(started)
        except _ApiError as error:
            if counted:
                self._tally(error.tally)
            if dialect is not None:
                error = dialect.error(error)
            response = self._reply(error.status, orjson.dumps(error.body), started, error.headers)
        if dialect is not None:
            dialect.finish(response, self._limits)
        return response

    def _tally(self, counter: _Tally) -> None:
        stats = self.stats
        if counter == "errors":
            stats.errors += 1
        elif counter == "faults":
            stats.faults += 1
        else:
            stats.rate_limited += 1

    def _authorize(self, request: web.Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        headers = request.headers
        given = headers.get("api-key") or headers.get("Authorization", "").removeprefix("Bearer ")
        given = given.strip()
        if given == key:
            return
        if not given:
            message = (
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        else:
            message = (
                f"Incorrect API key provided: {_mask(given)}. You can find your API key at "
                "https://platform.openai.com/account/api-keys."
            )
        raise _ApiError(401, _error_body(message, "invalid_request_error", "invalid_api_key"))

    async def _ok(
        self, payload: Mapping[str, Any], started: float, *, counted: bool = True
    ) -> web.StreamResponse:
        self.stats.ok += counted
        return self._reply(200, orjson.dumps(payload), started)

    async def _post(
        self,
        request: web.Request,
        started: float,
        parse: Callable[[dict[str, Any]], _J],
        answer: Callable[[_J, bytes], dict[str, Any]],
        *,
        load: Callable[[web.Request], Awaitable[tuple[bytes, dict[str, Any]]]] | None = None,
    ) -> web.StreamResponse:
        """`load`, for a body that is not JSON (a multipart form): its fields, and the
        bytes that identify it for `by_body` and directives."""
        body, form = (await _read(request), None) if load is None else await load(request)
        digest = sha256(body).digest()
        marked = _DIRECTIVE_MARK in body  # one scan of a body that may be megabytes
        count = self._count(digest, marked)
        job = parse(_load_json(body) if form is None else form)
        kind = _directive(job.directive_text, count) if marked else None
        retry_ms = _DIRECTIVE_RETRY_MS
        if kind is None:
            self._limits.admit(job.cost, job.model)
            self.stats.tokens += job.cost
            kind, retry_ms = self._draw_fault(), _FAULT_RETRY_MS
        await self._delay()
        if kind is None:
            return await self._ok(answer(job, digest), started)
        if kind not in _TRANSPORT_KINDS:
            raise _canned(kind, job.model, retry_ms)
        self.stats.faults += 1
        return await self._misbehave(request, kind, started, lambda: answer(job, digest))

    def _count(self, digest: bytes, marked: bool) -> int:
        """Record the body in `by_body`; the times it has been received, this one included.

        Untracked bodies count once, unless they carry a directive (`marked`), whose
        `:N` needs the count."""
        if not self.config.track_bodies and not marked:
            return 1
        key = digest.hex()
        by_body = self.stats.by_body
        by_body[key] += 1
        return by_body[key]

    def _draw_fault(self) -> str | None:
        config = self.config
        if config.fault_rate and self._fault_rng.random() < config.fault_rate:
            return self._fault_rng.choice(config.faults)
        return None

    async def _delay(self) -> None:
        mean = self.config.latency_ms
        if mean > 0:
            # Uniform around the mean: some spread, never a pathological tail.
            await asyncio.sleep(mean * self._latency_rng.uniform(0.5, 1.5) / 1000)

    async def _misbehave(
        self,
        request: web.Request,
        kind: str,
        started: float,
        answer: Callable[[], dict[str, Any]],
    ) -> web.StreamResponse:
        """Answer with a transport-level fault: reset, truncated, malformed or slow; or
        a misbehaving server's answer: an HTML page, a gzip bomb, silence, rate-limit
        headers at zero, a key echoed back."""
        transport = request.transport
        if kind == "reset" or transport is None:
            _reset(transport)
            return web.Response()  # aiohttp finds the transport closed and writes nothing
        if kind == "slow":
            await asyncio.sleep(_SLOW_DELAY_S)
            return self._reply(200, orjson.dumps(answer()), started)
        if kind in _MISBEHAVIOURS:
            return await _MISBEHAVIOURS[kind](self, request, started, answer)
        body = orjson.dumps(answer())
        if kind == "malformed":
            return self._reply(200, body[: len(body) // 2], started)
        # truncated: promise the whole body, send half, hang up.
        head = (
            f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        )
        head += "".join(f"{k}: {v}\r\n" for k, v in self._headers(started).items()) + "\r\n"
        transport.write(head.encode() + body[: len(body) // 2])
        transport.close()
        return web.Response()

    def _reply(
        self,
        status: int,
        payload: bytes,
        started: float,
        extra: Mapping[str, str] | None = None,
    ) -> web.Response:
        headers = self._headers(started)
        headers["Content-Type"] = "application/json"
        if extra:
            headers.update(extra)
        return web.Response(body=payload, status=status, headers=headers)

    def _headers(self, started: float) -> dict[str, str]:
        headers = self._limits.headers()
        headers["x-request-id"] = f"req_{self._id_prefix}{next(self._ids):020x}"
        headers["openai-processing-ms"] = str(int((time.perf_counter() - started) * 1000))
        return headers

    # -- answers -----------------------------------------------------------------------

    def _rng(self, digest: bytes, index: int = 0) -> random.Random:
        # (seed, body) -> stream, injective: the digest fills the low 256 bits.
        return random.Random((((self.config.seed << 8) | index) << 256) | int.from_bytes(digest))

    def _chat_answer(self, job: _ChatJob, digest: bytes) -> dict[str, Any]:
        choices = []
        completion = reasoning = 0
        for index in range(job.n):
            choice, used, thought = _choice(job, index, self._rng(digest, index))
            choices.append(choice)
            completion += used
            reasoning += thought
        return {
            "id": f"chatcmpl-{self._id_prefix}{next(self._ids):012x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": job.model,
            "choices": choices,
            "usage": self._usage(job, completion, reasoning),
            "service_tier": "default",
            "system_fingerprint": self._fingerprint,
        }

    def _usage(self, job: _ChatJob, completion: int, reasoning: int) -> dict[str, Any]:
        prompt = job.prompt_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": self._cached(job), "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def _cached(self, job: _ChatJob) -> int:
        """Half the prompt, in 128-token steps, once the same system prompt was answered."""
        return self.cached_share(job.messages[0], job.prompt_tokens)

    def cached_share(self, prefix: Any, prompt_tokens: int) -> int:
        """OpenAI's caching: half the prompt, in 128-token steps, once a request with
        the same `prefix` (a JSON-able leading part) was answered; 0 the first time."""
        if prompt_tokens < _CACHE_MIN_PROMPT:
            return 0
        key = hash(orjson.dumps(prefix, option=orjson.OPT_SORT_KEYS))
        return (prompt_tokens // 2) // _CACHE_STEP * _CACHE_STEP if self.seen(key) else 0

    def seen(self, key: int) -> bool:
        """Whether a cache prefix was seen before; remember it. The set is forgotten
        when it grows past _CACHE_MAX_PREFIXES, so a long run cannot grow the server."""
        if key in self._cached_prefixes:
            return True
        if len(self._cached_prefixes) >= _CACHE_MAX_PREFIXES:
            self._cached_prefixes.clear()
        self._cached_prefixes.add(key)
        return False

    def _embedding_answer(self, job: _EmbeddingJob, digest: bytes) -> dict[str, Any]:
        data = []
        for index, item in enumerate(job.inputs):
            vector = _vector(self.config.seed, item, job.dimensions)
            encoded: list[float] | str = _base64_floats(vector) if job.base64 else vector
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        usage = {"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens}
        return {"object": "list", "data": data, "model": job.model, "usage": usage}


async def _read(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        message = f"The request body is too large; the maximum is {_MAX_BODY_BYTES} bytes."
        raise _ApiError(413, _error_body(message, "invalid_request_error")) from None


def _directive(text: str, count: int) -> str | None:
    """The kind a `<<sim:KIND[:N]>>` directive asks for this time, or None."""
    match = _DIRECTIVE.search(text)
    if match is None:
        return None
    kind, times = match.group(1), match.group(2)
    if kind not in _KINDS:
        raise _invalid(
            f"Unknown simulator directive <<sim:{kind}>>; valid kinds: {', '.join(sorted(_KINDS))}."
        )
    if times is not None and count > int(times):
        return None
    return kind


async def _html(
    sim: Simulator, request: web.Request, started: float, answer: Callable[[], dict[str, Any]]
) -> web.StreamResponse:
    return web.Response(body=_HTML_PAGE, status=200, content_type="text/html")


async def _bomb(
    sim: Simulator, request: web.Request, started: float, answer: Callable[[], dict[str, Any]]
) -> web.StreamResponse:
    headers = sim._headers(started)
    headers.update({"Content-Type": "application/json", "Content-Encoding": "gzip"})
    return web.Response(body=_gzip_bomb(), status=200, headers=headers)


async def _silent(
    sim: Simulator, request: web.Request, started: float, answer: Callable[[], dict[str, Any]]
) -> web.StreamResponse:
    await asyncio.sleep(_SILENT_S)
    return web.Response(status=504)


async def _zero_limit(
    sim: Simulator, request: web.Request, started: float, answer: Callable[[], dict[str, Any]]
) -> web.StreamResponse:
    zero = {}
    for name in ("requests", "tokens"):
        zero[f"x-ratelimit-limit-{name}"] = "100"
        zero[f"x-ratelimit-remaining-{name}"] = "0"
        zero[f"x-ratelimit-reset-{name}"] = _ZERO_LIMIT_RESET
    return sim._reply(200, orjson.dumps(answer()), started, zero)


async def _echo_key(
    sim: Simulator, request: web.Request, started: float, answer: Callable[[], dict[str, Any]]
) -> web.StreamResponse:
    """A careless proxy's 401 that repeats the key it was given, whole."""
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    message = f"Incorrect API key provided: {given or request.headers.get('api-key', '')}."
    body = _error_body(message, "invalid_request_error", "invalid_api_key")
    return sim._reply(401, orjson.dumps(body), started)


_Misbehaviour = Callable[
    ["Simulator", web.Request, float, Callable[[], dict[str, Any]]],
    Awaitable[web.StreamResponse],
]
_MISBEHAVIOURS: Final[dict[str, _Misbehaviour]] = {
    "html": _html,
    "bomb": _bomb,
    "silent": _silent,
    "zerolimit": _zero_limit,
    "echokey": _echo_key,
}


@functools.cache
def _gzip_bomb() -> bytes:
    """A JSON-looking gzip body that inflates to _BOMB_BYTES (built once, in chunks)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip header and trailer
    parts = [packer.compress(b'{"id": "bomb", "choices": [{"message": {"content": "')]
    chunk = b"a" * 2**20
    parts.extend(packer.compress(chunk) for _ in range(_BOMB_BYTES // len(chunk)))
    parts.append(packer.compress(b'"}}]}'))
    parts.append(packer.flush())
    return b"".join(parts)


def _reset(transport: asyncio.Transport | None) -> None:
    """Drop the connection with a TCP RST, as a crashed proxy would."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Linger 0: close sends RST instead of FIN, so the client sees a reset.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _mask(key: str) -> str:
    return f"{key[:3]}{'*' * max(len(key) - 7, 3)}{key[-4:]}" if len(key) > 8 else "***"


def _model_object(model: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": owned_by}


# ---------------------------------------------------------------------------------------
# Running it


def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve until SIGINT or SIGTERM; for `pipeline simulate`.

    >>> serve(SimConfig(rpm=500), port=8080)  # blocks
    simulator listening on http://127.0.0.1:8080/v1
    """
    asyncio.run(_serve_until_signalled(config, host, port))


async def _serve_until_signalled(config: SimConfig, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    simulator = Simulator(config)
    try:
        base_url = await simulator.start(host, port)
        print(f"simulator listening on {base_url}", file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        await simulator.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


@contextlib.contextmanager
def running_in_thread(config: SimConfig = SimConfig()) -> Iterator[tuple[str, Simulator]]:
    """Run a simulator on its own loop in a daemon thread, on a free loopback port.

    >>> with running_in_thread(SimConfig(seed=1)) as (base_url, sim):
    ...     run_my_client(base_url)   # any client, any loop, any thread
    ...     assert sim.stats.faults == 0
    """
    simulator = Simulator(config)
    ready: concurrent.futures.Future[tuple[str, asyncio.AbstractEventLoop, asyncio.Event]]
    ready = concurrent.futures.Future()
    thread = threading.Thread(
        target=asyncio.run, args=(_host(simulator, ready),), name="simulator", daemon=True
    )
    thread.start()
    try:
        base_url, loop, stop = ready.result()
    except BaseException:
        thread.join()
        raise
    try:
        yield base_url, simulator
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join()


async def _host(
    simulator: Simulator,
    ready: concurrent.futures.Future[tuple[str, asyncio.AbstractEventLoop, asyncio.Event]],
) -> None:
    # asyncio.run() around this cancels whatever is left and closes the loop cleanly.
    stop = asyncio.Event()
    try:
        base_url = await simulator.start()
    except BaseException as error:
        ready.set_exception(error)
        return
    ready.set_result((base_url, asyncio.get_running_loop(), stop))
    try:
        await stop.wait()
    finally:
        await simulator.stop()
