"""A prompt's tokens as OpenAI counts them: messages (or Responses items) in, tokens out.

    prompt_tokens([{"role": "user", "content": "Hello"}], "gpt-4o-mini")   # 1 + 4 + 3 = 8
    items_tokens("Be brief.", [{"type": "message", "role": "user", "content": "Hi"}], model)
    content_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])  # "a b"

Each message counts its content's tokens plus 4 (its framing), and the reply's priming
3 more. Texts count in the model's encoding (text_tokens.py), images by their pixel
size (prompt_images.py), never by the length of their base64.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from pipeline.simulator.api_errors import invalid
from pipeline.simulator.prompt_images import (
    REMOTE_SIZE,
    ImageProblem,
    image_part_tokens,
    tokens_for,
)
from pipeline.simulator.text_tokens import count_text

# A content part that is neither text nor an image (audio, a file) counts this much;
# images are counted by their size (prompt_images.py), never by their base64 length.
_OTHER_PART_TOKENS: Final = 85


def prompt_tokens(messages: list[dict[str, Any]], model: str = "") -> int:
    """Each message's content tokens + 4 (its framing), plus 3 for the reply's priming.

    A message's content includes the name and arguments of the tool calls it carries.
    """
    total = 3
    for message in messages:
        total += content_tokens(message.get("content"), model) + 4
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                said = f"{function.get('name', '')}{function.get('arguments', '')}"
                total += count_text(said, model)
    return total


def content_tokens(content: Any, model: str = "") -> int:
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
                raise invalid(str(problem), "messages", problem.code) from None
        else:
            total += _OTHER_PART_TOKENS
    return total


def content_text(content: Any) -> str:
    """A message's text: a string, or its parts' texts joined by spaces."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = (p.get("text") for p in content if isinstance(p, dict))
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def items_tokens(instructions: str | None, items: list[dict[str, Any]], model: str) -> int:
    """A Responses API prompt, counted as chat completions counts: its instructions' and
    each input item's tokens + 4, and 3 for the reply.

    Images count by their size, as on chat completions; the tools are added by the caller.
    """
    total = 3
    if instructions is not None:
        total += count_text(instructions, model) + 4
    for item in items:
        kind = item["type"]
        if kind == "message":
            total += _parts_tokens(item["content"], model) + 4
        elif kind == "function_call":
            total += count_text(item["name"] + item["arguments"], model) + 4
        else:
            total += count_text(content_text(item["output"]), model) + 4
    return total


def _parts_tokens(content: str | list[dict[str, Any]], model: str) -> int:
    """The tokens of a message's content: its texts', and its images' by their size."""
    if isinstance(content, str):
        return count_text(content, model)
    total = 0
    for part in content:
        if part["type"] == "input_image":
            total += _image_tokens(part, model)
        else:
            total += count_text(str(part.get("text") or part.get("refusal") or ""), model)
    return total


def _image_tokens(part: Mapping[str, Any], model: str) -> int:
    """An `input_image` part's tokens, by chat completions' rules for an `image_url` one."""
    # "original" keeps the full resolution: at least what "high" costs.
    detail = "high" if part["detail"] == "original" else part["detail"]
    url = part.get("image_url")
    if url is None:  # an uploaded file (file_id): its size is unknown here
        return tokens_for(REMOTE_SIZE, detail, model)
    try:
        return image_part_tokens({"image_url": {"url": url, "detail": detail}}, model)
    except ImageProblem as problem:
        raise invalid(str(problem), "input", problem.code) from None
