"""Dedupe: identical requests are sent once, and their answer serves every row that asked.

    dedupe = Dedupe(journal.answered)
    works, ready = dedupe.known(works)      # answered by an earlier run: not sent again
    dedupe.claim(work)                      # True: send it; False: it waits; or a result
    results = dedupe.settle(results)        # an answer, and a copy for each row that waited

A request is known by the hash of its body (`request_digest`). Three places can answer
one: the journal (an earlier run, or a commit of this one), the answers this run got
lately (RECENT_ANSWERS, which closes the gap while a commit is on its way), and a request
with the same hash still in flight, whose rows wait for it. A shared answer was not sent
for its row, so it is not billed again: attempts 0, cost 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable

from pipeline.records import RowResult, Work

#: Answers kept in memory to share with identical requests that come later. The
#: journal answers for older ones; this closes the gap while a commit is on its way.
RECENT_ANSWERS = 10_000


def request_digest(body: bytes) -> int:
    """64 bits of the body's sha256: a collision is a 1 in 10^19 chance per pair."""
    return int.from_bytes(hashlib.sha256(body).digest()[:8], "big", signed=True)


def shared(result: RowResult, row: int) -> RowResult:
    """An identical request's answer for another row: not sent, so not billed again."""
    return dataclasses.replace(result, row=row, attempts=0, cost_usd=0.0, latency_ms=None)


class Dedupe:
    """The rows of one run that ask what another row asked. Used from the event loop,
    except `known`, which reads the journal (from the producer's thread)."""

    def __init__(self, answered: Callable[[Iterable[int]], dict[int, RowResult]]) -> None:
        #: The journal's lookup: an ok result for each hash that has one.
        self._answered = answered
        #: In-flight requests by hash -> the rows waiting for the same answer.
        self._leaders: dict[int, list[int]] = {}
        self._recent: OrderedDict[int, RowResult] = OrderedDict()

    def known(self, works: list[Work]) -> tuple[list[Work], list[RowResult]]:
        """The one-row requests still to send, and results for those the journal answers."""
        if not works:
            return works, []
        answered = self._answered(w.digests[0] for w in works)
        ready = [
            shared(answered[w.digests[0]], w.rows[0]) for w in works if w.digests[0] in answered
        ]
        return [w for w in works if w.digests[0] not in answered], ready

    def claim(self, work: Work) -> bool | RowResult:
        """True if `work` must be sent (it leads its hash); False if an identical request
        is in flight, whose answer will serve it too; or the answer it shares now."""
        digest, row = work.digests[0], work.rows[0]
        followers = self._leaders.get(digest)
        if followers is not None:
            followers.append(row)
            return False
        recent = self._recent.get(digest)
        if recent is not None:
            return shared(recent, row)
        self._leaders[digest] = []
        return True

    def settle(self, results: Iterable[RowResult]) -> list[RowResult]:
        """The results of requests sent, each followed by a copy for each row that waited
        for it (a failure too: those rows asked the same thing)."""
        everyone: list[RowResult] = []
        for result in results:
            digest = result.request_hash or 0
            followers = self._leaders.pop(digest, [])
            if result.status == "ok" and digest:
                self._recent[digest] = result
                if len(self._recent) > RECENT_ANSWERS:
                    self._recent.popitem(last=False)
            everyone.append(result)
            everyone.extend(shared(result, row) for row in followers)
        return everyone
