"""Embeddings: POST {base_url}/embeddings, many rows per request.

Each row's rendered `user` text is one input; a request carries up to `batch_rows`
inputs and at most BATCH_TOKENS estimated tokens (OpenAI's per-request limits are
2,048 inputs and 300,000 tokens). The vector of each row is stored as JSON and
written as a `list[f32]` column; the request's usage is shared among its rows.
"""

from __future__ import annotations

import base64
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from pipeline.endpoints.base import JSON, Endpoint, Item, split_usage
from pipeline.endpoints.chat import _usage
from pipeline.errors import Fatal, RowProblem
from pipeline.records import Answer, Prompt
from pipeline.spec import RequestSpec

#: Under OpenAI's 300,000 tokens per request, with room for the estimate's error.
BATCH_TOKENS = 250_000
#: Text beyond the models' 8,192-token input is refused by the server; fail it here.
MAX_INPUT_TOKENS = 8_192


class Embeddings(Endpoint):
    path = "/embeddings"
    answer_column = "embedding"
    batch_tokens = BATCH_TOKENS
    #: 2,048 vectors of 3,072 floats as JSON text are about 130 MB.
    max_response_bytes = 256 * 2**20

    def __init__(self, spec: RequestSpec) -> None:
        self._spec = spec
        self.batch_rows = spec.batch_rows
        self._static: dict[str, Any] = {"model": spec.model, "encoding_format": "float"}
        if spec.dimensions is not None:
            self._static["dimensions"] = spec.dimensions
        self._static.update(spec.extra_body)

    def item(self, prompt: Prompt) -> Item:
        text = "\n".join(str(m["content"]) for m in prompt.messages if m["role"] == "user")
        if not text:
            raise RowProblem("the text to embed is empty (the `user` template rendered nothing)")
        tokens = self.count(text)
        # An exact count refuses exactly what the server would; an estimate (a model
        # whose encoding we lack) refuses only what is surely too long.
        if tokens > MAX_INPUT_TOKENS * (1 if self.count.exact else 2):
            about = "" if self.count.exact else "about "
            raise RowProblem(
                f"the text is {about}{tokens:,} tokens: embeddings take "
                f"{MAX_INPUT_TOKENS:,} at most; shorten or split it"
            )
        return Item(text, tokens, orjson.dumps([self._static, text]))

    def encode(self, payloads: Sequence[Any]) -> tuple[bytes, str]:
        return orjson.dumps({**self._static, "input": list(payloads)}), JSON

    def answers(
        self, data: Any, headers: Mapping[str, str], weights: Sequence[int]
    ) -> list[Answer]:
        items = sorted(data["data"], key=lambda d: d.get("index", 0))
        if len(items) != len(weights):
            raise ValueError(f"{len(items)} embeddings for {len(weights)} inputs")
        vectors = [_vector(d["embedding"]) for d in items]
        shares = split_usage(_usage(data.get("usage") or {}), weights)
        request_id = headers.get("x-request-id")
        model = data.get("model")
        return [
            Answer(orjson.dumps(v).decode(), None, share, request_id, model)
            for v, share in zip(vectors, shares, strict=True)
        ]


def _vector(raw: Any) -> list[float]:
    if isinstance(raw, str):  # encoding_format "base64": little-endian float32
        return array("f", base64.b64decode(raw)).tolist()
    if not isinstance(raw, list):
        raise ValueError("an embedding is neither a list of numbers nor base64")
    if raw and isinstance(raw[0], list):
        # Every row would get the same: stop the run rather than retry it row by row.
        raise Fatal(
            f"the server returned one vector per token ({len(raw)} of them), not one per "
            "input: it does not pool. Serve the model with pooling (llama.cpp: "
            "--pooling mean) or use an embedding model"
        )
    return [float(x) for x in raw]
