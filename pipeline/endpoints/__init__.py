"""One adapter per API shape, behind the `Endpoint` interface; `make_endpoint` picks one."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pipeline.endpoints.base import Answer, ApiError, Endpoint, HttpRequest, HttpResponse, Usage
from pipeline.endpoints.chat import ChatCompletions
from pipeline.spec import RequestSpec

__all__ = [
    "Answer",
    "ApiError",
    "ChatCompletions",
    "Endpoint",
    "HttpRequest",
    "HttpResponse",
    "Usage",
    "auth_headers",
    "make_endpoint",
]

#: Hosts that understand (and for reasoning models require) `max_completion_tokens`.
_OPENAI_HOSTS = ("api.openai.com",)


def make_endpoint(spec: RequestSpec, base_url: str, schema: dict[str, Any] | None) -> Endpoint:
    param = spec.max_tokens_param or _max_tokens_param(base_url)
    return ChatCompletions(spec, schema, param)


def _max_tokens_param(base_url: str) -> str:
    host = urlsplit(base_url).hostname or ""
    return "max_completion_tokens" if host in _OPENAI_HOSTS else "max_tokens"


def auth_headers(api_key: str | None) -> dict[str, str]:
    headers = {"content-type": "application/json", "accept": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers
