"""Rate-limit arithmetic and the shared pause, on a fake clock."""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict

from pipeline.limits import Limiter, parse_duration, retry_after


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("6m0s", 360.0, id="minutes"),
        pytest.param("20ms", 0.02, id="millis"),
        pytest.param("1.5s", 1.5, id="fraction"),
        pytest.param("1h2m3s", 3723.0, id="hours"),
        pytest.param("-1", None, id="unknown"),
        pytest.param("soon", None, id="garbage"),
    ],
)
def test_go_durations(text: str, seconds: float | None) -> None:
    assert (
        parse_duration(text) == pytest.approx(seconds) if seconds else parse_duration(text) is None
    )


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        pytest.param({"retry-after-ms": "250"}, 0.25, id="ms-wins"),
        pytest.param({"retry-after-ms": "250", "retry-after": "9"}, 0.25, id="ms-over-seconds"),
        pytest.param({"retry-after": "3"}, 3.0, id="seconds"),
        pytest.param({"Retry-After": "3"}, 3.0, id="case-insensitive"),
        pytest.param({}, None, id="absent"),
    ],
)
def test_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    assert retry_after(CIMultiDict(headers)) == seconds


def test_pause_holds_every_acquire_until_it_ends() -> None:
    now = [100.0]
    limiter = Limiter(rpm=None, tpm=None, clock=lambda: now[0])

    limiter.pause(5.0)
    limiter.pause(1.0)  # a shorter pause never cuts a longer one

    assert limiter.paused_for == pytest.approx(5.0)
    now[0] += 5.0
    assert limiter.paused_for == 0.0
    asyncio.run(limiter.acquire(10))  # returns at once: no pause left, no limits


def test_oversized_request_waits_for_a_full_bucket_instead_of_failing() -> None:
    limiter = Limiter(rpm=None, tpm=60)  # 1 token/s, a bucket of 1 token

    asyncio.run(asyncio.wait_for(limiter.acquire(10_000), timeout=5))
