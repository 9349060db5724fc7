"""Anthropic's Messages API requests, checked as Anthropic checks them.

    job = parse_messages(payload)    # a MessageJob, or Anthropic's 400
    job.prompt_tokens, job.cache     # counted in Anthropic's order; the last breakpoint

`max_tokens` is required, `system` is a top-level field (a "system" role in `messages`
is refused), roles alternate, content blocks are well formed, every `tool_use` is
answered by a `tool_result` in the next turn, and no unknown top-level field is taken
(an OpenAI-only `seed` or `response_format` is a 400). The prompt counts four bytes a
token, images a fixed size, in the order Anthropic caches it: tools, system, messages;
the prefix up to the last `cache_control` breakpoint is what the cache holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from hashlib import sha256
from typing import Any, Final

import orjson

from pipeline.simulator.api_errors import FUNCTION_NAME, ApiError, Tally
from pipeline.simulator.text_tokens import by_four

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


def anthropic_error(status: int, type_: str, message: str, *, tally: Tally = "errors") -> ApiError:
    """An error in Anthropic's shape: {"type": "error", "error": {"type", "message"}}."""
    body = {"type": "error", "error": {"type": type_, "message": message}}
    return ApiError(status, body, tally=tally)


def anthropic_invalid(message: str) -> ApiError:
    """Anthropic's 400 `invalid_request_error`."""
    return anthropic_error(400, "invalid_request_error", message)


@dataclass(frozen=True, slots=True)
class MessageJob:
    """A checked Messages request: what the answer is made from."""

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
            raise anthropic_invalid(f"{where}.cache_control.type: Input should be 'ephemeral'")
        ttl = control.get("ttl", "5m")
        if ttl not in ("5m", "1h"):
            raise anthropic_invalid(f"{where}.cache_control.ttl: Input should be '5m' or '1h'")
        self.breakpoints += 1
        if self.breakpoints > _MAX_BREAKPOINTS:
            raise anthropic_invalid(
                f"A maximum of {_MAX_BREAKPOINTS} blocks with cache_control may be provided. "
                f"Found {self.breakpoints}."
            )
        self.cache = (self.tokens, self._hash.copy().digest(), ttl)


def parse_messages(payload: dict[str, Any]) -> MessageJob:
    """Check a Messages body as Anthropic does; raise the 400 it would send."""
    unknown = sorted(set(payload) - _FIELDS)
    if unknown:
        raise anthropic_invalid(f"{unknown[0]}: Extra inputs are not permitted")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise anthropic_invalid(
            "model: Field required" if model is None else "model: Input should be a valid string"
        )
    max_tokens = payload.get("max_tokens")
    if max_tokens is None:
        raise anthropic_invalid("max_tokens: Field required")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise anthropic_invalid("max_tokens: Input should be an integer greater than or equal to 1")
    if payload.get("stream"):
        raise anthropic_invalid(
            "stream: the simulator does not stream; send the request without it"
        )
    _check_sampling(payload)
    prefix = _Prefix()
    tools = _tools(payload.get("tools"), prefix)
    choice = _tool_choice(payload.get("tool_choice"), tools)
    _system(payload.get("system"), prefix)
    messages = _messages(payload.get("messages"), prefix)
    last = messages[-1]["content"]
    blocks = last if isinstance(last, list) else []
    return MessageJob(
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
            raise anthropic_invalid(
                f"{name}: Input should be a number between 0 and 1, got {value!r}"
            )
    stops = payload.get("stop_sequences")
    if stops is not None and not (
        isinstance(stops, list) and all(isinstance(s, str) and s.strip() for s in stops)
    ):
        raise anthropic_invalid("stop_sequences: Input should be a list of non-whitespace strings")


def _tools(raw: Any, prefix: _Prefix) -> tuple[dict[str, Any], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise anthropic_invalid("tools: Input should be a valid list")
    for i, tool in enumerate(raw):
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise anthropic_invalid(f"{where}: Input should be a valid dictionary")
        if tool.get("type", "custom") == "custom":
            name = tool.get("name")
            if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
                raise anthropic_invalid(
                    f"{where}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
                )
            schema = tool.get("input_schema")
            if not isinstance(schema, dict):
                raise anthropic_invalid(f"{where}.input_schema: Field required")
            if schema.get("type") != "object":
                raise anthropic_invalid(f"{where}.input_schema.type: Input should be 'object'")
        prefix.add(tool, by_four(len(orjson.dumps(tool))), where)
    if raw:
        prefix.tokens += _TOOL_PROMPT_TOKENS
    return tuple(t for t in raw if t.get("type", "custom") == "custom")


def _tool_choice(raw: Any, tools: tuple[dict[str, Any], ...]) -> tuple[str, str | None]:
    if raw is None:
        return "auto", None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise anthropic_invalid(
            "tool_choice.type: Input tag does not match any of the expected tags: "
            "'auto', 'any', 'tool', 'none'"
        )
    if kind in ("any", "tool") and not tools:
        raise anthropic_invalid(f"tool_choice: a tool_choice of type '{kind}' needs `tools`")
    if kind != "tool":
        return kind, None
    name = raw.get("name")
    if not any(t["name"] == name for t in tools):
        raise anthropic_invalid(f"tool_choice.name: the tool {name!r} is not in `tools`")
    return kind, name


def _system(raw: Any, prefix: _Prefix) -> None:
    if raw is None or isinstance(raw, str):
        if raw:
            prefix.tokens += by_four(len(raw.encode()))
        return
    if not isinstance(raw, list):
        raise anthropic_invalid("system: Input should be a valid string or a list of text blocks")
    for i, block in enumerate(raw):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise anthropic_invalid(f"system.{i}.type: Input should be 'text'")
        _text_block(block, f"system.{i}", prefix)


def _messages(raw: Any, prefix: _Prefix) -> list[dict[str, Any]]:
    if raw is None:
        raise anthropic_invalid("messages: Field required")
    if not isinstance(raw, list) or not raw:
        raise anthropic_invalid("messages: Input should be a non-empty list")
    pending: set[str] = set()  # tool_use ids the next turn must answer
    for i, message in enumerate(raw):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise anthropic_invalid(f"{where}: Input should be a valid dictionary")
        role = message.get("role")
        if role == "system":
            raise anthropic_invalid(
                f'{where}.role: Unexpected role "system". The Messages API accepts a '
                'top-level `system` parameter, not "system" as an input message role.'
            )
        if role not in ("user", "assistant"):
            raise anthropic_invalid(f"{where}.role: Input should be 'user' or 'assistant'")
        if i and raw[i - 1].get("role") == role:
            raise anthropic_invalid(
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
            raise anthropic_invalid(
                f"{where}: all messages must have non-empty content except for the optional "
                "final assistant message"
            )
        if pending:
            raise _unanswered(where, pending)
        prefix.tokens += by_four(len(raw.encode()))
        return set()
    if not isinstance(raw, list) or (not raw and not final_assistant):
        raise anthropic_invalid(
            f"{where}.content: Input should be a string or a non-empty list of blocks"
        )
    answered: set[str] = set()
    used: set[str] = set()
    for j, block in enumerate(raw):
        at = f"{where}.content.{j}"
        if not isinstance(block, dict):
            raise anthropic_invalid(f"{at}: Input should be a valid dictionary")
        kind = block.get("type")
        if kind == "text":
            _text_block(block, at, prefix)
        elif kind == "image":
            _image(block, at)
            prefix.add(block, _IMAGE_TOKENS, at)
        elif kind == "tool_use":
            if role != "assistant":
                raise anthropic_invalid(
                    f"{at}: `tool_use` blocks can only be in `assistant` messages"
                )
            _tool_use(block, at)
            used.add(block["id"])
            prefix.add(block, by_four(len(orjson.dumps(block.get("input")))), at)
        elif kind == "tool_result":
            if role != "user":
                raise anthropic_invalid(
                    f"{at}: `tool_result` blocks can only be in `user` messages"
                )
            answered.add(_tool_result(block, at, pending))
            prefix.add(block, by_four(len(orjson.dumps(block.get("content")))), at)
        elif isinstance(kind, str):  # thinking, document, ...: taken as they are
            prefix.add(block, by_four(len(orjson.dumps(block))), at)
        else:
            raise anthropic_invalid(f"{at}.type: Field required")
    if pending - answered:
        raise _unanswered(where, pending - answered)
    return used


def _text_block(block: Mapping[str, Any], at: str, prefix: _Prefix) -> None:
    text = block.get("text")
    if not isinstance(text, str):
        raise anthropic_invalid(f"{at}.text: Field required")
    if not text:
        raise anthropic_invalid(f"{at}: text content blocks must be non-empty")
    prefix.add(block, by_four(len(text.encode())), at)


def _image(block: Mapping[str, Any], at: str) -> None:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        assert isinstance(source, dict)
        if source.get("media_type") not in _IMAGE_TYPES:
            raise anthropic_invalid(
                f"{at}.source.base64.media_type: Input should be 'image/jpeg', 'image/png', "
                "'image/gif' or 'image/webp'"
            )
        if not isinstance(source.get("data"), str) or not source["data"]:
            raise anthropic_invalid(f"{at}.source.base64.data: Field required")
    elif kind == "url":
        assert isinstance(source, dict)
        url = source.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise anthropic_invalid(f"{at}.source.url.url: Input should be an http(s) URL")
    else:
        raise anthropic_invalid(
            f"{at}.source: Input tag does not match any of the expected tags: 'base64', 'url'"
        )


def _tool_use(block: Mapping[str, Any], at: str) -> None:
    if not isinstance(block.get("id"), str) or not block["id"]:
        raise anthropic_invalid(f"{at}.id: Field required")
    if not isinstance(block.get("name"), str):
        raise anthropic_invalid(f"{at}.name: Field required")
    if not isinstance(block.get("input"), dict):
        raise anthropic_invalid(f"{at}.input: Input should be a valid dictionary")


def _tool_result(block: Mapping[str, Any], at: str, pending: set[str]) -> str:
    use_id = block.get("tool_use_id")
    if use_id not in pending:
        raise anthropic_invalid(
            f"{at}: unexpected `tool_use_id` found in `tool_result` blocks: {use_id}. Each "
            "`tool_result` block must have a corresponding `tool_use` block in the previous "
            "message."
        )
    content = block.get("content")
    if content is not None and not isinstance(content, str | list):
        raise anthropic_invalid(f"{at}.content: Input should be a string or a list of blocks")
    return str(use_id)


def _unanswered(where: str, ids: set[str]) -> ApiError:
    return anthropic_invalid(
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
