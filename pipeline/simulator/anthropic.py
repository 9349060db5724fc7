"""Anthropic's Messages API in the simulator: `POST /v1/messages`.

    async with Simulator(SimConfig(api_key="sk-ant-test")) as base_url:
        ...  # POST f"{base_url}/messages" with x-api-key and anthropic-version

The route shares the simulator's exchange (directives, RPM/TPM buckets, fault draws,
latency), checks the body as Anthropic does (anthropic_request.py) and speaks
Anthropic's dialect on the wire:

- the key comes in `x-api-key` (a 401 `authentication_error` otherwise) and the
  `anthropic-version` header is required (a 400 without it);
- errors are `{"type": "error", "error": {"type": "overloaded_error", ...}}`, a 429
  carries `retry-after` in whole seconds, and every answer carries
  `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}` with RFC 3339 resets
  and a `request-id`;
- with tools the answer is a `tool_use` of the first tool (or the one tool_choice
  names), its input faked from the tool's input_schema, unless tool_choice is "none"
  or, with "auto", the last turn brings tool results back: then it answers in text;
- `cache_control` breakpoints are honoured: the prefix up to the last one, from 1024
  tokens on, is written to the cache the first time and read from it after.
"""

from __future__ import annotations

import math
import random
import re
import time
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from aiohttp import web

from pipeline.simulator.anthropic_request import (
    MessageJob,
    anthropic_error,
    anthropic_invalid,
    parse_messages,
)
from pipeline.simulator.api_errors import RATE_LIMIT_DOCS, ApiError
from pipeline.simulator.exchange import Exchange
from pipeline.simulator.fake_answers import chunk_tokens, fake_json, sentence_tokens
from pipeline.simulator.rate_limits import Limits

#: Anthropic caches a prefix from this many tokens on (1024 for Sonnet and Opus).
_CACHE_MIN_TOKENS: Final = 1024
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


def add_routes(exchange: Exchange, router: web.UrlDispatcher) -> None:
    """Serve `POST /v1/messages` through `exchange`."""
    router.add_post("/v1/messages", _Messages(exchange).handle)


# ---------------------------------------------------------------------------------------
# The dialect: keys, errors and headers as Anthropic spells them


class _Wire:
    """Anthropic's dialect for `Exchange.guarded`: x-api-key, its error bodies and
    its headers."""

    def authorize(self, request: web.Request, key: str | None) -> None:
        if key is None:
            return
        given = request.headers.get("x-api-key", "").strip()
        if not given:
            raise anthropic_error(401, "authentication_error", "x-api-key header is required")
        if given != key:
            raise anthropic_error(401, "authentication_error", "invalid x-api-key")

    def error(self, error: ApiError) -> ApiError:
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
            message = message.replace(RATE_LIMIT_DOCS, _RATE_LIMIT_HELP)
        elif status >= 500:
            message = "Internal server error"
        retry = error.headers.get("retry-after")
        out = anthropic_error(status, _TYPES.get(status, "api_error"), message, tally=error.tally)
        out.headers = {"retry-after": retry} if retry is not None else {}
        return out

    def finish(self, response: web.StreamResponse, limits: Limits) -> None:
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
# Answers


class _Messages:
    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange

    async def handle(self, request: web.Request) -> web.StreamResponse:
        exchange = self._exchange

        async def work(started: float) -> web.StreamResponse:
            if not request.headers.get("anthropic-version"):
                raise anthropic_invalid("anthropic-version: header is required")
            return await exchange.post(request, started, parse_messages, self._answer)

        return await exchange.guarded(request, work, _WIRE)

    def _answer(self, job: MessageJob, digest: bytes) -> dict[str, Any]:
        exchange = self._exchange
        rng = exchange.rng(digest)
        tool = _tool_to_call(job)
        sequence = None
        if tool is not None:
            content, output, stop = _call(job, tool, rng)
        else:
            content, output, stop, sequence = _text(job, rng)
        return {
            "id": exchange.answer_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": job.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": sequence,
            "usage": self._usage(job, output),
        }

    def _usage(self, job: MessageJob, output: int) -> dict[str, Any]:
        read = written = 0
        ttl = "5m"
        if job.cache is not None and job.cache[0] >= _CACHE_MIN_TOKENS:
            tokens, key, ttl = job.cache
            if self._exchange.seen(hash(key)):
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


def _tool_to_call(job: MessageJob) -> dict[str, Any] | None:
    kind, name = job.tool_choice
    if not job.tools or kind == "none" or (kind == "auto" and job.answered_tools):
        return None
    if kind == "tool":
        return next(t for t in job.tools if t["name"] == name)
    return job.tools[0]


def _call(
    job: MessageJob, tool: dict[str, Any], rng: random.Random
) -> tuple[list[dict[str, Any]], int, str]:
    """A tool_use block (after a word of preamble when the model chose to call), its
    output tokens and stop reason. Cut off by max_tokens, no block comes back."""
    try:
        arguments = fake_json(tool["input_schema"], rng)
    except (LookupError, TypeError, ValueError, AttributeError) as error:
        raise anthropic_invalid(
            f"tools: the input_schema of {tool['name']!r} is invalid: {error!r}"
        ) from None
    block = {
        "type": "tool_use",
        "id": f"toolu_{rng.getrandbits(96):024x}",
        "name": tool["name"],
        "input": arguments,
    }
    output = len(chunk_tokens(orjson.dumps(arguments).decode())) + 8
    content: list[dict[str, Any]] = []
    if job.tool_choice[0] == "auto":
        preamble = f"I will use {tool['name']}."
        content.append({"type": "text", "text": preamble})
        output += len(preamble.split())
    if output > job.max_tokens:
        return content, job.max_tokens, "max_tokens"
    return [*content, block], output, "tool_use"


def _text(job: MessageJob, rng: random.Random) -> tuple[list[dict[str, Any]], int, str, str | None]:
    """A text answer, cut at a stop sequence or at max_tokens like the real one."""
    tokens = sentence_tokens(rng)
    stop, sequence = "end_turn", None
    if len(tokens) > job.max_tokens:
        tokens, stop = tokens[: job.max_tokens], "max_tokens"
    text = "".join(tokens)
    found = [(text.find(s), s) for s in job.stop_sequences if s in text]
    if found:
        at, sequence = min(found)
        text, stop = text[:at], "stop_sequence"
        tokens = chunk_tokens(text)
    content = [{"type": "text", "text": text}] if text else []
    return content, len(tokens), stop, sequence
