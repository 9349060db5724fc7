"""The values that pass from one stage to the next, and nothing else.

    prompt = renderer.render(row)                      # render  -> Prompt
    work = Work(rows=(7,), request=HttpRequest(...), tokens=900)   # rows -> Work
    outcome = await dispatcher.send(work)              # dispatch -> Outcome (Answers)
    results = to_results(outcome, pricer)              # parse   -> RowResult, journalled

Stages import these from here, not from the stage that makes them, so each stage
depends on `{records, spec, errors}` and not on the one before it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import PipelineError, RequestFailure

#: The input row's position, carried beside its columns through every stage.
ROW_INDEX = "__row"


@dataclass(frozen=True, slots=True)
class Prompt:
    """One row, rendered: what an endpoint builds its part of a request from."""

    #: {"role": ..., "content": str}, in order.
    messages: list[dict[str, Any]]
    #: Image references (URL, data URL or local path) for the last user message.
    images: tuple[str, ...] = ()
    #: A local file to upload (audio transcription).
    file: str | None = None


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
    #: Part of prompt_tokens written to Anthropic's prompt cache (dearer).
    cache_write_tokens: int = 0
    #: Part of prompt_tokens that is audio (transcription models price it apart).
    audio_tokens: int = 0
    #: Seconds of audio, for models billed by duration (whisper-1).
    audio_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Answer:
    """What one row's successful answer carries, before job-specific parsing."""

    text: str | None
    finish_reason: str | None
    usage: Usage
    request_id: str | None
    model: str | None
    #: Endpoint-specific extras (tool calls, refusals), JSON-serialisable.
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: Files the answer carries (a generated image): written beside the output.
    data: bytes | None = None


@dataclass(slots=True)
class Work:
    """One request: one row, or several for endpoints that batch (embeddings)."""

    rows: tuple[int, ...]
    request: HttpRequest
    #: Estimated cost against the TPM limit: prompt tokens plus max output tokens.
    tokens: int
    #: Each row's request hash (64 bits): the journal's key for identical requests.
    digests: tuple[int, ...] = (0,)
    #: Each row's estimated prompt tokens: a batch's usage is shared by these.
    weights: tuple[int, ...] = (0,)
    #: What the request was encoded from (a tool loop builds the next one from it).
    payload: Any = None


#: Stands for the request of a row not encoded yet (a batching endpoint packs it later)
#: or never sent (rejected before sending).
UNSENT = HttpRequest("POST", "", {}, b"")


@dataclass(slots=True)
class Outcome:
    """What came of one request: an answer per row, or a failure for all its rows."""

    work: Work
    answers: list[Answer] | None
    failure: RequestFailure | None
    attempts: int
    http_status: int | None = None
    latency_ms: float | None = None


@dataclass(slots=True)
class RowResult:
    """One row's result, as stored and as written to the output."""

    row: int
    #: The request body's sha256, first 64 bits as a signed integer: identical
    #: requests share it (an integer keeps the journal's index small and fast).
    request_hash: int | None
    status: str
    error_type: str | None = None
    error: str | None = None
    http_status: int | None = None
    attempts: int = 0
    finish_reason: str | None = None
    response: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    cost_usd: float | None = None
    latency_ms: float | None = None
    request_id: str | None = None
    model: str | None = None
    #: When it was recorded (seconds since the epoch), and by which run of the job.
    answered_at: float | None = None
    run: int | None = None
    #: The model's tool calls, as JSON: [{"id", "name", "arguments"}].
    tool_calls: str | None = None


def rejected(row: int, failure: RequestFailure, digest: int = 0) -> Outcome:
    """The outcome of a row that failed before any request was sent."""
    return Outcome(Work((row,), UNSENT, 0, (digest,)), None, failure, attempts=0)


class Stop:
    """Why the run stops early, if it does: every stage reads it, any may ask for it.

    stop = Stop()
    stop.ask(Halted("the server is down"))   # the first reason wins
    stop.stopped, stop.reason                # True, Halted(...): the one to act on
    """

    __slots__ = ("reason",)

    def __init__(self) -> None:
        self.reason: PipelineError | None = None

    @property
    def stopped(self) -> bool:
        return self.reason is not None

    def ask(self, reason: PipelineError) -> None:
        """Stop taking rows. The first reason wins: it is the one the user must act on."""
        if self.reason is None:
            self.reason = reason
