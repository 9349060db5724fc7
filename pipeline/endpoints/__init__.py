"""One adapter per API shape, behind the `Endpoint` interface; `make_endpoint` picks one."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.endpoints.base import (
    Answer,
    ApiError,
    Endpoint,
    HttpRequest,
    HttpResponse,
    Item,
    Prompt,
    RowProblem,
    Usage,
)
from pipeline.endpoints.chat import ChatCompletions
from pipeline.endpoints.embeddings import Embeddings
from pipeline.endpoints.providers import Provider, make_provider
from pipeline.spec import RequestSpec, TemplateSpec

__all__ = [
    "Answer",
    "ApiError",
    "ChatCompletions",
    "Embeddings",
    "Endpoint",
    "HttpRequest",
    "HttpResponse",
    "Item",
    "Prompt",
    "Provider",
    "RowProblem",
    "Usage",
    "make_endpoint",
    "make_provider",
]

#: Hosts that understand (and for reasoning models require) `max_completion_tokens`.
_OPENAI_HOSTS = ("api.openai.com",)


def make_endpoint(
    spec: RequestSpec,
    template: TemplateSpec,
    base_url: str,
    schema: dict[str, Any] | None,
    base_dir: Path,
) -> Endpoint:
    """The adapter for the job's endpoint. `base_dir`: where relative file paths start."""
    kind = spec.kind
    if kind == "embeddings":
        return Embeddings(spec)
    if kind == "chat.completions":
        param = spec.max_tokens_param or _max_tokens_param(spec, base_url)
        return ChatCompletions(
            spec, schema, param, base_dir=base_dir, image_detail=template.image_detail
        )
    raise NotImplementedError(kind)


def _max_tokens_param(spec: RequestSpec, base_url: str) -> str:
    if spec.provider == "azure":
        return "max_completion_tokens"
    host = urlsplit(base_url).hostname or ""
    return "max_completion_tokens" if host in _OPENAI_HOSTS else "max_tokens"
