"""The dispatcher's own logic: what it retries, when, how long it waits, when it stops.

A test double stands in for the network only: `Network` is a `Transport` (one async
`send`) that answers each row's requests from a script of HTTP responses. The
dispatcher, the limiter, the classification of responses and the endpoint reading the
answers are the real ones. Backoff sleeps go through the dispatcher's injectable
`sleep`, which records them and returns at once; 429 pauses (the limiter's) run in
virtual time (conftest's `in_virtual_time`), so nothing here waits for real.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from conftest import in_virtual_time
from multidict import CIMultiDict

from pipeline.dispatch import MAX_RATE_LIMITED, SAME_ERROR_HALT, Dispatcher, RetryPolicy
from pipeline.endpoints import make_endpoint
from pipeline.errors import Halted, RateLimited, RowFailed, ServerError
from pipeline.limits import Limiter
from pipeline.records import Answer, HttpRequest, HttpResponse, Outcome, Work
from pipeline.spec import RequestSpec, TemplateSpec

URL = "http://127.0.0.1:9/v1"
ENDPOINT = make_endpoint(
    RequestSpec.model_validate({"model": "gpt-4o-mini"}),
    TemplateSpec(user="{{ text }}"),
    URL,
    None,
    Path("."),
)
#: Backoff small enough to read, with the cap far away unless a test moves it.
POLICY = RetryPolicy(max_attempts=6, backoff_s=0.5, backoff_max_s=30.0)
SEED = 7


def ok() -> HttpResponse:
    body = {
        "id": "chatcmpl-1",
        "model": "gpt-4o-mini",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
    return HttpResponse(200, CIMultiDict({"content-type": "application/json"}), orjson.dumps(body))


def failed(
    status: int,
    message: str = "something went wrong",
    *,
    type_: str = "server_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> HttpResponse:
    """An OpenAI-shaped error response."""
    body = {"error": {"message": message, "type": type_, "code": code}}
    sent = CIMultiDict({"content-type": "application/json", **(headers or {})})
    return HttpResponse(status, sent, orjson.dumps(body))


def bad_request(message: str | None = None) -> HttpResponse:
    message = message or "'temperature' must be at most 2"
    return failed(400, message, type_="invalid_request_error", code="invalid_value")


def rate_limited(**headers: str) -> HttpResponse:
    named = {k.replace("_", "-"): v for k, v in headers.items()}
    return failed(
        429, "Rate limit reached", type_="requests", code="rate_limit_exceeded", headers=named
    )


class Network:
    """Answers each row's requests, in order, from that row's script; logs every send as
    (row, status, loop time). A send past the end of a script fails the test."""

    def __init__(self, scripts: dict[int, list[HttpResponse]]) -> None:
        self._scripts = {row: list(script) for row, script in scripts.items()}
        self.log: list[tuple[int, int, float]] = []
        #: Set when a 429 is answered: lets a test send another row during the pause.
        self.rate_limited = asyncio.Event()

    async def send(self, request: HttpRequest) -> HttpResponse:
        row = int(request.body)
        script = self._scripts.get(row, [])
        assert script, f"row {row} sent once more than its script allows"
        response = script.pop(0)
        self.log.append((row, response.status, asyncio.get_running_loop().time()))
        if response.status == 429:
            self.rate_limited.set()
        return response

    def sends(self, row: int = 0) -> int:
        return sum(1 for r, _, _ in self.log if r == row)

    def times(self, row: int = 0) -> list[float]:
        return [at for r, _, at in self.log if r == row]


def one_row(*script: HttpResponse) -> Network:
    return Network({0: list(script)})


def work(row: int = 0) -> Work:
    request = HttpRequest("POST", f"{URL}/chat/completions", {}, str(row).encode())
    return Work((row,), request, tokens=10)


def unchecked(answer: Answer) -> Answer:
    return answer


class Sleeps(list[float]):
    """The dispatcher's `sleep`: records what it was asked to wait, waits for nothing."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


def dispatcher(
    network: Network,
    policy: RetryPolicy = POLICY,
    *,
    sleeps: Sleeps | None = None,
    limiter: Limiter | None = None,
    clock: Callable[[], float] = time.monotonic,
    seed: int = SEED,
) -> Dispatcher:
    return Dispatcher(
        network,
        ENDPOINT,
        limiter or Limiter(rpm=None, tpm=None),
        policy,
        unchecked,
        sleep=sleeps if sleeps is not None else Sleeps(),
        seed=seed,
        clock=clock,
    )


def send_one(
    network: Network, policy: RetryPolicy = POLICY, *, seed: int = SEED
) -> tuple[Outcome | None, Sleeps, Dispatcher]:
    sleeps = Sleeps()
    sender = dispatcher(network, policy, sleeps=sleeps, seed=seed)
    outcome = asyncio.run(sender.send(work()))
    return outcome, sleeps, sender


def backoff(policy: RetryPolicy, retries: int, rng: random.Random) -> list[float]:
    """The schedule written out: retry k waits a uniform draw between half and all of
    min(backoff_max_s, backoff_s * 2^(k-1)), drawn in order from the seeded generator."""
    delays = []
    for k in range(1, retries + 1):
        ceiling = min(policy.backoff_max_s, policy.backoff_s * 2.0 ** (k - 1))
        delays.append(ceiling / 2 + rng.uniform(0, ceiling / 2))
    return delays


# --- the retry schedule -------------------------------------------------------------


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"seed-{s}") for s in (0, 7, 2024)])
def test_retries_wait_the_exponential_backoff_with_the_seeded_jitter(seed: int) -> None:
    network = one_row(failed(500), failed(500), ok())

    outcome, sleeps, sender = send_one(network, seed=seed)

    assert outcome is not None
    assert outcome.failure is None
    assert outcome.attempts == 3
    assert sleeps == backoff(POLICY, 2, random.Random(seed))
    assert 0.25 <= sleeps[0] <= 0.5
    assert 0.5 <= sleeps[1] <= 1.0
    assert (sender.stats.sent, sender.stats.retries) == (3, 2)


def test_the_backoff_stops_growing_at_backoff_max_s() -> None:
    policy = RetryPolicy(max_attempts=6, backoff_s=1.0, backoff_max_s=3.0)
    network = one_row(*[failed(503, type_="server_error")] * 5, ok())

    outcome, sleeps, _ = send_one(network, policy)

    assert outcome is not None
    assert outcome.failure is None
    assert sleeps == backoff(policy, 5, random.Random(SEED))
    # Ceilings 1, 2, then 3, 3, 3: capped, where uncapped they would be 4 and 8.
    assert all(1.5 <= s <= 3.0 for s in sleeps[2:]), sleeps


@pytest.mark.parametrize(
    ("headers", "floor"),
    [
        pytest.param({"retry-after": "10"}, 10.0, id="retry-after"),
        pytest.param({"retry-after-ms": "2500"}, 2.5, id="retry-after-ms"),
        pytest.param({"retry-after-ms": "2500", "retry-after": "10"}, 2.5, id="ms-wins"),
        pytest.param({"retry-after-ms": "1"}, 0.001, id="shorter-than-backoff-is-no-shortcut"),
    ],
)
def test_the_servers_retry_after_is_a_floor_under_the_backoff(
    headers: dict[str, str], floor: float
) -> None:
    network = one_row(failed(500, headers=headers), ok())

    outcome, sleeps, _ = send_one(network)

    assert outcome is not None
    assert outcome.failure is None
    (jittered,) = backoff(POLICY, 1, random.Random(SEED))
    assert sleeps == [max(jittered, floor)]


# --- what is retried, and how often ---------------------------------------------------


@pytest.mark.parametrize(
    "refusal",
    [
        pytest.param(bad_request(), id="400"),
        pytest.param(
            failed(413, "request entity too large", type_="invalid_request_error"), id="413"
        ),
        pytest.param(failed(500, headers={"x-should-retry": "false"}), id="x-should-retry-false"),
    ],
)
def test_a_failure_that_retrying_cannot_fix_is_sent_once(refusal: HttpResponse) -> None:
    network = one_row(refusal, ok())  # a retry would have succeeded

    outcome, sleeps, sender = send_one(network)

    assert network.sends() == 1
    assert outcome is not None
    assert outcome.failure is not None
    assert outcome.answers is None
    assert outcome.attempts == 1
    assert outcome.http_status == refusal.status
    assert sleeps == []
    assert sender.stop_reason is None  # one row failed; the run goes on


def test_a_400_fails_the_row_as_row_failed_with_the_servers_message() -> None:
    outcome, _, _ = send_one(one_row(bad_request("'temperature' must be at most 2")))

    assert outcome is not None
    assert isinstance(outcome.failure, RowFailed)
    assert "'temperature' must be at most 2" in outcome.failure.message


@pytest.mark.parametrize("max_attempts", [1, 2, 4])
def test_a_row_is_sent_at_most_max_attempts_times(max_attempts: int) -> None:
    policy = RetryPolicy(max_attempts=max_attempts, backoff_s=0.5, backoff_max_s=30.0)
    network = one_row(*[failed(500)] * max_attempts, ok())

    outcome, sleeps, _ = send_one(network, policy)

    assert network.sends() == max_attempts  # the answer that would succeed is never asked
    assert outcome is not None
    assert isinstance(outcome.failure, ServerError)
    assert outcome.attempts == max_attempts
    assert sleeps == backoff(policy, max_attempts - 1, random.Random(SEED))


# --- 429: a pause for every worker, not an attempt ------------------------------------


def test_a_429_pauses_every_row_for_its_retry_after_without_using_an_attempt() -> None:
    policy = RetryPolicy(max_attempts=2, backoff_s=0.5, backoff_max_s=30.0)
    wait = 2.0
    network = Network(
        {
            0: [*[rate_limited(retry_after=str(wait))] * 3, failed(500), ok()],
            1: [ok()],
        }
    )
    sleeps = Sleeps()
    outcomes: list[Outcome | None] = []

    async def scenario(limiter: Limiter) -> None:
        loop = asyncio.get_running_loop()
        sender = dispatcher(network, policy, sleeps=sleeps, limiter=limiter, clock=loop.time)

        async def second_row() -> Outcome | None:
            await network.rate_limited.wait()  # row 0's first 429 has been answered
            return await sender.send(work(1))

        outcomes.extend(await asyncio.gather(sender.send(work(0)), second_row()))
        assert sender.stats.rate_limited == 3

    in_virtual_time(scenario)

    first, second = outcomes
    # Three 429s and a 500 with max_attempts=2: only the 500 counted.
    assert first is not None
    assert first.failure is None
    assert first.attempts == 5
    assert second is not None
    assert second.failure is None
    # Each retry after a 429 waited the server's time, through the limiter, not a sleep.
    times = network.times(0)
    assert all(later >= earlier + wait for earlier, later in itertools.pairwise(times[:4]))
    assert sleeps == backoff(policy, 1, random.Random(SEED))  # the 500's backoff only
    # The other row, sent during the pause, waited for it too.
    assert network.times(1)[0] >= times[0] + wait


@pytest.mark.parametrize(
    ("rate_limits", "ends_ok", "sends"),
    [
        pytest.param(MAX_RATE_LIMITED, True, MAX_RATE_LIMITED + 1, id="within-the-allowance"),
        pytest.param(MAX_RATE_LIMITED + 2, False, MAX_RATE_LIMITED + 2, id="past-it-they-count"),
    ],
)
def test_only_429s_past_max_rate_limited_count_as_attempts(
    rate_limits: int, ends_ok: bool, sends: int
) -> None:
    policy = RetryPolicy(max_attempts=2, backoff_s=0.5, backoff_max_s=30.0)
    network = one_row(*[rate_limited(retry_after_ms="1")] * rate_limits, ok())
    sleeps = Sleeps()
    outcomes: list[Outcome | None] = []

    async def scenario(limiter: Limiter) -> None:
        # The fault watch's clock stands still: no 429 storm builds up to a halt here
        # (its growing pauses and its halt are tested in test_faults.py).
        sender = dispatcher(network, policy, sleeps=sleeps, limiter=limiter, clock=lambda: 0.0)
        outcomes.append(await sender.send(work()))

    in_virtual_time(scenario)

    (outcome,) = outcomes
    assert network.sends() == sends
    assert outcome is not None
    assert outcome.attempts == sends
    if ends_ok:
        assert outcome.failure is None
        assert sleeps == []
    else:
        # The last two 429s were attempts 1 and 2 of max_attempts=2: a backoff, then done.
        assert isinstance(outcome.failure, RateLimited)
        assert sleeps == [max(d, 0.001) for d in backoff(policy, 1, random.Random(SEED))]


# --- failures of the run --------------------------------------------------------------


def send_rows(sender: Dispatcher, rows: range) -> list[tuple[Outcome | None, bool]]:
    """Send rows one after another: each one's outcome, and whether the run had stopped."""

    async def each() -> list[tuple[Outcome | None, bool]]:
        return [(await sender.send(work(row)), sender.stop_reason is not None) for row in rows]

    return asyncio.run(each())


def test_the_same_400_on_same_error_halt_rows_in_a_row_halts_the_run() -> None:
    rows = range(SAME_ERROR_HALT + 1)
    network = Network({row: [bad_request()] for row in rows})
    sender = dispatcher(network)

    sent = send_rows(sender, rows)

    *first, (last, halted), (after, _) = sent
    assert all(isinstance(o and o.failure, RowFailed) and not stop for o, stop in first)
    assert last is not None
    assert isinstance(last.failure, RowFailed)
    assert halted
    assert isinstance(sender.stop_reason, Halted)
    assert f"the last {SAME_ERROR_HALT} rows all failed with the same error" in str(
        sender.stop_reason
    )
    assert after is None  # the run stopped: the next row is left unsent, pending
    assert network.sends(SAME_ERROR_HALT) == 0


def test_a_different_error_between_breaks_the_run_of_same_errors() -> None:
    rows = range(SAME_ERROR_HALT + 1)
    other = SAME_ERROR_HALT // 2
    network = Network(
        {row: [bad_request("'top_p' must be positive" if row == other else None)] for row in rows}
    )
    sender = dispatcher(network)

    sent = send_rows(sender, rows)

    assert sender.stop_reason is None
    assert all(isinstance(o and o.failure, RowFailed) for o, _ in sent)


def test_a_401_halts_the_run_at_once_and_leaves_the_row_unsent() -> None:
    network = Network(
        {
            0: [failed(401, "Incorrect API key provided", type_="invalid_request_error"), ok()],
            1: [ok()],
        }
    )
    sleeps = Sleeps()
    sender = dispatcher(network, sleeps=sleeps)

    (first, _), (second, _) = send_rows(sender, range(2))

    assert first is None  # no outcome: the row stays pending for a resume
    assert isinstance(sender.stop_reason, Halted)
    assert "authentication failed" in str(sender.stop_reason)
    assert "Incorrect API key provided" in str(sender.stop_reason)
    assert network.sends(0) == 1
    assert sleeps == []
    assert second is None
    assert network.sends(1) == 0
