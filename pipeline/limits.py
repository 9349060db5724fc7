"""Request and token rate limits that follow the server, and the shared 429 pause.

    limiter = Limiter(rpm=500, tpm=200_000)
    await limiter.acquire(tokens=900, prompt=800)   # waits for the pause, a slot, tokens
    limiter.observe(response.headers, tokens=900)   # x-ratelimit-* resynchronise
    limiter.pause(2.5)                    # a 429 said wait: every worker waits
    limiter.slow_down()                   # 503 "slow down" / 529: half the rate, then back

A request costs its estimated prompt tokens plus its max output tokens, the way OpenAI
counts against TPM. The pace is a hair under the limit and the buckets are small and
start full, so the pace is smooth from the first request: no burst that a server
measuring in short windows would reject.

Beyond that pace, the limiter spends what a server that keeps a bucket says it has
left: its `x-ratelimit-remaining-*` headers, less what is in flight (sent, not yet
answered) and a margin, are credit that goes at once. A server whose bucket refilled
while the client started, or that holds a minute's worth, is used from the first
answer at the rate it allows, not at a hair under its refill. Only where the headers
describe a bucket holding more than a second's worth (remaining + reset x rate, as
OpenAI's do): what a server counting over a sliding second has left is room for the
next second's pace, not credit on top of it, and its headers describe a second's worth.
A 429 ends the credit for the run: what is left is the smooth pace.

The server has the last word: its `x-ratelimit-limit-*` headers lower limits set too
high in the job (and set them when the job gives none), and when its
`x-ratelimit-remaining-*` say a bucket is empty, every worker waits for the refill.

Anthropic says the same with `anthropic-ratelimit-{requests,tokens,input-tokens,
output-tokens}-{limit,remaining,reset}`, its resets being RFC 3339 times. It counts
input and output tokens in separate buckets, and so does the limiter once the headers
give both: `tpm` then paces a request's input, `otpm` its max output, each at its own
limit (charging both against the smaller would pace at a fifth of the input limit).
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from aiolimiter import AsyncLimiter

#: The pace, as a share of the limit: a hair under it, so that timing jitter between
#: here and the server does not tip a strict server over (and into 429s).
PACE = 0.985
#: How much may be spent at once, as a share of a second's worth. A server that
#: enforces per second over a sliding window admits a bucket of capacity C and rate r
#: only while C + r stays within its per-second limit: C small, r + C <= 100%.
BURST = 0.015
#: A server that enforces TPM per second (sliding or fixed) admits at most a second's
#: worth in any second, however smooth the pace: once its headers show that it does,
#: no more than that is sent in any span this long (a second, and a margin for the
#: jitter between our clock and its). Against a strict sliding-second server with
#: requests 5.4% of a second's worth: 1.01 s used 96.4% of its TPM, 1.005 s 96.9%,
#: 1.002 s 97.1%, all with 0 429s (the ceiling there is 97.9%: 18 requests a second).
WINDOW_S = 1.002
#: After a 503 "slow down" or a 529 the rate is halved, down to this share at least...
MIN_SCALE = 1 / 16
#: ...and grows back by this share of the full rate per RECOVERY_S without another.
RECOVERY_STEP = 0.1
RECOVERY_S = 2.0
#: Prompt estimates are scaled by how the server counted recent prompts (its usage
#: against our estimate), up or down: each answer's weight decays by this per later
#: answer...
CALIBRATION_DECAY = 0.99
#: ...once this many answers have been seen, within these bounds. Down as well as up:
#: a server that counts with the model's tokenizer counts English about a quarter
#: below four bytes a token, and charging the estimate there left a TPM-bound run at
#: 76% of the limit; one that counts characters counts a third above the tokenizer.
CALIBRATION_BOUNDS = (0.5, 2.0)
CALIBRATION_MIN_ANSWERS = 5
#: Until then, an exact count (the model's own encoding) is charged this much more:
#: as a server counting four bytes a token counts English prose (1.2-1.35x), so the
#: first seconds cannot overrun that kind of server; a tokenizer-counting one is
#: under-used only until the first answers say so.
WARMUP_RATIO = 1.3
#: What the server says it has left is spent only beyond this: a share of a second's
#: worth and a few requests (or twice the largest request's tokens), for the requests
#: the server counted in another order than they were answered here.
CREDIT_MARGIN = 0.02
CREDIT_MARGIN_REQUESTS = 2
#: A server's remaining is credit only when its bucket holds more than this many
#: seconds' worth (remaining + reset x limit/60): a sliding second's window reads as
#: one second's worth, and its room must be left to the pace.
CREDIT_BUCKET_S = 2.0


class Limiter:
    def __init__(
        self,
        *,
        rpm: int | None,
        tpm: int | None,
        prompt_ratio: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        #: Wall-clock time, for resets given as timestamps (Anthropic's).
        self._wall = wall
        self._resume_at = 0.0
        #: The limits in force: the job's, lowered or learned from the server's headers.
        self.rpm, self.tpm = rpm, tpm
        #: Output tokens per minute, where the server limits them apart from input
        #: (Anthropic): then `tpm` counts a request's input, this its max output.
        self.otpm: int | None = None
        #: Share of those limits used now: below 1 after the server asked to slow down.
        self.scale = 1.0
        self._changed_at = clock()
        self._requests: AsyncLimiter | None = None
        self._tokens: AsyncLimiter | None = None
        self._output: AsyncLimiter | None = None
        self._token_turn = asyncio.Lock()
        #: The tokens charged over the last WINDOW_S, and whether to keep within a
        #: second's worth there (set once the server shows it counts per second).
        self._window = _Window(clock)
        self.per_second = False
        #: The largest request so far: the token bucket holds at least one such, so a
        #: request waits once for its tokens, not once per bucketful.
        self._largest = self._largest_output = 0
        #: Server-counted prompt tokens per estimated one: a guess until learned from
        #: usage (WARMUP_RATIO for exact counts).
        self.prompt_ratio = prompt_ratio
        self._estimated = self._counted = 0.0
        self._answers = 0
        #: Requests let go and not answered yet, and the tokens charged for them: what
        #: the server may not have counted when it said what it had left.
        self._outstanding = self._outstanding_tokens = 0
        #: What the server said it had left beyond those and the margin: spent at once.
        self._credit = self._credit_tokens = 0.0
        #: Until a 429 says the server counts differently from what it reports.
        self.uses_credit = True
        self._rebuild()

    def _rebuild(self) -> None:
        self._requests = _bucket(self.rpm, self.scale)
        self._tokens = _bucket(self.tpm, self.scale, self._largest)
        self._output = _bucket(self.otpm, self.scale, self._largest_output)
        # A new bucket is empty and would let a whole second's worth through at once,
        # which a server that enforces per second rejects; start it full instead.
        buckets = (self._requests, self._tokens, self._output)
        self._unprimed = {b for b in buckets if b is not None}

    def pause(self, seconds: float) -> None:
        """Hold every request until `seconds` from now (never shortens a longer pause)."""
        self._resume_at = max(self._resume_at, self._clock() + seconds)

    @property
    def paused_for(self) -> float:
        return max(0.0, self._resume_at - self._clock())

    def charge(self, tokens: int, prompt: int) -> int:
        """What a request of `tokens` (of which `prompt` are its estimated prompt) will
        count against the server's TPM: the prompt as calibrated, the rest as it is."""
        if self.prompt_ratio == 1.0 or prompt <= 0:
            return tokens
        return tokens - prompt + int(prompt * self.prompt_ratio + 0.999)

    def calibrate(self, estimated: int, counted: int) -> None:
        """Learn from an answer's usage how the server counts prompts against our
        estimate: text the estimate undercounts (CJK, code) must not overrun TPM, and a
        server that counts fewer tokens than charged must not be left under-used.
        Recent answers weigh most; a handful of odd ones cannot swing it far."""
        if estimated <= 0 or counted <= 0:
            return
        self._estimated = self._estimated * CALIBRATION_DECAY + estimated
        self._counted = self._counted * CALIBRATION_DECAY + counted
        self._answers += 1
        if self._answers >= CALIBRATION_MIN_ANSWERS:
            low, high = CALIBRATION_BOUNDS
            self.prompt_ratio = min(high, max(low, self._counted / self._estimated))

    async def acquire(self, tokens: int, prompt: int = 0, output: int = 0) -> int:
        """Wait for the pause, a request slot and `tokens`, of which `prompt` are the
        estimated prompt (charged as calibrated) and `output` the max output tokens
        (counted apart where the server does). Returns the tokens charged: calibrated
        when the request's turn comes, not when it started waiting, so that requests
        queued during the first answers are not charged at the first guess."""
        # Not a poll: each sleep lasts exactly until the pause ends; the loop only
        # repeats when another 429 extended the pause meanwhile.
        while (wait := self.paused_for) > 0:  # noqa: ASYNC110
            await asyncio.sleep(wait)
        if (charged := self._from_credit(tokens, prompt)) is not None:
            return self._let_go(charged)
        for bucket in list(self._unprimed):
            self._unprimed.discard(bucket)
            await bucket.acquire(bucket.max_rate)
        if self._requests is not None:
            await self._requests.acquire()
        if self._tokens is None and self._output is None:
            return self._let_go(self.charge(tokens, prompt))
        # One request at a time takes its tokens, in arrival order: interleaved, many
        # requests would complete together and reach the server in a burst.
        async with self._token_turn:
            tokens = charged = self.charge(tokens, prompt)
            if self._output is not None:
                tokens -= output
                if output > self._largest_output:
                    self._largest_output = output
                    self._output = await _grown(self._output, self.otpm, self.scale, output)
                await _spend(self._output, output)
            if self._tokens is not None:
                if tokens > self._largest:
                    self._largest = tokens
                    self._tokens = await _grown(self._tokens, self.tpm, self.scale, tokens)
                await _spend(self._tokens, tokens)
                if self.per_second and self.tpm is not None:
                    await self._window.room(tokens, self.tpm * self.scale / 60.0)
                # Recorded from the start (~1 us a request with a TPM limit): a window
                # empty when per-second counting is found let one request too many
                # through, measured as a 429 against a sliding-second server.
                self._window.add(tokens)
        return self._let_go(charged)

    def _from_credit(self, tokens: int, prompt: int) -> int | None:
        """A request taken from what the server said it has left (its tokens too, where
        TPM is limited), charged as `acquire` charges; None when that does not cover it.
        Not where output is limited apart (Anthropic): the credit counts one token
        bucket, and Anthropic's headers are not read for it."""
        if self._credit < 1 or self._output is not None:
            return None
        charged = self.charge(tokens, prompt)
        if self._tokens is not None:
            if self._credit_tokens < charged:
                return None
            self._credit_tokens -= charged
            self._window.add(charged)
        self._credit -= 1
        return charged

    def _let_go(self, charged: int) -> int:
        self._outstanding += 1
        self._outstanding_tokens += charged
        return charged

    def returned(self, charged: int) -> None:
        """A request let go by `acquire` (charged `charged`) was answered or failed: the
        server has counted it, or never will."""
        self._outstanding -= 1
        self._outstanding_tokens -= charged

    def refused(self) -> None:
        """A 429: the server counts otherwise than its headers said (or another client
        shares the key). No more credit this run: the smooth pace is what is left."""
        self.uses_credit = False
        self._credit = self._credit_tokens = 0.0

    def has_room(self, tokens: int) -> bool:
        """Whether `tokens` could be spent now without waiting (tests, progress)."""
        return self._tokens is None or self._tokens.has_capacity(tokens)

    async def settle(self, estimated: int, actual: int) -> None:
        """Spend what a request used beyond its estimate (never refund: the server
        counted the estimate when the request arrived). The caller waits for it."""
        extra = actual - estimated
        if extra > 0 and self._tokens is not None:
            await _spend(self._tokens, extra)

    def observe(self, headers: Mapping[str, str], tokens: int, charged: int = 0) -> None:
        """Follow the server's x-ratelimit-* headers after a response to a request of
        `tokens` (`charged` as `acquire` returned), before `returned`."""
        limit_requests = _count(headers.get("x-ratelimit-limit-requests"))
        if limit_requests is None:
            if _ANTHROPIC_REQUESTS_LIMIT in headers:
                self._observe_anthropic(headers, tokens)
            return  # a server that says nothing about its limits (most self-hosted ones)
        limit_tokens = _count(headers.get("x-ratelimit-limit-tokens"))
        self._lower(limit_requests, limit_tokens)
        self._wait_if_empty(headers, "requests", 1, limit_requests)
        if limit_tokens:
            self._wait_if_empty(headers, "tokens", tokens, limit_tokens)
        self._take_credit(
            _bucket_left(headers, "requests", limit_requests),
            _bucket_left(headers, "tokens", limit_tokens) if limit_tokens else None,
            charged,
        )

    def _take_credit(self, requests: int | None, tokens: int | None, charged: int) -> None:
        """What the server's buckets have left (counted when it took this request, which
        is still outstanding here), less what it may not have counted yet and a margin."""
        if not self.uses_credit or requests is None or self.paused_for > 0:
            self._credit = self._credit_tokens = 0.0
            return
        rpm = (self.rpm or 0) * self.scale
        margin = CREDIT_MARGIN * rpm / 60.0 + CREDIT_MARGIN_REQUESTS
        self._credit = max(0.0, requests - (self._outstanding - 1) - margin)
        if self._tokens is not None:
            if tokens is None:
                self._credit = self._credit_tokens = 0.0
                return
            tpm = (self.tpm or 0) * self.scale
            margin = max(CREDIT_MARGIN * tpm / 60.0, 2.0 * self._largest)
            unseen = self._outstanding_tokens - charged
            self._credit_tokens = max(0.0, tokens - unseen - margin)

    def _lower(self, limit_requests: int | None, limit_tokens: int | None) -> None:
        """Take the server's limits where the job's are higher or unset."""
        lowered = False
        if limit_requests and (self.rpm is None or limit_requests < self.rpm):
            self.rpm, lowered = limit_requests, True
        if limit_tokens and (self.tpm is None or limit_tokens < self.tpm):
            self.tpm, lowered = limit_tokens, True
        if lowered:
            self._rebuild()

    def _wait_if_empty(self, headers: Mapping[str, str], kind: str, need: int, limit: int) -> None:
        """The server's bucket has less than a request needs: wait for its refill."""
        remaining = _count(headers.get(f"x-ratelimit-remaining-{kind}"))
        if remaining is None or remaining >= need:
            return
        reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}") or "")
        self._wait_for_refill(need - remaining, limit, reset)
        if kind == "tokens":
            # Smooth pacing under the limit emptied its bucket: it counts per second.
            self.per_second = True

    def _wait_for_refill(self, missing: int, limit: int, reset: float | None) -> None:
        """Pause until `missing` have refilled at limit/minute, or the bucket's reset."""
        refill = missing * 60.0 / limit
        self.pause(min(refill, reset) if reset is not None else refill)

    def _observe_anthropic(self, headers: Mapping[str, str], tokens: int) -> None:
        """Follow Anthropic's anthropic-ratelimit-* headers (see the module's docstring)."""
        limit_requests = _count(headers.get(_ANTHROPIC_REQUESTS_LIMIT))
        token_limits = [
            (kind, limit)
            for kind in _ANTHROPIC_TOKEN_KINDS
            if (limit := _count(headers.get(f"anthropic-ratelimit-{kind}-limit")))
        ]
        found = dict(token_limits)
        output = found.get("output-tokens")
        if output is not None and (self.otpm is None or output < self.otpm):
            # Input and output are limited apart: each bucket follows its own limit,
            # rather than both following the smaller (often a fifth of the other).
            self.otpm = output
            self._rebuild()
        token_limit = found.get("input-tokens") if output is not None else None
        if token_limit is None:
            token_limit = min(found.values(), default=None)
        self._lower(limit_requests, token_limit)
        if limit_requests:
            self._wait_for_anthropic(headers, "requests", 1, limit_requests)
        for kind, limit in token_limits:
            self._wait_for_anthropic(headers, kind, tokens, limit)

    def _wait_for_anthropic(
        self, headers: Mapping[str, str], kind: str, need: int, limit: int
    ) -> None:
        remaining = _count(headers.get(f"anthropic-ratelimit-{kind}-remaining"))
        if remaining is None or remaining >= need:
            return
        when = parse_timestamp(headers.get(f"anthropic-ratelimit-{kind}-reset") or "")
        reset = None if when is None else max(0.0, when - self._wall())
        self._wait_for_refill(need - remaining, limit, reset)

    def slow_down(self) -> None:
        """The server is overloaded: halve the rate (gradually restored by `recovered`)."""
        self.scale = max(MIN_SCALE, self.scale / 2)
        self._changed_at = self._clock()
        self._rebuild()

    def recovered(self) -> None:
        """A request succeeded: step the rate back up, once per RECOVERY_S."""
        if self.scale >= 1.0 or self._clock() - self._changed_at < RECOVERY_S:
            return
        self.scale = min(1.0, self.scale + RECOVERY_STEP)
        self._changed_at = self._clock()
        self._rebuild()


class _Window:
    """What was charged over the last WINDOW_S seconds."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._charged: collections.deque[tuple[float, int]] = collections.deque()
        self._total = 0

    def _expire(self) -> float:
        now = self._clock()
        while self._charged and self._charged[0][0] <= now - WINDOW_S:
            self._total -= self._charged.popleft()[1]
        return now

    def add(self, amount: int) -> None:
        self._charged.append((self._expire(), amount))
        self._total += amount

    async def room(self, amount: int, allowance: float) -> None:
        """Wait until `amount` more keeps the window within `allowance` (at once when
        the window is empty: a request bigger than a second's worth still goes)."""
        while True:
            now = self._expire()
            excess = self._total + amount - allowance
            if excess <= 0 or not self._charged:
                return
            # The oldest leave first; a request over a second's worth waits for all.
            freed_at = self._charged[-1][0]
            for sent_at, charged in self._charged:
                excess -= charged
                if excess <= 0:
                    freed_at = sent_at
                    break
            await asyncio.sleep(freed_at + WINDOW_S - now)


async def _grown(
    bucket: AsyncLimiter, per_minute: int | None, scale: float, largest: int
) -> AsyncLimiter:
    """The bucket, or one that holds a request of `largest` (starting full, too), so a
    request waits once for its tokens, not once per bucketful."""
    if largest <= bucket.max_rate:
        return bucket
    bigger = _bucket(per_minute, scale, largest)
    assert bigger is not None
    await bigger.acquire(bigger.max_rate)
    return bigger


def _bucket(per_minute: int | None, scale: float, largest: float = 1.0) -> AsyncLimiter | None:
    """A bucket pacing `per_minute` x scale, holding a little, or the largest request
    (at most a second's worth: bigger ones are charged a bucketful at a time)."""
    if per_minute is None:
        return None
    per_second = per_minute * scale / 60.0
    capacity = min(max(1.0, per_second * BURST, largest), max(1.0, per_second))
    return AsyncLimiter(max_rate=capacity, time_period=capacity / (per_second * PACE))


async def _spend(bucket: AsyncLimiter, amount: float) -> None:
    """Take `amount` from a bucket smaller than it, a bucketful at a time: charged in
    full, never clamped, so big requests cannot overrun the limit."""
    while amount > 0:
        part = min(amount, bucket.max_rate)
        await bucket.acquire(part)
        amount -= part


def _bucket_left(headers: Mapping[str, str], kind: str, limit: int | None) -> int | None:
    """What a server's bucket of `kind` has left, where its headers show one holding
    more than CREDIT_BUCKET_S seconds' worth; else None."""
    remaining = _count(headers.get(f"x-ratelimit-remaining-{kind}"))
    reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}") or "")
    if not limit or remaining is None or reset is None:
        return None
    holds = remaining + reset * limit / 60.0
    return remaining if holds > CREDIT_BUCKET_S * limit / 60.0 else None


def _count(value: str | None) -> int | None:
    """A header's count; None when absent, unparseable or -1 (Azure: unknown)."""
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number >= 0 else None


_ANTHROPIC_REQUESTS_LIMIT = "anthropic-ratelimit-requests-limit"
#: Anthropic's token buckets: `tokens` is the most restrictive of the other two.
_ANTHROPIC_TOKEN_KINDS = ("tokens", "input-tokens", "output-tokens")


def parse_timestamp(text: str) -> float | None:
    """Seconds since the epoch of an RFC 3339 time, as Anthropic's resets give it.

    >>> parse_timestamp("2026-11-25T02:10:51Z")
    1795572651.0
    """
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(text: str) -> float | None:
    """Seconds in a Go-style duration as OpenAI sends them: "6m0s", "20ms", "1.5s".

    >>> parse_duration("6m0s")
    360.0
    """
    text = text.strip()
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked us to wait: retry-after-ms, then retry-after, else None."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    when = _http_date(value)
    if when is None:
        return None
    # Against the server's own clock when it sent one: a local clock minutes off would
    # turn a short wait into none, or into a long one.
    now = _http_date(headers.get("date") or "")
    return max(0.0, when - (now if now is not None else time.time()))


def _http_date(text: str) -> float | None:
    """An HTTP-date (RFC 9110) as a Unix time; None when it is not one."""
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
