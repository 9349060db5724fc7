"""Dedupe on its own: which row leads an identical request, who waits for it, what is
shared and at what price, and what the journal answers from an earlier run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.dedupe import RECENT_ANSWERS, Dedupe, request_digest
from pipeline.journal import Journal
from pipeline.records import UNSENT, RowResult, Work


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    opened = Journal.open(tmp_path / "j.sqlite", {"job": "test"}, fresh=False, job="test")
    yield opened
    opened.close()


def work(row: int, body: bytes) -> Work:
    return Work((row,), UNSENT, 100, (request_digest(body),), (90,))


def answer(w: Work, status: str = "ok") -> RowResult:
    return RowResult(
        w.rows[0],
        w.digests[0],
        status,
        attempts=2,
        response="the answer" if status == "ok" else None,
        cost_usd=0.25,
        latency_ms=300.0,
        request_id="req_1",
    )


def test_the_same_body_has_the_same_digest_and_another_body_another() -> None:
    assert request_digest(b'{"a": 1}') == request_digest(b'{"a": 1}')
    assert request_digest(b'{"a": 1}') != request_digest(b'{"a": 2}')
    assert -(2**63) <= request_digest(b"x") < 2**63  # fits SQLite's INTEGER


def test_the_first_row_leads_and_identical_rows_wait_then_share_its_answer(
    journal: Journal,
) -> None:
    dedupe = Dedupe(journal.answered)
    lead, twin, other = work(0, b"same"), work(1, b"same"), work(2, b"other")
    assert dedupe.claim(lead) is True
    assert dedupe.claim(twin) is False  # waits for the request in flight
    assert dedupe.claim(other) is True
    results = dedupe.settle([answer(lead)])
    assert [r.row for r in results] == [0, 1]
    copy = results[1]
    # Shared, not sent: not billed again, no attempts, no latency of its own.
    assert (copy.attempts, copy.cost_usd, copy.latency_ms) == (0, 0.0, None)
    assert copy.response == "the answer"
    assert copy.request_hash == lead.digests[0]


def test_a_row_after_the_answer_takes_it_at_once_from_the_recent_answers(
    journal: Journal,
) -> None:
    dedupe = Dedupe(journal.answered)
    lead = work(0, b"same")
    assert dedupe.claim(lead) is True
    dedupe.settle([answer(lead)])
    later = dedupe.claim(work(5, b"same"))
    assert isinstance(later, RowResult)
    assert (later.row, later.attempts, later.cost_usd) == (5, 0, 0.0)


def test_a_failed_answer_goes_to_the_rows_that_waited_but_is_not_kept(journal: Journal) -> None:
    dedupe = Dedupe(journal.answered)
    lead, twin = work(0, b"same"), work(1, b"same")
    dedupe.claim(lead)
    dedupe.claim(twin)
    results = dedupe.settle([answer(lead, "failed")])
    assert [(r.row, r.status) for r in results] == [(0, "failed"), (1, "failed")]
    # A later identical row is sent again: a failure is not an answer to share.
    assert dedupe.claim(work(2, b"same")) is True


def test_recent_answers_keep_the_newest_only(journal: Journal) -> None:
    dedupe = Dedupe(journal.answered)
    first = work(0, b"body 0")
    dedupe.claim(first)
    dedupe.settle([answer(first)])
    for i in range(1, RECENT_ANSWERS + 1):
        w = work(i, f"body {i}".encode())
        dedupe.claim(w)
        dedupe.settle([answer(w)])
    # The oldest answer fell out (the journal answers for it once committed).
    assert dedupe.claim(work(99_999, b"body 0")) is True
    assert isinstance(dedupe.claim(work(99_998, f"body {RECENT_ANSWERS}".encode())), RowResult)


def test_the_journal_answers_what_an_earlier_run_was_answered(journal: Journal) -> None:
    sent = work(0, b"asked before")
    journal.write(results=[answer(sent)])
    dedupe = Dedupe(journal.answered)
    again, new = work(7, b"asked before"), work(8, b"never asked")
    to_send, ready = dedupe.known([again, new])
    assert to_send == [new]
    assert [(r.row, r.attempts, r.cost_usd, r.response) for r in ready] == [
        (7, 0, 0.0, "the answer")
    ]


def test_the_journal_does_not_answer_with_a_shared_copy_or_a_failure(journal: Journal) -> None:
    a, b = work(0, b"failed before"), work(1, b"shared before")
    copy = RowResult(1, b.digests[0], "ok", attempts=0, response="copied")
    journal.write(results=[answer(a, "failed"), copy])
    to_send, ready = Dedupe(journal.answered).known(
        [work(2, b"failed before"), work(3, b"shared before")]
    )
    assert [w.rows for w in to_send] == [(2,), (3,)]
    assert ready == []
