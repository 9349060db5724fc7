"""One adapter per API shape, behind the `Endpoint` interface; `make_endpoint` picks one."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.endpoints.anthropic import AnthropicMessages
from pipeline.endpoints.audio import AudioTranscriptions
from pipeline.endpoints.base import ApiError, Endpoint, Item
from pipeline.endpoints.chat import ChatCompletions
from pipeline.endpoints.embeddings import Embeddings
from pipeline.endpoints.images import ImageGenerations
from pipeline.endpoints.providers import Provider, make_provider
from pipeline.endpoints.responses import Responses
from pipeline.records import Answer, HttpRequest, HttpResponse, Prompt, Usage
from pipeline.spec import RequestSpec, TemplateSpec

__all__ = [
    "Answer",
    "AnthropicMessages",
    "ApiError",
    "ChatCompletions",
    "Embeddings",
    "Endpoint",
    "HttpRequest",
    "HttpResponse",
    "Item",
    "Prompt",
    "Provider",
    "Responses",
    "Usage",
    "make_endpoint",
    "make_provider",
]

#: Hosts that understand (and for reasoning models require) `max_completion_tokens`.
_OPENAI_HOSTS = ("api.openai.com",)


#: Rows rendered at a time when each request carries a file (an image, audio): a few
#: MB each at most, so a few dozen in memory.
FILE_PREPARE_ROWS = 16


def make_endpoint(
    spec: RequestSpec,
    template: TemplateSpec,
    base_url: str,
    schema: dict[str, Any] | None,
    base_dir: Path,
) -> Endpoint:
    """The adapter for the job's endpoint. `base_dir`: where relative file paths start."""
    endpoint = _adapter(spec, template, base_url, schema, base_dir)
    if template.images or template.file is not None:
        endpoint.prepare_rows = FILE_PREPARE_ROWS
        endpoint.prepare_reads_files = True
    return endpoint


def _adapter(
    spec: RequestSpec,
    template: TemplateSpec,
    base_url: str,
    schema: dict[str, Any] | None,
    base_dir: Path,
) -> Endpoint:
    kind = spec.kind
    if kind == "embeddings":
        return Embeddings(spec)
    if kind == "chat.completions":
        param = spec.max_tokens_param or _max_tokens_param(spec, base_url)
        return ChatCompletions(
            spec, schema, param, base_dir=base_dir, image_detail=template.image_detail
        )
    if kind == "responses":
        return Responses(spec, schema, base_dir=base_dir, image_detail=template.image_detail)
    if kind == "messages":
        return AnthropicMessages(spec, schema, base_dir=base_dir)
    if kind == "images.generations":
        return ImageGenerations(spec, template)
    if kind == "audio.transcriptions":
        return AudioTranscriptions(spec, template, base_dir)
    raise NotImplementedError(kind)


def _max_tokens_param(spec: RequestSpec, base_url: str) -> str:
    if spec.provider == "azure":
        return "max_completion_tokens"
    host = urlsplit(base_url).hostname or ""
    return "max_completion_tokens" if host in _OPENAI_HOSTS else "max_tokens"
