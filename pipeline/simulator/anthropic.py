"""Anthropic's Messages API in the simulator: `POST /v1/messages`.

The route shares the simulator's request pipeline (`Simulator._post`: directives,
RPM/TPM buckets, fault draws, latency) and speaks Anthropic's dialect on the wire:

- the key comes in `x-api-key` (a 401 `authentication_error` otherwise) and the
  `anthropic-version` header is required (a 400 without it);
- the body is checked as Anthropic checks it: `max_tokens` required, `system` as a
  top-level field (a "system" role in `messages` is refused), roles alternating, content
  blocks well formed, every `tool_use` answered by a `tool_result` in the next turn,
  no unknown top-level field (an OpenAI-only `seed` or `response_format` is a 400);
- errors are `{"type": "error", "error": {"type": "overloaded_error", ...}}`, a 429
  carries `retry-after` in whole seconds, and every answer carries
  `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}` with RFC 3339 resets
  and a `request-id`;
- with tools the answer is a `tool_use` of the first tool (or the one tool_choice
  names), its input faked from the tool's input_schema, unless tool_choice is "none"
  or, with "auto", the last turn brings tool results back: then it answers in text;
- `cache_control` breakpoints are honoured: the prefix up to the last one, from 1024
  tokens on, is written to the cache the first time and read from it after.

    async with Simulator(SimConfig(api_key="sk-ant-test")) as base_url:
        ...  # POST f"{base_url}/messages" with x-api-key and anthropic-version
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import sha256
from typing import Any, Final

import orjson
from aiohttp import web

from pipeline.simulator import (
    _RATE_LIMIT_DOCS,
    FUNCTION_NAME,
    Simulator,
    _ApiError,
    _ceil4,
    _fake_json,
    _Limits,
    _sentence_tokens,
    _Tally,
    _text_tokens,
)

#: Anthropic caches a prefix from this many tokens on (1024 for Sonnet and Opus).
_CACHE_MIN_TOKENS: Final = 1024
_MAX_BREAKPOINTS: Final = 4
#: An image, whatever its size: about a 1092x1092 one (width x height / 750).
_IMAGE_TOKENS: Final = 1600
#: The system prompt Anthropic adds when tools are offered.
_TOOL_PROMPT_TOKENS: Final = 346
_IMAGE_TYPES: Final = ("image/jpeg", "image/png", "image/gif", "image/webp")

_FIELDS: Final = frozenset(
    {
        "model", "messages", "max_tokens", "system", "temperature", "top_p", "top_k",
        "stop_sequences", "stream", "metadata", "tools", "tool_choice", "thinking",
        "service_tier", "container", "mcp_servers", "context_management",
    }
)  # fmt: skip
#: The error type Anthropic sends with each status.
_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_RATE_LIMIT_HELP: Final = "For details, refer to: https://docs.claude.com/en/api/rate-limits."
_NO_CREDIT: Final = (
    "Your credit balance is too low to access the Anthropic API. Please go to Plans & "
    "Billing to upgrade or purchase credits."
)


def add_routes(sim: Simulator, router: web.UrlDispatcher) -> None:
    """Serve `POST /v1/messages` on `sim`."""
    router.add_post("/v1/messages", _Messages(sim).handle)


# ---------------------------------------------------------------------------------------
# The dialect: keys, errors and headers as Anthropic spells them


def _error(status: int, type_: str, message: str, *, tally: _Tally = "errors") -> _ApiError:
    body = {"type": "error", "error": {"type": type_, "message": message}}
    return _ApiError(status, body, tally=tally)


def _invalid(message: str) -> _ApiError:
    return _error(400, "invalid_request_error", message)


class _Wire:
    """Anthropic's dialect for `Simulator._guarded`: x-api-key, its error bodies and
    its headers."""

    def authorize(self, request: web.Request, key: str | None) -> None:
        if key is None:
            return
        given = request.headers.get("x-api-key", "").strip()
        if not given:
            raise _error(401, "authentication_error", "x-api-key header is required")
        if given != key:
            raise _error(401, "authentication_error", "invalid x-api-key")

    def error(self, error: _ApiError) -> _ApiError:
        """An error the shared pipeline raised in OpenAI's shape, in Anthropic's."""
        if error.body.get("type") == "error":
            return error  # built here, or the canned 529: Anthropic's already
        inner = error.body.get("error") or {}
        status, message = error.status, str(inner.get("message") or "")
        if status == 429 and inner.get("type") == "insufficient_quota":
            status, message = 402, _NO_CREDIT  # Anthropic's quota is a billing error
        elif inner.get("code") == "model_not_found":
            model = re.search(r"`([^`]*)`", message)
            message = f"model: {model.group(1) if model else ''}"
        elif status == 401:
            message = "invalid x-api-key"
        elif status == 429:
            message = message.replace(_RATE_LIMIT_DOCS, _RATE_LIMIT_HELP)
        elif status >= 500:
            message = "Internal server error"
        retry = error.headers.get("retry-after")
        out = _error(status, _TYPES.get(status, "api_error"), message, tally=error.tally)
        out.headers = {"retry-after": retry} if retry is not None else {}
        return out

    def finish(self, response: web.StreamResponse, limits: _Limits) -> None:
        headers = response.headers
        for name in [h for h in headers if h.lower().startswith("x-ratelimit-")]:
            del headers[name]
        headers.popall("openai-processing-ms", None)
        request_id = headers.popall("x-request-id", None)
        if request_id:
            headers["request-id"] = request_id[0]
        wall = time.time()
        for name, bucket in limits.levels():
            prefix = f"anthropic-ratelimit-{name}"
            headers[f"{prefix}-limit"] = str(int(bucket.capacity))
            headers[f"{prefix}-remaining"] = str(max(int(bucket.level), 0))
            headers[f"{prefix}-reset"] = _rfc3339(wall + bucket.until_full())


_WIRE: Final = _Wire()


def _rfc3339(when: float) -> str:
    """A UTC time as Anthropic's reset headers give it, rounded up to the second: a
    client that waits until then never comes back before the bucket is full."""
    return datetime.fromtimestamp(math.ceil(when), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------
# Parsing a request


@dataclass(frozen=True, slots=True)
class _MessageJob:
    model: str
    max_tokens: int
    prompt_tokens: int
    directive_text: str
    tools: tuple[dict[str, Any], ...]
    #: "auto", "any", "tool" or "none", and the tool's name for "tool".
    tool_choice: tuple[str, str | None]
    #: The last turn brings tool results back.
    answered_tools: bool
    stop_sequences: tuple[str, ...]
    #: (tokens, key, ttl) of the prefix up to the last cache_control breakpoint.
    cache: tuple[int, bytes, str] | None

    @property
    def cost(self) -> int:
        return self.prompt_tokens + self.max_tokens


class _Prefix:
    """Counts the prompt's tokens in Anthropic's order (tools, system, messages) and
    remembers where the last cache_control breakpoint falls."""

    def __init__(self) -> None:
        self.tokens = 3
        self._hash = sha256()
        self.breakpoints = 0
        self.cache: tuple[int, bytes, str] | None = None

    def add(self, piece: Mapping[str, Any], tokens: int, where: str) -> None:
        self.tokens += tokens
        self._hash.update(orjson.dumps(piece, option=orjson.OPT_SORT_KEYS))
        control = piece.get("cache_control")
        if control is None:
            return
        if not isinstance(control, dict) or control.get("type") != "ephemeral":
            raise _invalid(f"{where}.cache_control.type: Input should be 'ephemeral'")
        ttl = control.get("ttl", "5m")
        if ttl not in ("5m", "1h"):
            raise _invalid(f"{where}.cache_control.ttl: Input should be '5m' or '1h'")
        self.breakpoints += 1
        if self.breakpoints > _MAX_BREAKPOINTS:
            raise _invalid(
                f"A maximum of {_MAX_BREAKPOINTS} blocks with cache_control may be provided. "
                f"Found {self.breakpoints}."
            )
        self.cache = (self.tokens, self._hash.copy().digest(), ttl)


def _parse(payload: dict[str, Any]) -> _MessageJob:
    unknown = sorted(set(payload) - _FIELDS)
    if unknown:
        raise _invalid(f"{unknown[0]}: Extra inputs are not permitted")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid(
            "model: Field required" if model is None else "model: Input should be a valid string"
        )
    max_tokens = payload.get("max_tokens")
    if max_tokens is None:
        raise _invalid("max_tokens: Field required")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _invalid("max_tokens: Input should be an integer greater than or equal to 1")
    if payload.get("stream"):
        raise _invalid("stream: the simulator does not stream; send the request without it")
    _check_sampling(payload)
    prefix = _Prefix()
    tools = _tools(payload.get("tools"), prefix)
    choice = _tool_choice(payload.get("tool_choice"), tools)
    _system(payload.get("system"), prefix)
    messages = _messages(payload.get("messages"), prefix)
    last = messages[-1]["content"]
    blocks = last if isinstance(last, list) else []
    return _MessageJob(
        model=model,
        max_tokens=max_tokens,
        prompt_tokens=prefix.tokens,
        directive_text=_text_of(last),
        tools=tools,
        tool_choice=choice,
        answered_tools=any(b.get("type") == "tool_result" for b in blocks),
        stop_sequences=tuple(payload.get("stop_sequences") or ()),
        cache=prefix.cache,
    )


def _check_sampling(payload: Mapping[str, Any]) -> None:
    for name in ("temperature", "top_p"):
        value = payload.get(name)
        if value is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
            raise _invalid(f"{name}: Input should be a number between 0 and 1, got {value!r}")
    stops = payload.get("stop_sequences")
    if stops is not None and not (
        isinstance(stops, list) and all(isinstance(s, str) and s.strip() for s in stops)
    ):
        raise _invalid("stop_sequences: Input should be a list of non-whitespace strings")


def _tools(raw: Any, prefix: _Prefix) -> tuple[dict[str, Any], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _invalid("tools: Input should be a valid list")
    for i, tool in enumerate(raw):
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise _invalid(f"{where}: Input should be a valid dictionary")
        if tool.get("type", "custom") == "custom":
            name = tool.get("name")
            if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
                raise _invalid(
                    f"{where}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
                )
            schema = tool.get("input_schema")
            if not isinstance(schema, dict):
                raise _invalid(f"{where}.input_schema: Field required")
            if schema.get("type") != "object":
                raise _invalid(f"{where}.input_schema.type: Input should be 'object'")
        prefix.add(tool, _ceil4(len(orjson.dumps(tool))), where)
    if raw:
        prefix.tokens += _TOOL_PROMPT_TOKENS
    return tuple(t for t in raw if t.get("type", "custom") == "custom")


def _tool_choice(raw: Any, tools: tuple[dict[str, Any], ...]) -> tuple[str, str | None]:
    if raw is None:
        return "auto", None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise _invalid(
            "tool_choice.type: Input tag does not match any of the expected tags: "
            "'auto', 'any', 'tool', 'none'"
        )
    if kind in ("any", "tool") and not tools:
        raise _invalid(f"tool_choice: a tool_choice of type '{kind}' needs `tools`")
    if kind != "tool":
        return kind, None
    name = raw.get("name")
    if not any(t["name"] == name for t in tools):
        raise _invalid(f"tool_choice.name: the tool {name!r} is not in `tools`")
    return kind, name


def _system(raw: Any, prefix: _Prefix) -> None:
    if raw is None or isinstance(raw, str):
        if raw:
            prefix.tokens += _ceil4(len(raw.encode()))
        return
    if not isinstance(raw, list):
        raise _invalid("system: Input should be a valid string or a list of text blocks")
    for i, block in enumerate(raw):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _invalid(f"system.{i}.type: Input should be 'text'")
        _text_block(block, f"system.{i}", prefix)


def _messages(raw: Any, prefix: _Prefix) -> list[dict[str, Any]]:
    if raw is None:
        raise _invalid("messages: Field required")
    if not isinstance(raw, list) or not raw:
        raise _invalid("messages: Input should be a non-empty list")
    pending: set[str] = set()  # tool_use ids the next turn must answer
    for i, message in enumerate(raw):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise _invalid(f"{where}: Input should be a valid dictionary")
        role = message.get("role")
        if role == "system":
            raise _invalid(
                f'{where}.role: Unexpected role "system". The Messages API accepts a '
                'top-level `system` parameter, not "system" as an input message role.'
            )
        if role not in ("user", "assistant"):
            raise _invalid(f"{where}.role: Input should be 'user' or 'assistant'")
        if i and raw[i - 1].get("role") == role:
            raise _invalid(
                'messages: roles must alternate between "user" and "assistant", but found '
                f'multiple "{role}" roles in a row'
            )
        final_assistant = role == "assistant" and i == len(raw) - 1
        pending = _content(message.get("content"), role, where, pending, final_assistant, prefix)
        prefix.tokens += 4
    return raw


def _content(
    raw: Any, role: str, where: str, pending: set[str], final_assistant: bool, prefix: _Prefix
) -> set[str]:
    """Check one message's content; the tool_use ids it leaves for the next turn."""
    if isinstance(raw, str):
        if not raw and not final_assistant:
            raise _invalid(
                f"{where}: all messages must have non-empty content except for the optional "
                "final assistant message"
            )
        if pending:
            raise _unanswered(where, pending)
        prefix.tokens += _ceil4(len(raw.encode()))
        return set()
    if not isinstance(raw, list) or (not raw and not final_assistant):
        raise _invalid(f"{where}.content: Input should be a string or a non-empty list of blocks")
    answered: set[str] = set()
    used: set[str] = set()
    for j, block in enumerate(raw):
        at = f"{where}.content.{j}"
        if not isinstance(block, dict):
            raise _invalid(f"{at}: Input should be a valid dictionary")
        kind = block.get("type")
        if kind == "text":
            _text_block(block, at, prefix)
        elif kind == "image":
            _image(block, at)
            prefix.add(block, _IMAGE_TOKENS, at)
        elif kind == "tool_use":
            if role != "assistant":
                raise _invalid(f"{at}: `tool_use` blocks can only be in `assistant` messages")
            _tool_use(block, at)
            used.add(block["id"])
            prefix.add(block, _ceil4(len(orjson.dumps(block.get("input")))), at)
        elif kind == "tool_result":
            if role != "user":
                raise _invalid(f"{at}: `tool_result` blocks can only be in `user` messages")
            answered.add(_tool_result(block, at, pending))
            prefix.add(block, _ceil4(len(orjson.dumps(block.get("content")))), at)
        elif isinstance(kind, str):  # thinking, document, ...: taken as they are
            prefix.add(block, _ceil4(len(orjson.dumps(block))), at)
        else:
            raise _invalid(f"{at}.type: Field required")
    if pending - answered:
        raise _unanswered(where, pending - answered)
    return used


def _text_block(block: Mapping[str, Any], at: str, prefix: _Prefix) -> None:
    text = block.get("text")
    if not isinstance(text, str):
        raise _invalid(f"{at}.text: Field required")
    if not text:
        raise _invalid(f"{at}: text content blocks must be non-empty")
    prefix.add(block, _ceil4(len(text.encode())), at)


def _image(block: Mapping[str, Any], at: str) -> None:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        assert isinstance(source, dict)
        if source.get("media_type") not in _IMAGE_TYPES:
            raise _invalid(
                f"{at}.source.base64.media_type: Input should be 'image/jpeg', 'image/png', "
                "'image/gif' or 'image/webp'"
            )
        if not isinstance(source.get("data"), str) or not source["data"]:
            raise _invalid(f"{at}.source.base64.data: Field required")
    elif kind == "url":
        assert isinstance(source, dict)
        url = source.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise _invalid(f"{at}.source.url.url: Input should be an http(s) URL")
    else:
        raise _invalid(
            f"{at}.source: Input tag does not match any of the expected tags: 'base64', 'url'"
        )


def _tool_use(block: Mapping[str, Any], at: str) -> None:
    if not isinstance(block.get("id"), str) or not block["id"]:
        raise _invalid(f"{at}.id: Field required")
    if not isinstance(block.get("name"), str):
        raise _invalid(f"{at}.name: Field required")
    if not isinstance(block.get("input"), dict):
        raise _invalid(f"{at}.input: Input should be a valid dictionary")


def _tool_result(block: Mapping[str, Any], at: str, pending: set[str]) -> str:
    use_id = block.get("tool_use_id")
    if use_id not in pending:
        raise _invalid(
            f"{at}: unexpected `tool_use_id` found in `tool_result` blocks: {use_id}. Each "
            "`tool_result` block must have a corresponding `tool_use` block in the previous "
            "message."
        )
    content = block.get("content")
    if content is not None and not isinstance(content, str | list):
        raise _invalid(f"{at}.content: Input should be a string or a list of blocks")
    return str(use_id)


def _unanswered(where: str, ids: set[str]) -> _ApiError:
    return _invalid(
        f"{where}: `tool_use` ids were found without `tool_result` blocks immediately after: "
        f"{', '.join(sorted(ids))}. Each `tool_use` block must have a corresponding "
        "`tool_result` block in the next message."
    )


def _text_of(content: Any) -> str:
    """A message's text, tool results included: where a `<<sim:...>>` directive is read."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif block.get("type") == "tool_result" and isinstance(block.get("content"), str):
            parts.append(block["content"])
    return " ".join(parts)


# ---------------------------------------------------------------------------------------
# Answers


class _Messages:
    def __init__(self, sim: Simulator) -> None:
        self._sim = sim

    async def handle(self, request: web.Request) -> web.StreamResponse:
        sim = self._sim

        async def work(started: float) -> web.StreamResponse:
            if not request.headers.get("anthropic-version"):
                raise _invalid("anthropic-version: header is required")
            return await sim._post(request, started, _parse, self._answer)

        return await sim._guarded(request, work, _WIRE)

    def _answer(self, job: _MessageJob, digest: bytes) -> dict[str, Any]:
        sim = self._sim
        rng = sim._rng(digest)
        tool = _tool_to_call(job)
        sequence = None
        if tool is not None:
            content, output, stop = _call(job, tool, rng)
        else:
            content, output, stop, sequence = _text(job, rng)
        return {
            "id": f"msg_{sim._id_prefix}{next(sim._ids):012x}",
            "type": "message",
            "role": "assistant",
            "model": job.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": sequence,
            "usage": self._usage(job, output),
        }

    def _usage(self, job: _MessageJob, output: int) -> dict[str, Any]:
        read = written = 0
        ttl = "5m"
        if job.cache is not None and job.cache[0] >= _CACHE_MIN_TOKENS:
            tokens, key, ttl = job.cache
            if self._sim.seen(hash(key)):
                read = tokens
            else:
                written = tokens
        return {
            "input_tokens": job.prompt_tokens - read - written,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": written if ttl == "5m" else 0,
                "ephemeral_1h_input_tokens": written if ttl == "1h" else 0,
            },
            "output_tokens": output,
            "service_tier": "standard",
        }


def _tool_to_call(job: _MessageJob) -> dict[str, Any] | None:
    kind, name = job.tool_choice
    if not job.tools or kind == "none" or (kind == "auto" and job.answered_tools):
        return None
    if kind == "tool":
        return next(t for t in job.tools if t["name"] == name)
    return job.tools[0]


def _call(
    job: _MessageJob, tool: dict[str, Any], rng: random.Random
) -> tuple[list[dict[str, Any]], int, str]:
    """A tool_use block (after a word of preamble when the model chose to call), its
    output tokens and stop reason. Cut off by max_tokens, no block comes back."""
    try:
        arguments = _fake_json(tool["input_schema"], rng)
    except (LookupError, TypeError, ValueError, AttributeError) as error:
        raise _invalid(
            f"tools: the input_schema of {tool['name']!r} is invalid: {error!r}"
        ) from None
    block = {
        "type": "tool_use",
        "id": f"toolu_{rng.getrandbits(96):024x}",
        "name": tool["name"],
        "input": arguments,
    }
    output = len(_text_tokens(orjson.dumps(arguments).decode())) + 8
    content: list[dict[str, Any]] = []
    if job.tool_choice[0] == "auto":
        preamble = f"I will use {tool['name']}."
        content.append({"type": "text", "text": preamble})
        output += len(preamble.split())
    if output > job.max_tokens:
        return content, job.max_tokens, "max_tokens"
    return [*content, block], output, "tool_use"


def _text(
    job: _MessageJob, rng: random.Random
) -> tuple[list[dict[str, Any]], int, str, str | None]:
    """A text answer, cut at a stop sequence or at max_tokens like the real one."""
    tokens = _sentence_tokens(rng)
    stop, sequence = "end_turn", None
    if len(tokens) > job.max_tokens:
        tokens, stop = tokens[: job.max_tokens], "max_tokens"
    text = "".join(tokens)
    found = [(text.find(s), s) for s in job.stop_sequences if s in text]
    if found:
        at, sequence = min(found)
        text, stop = text[:at], "stop_sequence"
        tokens = _text_tokens(text)
    content = [{"type": "text", "text": text}] if text else []
    return content, len(tokens), stop, sequence
