"""What every endpoint adapter provides: a request from rendered rows, answers back.

An adapter knows one API shape (chat completions, embeddings, Anthropic messages...):
the body of a request and how to read the answers, usage and errors it returns. A
`Provider` knows where requests go and how they authenticate. Neither knows anything
about sockets, retries or rate limits.

    item = endpoint.item(prompt)                   # per row, in the producer's thread
    body, content_type = endpoint.encode([item.payload, ...])   # up to batch_rows rows
    endpoint.answers(json_body, headers, weights)  # one Answer per row of the request
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from pipeline.records import Answer, Usage
from pipeline.records import Prompt as Prompt
from pipeline.spec import RequestSpec
from pipeline.tokens import HEURISTIC_COUNTER, TextCounter, text_counter

JSON = "application/json"


@dataclass(frozen=True, slots=True)
class ApiError:
    """The parts of an error body that decide what happens next."""

    type: str | None
    code: str | None
    message: str


@dataclass(frozen=True, slots=True)
class Item:
    """One row's part of a request."""

    #: What `encode` takes: a whole body for one-row endpoints (already encoded, as
    #: bytes, when that is what the key is), one input for batching ones.
    payload: Any
    #: Estimated prompt tokens, as the server counts them for its TPM limit.
    tokens: int
    #: Identical keys mean identical requests: their answer is shared (dedupe).
    key: bytes


class Endpoint(ABC):
    #: The path under the base URL, e.g. "/chat/completions".
    path: str
    #: Rows one request may carry (embeddings: many), and their token budget.
    batch_rows: int = 1
    batch_tokens: int = 0
    #: Rows rendered into requests at a time, ahead of sending: fewer for requests
    #: that carry files (audio, local images), so memory stays bounded.
    prepare_rows: int = 500
    #: Whether preparing a row reads files (audio, local images): then rows are prepared
    #: in a thread, so the event loop keeps serving answers meanwhile.
    prepare_reads_files: bool = False
    #: The output column the answer goes to: "response" (text), "embedding", "image_path".
    answer_column: str = "response"
    #: The most decoded bytes one answer may have (transport.MAX_BODY_BYTES): more for
    #: endpoints whose answers are big by nature.
    max_response_bytes: int = 32 * 2**20

    #: Relative file references (images, audio) resolve against this folder.
    base_dir: Path = Path(".")
    #: The job's request settings.
    _spec: RequestSpec
    #: How texts are counted when not the model's encoding (see `estimating`).
    _counter: TextCounter | None = None
    #: When this endpoint estimates (`estimating`): the same one counting with the
    #: model's encoding, for the rows whose estimate comes near a bound (bounds.py).
    exact: Endpoint | None = None

    @property
    def count(self) -> TextCounter:
        """Counts a text's tokens for the job's model (`tokens.text_counter`)."""
        return self._counter if self._counter is not None else text_counter(self._spec.model)

    def estimating(self) -> Endpoint:
        """This endpoint counting bytes/4 instead of the model's encoding, for a run
        where an exact count decides nothing (`plan.for_sending`); `exact` is this one."""
        clone = copy.copy(self)
        clone._counter, clone.exact = HEURISTIC_COUNTER, self
        return clone

    @abstractmethod
    def item(self, prompt: Prompt) -> Item:
        """The row's part of a request. Raise RowProblem if the row cannot be sent."""

    def encode(self, payloads: Sequence[Any]) -> tuple[bytes, str]:
        """The request body for these rows' payloads, and its content type."""
        (payload,) = payloads
        return (payload if isinstance(payload, bytes) else orjson.dumps(payload)), JSON

    @abstractmethod
    def answers(
        self, data: Any, headers: Mapping[str, str], weights: Sequence[int]
    ) -> list[Answer]:
        """Read a 2xx response: one Answer per row. Raise ValueError on a wrong shape.

        `weights` are the rows' token estimates, by which a batch's usage is shared.
        """

    def max_output_tokens(self) -> int:
        """The most completion tokens a request may use; rate limiters reserve this."""
        return 0

    def follow_up(self, payload: Any, answer: Answer, results: list[dict[str, Any]]) -> Any:
        """The next payload of a tool loop: the answer's tool calls and their results."""
        raise NotImplementedError(f"{type(self).__name__} has no tool loop")

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


def split_usage(usage: Usage, weights: Sequence[int]) -> list[Usage]:
    """A batch request's usage shared among its rows, in proportion to `weights`.

    Each row gets the rounded-down difference of the running shares, so the parts add
    up to the whole exactly, field by field, and per-row costs add up to the bill.
    """
    if not sum(weights):
        weights = [1] * len(weights)
    total = sum(weights)
    whole = dataclasses.asdict(usage)
    shares = []
    before = dict.fromkeys(whole, 0)
    for upto in itertools.accumulate(weights):
        now = {n: v * upto // total if isinstance(v, int) else v * upto / total
               for n, v in whole.items()}  # fmt: skip
        shares.append(Usage(**{n: now[n] - before[n] for n in whole}))
        before = now
    return shares


def definition_tokens(definitions: Any, count: TextCounter) -> int:
    """Prompt tokens of JSON the server adds to every prompt (tool definitions)."""
    return count(orjson.dumps(definitions).decode()) if definitions else 0


def with_image_parts(
    messages: list[dict[str, Any]], parts: list[dict[str, Any]], text_type: str
) -> list[dict[str, Any]]:
    """The messages with image parts added to the last user message, its text first as
    a part of type `text_type` ("text" in chat completions, "input_text" in Responses)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        return [*messages, {"role": "user", "content": parts}]
    text = messages[last]["content"]
    content = [{"type": text_type, "text": text}, *parts] if text else parts
    return [*messages[:last], {**messages[last], "content": content}, *messages[last + 1 :]]
