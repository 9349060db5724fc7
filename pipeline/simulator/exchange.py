"""One request and its answer, through the steps every simulated API shares.

    exchange = Exchange(SimConfig(rpm=600), clock=time.monotonic)

    async def handle(request: web.Request) -> web.StreamResponse:
        return await exchange.guarded(
            request, lambda started: exchange.post(request, started, parse, answer)
        )

`guarded` counts the request, checks the key and turns an `ApiError` raised anywhere
below into its answer; `post` reads the body, counts it, reads a `<<sim:...>>`
directive, admits the request to the RPM/TPM buckets, draws a fault, waits the
latency, and answers with `answer(job, digest)` or the fault. Each API module
(chat.py, anthropic.py, ...) brings its own `parse` and `answer`, and a `Dialect` when
its family spells keys, errors and headers otherwise. The exchange also holds what
answers share: the seeded streams, the ids, the prompt-cache memory.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from hashlib import sha256
from typing import Any, Final, Protocol, TypeVar

import orjson
from aiohttp import web

from pipeline.simulator.api_errors import ApiError, Tally, canned, error_body
from pipeline.simulator.config import SimConfig, SimStats
from pipeline.simulator.fault_injection import (
    DIRECTIVE_MARK,
    DIRECTIVE_RETRY_MS,
    FAULT_RETRY_MS,
    TRANSPORT_KINDS,
    directive,
    misbehave,
)
from pipeline.simulator.rate_limits import Limits
from pipeline.simulator.request_fields import given_key, load_json

# Prompt caching starts at 1024 tokens and is reported in steps of 128, as OpenAI does.
_CACHE_MIN_PROMPT: Final = 1024
_CACHE_STEP: Final = 128
# The set of cached system prompts is forgotten when it grows past this, so that a
# million-row job with a distinct prompt per row does not grow the server without end.
_CACHE_MAX_PREFIXES: Final = 100_000
# Big enough for a prompt with a few base64 images.
MAX_BODY_BYTES: Final = 64 * 1024 * 1024


class Job(Protocol):
    """What the exchange needs from a parsed request, whatever the endpoint."""

    @property
    def model(self) -> str: ...
    @property
    def cost(self) -> int: ...
    @property
    def directive_text(self) -> str: ...


class Dialect(Protocol):
    """How another API family (Anthropic's, Azure's) differs on the wire from OpenAI's,
    for a route that shares the exchange: its key header, error bodies, header names."""

    def authorize(self, request: web.Request, key: str | None) -> None:
        """Raise the family's 401 unless the request carries `key` (None: no key needed)."""

    def error(self, error: ApiError) -> ApiError:
        """The error as the family spells it: its status, body and headers."""

    def finish(self, response: web.StreamResponse, limits: Limits) -> None:
        """Give the answer the family's rate-limit and request-id headers."""


J = TypeVar("J", bound=Job)
#: A multipart form's reader: the bytes that identify the body, and its fields.
FormLoader = Callable[[web.Request], Awaitable[tuple[bytes, dict[str, Any]]]]


class Exchange:
    """The shared request pipeline and the state answers draw on.

    `clock` is for tests that move time by hand instead of sleeping; it drives the
    rate-limit buckets only.
    """

    def __init__(self, config: SimConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.stats = SimStats()
        self.limits = Limits(config.rpm, config.tpm, clock)
        # Separate streams, so that latency draws never shift which requests fault.
        self._fault_rng = random.Random(config.seed)
        self._latency_rng = random.Random(config.seed + 1)
        self._cached_prefixes: set[int] = set()
        self._ids = itertools.count()
        self._id_prefix = os.urandom(6).hex()
        #: The `system_fingerprint` of chat answers: one per seed.
        self.fingerprint = f"fp_{sha256(str(config.seed).encode()).hexdigest()[:10]}"

    async def guarded(
        self,
        request: web.Request,
        work: Callable[[float], Awaitable[web.StreamResponse]],
        dialect: Dialect | None = None,
        *,
        counted: bool = True,
    ) -> web.StreamResponse:
        """Count, check the key, run `work`, and turn an `ApiError` into its answer.

        A `dialect` (Anthropic's) checks its own key header and respells the errors and
        headers; the answers are built as OpenAI's first. A truncated fault's head is
        written raw and keeps OpenAI's names: no client reads headers of a cut body.
        Not `counted`: listing models, which a client may do before its work (a server
        check); it counts in `listings` alone, so `requests` stays the API calls.
        """
        started = time.perf_counter()
        if counted:
            if not self.stats.requests:
                self.stats.first_request_at = time.time()
            self.stats.requests += 1
        else:
            self.stats.listings += 1
        try:
            if dialect is None:
                self._authorize(request)
            else:
                dialect.authorize(request, self.config.api_key)
            response = await work(started)
        except ApiError as error:
            if counted:
                self._tally(error.tally)
            if dialect is not None:
                error = dialect.error(error)
            response = self.reply(error.status, orjson.dumps(error.body), started, error.headers)
        if dialect is not None:
            dialect.finish(response, self.limits)
        return response

    def route(
        self,
        parse: Callable[[dict[str, Any]], J],
        answer: Callable[[J, bytes], dict[str, Any]],
        *,
        load: FormLoader | None = None,
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """The handler of an API route: every step `post` takes, under `guarded`."""

        async def handle(request: web.Request) -> web.StreamResponse:
            return await self.guarded(
                request, lambda started: self.post(request, started, parse, answer, load=load)
            )

        return handle

    async def post(
        self,
        request: web.Request,
        started: float,
        parse: Callable[[dict[str, Any]], J],
        answer: Callable[[J, bytes], dict[str, Any]],
        *,
        load: FormLoader | None = None,
    ) -> web.StreamResponse:
        """`load`, for a body that is not JSON (a multipart form): its fields, and the
        bytes that identify it for `by_body` and directives."""
        body, form = (await _read(request), None) if load is None else await load(request)
        digest = sha256(body).digest()
        marked = DIRECTIVE_MARK in body  # one scan of a body that may be megabytes
        count = self._count(digest, marked)
        job = parse(load_json(body) if form is None else form)
        kind = directive(job.directive_text, count) if marked else None
        retry_ms = DIRECTIVE_RETRY_MS
        if kind is None:
            self.limits.admit(job.cost, job.model)
            self.stats.tokens += job.cost
            kind, retry_ms = self._draw_fault(), FAULT_RETRY_MS
        await self._delay()
        if kind is None:
            return await self.ok(answer(job, digest), started)
        if kind not in TRANSPORT_KINDS:
            raise canned(kind, job.model, retry_ms)
        self.stats.faults += 1
        return await misbehave(self, request, kind, started, lambda: answer(job, digest))

    async def ok(
        self, payload: Mapping[str, Any], started: float, *, counted: bool = True
    ) -> web.StreamResponse:
        """A 200 with `payload`, counted in `ok` unless it is a listing."""
        self.stats.ok += counted
        return self.reply(200, orjson.dumps(payload), started)

    def reply(
        self,
        status: int,
        payload: bytes,
        started: float,
        extra: Mapping[str, str] | None = None,
    ) -> web.Response:
        """A JSON answer with OpenAI's headers (and `extra`)."""
        headers = self.headers(started)
        headers["Content-Type"] = "application/json"
        if extra:
            headers.update(extra)
        return web.Response(body=payload, status=status, headers=headers)

    def headers(self, started: float) -> dict[str, str]:
        """x-ratelimit-*, x-request-id and openai-processing-ms, as they stand now."""
        headers = self.limits.headers()
        headers["x-request-id"] = f"req_{self._id_prefix}{next(self._ids):020x}"
        headers["openai-processing-ms"] = str(int((time.perf_counter() - started) * 1000))
        return headers

    # -- what answers share ------------------------------------------------------------

    def rng(self, digest: bytes, index: int = 0) -> random.Random:
        """The answer's random stream: a pure function of the seed, the body and `index`."""
        # (seed, body) -> stream, injective: the digest fills the low 256 bits.
        return random.Random((((self.config.seed << 8) | index) << 256) | int.from_bytes(digest))

    def answer_id(self, prefix: str) -> str:
        """A fresh id for an answer object: "chatcmpl-", "msg_", "resp_" ... and a count."""
        return f"{prefix}{self._id_prefix}{next(self._ids):012x}"

    def cached_share(self, prefix: Any, prompt_tokens: int) -> int:
        """OpenAI's caching: half the prompt, in 128-token steps, once a request with
        the same `prefix` (a JSON-able leading part) was answered; 0 the first time."""
        if prompt_tokens < _CACHE_MIN_PROMPT:
            return 0
        key = hash(orjson.dumps(prefix, option=orjson.OPT_SORT_KEYS))
        return (prompt_tokens // 2) // _CACHE_STEP * _CACHE_STEP if self.seen(key) else 0

    def seen(self, key: int) -> bool:
        """Whether a cache prefix was seen before; remember it. The set is forgotten
        when it grows past _CACHE_MAX_PREFIXES, so a long run cannot grow the server."""
        if key in self._cached_prefixes:
            return True
        if len(self._cached_prefixes) >= _CACHE_MAX_PREFIXES:
            self._cached_prefixes.clear()
        self._cached_prefixes.add(key)
        return False

    # -- the steps ---------------------------------------------------------------------

    def _tally(self, counter: Tally) -> None:
        stats = self.stats
        if counter == "errors":
            stats.errors += 1
        elif counter == "faults":
            stats.faults += 1
        else:
            stats.rate_limited += 1

    def _authorize(self, request: web.Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = given_key(request.headers)
        if given == key:
            return
        if not given:
            message = (
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        else:
            message = (
                f"Incorrect API key provided: {_mask(given)}. You can find your API key at "
                "https://platform.openai.com/account/api-keys."
            )
        raise ApiError(401, error_body(message, "invalid_request_error", "invalid_api_key"))

    def _count(self, digest: bytes, marked: bool) -> int:
        """Record the body in `by_body`; the times it has been received, this one included.

        Untracked bodies count once, unless they carry a directive (`marked`), whose
        `:N` needs the count."""
        if not self.config.track_bodies and not marked:
            return 1
        key = digest.hex()
        by_body = self.stats.by_body
        by_body[key] += 1
        return by_body[key]

    def _draw_fault(self) -> str | None:
        config = self.config
        if config.fault_rate and self._fault_rng.random() < config.fault_rate:
            return self._fault_rng.choice(config.faults)
        return None

    async def _delay(self) -> None:
        mean = self.config.latency_ms
        if mean > 0:
            # Uniform around the mean: some spread, never a pathological tail.
            await asyncio.sleep(mean * self._latency_rng.uniform(0.5, 1.5) / 1000)


async def _read(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        message = f"The request body is too large; the maximum is {MAX_BODY_BYTES} bytes."
        raise ApiError(413, error_body(message, "invalid_request_error")) from None


def _mask(key: str) -> str:
    return f"{key[:3]}{'*' * max(len(key) - 7, 3)}{key[-4:]}" if len(key) > 8 else "***"
