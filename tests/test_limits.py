"""Rate-limit arithmetic and the shared pause, on a fake clock."""

from __future__ import annotations

import asyncio

import pytest
from conftest import in_virtual_time
from multidict import CIMultiDict

from pipeline.limits import (
    CALIBRATION_MIN_ANSWERS,
    CREDIT_MARGIN,
    CREDIT_MARGIN_REQUESTS,
    MIN_SCALE,
    WARMUP_RATIO,
    WINDOW_S,
    Limiter,
    parse_duration,
    retry_after,
)


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


def test_requests_are_paced_smoothly_from_the_first_one() -> None:
    async def twenty(limiter: Limiter) -> None:
        for _ in range(20):
            await limiter.acquire(1)

    # 600 RPM = 10/s, paced at 98.5%: no burst at the start.
    assert in_virtual_time(twenty, rpm=600, tpm=None) == pytest.approx(20 / 9.85, rel=0.03)


def test_a_request_bigger_than_the_bucket_is_charged_in_full() -> None:
    async def big(limiter: Limiter) -> None:
        await limiter.acquire(1_000)

    # 6,000 TPM = 100 tokens/s at 98.5%; a bucket of 1.5 tokens, started full.
    assert in_virtual_time(big, rpm=None, tpm=6000) == pytest.approx(1000 / 98.5, rel=0.03)


def test_a_waiting_request_is_charged_as_calibrated_when_its_turn_comes() -> None:
    charged: list[int] = []

    async def queued(limiter: Limiter) -> None:
        limiter.prompt_ratio = 2.0  # the first guess: twice the estimate

        async def one() -> None:
            charged.append(await limiter.acquire(150, prompt=100, output=50))
            if len(charged) == 1:  # the first answers: the server counts as estimated
                for _ in range(CALIBRATION_MIN_ANSWERS):
                    limiter.calibrate(estimated=100, counted=100)

        await asyncio.gather(*(one() for _ in range(4)))

    # 60,000 TPM: 1,000 tokens/s. Charged at their turn, the three that waited cost
    # 150 each, not the 250 they would have cost when they started waiting.
    seconds = in_virtual_time(queued, rpm=None, tpm=60_000)
    assert charged == [250, 150, 150, 150]
    assert seconds == pytest.approx((250 + 3 * 150) / 985, rel=0.1)


def test_usage_beyond_the_estimate_is_spent_from_the_token_bucket() -> None:
    async def as_estimated(limiter: Limiter) -> None:
        await limiter.acquire(100)
        await limiter.settle(estimated=100, actual=100)
        await limiter.acquire(100)

    async def more_than_estimated(limiter: Limiter) -> None:
        await limiter.acquire(100)
        await limiter.settle(estimated=100, actual=300)  # 200 more than estimated
        await limiter.acquire(100)

    exact = in_virtual_time(as_estimated, rpm=None, tpm=6000)
    over = in_virtual_time(more_than_estimated, rpm=None, tpm=6000)
    assert over - exact == pytest.approx(200 / 98.5, rel=0.05)


def headers(**values: str) -> CIMultiDict[str]:
    return CIMultiDict({f"x-ratelimit-{k.replace('_', '-')}": v for k, v in values.items()})


def test_server_limits_are_learned_when_the_job_sets_none() -> None:
    limiter = Limiter(rpm=None, tpm=None)

    limiter.observe(headers(limit_requests="500", limit_tokens="30000"), tokens=10)

    assert (limiter.rpm, limiter.tpm) == (500, 30000)


def test_server_limits_lower_a_job_that_asks_for_too_much() -> None:
    limiter = Limiter(rpm=4000, tpm=10_000_000)

    limiter.observe(headers(limit_requests="1000", limit_tokens="200000"), tokens=10)

    assert (limiter.rpm, limiter.tpm) == (1000, 200000)


def test_server_limits_never_raise_the_jobs_own() -> None:
    limiter = Limiter(rpm=100, tpm=1000)

    limiter.observe(headers(limit_requests="5000", limit_tokens="900000"), tokens=10)

    assert (limiter.rpm, limiter.tpm) == (100, 1000)


@pytest.mark.parametrize("value", ["-1", "", "n/a"])
def test_unknown_limits_are_ignored(value: str) -> None:
    limiter = Limiter(rpm=100, tpm=None)

    limiter.observe(headers(limit_requests=value, limit_tokens=value), tokens=10)

    assert (limiter.rpm, limiter.tpm) == (100, None)


def test_an_empty_server_bucket_pauses_every_worker_until_it_refills() -> None:
    now = [0.0]
    limiter = Limiter(rpm=None, tpm=None, clock=lambda: now[0])

    limiter.observe(
        headers(
            limit_requests="600",
            remaining_requests="0",
            reset_requests="100ms",
            limit_tokens="60000",
            remaining_tokens="50000",
            reset_tokens="10s",
        ),
        tokens=100,
    )

    assert limiter.paused_for == pytest.approx(0.1)  # 1 request at 10/s; tokens suffice


def test_too_few_tokens_left_waits_for_just_enough() -> None:
    now = [0.0]
    limiter = Limiter(rpm=None, tpm=None, clock=lambda: now[0])

    limiter.observe(
        headers(
            limit_requests="600",
            remaining_requests="599",
            limit_tokens="6000",
            remaining_tokens="100",
            reset_tokens="59s",
        ),
        tokens=300,
    )

    assert limiter.paused_for == pytest.approx(2.0)  # 200 missing tokens at 100/s
    # Paced under its limit, yet its bucket ran dry: it counts per second from now on.
    assert limiter.per_second


def heaviest_second(times: list[float], tokens: int) -> int:
    """The most tokens sent in any one second, at `tokens` a request."""
    return max(sum(1 for t in times if start <= t < start + 1.0) for start in times) * tokens


@pytest.mark.parametrize("per_second", [False, True])
def test_a_server_counting_per_second_never_gets_more_than_a_seconds_worth(
    per_second: bool,
) -> None:
    sent: list[float] = []

    async def twelve(limiter: Limiter) -> None:
        limiter.per_second = per_second
        loop = asyncio.get_running_loop()
        for _ in range(12):
            await limiter.acquire(300)
            sent.append(loop.time())

    # 60,000 TPM: 1,000 tokens a second. Paced at 98.5%, a 300-token request goes every
    # 0.305 s: four of them (1,200 tokens) in some second, which a server counting per
    # second refuses. Knowing it does, the fourth waits for the first to leave the window.
    seconds = in_virtual_time(twelve, rpm=None, tpm=60_000)
    assert len(sent) == 12

    if per_second:
        assert heaviest_second(sent, 300) <= 1000
        # Three fit in a second: each fourth goes a window after the one three before.
        assert min(b - a for a, b in zip(sent, sent[3:], strict=False)) >= WINDOW_S
    else:
        assert heaviest_second(sent, 300) == 1200
    assert seconds == pytest.approx(sent[-1], abs=0.01)


def test_a_request_over_a_seconds_worth_still_goes_when_the_window_is_empty() -> None:
    async def two_big(limiter: Limiter) -> None:
        limiter.per_second = True
        await limiter.acquire(1500)
        await limiter.acquire(1500)

    # 1,000 tokens a second: each is charged in full at the pace, and never waits forever.
    seconds = in_virtual_time(two_big, rpm=None, tpm=60_000)
    assert seconds == pytest.approx(3000 / 985, rel=0.05)


def test_slow_down_halves_the_rate_and_it_recovers_step_by_step() -> None:
    now = [0.0]
    limiter = Limiter(rpm=600, tpm=None, clock=lambda: now[0])

    limiter.slow_down()
    limiter.slow_down()
    assert limiter.scale == 0.25
    limiter.recovered()  # too soon after the last change
    assert limiter.scale == 0.25
    for _ in range(20):
        now[0] += 2.0
        limiter.recovered()

    assert limiter.scale == 1.0


def test_slow_down_has_a_floor() -> None:
    limiter = Limiter(rpm=600, tpm=None)

    for _ in range(20):
        limiter.slow_down()

    assert limiter.scale == MIN_SCALE  # 20 halvings would be 1/1,048,576


def test_prompt_estimates_the_server_counts_higher_are_scaled_up() -> None:
    limiter = Limiter(rpm=None, tpm=60_000)
    for _ in range(CALIBRATION_MIN_ANSWERS - 1):
        limiter.calibrate(estimated=1000, counted=1500)
    assert limiter.charge(1200, prompt=1000) == 1200  # too few answers yet to judge

    limiter.calibrate(estimated=1000, counted=1500)

    assert limiter.prompt_ratio == pytest.approx(1.5)
    # Only the prompt is scaled: max output tokens count as they are.
    assert limiter.charge(1200, prompt=1000) == 200 + 1500


def test_calibration_follows_recent_answers_and_is_bounded() -> None:
    limiter = Limiter(rpm=None, tpm=60_000)
    for _ in range(200):
        limiter.calibrate(estimated=100, counted=180)
    for _ in range(300):
        limiter.calibrate(estimated=100, counted=120)
    assert limiter.prompt_ratio == pytest.approx(1.2, abs=0.05)

    for _ in range(500):
        limiter.calibrate(estimated=100, counted=1000)
    assert limiter.prompt_ratio == 2.0
    for _ in range(2000):
        limiter.calibrate(estimated=100, counted=75)
    # A server counting with the model's tokenizer, below four bytes a token: followed.
    assert limiter.prompt_ratio == pytest.approx(0.75, abs=0.001)
    assert limiter.charge(175, prompt=100) == 75 + 75
    for _ in range(1000):
        limiter.calibrate(estimated=100, counted=10)
    assert limiter.prompt_ratio == 0.5  # a few odd usages cannot make it charge nothing
    limiter.calibrate(estimated=0, counted=50)  # no estimate: nothing to learn from
    assert limiter.prompt_ratio == 0.5


def test_an_exact_count_is_charged_with_a_margin_until_the_server_has_answered() -> None:
    limiter = Limiter(rpm=None, tpm=60_000, prompt_ratio=WARMUP_RATIO)
    assert limiter.charge(1100, prompt=1000) == 100 + 1300  # a bytes/4 server's count
    for _ in range(CALIBRATION_MIN_ANSWERS):
        limiter.calibrate(estimated=1000, counted=1000)  # it counts with the tokenizer
    assert limiter.charge(1100, prompt=1000) == 1100


def openai_headers(
    rpm: int,
    requests_left: int,
    tpm: int | None = None,
    tokens_left: int = 0,
    holds_s: float = 60.0,
) -> dict[str, str]:
    """Headers as a server with buckets holding `holds_s` seconds' worth sends them
    (OpenAI's hold a minute's): the reset is the time until the bucket is full again."""
    headers = {
        "x-ratelimit-limit-requests": str(rpm),
        "x-ratelimit-remaining-requests": str(requests_left),
        "x-ratelimit-reset-requests": f"{(rpm * holds_s / 60 - requests_left) * 60 / rpm:.3f}s",
    }
    if tpm is not None:
        headers["x-ratelimit-limit-tokens"] = str(tpm)
        headers["x-ratelimit-remaining-tokens"] = str(tokens_left)
        reset = (tpm * holds_s / 60 - tokens_left) * 60 / tpm
        headers["x-ratelimit-reset-tokens"] = f"{reset:.3f}s"
    return headers


async def answered(limiter: Limiter, headers: dict[str, str], tokens: int = 1) -> None:
    """One request through the limiter, answered with `headers`."""
    charged = await limiter.acquire(tokens)
    limiter.observe(headers, tokens, charged)
    limiter.returned(charged)


def test_what_the_server_says_it_has_left_goes_at_once() -> None:
    async def scenario(limiter: Limiter) -> None:
        # 600 RPM: 10 a second. The server's bucket refilled to 50 while we started.
        await answered(limiter, openai_headers(600, 50))
        assert limiter._credit == pytest.approx(50 - CREDIT_MARGIN * 10 - CREDIT_MARGIN_REQUESTS)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for _ in range(47):
            await limiter.acquire(1)
        assert loop.time() - start < 0.01
        await limiter.acquire(1)  # the 48th waits for the pace
        assert loop.time() - start >= 0.05

    in_virtual_time(scenario, rpm=600, tpm=None)


def test_the_credit_runs_out_then_the_pace_takes_over() -> None:
    async def scenario(limiter: Limiter) -> None:
        await answered(limiter, openai_headers(600, 30))
        for _ in range(37):  # the credit (30 less the margin: 27) and ten paced
            await limiter.acquire(1)

    # Ten paced at 9.85 a second after the credit, plus the first request's own turn.
    seconds = in_virtual_time(scenario, rpm=600, tpm=None)
    assert seconds == pytest.approx(11 / 9.85, rel=0.05)


def test_requests_in_flight_are_not_spent_twice() -> None:
    async def scenario(limiter: Limiter) -> None:
        charged = [await limiter.acquire(1) for _ in range(6)]  # six in flight
        limiter.observe(openai_headers(600, 20), 1, charged[0])  # the first answered
        limiter.returned(charged[0])
        # The five still out may not have been counted in the 20: 20 - 5 - margin.
        assert limiter._credit == pytest.approx(20 - 5 - CREDIT_MARGIN * 10 - 2)

    in_virtual_time(scenario, rpm=600, tpm=None)


def test_token_credit_keeps_twice_the_largest_request_back() -> None:
    async def scenario(limiter: Limiter) -> None:
        headers = openai_headers(100_000, 1_000, tpm=60_000, tokens_left=5_000)
        await answered(limiter, headers, tokens=300)
        # 5,000 left less a margin of two 300-token requests: 14 go at once.
        assert limiter._credit_tokens == pytest.approx(5_000 - 600)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for _ in range(14):
            await limiter.acquire(300)
        assert loop.time() - start < 0.01
        await limiter.acquire(300)  # the fifteenth waits for the pace
        assert loop.time() - start >= 0.25

    in_virtual_time(scenario, rpm=None, tpm=60_000)


def test_a_429_ends_the_credit_for_the_run() -> None:
    async def scenario(limiter: Limiter) -> None:
        await answered(limiter, openai_headers(600, 50))
        limiter.refused()
        await answered(limiter, openai_headers(600, 50))  # later headers say the same
        assert limiter._credit == 0
        for _ in range(10):
            await limiter.acquire(1)

    # Back to the smooth pace: twelve requests at 9.85 a second.
    seconds = in_virtual_time(scenario, rpm=600, tpm=None)
    assert seconds == pytest.approx(12 / 9.85, rel=0.05)


@pytest.mark.parametrize(
    "headers",
    [
        # 6,000 RPM counted over a sliding second: 100 a second, 60 left in this one.
        pytest.param(openai_headers(6_000, 60, holds_s=1.0), id="a-second-window"),
        pytest.param(
            {**openai_headers(6_000, 60), "x-ratelimit-reset-requests": ""}, id="no-reset"
        ),
    ],
)
def test_room_in_a_second_is_left_to_the_pace_not_spent_at_once(headers: dict[str, str]) -> None:
    limiter = Limiter(rpm=6_000, tpm=None)
    asyncio.run(answered(limiter, headers))
    # Spent at once, with the pace's hundred in the same second, it would be 160.
    assert limiter._credit == 0
