"""Request and token rate limits, and the pause every worker honours after a 429.

    limiter = Limiter(rpm=500, tpm=200_000)
    await limiter.acquire(tokens=900)     # waits for the pause, a request slot and tokens
    limiter.pause(2.5)                    # a 429 said wait: every worker waits

A request costs its estimated prompt tokens plus its max output tokens, the way OpenAI
counts against TPM. Buckets hold one second's worth, so the first second does not
burst a whole minute's quota at a server that measures in shorter windows.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import time
from collections.abc import Callable, Mapping

from aiolimiter import AsyncLimiter

#: How much of a limit may be spent at once: one second's worth of it.
BURST_SECONDS = 1.0


class Limiter:
    def __init__(
        self,
        *,
        rpm: int | None,
        tpm: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._requests = _bucket(rpm)
        self._tokens = _bucket(tpm)
        self._clock = clock
        self._resume_at = 0.0
        self.rpm, self.tpm = rpm, tpm

    def pause(self, seconds: float) -> None:
        """Hold every request until `seconds` from now (never shortens a longer pause)."""
        self._resume_at = max(self._resume_at, self._clock() + seconds)

    @property
    def paused_for(self) -> float:
        return max(0.0, self._resume_at - self._clock())

    async def acquire(self, tokens: int) -> None:
        # Not a poll: each sleep lasts exactly until the pause ends; the loop only
        # repeats when another 429 extended the pause meanwhile.
        while (wait := self.paused_for) > 0:  # noqa: ASYNC110
            await asyncio.sleep(wait)
        if self._requests is not None:
            await self._requests.acquire()
        if self._tokens is not None:
            # A request bigger than the bucket waits for a full bucket rather than forever.
            await self._tokens.acquire(min(float(tokens), self._tokens.max_rate))


def _bucket(per_minute: int | None) -> AsyncLimiter | None:
    if per_minute is None:
        return None
    per_second = per_minute / 60.0
    capacity = max(1.0, per_second * BURST_SECONDS)
    return AsyncLimiter(max_rate=capacity, time_period=capacity / per_second)


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
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
