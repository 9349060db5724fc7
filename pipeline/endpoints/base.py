"""What every endpoint adapter provides: a request from a rendered row, an answer back.

An adapter knows one API shape (chat completions, embeddings, Anthropic messages...):
its URL, headers and body, and how to read the answer, usage and errors it returns.
It knows nothing about sockets, retries or rate limits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    #: Case-insensitive in practice (aiohttp's CIMultiDictProxy); look up lower-case names.
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Part of prompt_tokens served from the provider's prompt cache (cheaper).
    cached_tokens: int = 0
    #: Part of completion_tokens spent on hidden reasoning.
    reasoning_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Answer:
    """What one successful response carries, before job-specific parsing."""

    text: str | None
    finish_reason: str | None
    usage: Usage
    request_id: str | None
    model: str | None
    #: Endpoint-specific extras (tool calls, refusals), JSON-serialisable.
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ApiError:
    """The parts of an error body that decide what happens next."""

    type: str | None
    code: str | None
    message: str


class Endpoint(ABC):
    #: The path under the base URL, e.g. "/chat/completions".
    path: str

    @abstractmethod
    def body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """The JSON body for one row's rendered messages."""

    @abstractmethod
    def answer(self, data: Mapping[str, Any], headers: Mapping[str, str]) -> Answer:
        """Read a 2xx response body. Raise ValueError if it is not the expected shape."""

    def max_output_tokens(self) -> int:
        """The most completion tokens a request may use; rate limiters reserve this."""
        return 0

    @staticmethod
    def error(data: Any) -> ApiError:
        """Read an error body. OpenAI and Anthropic both nest it under `error`."""
        inner = data.get("error") if isinstance(data, Mapping) else None
        if not isinstance(inner, Mapping):
            text = data if isinstance(data, str) else ""
            return ApiError(type=None, code=None, message=text[:500])
        code = inner.get("code")
        return ApiError(
            type=inner.get("type"),
            code=str(code) if code is not None else None,
            message=str(inner.get("message") or ""),
        )
