"""The retry loop: one request sent under the limits, and tried again while that may help.

    dispatcher = Dispatcher(transport, endpoint, limiter, RetryPolicy(max_attempts=6), check)
    outcome = await dispatcher.send(work)     # an Outcome, or None if the run stopped

`send` is the whole life of one request: wait for the limiter, record the rows as sent
(`recorder`, the journal's writer), send, classify, and back off and retry what deserves
it. A failed row is an Outcome, not an exception. A failure of the run (auth, quota, a
halt) asks `stop`: the attempt in hand finishes, nothing else is sent, and a row that
was recorded but could not have been billed is forgotten. Who calls `send` is above it:
the online engine's workers (online.py), the tool loop (tool_loop.py).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import orjson

from pipeline.endpoints import Endpoint
from pipeline.errors import (
    Fatal,
    Halted,
    PipelineError,
    RateLimited,
    ReadFailed,
    RequestFailure,
    ResponseInvalid,
    ServerError,
)
from pipeline.faults import FaultWatch
from pipeline.limits import Limiter
from pipeline.records import Answer, HttpResponse, Outcome, Stop, Work
from pipeline.transport import Transport, classify

#: When this many rows in a row fail with the same client error, the job is wrong, not
#: the rows: halt rather than fail (and perhaps pay for) every row the same way.
SAME_ERROR_HALT = 25
#: 429s a row may meet (each followed by the server's wait) before it counts them as
#: attempts: generous, since they cost nothing, but bounded.
MAX_RATE_LIMITED = 50


class Recorder(Protocol):
    """Where a request's rows are recorded as sent (the journal's writer)."""

    async def sending(self, work: Work, /) -> None:
        """Returns once the rows are durably recorded as sent."""

    async def not_sent(self, work: Work, /) -> None:
        """The rows recorded as sent were not: the run stopped before any attempt."""


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0

    def delay(self, attempt: int, failure: RequestFailure, rng: random.Random) -> float:
        """Exponential backoff with jitter; never sooner than the server asked."""
        ceiling = min(self.backoff_max_s, self.backoff_s * 2.0 ** (attempt - 1))
        jittered = ceiling / 2 + rng.uniform(0, ceiling / 2)
        return max(jittered, failure.retry_after or 0.0)


@dataclass
class DispatchStats:
    """Counters owned by the dispatcher; progress reads them."""

    sent: int = 0
    retries: int = 0
    rate_limited: int = 0
    #: Retries after a failure that may have reached the model (possibly billed again).
    maybe_billed_retries: int = 0


#: A gateway with no server behind it answers these; many in a row with no success
#: between say the server is down, not that the request is wrong.
_GATEWAY_DOWN = frozenset({502, 503, 504})


def _gateway_down(failure: RequestFailure) -> bool:
    return isinstance(failure, ServerError) and failure.status in _GATEWAY_DOWN


class Dispatcher:
    def __init__(
        self,
        transport: Transport,
        endpoint: Endpoint,
        limiter: Limiter,
        policy: RetryPolicy,
        check: Callable[[Answer], Answer],
        *,
        recorder: Recorder | None = None,
        stop: Stop | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._transport = transport
        self._endpoint = endpoint
        self._limiter = limiter
        self._policy = policy
        self._check = check
        #: Told of a row before its first attempt, once the limiter lets it go, and of a
        #: recorded row that the run stopped (a halt, Ctrl-C) before it could be billed.
        self._recorder = recorder
        #: The run's stop, shared with the other stages; the dispatcher may ask for it.
        self.run_stop = stop if stop is not None else Stop()
        #: Requests sent and not answered yet: what a drain that times out abandons.
        self.in_flight = 0
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._same_error: tuple[str, int] = ("", 0)
        #: Faults that will not clear (an unreachable server, a 429 storm) stop the run.
        self.faults = FaultWatch(clock)
        self.stats = DispatchStats()

    @property
    def stopped(self) -> bool:
        return self.run_stop.stopped

    @property
    def stop_reason(self) -> PipelineError | None:
        """Why the run stopped early, if it did."""
        return self.run_stop.reason

    def stop(self, reason: PipelineError) -> None:
        """Stop taking rows. The first reason wins: it is the one the user must act on."""
        self.run_stop.ask(reason)

    async def send(self, work: Work, *, follow_up: bool = False) -> Outcome | None:
        """All attempts for one request. None when the run stopped before it was done.

        `follow_up`: a later request of a row already recorded and billed (the tool
        loop's next round): not recorded again, and never forgotten.
        """
        sends = tries = 0  # tries: the sends that count against max_attempts
        recorded = billed = follow_up  # billed: an attempt may have reached the model
        while True:
            estimated = sum(work.weights)  # the prompt's share of work.tokens
            output = work.tokens - estimated
            charged = await self._limiter.acquire(work.tokens, estimated, output)
            if self.stopped:
                self._limiter.returned(charged)
                await self._forget(work, recorded and not billed)
                return None
            if not recorded and self._recorder is not None:
                # Recorded once the limiter lets it go, not before: a row still waiting
                # for its turn at a halt or Ctrl-C never left, and is not "in flight".
                await self._recorder.sending(work)
                recorded = True
            sends += 1
            outcome = await self._attempt(work, sends, charged)
            failure = outcome.failure
            billed = billed or failure is None or failure.maybe_billed
            if failure is None:
                self._same_error = ("", 0)
                self.faults.succeeded()
                self._limiter.recovered()
                answers = outcome.answers or []
                counted = sum(a.usage.prompt_tokens for a in answers)
                self._limiter.calibrate(estimated, counted)
                actual = counted + sum(a.usage.completion_tokens for a in answers)
                await self._limiter.settle(charged, actual)
                return outcome
            if isinstance(failure, Fatal):
                self.stop(Halted(failure.message))
                await self._forget(work, recorded and not billed)
                return None
            if self.stopped and failure.should_retry:
                await self._forget(work, recorded and not billed)
                return None  # it would have been tried again: it stays pending
            if isinstance(failure, RateLimited) and sends - tries <= MAX_RATE_LIMITED:
                # The server said when to come back and billed nothing: every worker
                # waits (in acquire), and the wait does not use up the row's attempts;
                # the wait grows while nothing is answered, and a storm halts the run.
                self.stats.rate_limited += 1
                self._limiter.refused()
                wait, halt = self.faults.rate_limited(
                    failure.retry_after, base_s=self._policy.backoff_s
                )
                if halt is not None:
                    self.stop(halt)
                    await self._forget(work, recorded and not billed)
                    return None
                self._limiter.pause(wait)
            else:
                if isinstance(failure, ServerError) and failure.slow_down:
                    self._limiter.slow_down()
                tries += 1
                last = not failure.should_retry or tries >= self._policy.max_attempts
                if failure.outage or _gateway_down(failure):
                    halt = self.faults.outage(failure, gave_up=last)
                    if halt is not None:
                        self.stop(halt)
                        await self._forget(work, recorded and not billed)
                        return None  # the server is down, not the row: it stays pending
                if last:
                    self._watch_repeats(failure)
                    return outcome
                await self._sleep(self._policy.delay(tries, failure, self._rng))
            self.stats.retries += 1
            self.stats.maybe_billed_retries += failure.maybe_billed

    async def _forget(self, work: Work, unbilled: bool) -> None:
        """A row recorded as sent that the run stops: unbilled, it is not in flight."""
        if unbilled and self._recorder is not None:
            await self._recorder.not_sent(work)

    async def _attempt(self, work: Work, attempt: int, charged: int) -> Outcome:
        """One send of a request the limiter let go, charged `charged`."""
        started = time.perf_counter()
        self.stats.sent += 1
        response: HttpResponse | None = None
        self.in_flight += 1
        try:
            response = await self._transport.send(work.request)
            self._limiter.observe(response.headers, work.tokens, charged)
            failure = classify(response, self._endpoint, request_tokens=work.tokens)
            answers = self._read(response, work) if failure is None else None
        except RequestFailure as exc:
            failure, answers = exc, None
        finally:
            self.in_flight -= 1
            self._limiter.returned(charged)
        latency = (time.perf_counter() - started) * 1000.0
        status = response.status if response is not None else None
        return Outcome(work, answers, failure, attempt, status, latency)

    def _read(self, response: HttpResponse, work: Work) -> list[Answer]:
        try:
            data = orjson.loads(response.body)
            answers = self._endpoint.answers(data, response.headers, work.weights)
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
            raise ReadFailed(
                f"HTTP {response.status} with a body that does not parse: {exc}"
            ) from None
        checked = []
        for answer in answers:
            try:
                checked.append(self._check(answer))
            except ResponseInvalid as exc:
                exc.answer = answer
                raise
        return checked

    def _watch_repeats(self, failure: RequestFailure) -> None:
        """Halt when rows keep failing for good in the same way: it is the job.

        Counts every row's final failure, retried or not: a server that answers a
        request it cannot take with the same 500 on every row (llama.cpp does, for a
        response_format it lacks) is as much a job problem as a repeated 400. A
        failure about a row's own content (a content filter's refusal) says nothing
        about the job: it neither counts nor breaks a run of others.
        """
        if not failure.job_signal:
            return
        if failure.status is None:
            self._same_error = ("", 0)
            return
        signature = f"{failure.status}:{failure.message[:200]}"
        count = self._same_error[1] + 1 if self._same_error[0] == signature else 1
        self._same_error = (signature, count)
        if count >= SAME_ERROR_HALT:
            self.stop(
                Halted(
                    f"the last {count} rows all failed with the same error ({failure.message}); "
                    "the request itself is wrong, not the rows: check the job's request "
                    "parameters and model, then run again (done rows are kept)"
                )
            )
