"""Azure OpenAI's data plane, as the simulator serves it.

    POST /openai/deployments/{deployment}/chat/completions?api-version=2024-10-21
    POST /openai/deployments/{deployment}/embeddings?api-version=2024-10-21
    POST /openai/v1/chat/completions, /openai/v1/embeddings   (the v1 API: model in the body)

Each is served with and without a leading /v1. The simulator's base URL ends in /v1,
which is what OpenAI clients want, and an Azure client builds its URLs under whatever
base it is given: `pipeline run --simulate` sends to /v1/openai/deployments/..., a job
pointed at the bare host to /openai/deployments/.... Serving both keeps the runner from
having to know which API the simulator stands in for.

How Azure differs from OpenAI, as simulated here:
- the deployment in the path names the model; a `model` in the body is ignored;
- `api-version` is required: without it Azure answers 404 "Resource not found", with
  one that is not a date (2024-10-21, 2025-01-01-preview) 400 "API version not supported";
- the key goes in an `api-key` header, and a 401 says "Access denied ...";
- the rate-limit headers are x-ratelimit-remaining-requests/-tokens only, -1 for a limit
  not set, beside apim-request-id and x-ms-region; a 429 says it in Azure's words;
- content filtering. `<<sim:content_filter>>` in the last message is refused with
  Azure's 400, code "content_filter" and innererror.content_filter_result;
  `<<sim:filtered>>` is answered 200 with finish_reason "content_filter" and null
  content. Every answer carries prompt_filter_results and content_filter_results.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from pipeline.simulator.api_errors import ApiError
from pipeline.simulator.chat import ChatJob, chat_answer, parse_chat
from pipeline.simulator.embeddings import embedding_answer, parse_embeddings
from pipeline.simulator.exchange import Exchange
from pipeline.simulator.rate_limits import Limits

_VERSION: Final = re.compile(r"^\d{4}-\d{2}-\d{2}(-preview)?$")
_DIRECTIVE: Final = re.compile(r"<<sim:(content_filter|filtered)>>")
_CATEGORIES: Final = ("hate", "self_harm", "sexual", "violence")
#: The category the simulated filter objects to.
_FLAGGED: Final = "violence"
_REGION: Final = "Sweden Central"
_QUOTA_DOCS: Final = (
    "Please go here: https://aka.ms/oai/quotaincrease if you would like to further "
    "increase the default rate limit."
)
_FILTER_MESSAGE: Final = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content "
    "management policy. Please modify your prompt and retry. To learn more about our "
    "content filtering policies please read our documentation: "
    "https://go.microsoft.com/fwlink/?linkid=2198766"
)


def add_routes(exchange: Exchange, router: web.UrlDispatcher) -> None:
    """Register Azure's routes; before OpenAI's catch-all /v1/{tail}."""
    for prefix in ("", "/v1"):
        for base, deployed in (("/openai/deployments/{deployment}", True), ("/openai/v1", False)):
            for path, operation in (("/chat/completions", _CHAT), ("/embeddings", _EMBEDDINGS)):
                handler = functools.partial(_serve, exchange, operation, deployed)
                router.add_post(f"{prefix}{base}{path}", handler)
        router.add_route("*", f"{prefix}/openai/{{tail:.*}}", functools.partial(_unknown, exchange))


@dataclass(frozen=True)
class _Operation:
    """One of Azure's operations: its name in error messages, and how it is served."""

    name: str
    parse: Callable[[dict[str, Any]], Any]
    answer: Callable[[Exchange, Any, bytes], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class _AzureChat:
    """A chat request, and whether the simulated filter withholds its answer."""

    inner: ChatJob
    filtered: bool

    @property
    def model(self) -> str:
        return self.inner.model

    @property
    def cost(self) -> int:
        return self.inner.cost

    @property
    def directive_text(self) -> str:
        return self.inner.directive_text


def _parse_azure_chat(payload: dict[str, Any]) -> _AzureChat:
    job = parse_chat(payload)
    found = _DIRECTIVE.search(job.directive_text)
    if found is not None and found.group(1) == "content_filter":
        raise ApiError(400, _filter_error_body(), tally="faults")
    # Azure's directives are handled here; the shared pipeline must not see them.
    text = _DIRECTIVE.sub("", job.directive_text)
    return _AzureChat(dataclasses.replace(job, directive_text=text), filtered=found is not None)


def _chat_answer(exchange: Exchange, job: _AzureChat, digest: bytes) -> dict[str, Any]:
    body = chat_answer(exchange, job.inner, digest)
    body.pop("service_tier", None)
    body["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": _verdict()}]
    for choice in body["choices"]:
        if job.filtered:
            choice["message"]["content"] = None
            choice["message"].pop("tool_calls", None)
            choice["finish_reason"] = "content_filter"
            choice["content_filter_results"] = _verdict(_FLAGGED)
        else:
            choice["content_filter_results"] = _verdict()
    return body


_CHAT: Final = _Operation("ChatCompletions_Create", _parse_azure_chat, _chat_answer)
_EMBEDDINGS: Final = _Operation("Embeddings_Create", parse_embeddings, embedding_answer)


async def _serve(
    exchange: Exchange, operation: _Operation, deployed: bool, request: web.Request
) -> web.StreamResponse:
    version = request.query.get("api-version")
    deployment = request.match_info.get("deployment")

    async def work(started: float) -> web.StreamResponse:
        if deployed:
            _check_version(version)

        def parse(payload: dict[str, Any]) -> Any:
            if deployment is not None:
                payload["model"] = deployment  # the deployment decides, whatever the body says
            return operation.parse(payload)

        def answer(job: Any, digest: bytes) -> dict[str, Any]:
            return operation.answer(exchange, job, digest)

        return await exchange.post(request, started, parse, answer)

    return await exchange.guarded(request, work, _Azure(operation.name, version))


async def _unknown(exchange: Exchange, request: web.Request) -> web.StreamResponse:
    async def refuse(started: float) -> web.StreamResponse:
        raise ApiError(404, _error("404", "Resource not found"))

    return await exchange.guarded(request, refuse, _Azure("", None))


def _check_version(version: str | None) -> None:
    if version is None:
        raise ApiError(404, _error("404", "Resource not found"))
    if not _VERSION.match(version):
        raise ApiError(400, _error("BadRequest", "API version not supported"))


class _Azure:
    """Azure's spelling of auth, errors and headers (an `exchange.Dialect`)."""

    def __init__(self, operation: str, version: str | None) -> None:
        self._operation = operation
        self._version = version or "v1"

    def authorize(self, request: web.Request, key: str | None) -> None:
        if key is None:
            return
        given = request.headers.get("api-key", "").strip()
        if given == key:
            return
        if not given:
            message = (
                "Access denied due to missing subscription key. Make sure to include "
                "subscription key when making requests to an API."
            )
        else:
            message = (
                "Access denied due to invalid subscription key or wrong API endpoint. Make "
                "sure to provide a valid key for an active subscription and use a correct "
                "regional API endpoint for your resource."
            )
        raise ApiError(401, _error("401", message))

    def error(self, error: ApiError) -> ApiError:
        inner = error.body.get("error")
        code = inner.get("code") if isinstance(inner, Mapping) else None
        if error.status == 429 and code == "rate_limit_exceeded":
            assert isinstance(inner, Mapping)
            kind = "call" if inner.get("type") == "requests" else "token"
            wait = error.headers.get("retry-after", "1")
            message = (
                f"Requests to the {self._operation} Operation under Azure OpenAI API version "
                f"{self._version} have exceeded {kind} rate limit of your current OpenAI S0 "
                f"pricing tier. Please retry after {wait} second{'s' * (wait != '1')}. "
                + _QUOTA_DOCS
            )
            return ApiError(429, _error("429", message), tally=error.tally, headers=error.headers)
        if error.status == 404 and code == "model_not_found":
            message = (
                "The API deployment for this resource does not exist. If you created the "
                "deployment within the last 5 minutes, please wait a moment and try again."
            )
            return ApiError(404, _error("DeploymentNotFound", message), tally=error.tally)
        return error

    def finish(self, response: web.StreamResponse, limits: Limits) -> None:
        headers = response.headers
        for name in list(headers):
            if name.lower().startswith(("x-ratelimit-limit-", "x-ratelimit-reset-", "openai-")):
                del headers[name]
        for kind in ("requests", "tokens"):
            headers.setdefault(f"x-ratelimit-remaining-{kind}", "-1")
        headers["apim-request-id"] = str(uuid.uuid4())
        headers["x-ms-region"] = _REGION


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _verdict(flagged: str | None = None) -> dict[str, Any]:
    """Azure's content_filter_results: every category safe but `flagged`."""
    return {
        c: {"filtered": c == flagged, "severity": "high" if c == flagged else "safe"}
        for c in _CATEGORIES
    }


def _filter_error_body() -> dict[str, Any]:
    return {
        "error": {
            "message": _FILTER_MESSAGE,
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": _verdict(_FLAGGED),
            },
        }
    }
