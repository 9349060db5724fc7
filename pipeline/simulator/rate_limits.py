"""RPM and TPM as OpenAI enforces them: two token buckets, a request charged to both.

    limits = Limits(rpm=600, tpm=100_000, clock=time.monotonic)
    limits.admit(cost=1_200, model="gpt-4o-mini")   # or raise the 429 OpenAI would send
    limits.headers()    # {"x-ratelimit-limit-requests": "600", ..., "-reset-tokens": "1s"}

Each bucket holds up to one minute's limit and refills at limit/60 a second. A request
costs its prompt tokens plus its completion budget; one larger than the whole TPM limit
is "too large" (a 429 without retry-after: waiting never makes it fit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from pipeline.simulator.api_errors import (
    ORGANIZATION,
    RATE_LIMIT_DOCS,
    ApiError,
    error_body,
    retry_headers,
)


def go_duration(seconds: float) -> str:
    """Format a duration the way OpenAI's reset headers do: "20ms", "1.5s", "6m0s"."""
    total_ms = max(math.ceil(seconds * 1000 - 1e-6), 0)
    if total_ms < 1000:
        return f"{total_ms}ms" if total_ms else "0s"
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = str(rest // 1000) + (f".{rest % 1000:03d}".rstrip("0") if rest % 1000 else "")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class Bucket:
    """A token bucket holding up to one minute's limit, refilled at limit/60 per second."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, limit: int, now: float) -> None:
        self.capacity = float(limit)
        self.level = float(limit)
        self.rate = limit / 60.0
        self.stamp = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, amount: float) -> float:
        """Seconds until `amount` fits; 0 when it fits now."""
        # The epsilon absorbs float drift in refills: a bucket refilled to 0.9999999999
        # must not turn away a client that waited exactly the advertised time.
        return max(0.0, (amount - self.level - 1e-9) / self.rate)

    def until_full(self) -> float:
        return (self.capacity - self.level) / self.rate


class Limits:
    """The RPM and TPM buckets; a request is charged to both or to neither."""

    def __init__(self, rpm: int | None, tpm: int | None, clock: Callable[[], float]) -> None:
        now = clock()
        self._clock = clock
        self._requests = Bucket(rpm, now) if rpm else None
        self._tokens = Bucket(tpm, now) if tpm else None

    def admit(self, cost: int, model: str) -> None:
        """Charge one request of `cost` tokens, or raise the 429 OpenAI would send."""
        now = self._clock()
        requests, tokens = self._requests, self._tokens
        if tokens is not None and cost > tokens.capacity:
            raise too_large(model, int(tokens.capacity), cost)
        request_wait = token_wait = 0.0
        if requests is not None:
            requests.refill(now)
            request_wait = requests.wait(1)
        if tokens is not None:
            tokens.refill(now)
            token_wait = tokens.wait(cost)
        if request_wait or token_wait:
            raise self._rejection(model, cost, request_wait, token_wait)
        if requests is not None:
            requests.level -= 1
        if tokens is not None:
            tokens.level -= cost

    def _rejection(self, model: str, cost: int, request_wait: float, token_wait: float) -> ApiError:
        wait = max(request_wait, token_wait)
        if request_wait:
            assert self._requests is not None
            kind, bucket, unit, asked = "requests", self._requests, "requests per min (RPM)", 1
        else:
            assert self._tokens is not None
            kind, bucket, unit, asked = "tokens", self._tokens, "tokens per min (TPM)", cost
        used = math.ceil(bucket.capacity - bucket.level)
        message = (
            f"Rate limit reached for {model} in organization {ORGANIZATION} on {unit}: "
            f"Limit {int(bucket.capacity)}, Used {used}, Requested {asked}. "
            f"Please try again in {go_duration(wait)}. {RATE_LIMIT_DOCS}"
        )
        body = error_body(message, kind, "rate_limit_exceeded")
        ms = math.ceil(wait * 1000)
        return ApiError(429, body, tally="rate_limited", headers=retry_headers(ms))

    def headers(self) -> dict[str, str]:
        """The x-ratelimit-* headers for the buckets as they stand now."""
        out: dict[str, str] = {}
        for name, bucket in self.levels():
            out[f"x-ratelimit-limit-{name}"] = str(int(bucket.capacity))
            out[f"x-ratelimit-remaining-{name}"] = str(max(int(bucket.level), 0))
            out[f"x-ratelimit-reset-{name}"] = go_duration(bucket.until_full())
        return out

    def levels(self) -> Iterator[tuple[str, Bucket]]:
        """("requests" or "tokens", its bucket refilled to now), for each limit set."""
        now = self._clock()
        for name, bucket in (("requests", self._requests), ("tokens", self._tokens)):
            if bucket is not None:
                bucket.refill(now)
                yield name, bucket


def too_large(model: str, limit: int, cost: int) -> ApiError:
    """The 429 for a request larger than the whole TPM limit."""
    # No retry-after: waiting never makes a request larger than the whole limit fit.
    message = (
        f"Request too large for {model} in organization {ORGANIZATION} on tokens per min "
        f"(TPM): Limit {limit}, Requested {cost}. The input or output tokens must be reduced "
        f"in order to run successfully. {RATE_LIMIT_DOCS}"
    )
    return ApiError(429, error_body(message, "tokens", "rate_limit_exceeded"), tally="rate_limited")
