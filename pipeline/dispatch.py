"""A fixed pool of workers sends requests under the limits and retries what deserves it.

    dispatcher = Dispatcher(transport, endpoint, limiter, RetryPolicy(max_attempts=6), check)
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(dispatcher.worker(inbox, outbox))

Workers pull `Work` from a bounded queue (a full queue is the producer's backpressure)
and push one `Outcome` per row. A failed row is an Outcome, not an exception. A failure
of the run (auth, quota, a stop asked for) sets `stopped`: workers finish the attempt in
hand, leave the rest unsent (pending, for a later resume) and drain their queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

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
from pipeline.records import Answer, HttpRequest, HttpResponse, Outcome, Usage, Work
from pipeline.transport import Transport, classify

#: When this many rows in a row fail with the same client error, the job is wrong, not
#: the rows: halt rather than fail (and perhaps pay for) every row the same way.
SAME_ERROR_HALT = 25
#: 429s a row may meet (each followed by the server's wait) before it counts them as
#: attempts: generous, since they cost nothing, but bounded.
MAX_RATE_LIMITED = 50


def rejected(row: int, failure: RequestFailure, digest: int = 0) -> Outcome:
    """The outcome of a row that failed before any request was sent."""
    work = Work((row,), _NOT_SENT, 0, (digest,))
    return Outcome(work, None, failure, attempts=0)


_NOT_SENT = HttpRequest("POST", "", {}, b"")


class ToolLoop(Protocol):
    """Runs a tool-calling answer's calls and builds the request that sends the results."""

    max_rounds: int

    def next_work(self, work: Work, answer: Answer) -> tuple[Work, list[dict[str, Any]]]:
        """The next request, and the calls made with their results."""
        ...


def _with_usage(answer: Answer, earlier: Usage) -> Answer:
    """The answer with the usage of the tool loop's earlier rounds added: all was billed."""
    total = {
        f.name: getattr(answer.usage, f.name) + getattr(earlier, f.name)
        for f in dataclasses.fields(Usage)
    }
    return dataclasses.replace(answer, usage=Usage(**total))


class Sink(Protocol):
    """Where workers put outcomes: any queue that takes them."""

    async def put(self, item: Outcome, /) -> None: ...


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
        tools: ToolLoop | None = None,
        before_send: Callable[[Work], Awaitable[None]] | None = None,
        not_sent: Callable[[Work], Awaitable[None]] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._transport = transport
        self._endpoint = endpoint
        self._limiter = limiter
        self._policy = policy
        self._check = check
        self._tools = tools
        #: Awaited before a row's first attempt, once the limiter lets it go: the
        #: journal records it as sent.
        self._before_send = before_send
        #: Awaited for a recorded row that the run stopped (a halt, Ctrl-C) before any
        #: attempt could have been billed: the journal forgets that it was sent.
        self._not_sent = not_sent
        #: Requests sent and not answered yet: what a drain that times out abandons.
        self.in_flight = 0
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._same_error: tuple[str, int] = ("", 0)
        #: Faults that will not clear (an unreachable server, a 429 storm) stop the run.
        self.faults = FaultWatch(clock)
        self.stats = DispatchStats()
        #: Why the run stopped early, if it did.
        self.stop_reason: PipelineError | None = None

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def stop(self, reason: PipelineError) -> None:
        """Stop taking rows. The first reason wins: it is the one the user must act on."""
        if self.stop_reason is None:
            self.stop_reason = reason

    async def worker(self, inbox: asyncio.Queue[Work | None], outbox: Sink) -> None:
        """Serve `inbox` until its `None`; one Outcome per row sent, none for rows left."""
        while (work := await inbox.get()) is not None:
            if self.stopped:
                continue  # drain: the row stays pending in the journal
            outcome = await self.send(work)
            if outcome is not None:
                await outbox.put(outcome)

    async def send(self, work: Work) -> Outcome | None:
        """All attempts for one request. None when the run stopped before it was done."""
        sends = tries = rounds = 0  # tries: the sends that count against max_attempts
        recorded = billed = False  # billed: an attempt may have reached the model
        spent = Usage()  # by earlier rounds of a tool loop
        made: list[dict[str, Any]] = []  # the calls those rounds ran, with their results
        while True:
            estimated = sum(work.weights)  # the prompt's share of work.tokens
            output = work.tokens - estimated
            charged = await self._limiter.acquire(work.tokens, estimated, output)
            if self.stopped:
                await self._forget(work, recorded and not billed)
                return None
            if not recorded and self._before_send is not None:
                # Recorded once the limiter lets it go, not before: a row still waiting
                # for its turn at a halt or Ctrl-C never left, and is not "in flight".
                await self._before_send(work)
                recorded = True
            sends += 1
            outcome = await self._attempt(work, sends)
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
                if self._tools is None:
                    return outcome
                answer = _with_usage(answers[0], spent)
                outcome.answers = [answer]
                if not answer.extra.get("tool_calls"):
                    if made:  # the final answer: the calls that led to it go with it
                        extra = {**answer.extra, "tool_calls": made}
                        outcome.answers = [dataclasses.replace(answer, extra=extra)]
                    return outcome
                if rounds >= self._tools.max_rounds:
                    outcome.failure = ResponseInvalid(
                        f"the model still called tools after {rounds} rounds "
                        "(max_tool_rounds): no final answer"
                    )
                    return outcome
                rounds += 1
                spent = answer.usage
                work, ran = await asyncio.to_thread(self._tools.next_work, work, answer)
                made.extend(ran)
                continue
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
                    halt = self.faults.outage(failure, gave_up=last, early=failure.outage)
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
        if unbilled and self._not_sent is not None:
            await self._not_sent(work)

    async def _attempt(self, work: Work, attempt: int) -> Outcome:
        started = time.perf_counter()
        self.stats.sent += 1
        response: HttpResponse | None = None
        self.in_flight += 1
        try:
            response = await self._transport.send(work.request)
            self._limiter.observe(response.headers, work.tokens)
            failure = classify(response, self._endpoint, request_tokens=work.tokens)
            answers = self._read(response, work) if failure is None else None
        except RequestFailure as exc:
            failure, answers = exc, None
        finally:
            self.in_flight -= 1
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
