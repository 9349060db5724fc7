"""The online engine: a fixed pool of workers sends requests as they come, under the limits.

    engine = Online(plan, transport, build, writer=writer, stop=stop)
    await engine.run(requests.stream())   # returns when every request is answered
    engine.stats.sent, engine.abandon()   # what was sent; cancel what is still out

Workers pull `Work` from a bounded queue (a full queue is the feeder's backpressure:
memory holds a batch and a few requests per worker, never the whole input), send each
through the tool loop when the job runs tools, else straight through the dispatcher's
retry loop, and put one `Outcome` per row in the journal's writer. Once the run is
asked to stop, workers finish the attempt in hand, leave the rest unsent (pending, for
a later resume) and drain their queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from pipeline.dispatch import Dispatcher, DispatchStats, RetryPolicy
from pipeline.journal.writer import Writer
from pipeline.limits import WARMUP_RATIO, Limiter
from pipeline.plan import Plan
from pipeline.prepare import RequestBuilder
from pipeline.records import Outcome, Stop, Work
from pipeline.tool_loop import ToolLoop
from pipeline.transport import Transport


class Online:
    """One run's limiter, dispatcher and workers."""

    def __init__(
        self,
        plan: Plan,
        transport: Transport,
        build: RequestBuilder,
        *,
        writer: Writer,
        stop: Stop,
    ) -> None:
        job, endpoint = plan.job, plan.endpoint
        limits = job.limits
        start = WARMUP_RATIO if endpoint.count.exact else 1.0
        limiter = Limiter(rpm=limits.rpm, tpm=limits.tpm, prompt_ratio=start)
        policy = RetryPolicy(limits.max_attempts, limits.backoff_s, limits.backoff_max_s)
        self.dispatcher = Dispatcher(
            transport, endpoint, limiter, policy, plan.check, recorder=writer, stop=stop
        )
        self._send: Callable[[Work], Awaitable[Outcome | None]] = self.dispatcher.send
        if plan.tools is not None:
            rounds = job.request.max_tool_rounds
            loop = ToolLoop(self.dispatcher, plan.tools, endpoint, build, max_rounds=rounds)
            self._send = loop.send
        self._concurrency = limits.concurrency
        self._writer = writer
        self._stop = stop
        #: The feeder and the workers, once running: what abandon() cancels.
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def stats(self) -> DispatchStats:
        return self.dispatcher.stats

    async def run(self, works: AsyncIterator[Work]) -> None:
        """Send every request `works` yields, until it ends or the run stops."""
        inbox: asyncio.Queue[Work | None] = asyncio.Queue(maxsize=self._concurrency * 2)
        async with asyncio.TaskGroup() as tg:
            feeder = tg.create_task(self._feed(works, inbox))
            workers = [tg.create_task(self._work(inbox)) for _ in range(self._concurrency)]
            self._tasks = [feeder, *workers]
            # return_exceptions: tasks that abandon() cancelled end quietly, and the
            # writer still commits what arrived; one that failed fails the group.
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def abandon(self) -> int:
        """Stop sending at once (a drain that took too long); return how many requests
        were in flight. Those stay recorded as sending, so a resume says so and sends
        them again; the writer still commits every answer that arrived."""
        abandoned = self.dispatcher.in_flight
        for task in self._tasks:
            task.cancel()
        return abandoned

    async def _feed(self, works: AsyncIterator[Work], inbox: asyncio.Queue[Work | None]) -> None:
        async for work in works:
            await inbox.put(work)
        for _ in range(self._concurrency):
            await inbox.put(None)

    async def _work(self, inbox: asyncio.Queue[Work | None]) -> None:
        """Serve `inbox` until its `None`; one Outcome per row sent, none for rows left."""
        while (work := await inbox.get()) is not None:
            if self._stop.stopped:
                continue  # drain: the row stays pending in the journal
            outcome = await self._send(work)
            if outcome is not None:
                await self._writer.put(outcome)
