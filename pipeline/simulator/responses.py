"""POST /v1/responses: OpenAI's Responses API, checked and answered as the real one does.

    add_routes(exchange, app.router)
    answer_responses(exchange, parse_responses(payload), digest)   # the Response

Requests go through the same exchange as chat completions (key, `<<sim:...>>`
directives, rate limits, faults), and are counted and cut like them: the same prompt
estimate, one token per word of a plain answer, four characters per token of a JSON
one, reasoning tokens for o-models. The body is checked like the real API checks it
(responses_request.py).

The answer is a Response: a `message` with an `output_text` part (JSON made from the
schema with text.format json_schema), or, when tools are given and the input holds no
function_call_output yet, a `function_call` with arguments made from the tool's
parameters; once the outputs are there, the final message. `max_output_tokens` cuts
the output and makes the status "incomplete". A request whose last user message holds
one of these is answered, every time, with a Response of that kind (and so are the
later rounds of its tool loop, which carry that message on):

    <<sim:refusal>>        a message whose one part is a refusal
    <<sim:failed>>         status "failed", error code invalid_prompt
    <<sim:failedserver>>   status "failed", error code server_error
    <<sim:filtered>>       status "incomplete" for content_filter, the text cut short
"""

from __future__ import annotations

import functools
import random
import time
from typing import Any, Final

import orjson
from aiohttp import web

from pipeline.simulator.api_errors import invalid
from pipeline.simulator.exchange import Exchange
from pipeline.simulator.fake_answers import (
    REASONING_TOKENS,
    chunk_tokens,
    fake_json,
    is_reasoning,
    schema_answer,
    sentence_tokens,
)
from pipeline.simulator.responses_request import ResponsesJob, parse_responses
from pipeline.simulator.tool_calls import call_id

_REFUSAL: Final = "I'm sorry, but I can't help with that request."
_FAILURES: Final = {
    "failed": (
        "invalid_prompt",
        "Invalid prompt: your prompt was flagged as potentially violating our usage policy.",
    ),
    "failedserver": (
        "server_error",
        "The server had an error while processing your request. Sorry about that!",
    ),
}
_NO_PARAMETERS: Final = {"type": "object", "properties": {}}


def add_routes(exchange: Exchange, router: web.UrlDispatcher) -> None:
    """Serve `POST /v1/responses` through `exchange`."""
    answer = functools.partial(answer_responses, exchange)

    router.add_post("/v1/responses", exchange.route(parse_responses, answer))


# ---------------------------------------------------------------------------------------
# The answer


def answer_responses(exchange: Exchange, job: ResponsesJob, digest: bytes) -> dict[str, Any]:
    """The Response for a checked request: a pure function of the seed and the body."""
    rng = exchange.rng(digest)
    if job.outcome in _FAILURES:
        code, message = _FAILURES[job.outcome]
        usage = _usage(exchange, job, 0, 0)
        return _response(
            exchange, job, "failed", [], usage, error={"code": code, "message": message}
        )
    reasoning = rng.randint(*REASONING_TOKENS) if is_reasoning(job.model) else 0
    budget = None
    if job.max_output_tokens is not None:
        reasoning = min(reasoning, job.max_output_tokens)
        budget = job.max_output_tokens - reasoning
    tool = _tool_to_call(job)
    tokens = _output_tokens(job, tool, rng)
    status, reason = "completed", None
    if job.outcome == "filtered":
        tokens, status, reason = tokens[: len(tokens) // 2], "incomplete", "content_filter"
    if budget is not None and len(tokens) > budget:
        # Cut like the real API: mid-sentence, mid-JSON; a reasoning model whose thinking
        # ate the whole budget leaves no message at all.
        tokens, status, reason = tokens[:budget], "incomplete", "max_output_tokens"
    output: list[dict[str, Any]] = []
    if reasoning:
        output.append({"id": _id(exchange, "rs"), "type": "reasoning", "summary": []})
    if tokens or status == "completed":
        item_status = "completed" if status == "completed" else "incomplete"
        output.append(_output_item(exchange, job, tool, "".join(tokens), item_status, rng))
    usage = _usage(exchange, job, len(tokens) + reasoning, reasoning)
    return _response(exchange, job, status, output, usage, reason=reason)


def _tool_to_call(job: ResponsesJob) -> dict[str, Any] | None:
    """The function the model calls now, or None for a message.

    The first tool is called (the forced one, if named) until the outputs are in the
    input; a forced choice (a named function, or "required") calls again every time,
    as on the real API and on the simulator's chat completions.
    """
    choice = job.tool_choice
    if not job.tools or choice == "none" or job.outcome == "refusal":
        return None
    if isinstance(choice, dict):
        return next(t for t in job.tools if t["name"] == choice["name"])
    if job.tools_answered and choice != "required":
        return None
    return job.tools[0]


def _output_tokens(job: ResponsesJob, tool: dict[str, Any] | None, rng: random.Random) -> list[str]:
    if tool is not None:
        try:
            arguments = fake_json(tool["parameters"] or _NO_PARAMETERS, rng)
        except (LookupError, TypeError, ValueError, AttributeError) as error:
            raise invalid(
                f"Invalid schema for function '{tool['name']}': {error!r}",
                "tools",
                "invalid_function_parameters",
            ) from None
        return chunk_tokens(orjson.dumps(arguments).decode())
    if job.outcome == "refusal":
        return chunk_tokens(_REFUSAL)
    fmt = job.text_format
    if fmt["type"] == "json_schema":
        return chunk_tokens(orjson.dumps(schema_answer(fmt, rng)).decode())
    if fmt["type"] == "json_object":
        return chunk_tokens(orjson.dumps({"answer": "".join(sentence_tokens(rng))}).decode())
    return sentence_tokens(rng)


def _output_item(
    exchange: Exchange,
    job: ResponsesJob,
    tool: dict[str, Any] | None,
    text: str,
    status: str,
    rng: random.Random,
) -> dict[str, Any]:
    if tool is not None:
        return {
            "id": _id(exchange, "fc"),
            "type": "function_call",
            "status": status,
            # Drawn from the body's stream, not counted: the call id goes back in the next
            # request, whose answer then stays a pure function of the seed and the rows.
            "call_id": call_id(rng),
            "name": tool["name"],
            "arguments": text,
        }
    part: dict[str, Any]
    if job.outcome == "refusal":
        part = {"type": "refusal", "refusal": text}
    else:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {
        "id": _id(exchange, "msg"),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [part],
    }


def _id(exchange: Exchange, prefix: str) -> str:
    return exchange.answer_id(f"{prefix}_")


def _usage(exchange: Exchange, job: ResponsesJob, output: int, reasoning: int) -> dict[str, Any]:
    prompt = job.prompt_tokens
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": _cached(exchange, job), "cache_write_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + output,
    }


def _cached(exchange: Exchange, job: ResponsesJob) -> int:
    """The cached share, once the same instructions (or, without them, the same first
    input item) were answered: the prefix a cache would hold."""
    prefix = job.items[0] if job.instructions is None else job.instructions
    return exchange.cached_share(prefix, job.prompt_tokens)


def _response(
    exchange: Exchange,
    job: ResponsesJob,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any],
    *,
    error: dict[str, str] | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    now = int(time.time())
    settings = job.settings
    return {
        "id": _id(exchange, "resp"),
        "object": "response",
        "created_at": now,
        "status": status,
        "background": False,
        "completed_at": now if status == "completed" else None,
        "error": error,
        "incomplete_details": {"reason": reason} if reason else None,
        "instructions": job.instructions,
        "max_output_tokens": job.max_output_tokens,
        "max_tool_calls": None,
        "model": job.model,
        "output": output,
        "parallel_tool_calls": settings["parallel_tool_calls"] is not False,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": settings["store"] is not False,
        "temperature": 1.0 if settings["temperature"] is None else settings["temperature"],
        "text": {"format": job.text_format, "verbosity": "medium"},
        "tool_choice": job.tool_choice,
        "tools": job.tools,
        "top_p": 1.0 if settings["top_p"] is None else settings["top_p"],
        "truncation": "disabled",
        "usage": usage,
        "metadata": settings["metadata"],
    }
