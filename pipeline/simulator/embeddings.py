"""POST /v1/embeddings: checked and answered as OpenAI's embeddings.

    add_routes(exchange, app.router)
    job = parse_embeddings({"model": "text-embedding-3-small", "input": ["a", "b"]})
    embedding_answer(exchange, job, digest)    # {"object": "list", "data": [...], ...}

`input` is a string, strings, a token array or token arrays, at most 2048 of them;
`dimensions` up to the model's own; `encoding_format` "float" or "base64". Each input
gets a unit vector drawn from the seed and the input alone, so the same text embeds
the same in any request. A `<<sim:...>>` directive is read from the first input that
holds one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from pipeline.simulator.api_errors import invalid, missing
from pipeline.simulator.exchange import Exchange
from pipeline.simulator.fake_answers import base64_floats, vector
from pipeline.simulator.request_fields import model_field, positive_int
from pipeline.simulator.text_tokens import count_text

_MAX_EMBEDDING_INPUTS: Final = 2048
_EMBEDDING_DIMENSIONS: Final = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072}
_DEFAULT_DIMENSIONS: Final = 1536


def add_routes(exchange: Exchange, router: web.UrlDispatcher) -> None:
    """Serve `POST /v1/embeddings` through `exchange`."""
    answer = functools.partial(embedding_answer, exchange)

    router.add_post("/v1/embeddings", exchange.route(parse_embeddings, answer))


@dataclass(frozen=True, slots=True)
class EmbeddingJob:
    """A checked embeddings request."""

    model: str
    inputs: list[str | list[int]]
    dimensions: int
    base64: bool
    prompt_tokens: int
    directive_text: str

    @property
    def cost(self) -> int:
        return self.prompt_tokens


def parse_embeddings(payload: dict[str, Any]) -> EmbeddingJob:
    """Check an embeddings body as the API does; raise the 400 it would send."""
    model = model_field(payload)
    inputs = _inputs(payload.get("input"))
    if len(inputs) > _MAX_EMBEDDING_INPUTS:
        raise invalid(
            f"Too many inputs: got {len(inputs)}, the maximum is {_MAX_EMBEDDING_INPUTS} "
            "per request.",
            "input",
        )
    native = _EMBEDDING_DIMENSIONS.get(model, _DEFAULT_DIMENSIONS)
    encoding = payload.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise invalid(
            f"Invalid value for 'encoding_format': got {encoding!r}; valid values are "
            "'float' and 'base64'.",
            "encoding_format",
            "invalid_value",
        )
    return EmbeddingJob(
        model=model,
        inputs=inputs,
        dimensions=positive_int(payload, "dimensions", most=native) or native,
        base64=encoding == "base64",
        prompt_tokens=sum(count_text(x, model) if isinstance(x, str) else len(x) for x in inputs),
        directive_text=next((x for x in inputs if isinstance(x, str) and "<<sim:" in x), ""),
    )


def _inputs(raw: Any) -> list[str | list[int]]:
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(x, int) for x in raw):
            return [raw]
        if all(isinstance(x, str) for x in raw):
            return raw
        if all(isinstance(x, list) and x and all(isinstance(t, int) for t in x) for x in raw):
            return raw
    if raw is None:
        raise missing("input")
    raise invalid(
        "Invalid 'input': expected a non-empty string, an array of strings, an array of "
        "tokens or an array of token arrays.",
        "input",
        "invalid_value",
    )


def embedding_answer(exchange: Exchange, job: EmbeddingJob, digest: bytes) -> dict[str, Any]:
    """The embeddings list: one unit vector per input, floats or base64."""
    data = []
    for index, item in enumerate(job.inputs):
        floats = vector(exchange.config.seed, item, job.dimensions)
        encoded: list[float] | str = base64_floats(floats) if job.base64 else floats
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    usage = {"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens}
    return {"object": "list", "data": data, "model": job.model, "usage": usage}
