"""A chat prompt's tokens as OpenAI counts them: messages in, prompt tokens out.

    prompt_tokens([{"role": "user", "content": "Hello"}], "gpt-4o-mini")   # 1 + 4 + 3 = 8
    content_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])  # "a b"

Each message counts its content's tokens plus 4 (its framing), and the reply's priming
3 more. Texts count in the model's encoding (text_tokens.py), images by their pixel
size (prompt_images.py), never by the length of their base64.
"""

from __future__ import annotations

from typing import Any, Final

from pipeline.simulator.api_errors import invalid
from pipeline.simulator.prompt_images import ImageProblem, image_part_tokens
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
