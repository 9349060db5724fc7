"""The journal's writer on its own: group commits in virtual time, rows recorded as sent
before they leave, committed results told after their transaction, WAL folds."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from pipeline.errors import ServerError
from pipeline.journal import Journal
from pipeline.journal.writer import (
    COMMIT_ROWS,
    COMMIT_SPACING_S,
    FOLD_COMMITS,
    Writer,
    sending_records,
)
from pipeline.records import UNSENT, Outcome, RowResult, Work

FINGERPRINT = {"job": "test"}


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    opened = Journal.open(tmp_path / "j.sqlite", FINGERPRINT, fresh=False, job="test")
    yield opened
    opened.close()


def ok(row: int, cost: float = 0.001) -> RowResult:
    return RowResult(row, row + 1000, "ok", attempts=1, response=f"answer {row}", cost_usd=cost)


def failed(outcome: Outcome) -> list[RowResult]:
    """A stand-in for parse + cost: every row of the outcome, failed."""
    return [RowResult(row, None, "failed", error="boom", attempts=1) for row in outcome.work.rows]


class VirtualTime:
    """A clock that moves only when the writer sleeps; every sleep is recorded."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def run(
    journal: Journal,
    body: Callable[[Writer], Awaitable[None]],
    *,
    time: VirtualTime | None = None,
    committed: Callable[[list[RowResult]], None] = lambda _: None,
) -> Writer:
    """Run a writer while `body` feeds it, then close it and wait for the last commit."""
    vt = time or VirtualTime()
    writer = Writer(journal, collect=failed, committed=committed, clock=vt.clock, sleep=vt.sleep)

    async def main() -> None:
        task = asyncio.create_task(writer.run())
        await body(writer)
        await writer.close()
        await task

    asyncio.run(main())
    return writer


def test_entries_that_arrive_together_are_one_transaction(tmp_path: Path, journal: Journal) -> None:
    told: list[list[RowResult]] = []

    async def body(writer: Writer) -> None:
        for row in range(300):
            await writer.put(ok(row))

    writer = run(journal, body, committed=told.append)
    assert writer.commits == 1
    assert journal.count() == 300
    assert sum(len(t) for t in told) == 300
    assert journal.totals().cost_usd == pytest.approx(0.3)


def test_a_transaction_holds_at_most_commit_rows(tmp_path: Path, journal: Journal) -> None:
    rows = COMMIT_ROWS * 2 + 5

    async def body(writer: Writer) -> None:
        for row in range(rows):
            await writer.put(ok(row))

    writer = run(journal, body)
    assert journal.count() == rows
    # The queue holds COMMIT_ROWS at most, so the feeder waits for commits: at least
    # three transactions, each within the bound.
    assert writer.commits >= 3


def test_commits_are_spaced_by_commit_spacing_when_entries_come_fast(
    tmp_path: Path, journal: Journal
) -> None:
    vt = VirtualTime()

    async def body(writer: Writer) -> None:
        await writer.put(ok(0))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the first commit is made, at 100.0
        vt.now += COMMIT_SPACING_S / 4  # the next entry comes a quarter of the spacing later
        await writer.put(ok(1))
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    writer = run(journal, body, time=vt)
    # The first commit waits for nothing; the second waits out the rest of the spacing.
    assert vt.sleeps[0] == 0.0
    assert vt.sleeps[1] == pytest.approx(COMMIT_SPACING_S * 3 / 4)
    assert writer.commits == 2
    assert journal.count() == 2


def test_sending_returns_once_the_record_is_durable(tmp_path: Path, journal: Journal) -> None:
    seen: list[tuple[int, int]] = []
    work = Work((7,), UNSENT, 900, (1234,), (400,))

    async def body(writer: Writer) -> None:
        await writer.sending(work)
        # Another connection (a reader, as `pipeline status` is) sees it already.
        reader = Journal.read(tmp_path / "j.sqlite", job="test")
        try:
            flight = reader.in_flight()
            seen.append((flight.rows, flight.tokens))
        finally:
            reader.close()

    run(journal, body)
    assert seen == [(1, 900)]


def test_not_sent_forgets_the_sending_record(tmp_path: Path, journal: Journal) -> None:
    work = Work((3,), UNSENT, 500)

    async def body(writer: Writer) -> None:
        await writer.sending(work)
        await writer.not_sent(work)

    run(journal, body)
    assert journal.in_flight().rows == 0
    assert journal.count() == 0


def test_an_outcome_is_collected_at_commit_and_ends_its_flight(
    tmp_path: Path, journal: Journal
) -> None:
    work = Work((4, 5), UNSENT, 100, (1, 2), (10, 20))
    outcome = Outcome(work, None, ServerError("HTTP 500: boom"), attempts=1)

    async def body(writer: Writer) -> None:
        await writer.sending(work)
        await writer.put(outcome)

    run(journal, body)
    assert journal.in_flight().rows == 0
    assert journal.totals().failed == 2
    assert journal.done_rows(0, 10) == {4, 5}


def test_committed_hears_of_results_only_once_they_are_in_the_file(
    tmp_path: Path, journal: Journal
) -> None:
    in_file: list[int] = []

    def committed(results: list[RowResult]) -> None:
        if results:
            reader = Journal.read(tmp_path / "j.sqlite", job="test")
            try:
                in_file.append(reader.count())
            finally:
                reader.close()

    async def body(writer: Writer) -> None:
        for row in range(10):
            await writer.put(ok(row))
            await asyncio.sleep(0)

    run(journal, body, committed=committed)
    assert in_file
    assert in_file[-1] == 10
    assert in_file == sorted(in_file)


class FoldCounting(Journal):
    """The journal as it is, counting its WAL folds."""

    folds = 0

    def fold_wal(self) -> None:
        type(self).folds += 1
        super().fold_wal()


def test_the_wal_is_folded_in_every_fold_commits_commits(tmp_path: Path) -> None:
    journal = FoldCounting.open(tmp_path / "j.sqlite", FINGERPRINT, fresh=False, job="test")
    FoldCounting.folds = 0

    async def body(writer: Writer) -> None:
        for row in range(FOLD_COMMITS * 2 + 1):
            await writer.put(ok(row))
            for _ in range(3):  # let each entry be its own commit
                await asyncio.sleep(0)

    writer = run(journal, body)
    assert writer.commits == FOLD_COMMITS * 2 + 1
    assert FoldCounting.folds == 2
    journal.close()


def test_a_batched_requests_tokens_are_shared_by_its_rows() -> None:
    # Three rows' prompts (10, 20, 30 tokens) and 30 tokens of output between them.
    work = Work((1, 2, 3), UNSENT, 90, (11, 12, 13), (10, 20, 30))
    assert sending_records(work) == [(1, 11, 20), (2, 12, 30), (3, 13, 40)]
    assert sending_records(Work((9,), UNSENT, 77, (5,), (50,))) == [(9, 5, 77)]


def test_an_estimated_prompt_is_recorded_at_its_bound() -> None:
    # 50 prompt tokens estimated (bytes/4) and 27 of output: at most 4 x 50 + 27.
    assert sending_records(Work((9,), UNSENT, 77, (5,), (50,)), prompt_bound=4) == [(9, 5, 227)]
    work = Work((1, 2), UNSENT, 100, (11, 12), (20, 30))
    assert sending_records(work, prompt_bound=4) == [(1, 11, 105), (2, 12, 145)]
