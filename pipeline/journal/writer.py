"""The journal's one writer: group commits, and a row's "sending" record before it leaves.

    writer = Writer(journal, collect=results_of, committed=tally)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(writer.run())
        await writer.sending(work)     # returns once the row is durably "sending"
        await writer.put(outcome)      # committed with the next group
        await writer.close()           # commits what is left; run() then returns

Every commit appends whole pages to the WAL, so a commit per request would cost more
than the request. At a trickle a commit goes at once; when entries come fast, at most
one per COMMIT_SPACING_S, taking all that has arrived (COMMIT_ROWS at most). Every
FOLD_COMMITS commits the WAL is folded into the database file in a thread (it fsyncs).

A result is committed before it counts as done: `committed` hears of rows only after
their transaction, so progress, the budget and the summary never run ahead of the file.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pipeline.journal.store import Journal
from pipeline.records import Outcome, RowResult, Work

#: Entries committed in one transaction at most; a commit takes whatever is waiting.
COMMIT_ROWS = 2_000
#: The shortest time between two commits when entries come fast: requests wait at
#: most this long to be recorded as sent. Far below any API's latency.
COMMIT_SPACING_S = 0.002
#: Commits between two folds of the WAL into the database (in a thread: they fsync).
FOLD_COMMITS = 500


@dataclass(slots=True)
class Sending:
    """A row about to be sent; `recorded` resolves once that is durable."""

    work: Work
    recorded: asyncio.Future[None]


@dataclass(slots=True)
class NotSent:
    """A row recorded as sending that the run stopped before it could be billed."""

    work: Work


Entry = Outcome | RowResult | Sending | NotSent | None


class Writer:
    """The one task that writes to the journal; everything else queues entries for it.

    `collect` turns an outcome into its rows' results (priced, redacted, shared with
    the rows waiting for the same answer) at commit time; `committed` is told of the
    results of each transaction once it is durable.
    """

    def __init__(
        self,
        journal: Journal,
        *,
        collect: Callable[[Outcome], list[RowResult]],
        committed: Callable[[list[RowResult]], None] = lambda _: None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        prompt_bound: int = 1,
    ) -> None:
        self._journal = journal
        #: How far over its estimate a prompt may count (`sending_records`).
        self._prompt_bound = prompt_bound
        self._collect = collect
        self._committed = committed
        self._clock = clock
        self._sleep = sleep
        self._queue: asyncio.Queue[Entry] = asyncio.Queue(maxsize=COMMIT_ROWS)
        #: Transactions so far.
        self.commits = 0

    async def put(self, entry: Outcome | RowResult) -> None:
        """Queue a row's outcome (from a worker) or result (rejected or shared)."""
        await self._queue.put(entry)

    async def sending(self, work: Work) -> None:
        """Record `work`'s rows as sent; returns once that is durable."""
        recorded = asyncio.get_running_loop().create_future()
        await self._queue.put(Sending(work, recorded))
        await recorded

    async def not_sent(self, work: Work) -> None:
        """Forget that `work`'s rows were sent: the run stopped before they could be billed."""
        await self._queue.put(NotSent(work))

    async def close(self) -> None:
        """No more entries: `run` commits what is queued and returns."""
        await self._queue.put(None)

    async def run(self) -> None:
        """Commit whatever has arrived, in one transaction, until `close`."""
        last_commit = -COMMIT_SPACING_S
        folding: asyncio.Future[None] | None = None
        finished = False
        while not finished:
            entries = [await self._queue.get()]
            await self._sleep(max(last_commit + COMMIT_SPACING_S - self._clock(), 0.0))
            while not self._queue.empty() and len(entries) < COMMIT_ROWS:
                entries.append(self._queue.get_nowait())
            finished = entries[-1] is None
            waiting, results = self._commit(entries)
            if waiting is not None:
                last_commit = self._clock()
                if self.commits % FOLD_COMMITS == 0 and (folding is None or folding.done()):
                    folding = asyncio.ensure_future(asyncio.to_thread(self._journal.fold_wal))
            for future in waiting or ():
                future.set_result(None)
            self._committed(results)
        if folding is not None:
            await folding

    def _commit(
        self, entries: list[Entry]
    ) -> tuple[list[asyncio.Future[None]] | None, list[RowResult]]:
        """Write the entries in one transaction: the futures waiting for it (None when
        there was nothing to write) and the results it holds."""
        sending: list[tuple[int, int, int]] = []
        waiting: list[asyncio.Future[None]] = []
        results: list[RowResult] = []
        unsent: list[int] = []
        for entry in entries:
            if isinstance(entry, Sending):
                sending.extend(sending_records(entry.work, self._prompt_bound))
                waiting.append(entry.recorded)
            elif isinstance(entry, NotSent):
                unsent.extend(entry.work.rows)
            elif isinstance(entry, Outcome):
                results.extend(self._collect(entry))
            elif isinstance(entry, RowResult):
                results.append(entry)
        if not (sending or results or unsent):
            return None, results
        # In the loop, not a thread: a WAL append without fsync takes ~40 us, less than
        # the hop to a thread and back. The fsync is in fold_wal().
        self._journal.write(sending=sending, results=results, unsent=unsent)
        self.commits += 1
        return waiting, results


def sending_records(work: Work, prompt_bound: int = 1) -> list[tuple[int, int, int]]:
    """The journal's `sending` records of a request: (row, hash, tokens it may cost),
    its prompt's estimate taken `prompt_bound` times (an estimate, not a count, is at
    most that far under: bounds.ESTIMATE_BOUND), so that "at most" stays true."""
    if len(work.rows) == 1:
        extra = (prompt_bound - 1) * sum(work.weights)
        return [(work.rows[0], work.digests[0], work.tokens + extra)]
    out = (work.tokens - sum(work.weights)) // len(work.rows)
    return [
        (row, digest, weight * prompt_bound + out)
        for row, digest, weight in zip(work.rows, work.digests, work.weights, strict=True)
    ]
