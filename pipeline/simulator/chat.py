"""POST /v1/chat/completions: checked and answered as OpenAI's chat completions.

    add_routes(exchange, app.router)
    job = parse_chat({"model": "gpt-4o-mini", "messages": [...]})   # or raise the 400
    chat_answer(exchange, job, digest)     # the ChatCompletion, usage included

The body is checked as the API checks it (model, messages with roles, no `stream`,
`max_completion_tokens` on o-models, `n` up to 128, `response_format` with a strict
schema's rules, tools and tool messages: tool_calls.py). The answer is `n` choices of
5 to 40 words, JSON made from the schema when one is asked for, or a call of the
offered tool; `max_tokens` cuts it as the real API does. The usage counts the prompt
as OpenAI does (prompt_tokens.py) and reports a cached share once the same system
prompt comes back.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from pipeline.simulator.api_errors import invalid, missing, wrong_type
from pipeline.simulator.exchange import Exchange
from pipeline.simulator.fake_answers import (
    DEFAULT_COMPLETION_COST,
    REASONING_TOKENS,
    chunk_tokens,
    is_reasoning,
    schema_answer,
    sentence_tokens,
)
from pipeline.simulator.prompt_tokens import content_text, prompt_tokens
from pipeline.simulator.request_fields import model_field, positive_int
from pipeline.simulator.strict_schemas import strict_problem
from pipeline.simulator.tool_calls import ToolCall, tool_to_call, tools_tokens

_MAX_CHOICES: Final = 128


def add_routes(exchange: Exchange, router: web.UrlDispatcher) -> None:
    """Serve `POST /v1/chat/completions` through `exchange`."""
    answer = functools.partial(chat_answer, exchange)

    router.add_post("/v1/chat/completions", exchange.route(parse_chat, answer))


@dataclass(frozen=True, slots=True)
class ChatJob:
    """A checked chat completions request: what the answer is made from."""

    model: str
    messages: list[dict[str, Any]]
    prompt_tokens: int
    max_tokens: int | None
    n: int
    response_format: dict[str, Any] | None
    directive_text: str
    #: The tool the answer calls (tool_calls.py); None: it answers in text.
    tool: ToolCall | None = None

    @property
    def cost(self) -> int:
        completion = DEFAULT_COMPLETION_COST if self.max_tokens is None else self.max_tokens
        return self.prompt_tokens + completion * self.n


# ---------------------------------------------------------------------------------------
# The request


def parse_chat(payload: dict[str, Any]) -> ChatJob:
    """Check a chat completions body as the API does; raise the 400 it would send."""
    model = model_field(payload)
    messages = _messages(payload)
    if payload.get("stream"):
        raise invalid(
            "The simulator does not stream; send the request without 'stream'.",
            "stream",
            "unsupported_parameter",
        )
    if is_reasoning(model) and "max_tokens" in payload:
        raise invalid(
            "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead.",
            "max_tokens",
            "unsupported_parameter",
        )
    max_tokens = positive_int(payload, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = positive_int(payload, "max_tokens")
    return ChatJob(
        model=model,
        messages=messages,
        prompt_tokens=prompt_tokens(messages, model) + tools_tokens(payload, model),
        max_tokens=max_tokens,
        n=positive_int(payload, "n", most=_MAX_CHOICES) or 1,
        response_format=_response_format(payload),
        directive_text=content_text(messages[-1].get("content")),
        tool=tool_to_call(payload, messages),
    )


def _messages(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = payload.get("messages")
    if messages is None:
        raise missing("messages")
    if not isinstance(messages, list):
        raise wrong_type("messages", "an array of message objects", messages)
    if not messages:
        raise invalid(
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
            "messages",
            "empty_array",
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise wrong_type(f"messages[{i}]", "an object", message)
        if "role" not in message:
            raise missing(f"messages[{i}].role")
    return messages


def _response_format(payload: Mapping[str, Any]) -> dict[str, Any] | None:
    fmt = payload.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise wrong_type("response_format", "an object", fmt)
    kind = fmt.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise invalid(
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
        raise missing("response_format.json_schema")
    if not isinstance(spec, dict):
        raise wrong_type("response_format.json_schema", "an object", spec)
    if not isinstance(spec.get("name"), str):
        raise missing("response_format.json_schema.name")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise wrong_type("response_format.json_schema.schema", "an object", schema)
    if spec.get("strict"):
        problem = strict_problem(schema, ())
        if problem:
            raise invalid(
                f"Invalid schema for response_format '{spec['name']}': {problem}",
                "response_format",
                "invalid_json_schema",
            )


# ---------------------------------------------------------------------------------------
# The answer


def chat_answer(exchange: Exchange, job: ChatJob, digest: bytes) -> dict[str, Any]:
    """The ChatCompletion for a checked request: a pure function of the seed and body."""
    choices = []
    completion = reasoning = 0
    for index in range(job.n):
        choice, used, thought = _choice(job, index, exchange.rng(digest, index))
        choices.append(choice)
        completion += used
        reasoning += thought
    return {
        "id": exchange.answer_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": job.model,
        "choices": choices,
        "usage": _usage(exchange, job, completion, reasoning),
        "service_tier": "default",
        "system_fingerprint": exchange.fingerprint,
    }


def _choice(job: ChatJob, index: int, rng: random.Random) -> tuple[dict[str, Any], int, int]:
    """One choice, its completion tokens and its reasoning tokens."""
    if job.tool is not None:
        return job.tool.choice(index, job.max_tokens, rng)
    reasoning = rng.randint(*REASONING_TOKENS) if is_reasoning(job.model) else 0
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


def _answer_tokens(job: ChatJob, rng: random.Random) -> list[str]:
    fmt = job.response_format
    kind = fmt.get("type") if fmt else "text"
    if kind == "json_schema":
        assert fmt is not None
        return chunk_tokens(orjson.dumps(schema_answer(fmt["json_schema"], rng)).decode())
    if kind == "json_object":
        assert fmt is not None
        if isinstance(fmt.get("schema"), dict):
            # llama-cpp-python's and vLLM's extension: a schema the answer must follow.
            return chunk_tokens(orjson.dumps(schema_answer(fmt, rng)).decode())
        answer = "".join(sentence_tokens(rng))
        return chunk_tokens(orjson.dumps({"answer": answer}).decode())
    return sentence_tokens(rng)


def _usage(exchange: Exchange, job: ChatJob, completion: int, reasoning: int) -> dict[str, Any]:
    prompt = job.prompt_tokens
    # Half the prompt, in 128-token steps, once the same system prompt was answered.
    cached = exchange.cached_share(job.messages[0], prompt)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
