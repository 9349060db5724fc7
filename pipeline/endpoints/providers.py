"""Where a request goes and how it authenticates, by provider.

    provider = make_provider(job.request)
    provider.url("https://x.openai.azure.com", "/chat/completions")
    # https://x.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=...
    provider.headers("sk-...")

OpenAI and every OpenAI-compatible server (vLLM, Ollama, llama.cpp) take a bearer
token at {base_url}{path}. Azure OpenAI addresses a deployment and a version and takes
an `api-key` header; Anthropic takes `x-api-key` and `anthropic-version`.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from pipeline.spec import ANTHROPIC_VERSION, AZURE_API_VERSION, RequestSpec

_JSON_ACCEPT = {"accept": "application/json"}


@dataclass(frozen=True)
class Provider:
    name: str

    def url(self, base_url: str, path: str) -> str:
        return base_url + path

    def headers(self, api_key: str | None) -> dict[str, str]:
        if api_key:
            return {**_JSON_ACCEPT, "authorization": f"Bearer {api_key}"}
        return dict(_JSON_ACCEPT)


@dataclass(frozen=True)
class Azure(Provider):
    deployment: str
    api_version: str

    def url(self, base_url: str, path: str) -> str:
        # A base URL that already names the v1 API (…/openai/v1) takes plain paths.
        if base_url.endswith("/openai/v1"):
            return base_url + path
        base = base_url.removesuffix("/openai")
        deployment = quote(self.deployment, safe="")
        return f"{base}/openai/deployments/{deployment}{path}?api-version={self.api_version}"

    def headers(self, api_key: str | None) -> dict[str, str]:
        return {**_JSON_ACCEPT, "api-key": api_key} if api_key else dict(_JSON_ACCEPT)


@dataclass(frozen=True)
class Anthropic(Provider):
    version: str

    def headers(self, api_key: str | None) -> dict[str, str]:
        headers = {**_JSON_ACCEPT, "anthropic-version": self.version}
        if api_key:
            headers["x-api-key"] = api_key
        return headers


def make_provider(spec: RequestSpec) -> Provider:
    if spec.provider == "azure":
        return Azure("azure", spec.deployment or spec.model, spec.api_version or AZURE_API_VERSION)
    if spec.provider == "anthropic":
        return Anthropic("anthropic", spec.api_version or ANTHROPIC_VERSION)
    return Provider("openai")
