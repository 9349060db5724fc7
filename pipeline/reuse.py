"""Answers reused when the input changes: a row that asks what a row of an earlier input
asked gets that answer, as it was billed, before anything is sent.

    journal = Journal.open(path, fingerprint(plan), fresh=False, inputs=INPUT_PARTS)
    if journal.reusing:                      # the input changed since the last run
        reused = reuse(plan, journal)        # renders every row, gives each its answer
        notify(reused.note())                # "... 9,500 reuse earlier answers, 500 to send"

A request is known by its hash (`dedupe.request_digest`), the same one that dedupe
shares answers by within a run: the endpoint, the model, the parameters, the messages,
the schema and the tools, everything that is sent. A new export of the same table (a new
mtime, the same bytes), rows appended, reordered or deleted, a different file with the
same columns: each row whose request was answered `ok` before is not sent again. A
changed row asks something else, and is sent.

The pass renders every row once, in batches (memory stays flat), and writes each batch's
reused rows in one transaction; the run then sends only the rows still not done. Rows
that ask what another reused row asks share its answer during the run (cost 0), as
identical requests always do. A pass cut short (a crash) is run again at the next
start: the journal says so (`Journal.reusing`) until one ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.bounds import RowSizer
from pipeline.dedupe import request_digest
from pipeline.endpoints import Item
from pipeline.journal import Journal
from pipeline.plan import BATCH_ROWS, Plan, limited
from pipeline.progress import plural
from pipeline.records import ROW_INDEX


@dataclass(frozen=True)
class Reused:
    """What the pass found, over the rows this run covers (`--limit` applied)."""

    rows: int
    #: Rows that ask what an earlier input's row asked: not sent.
    reused: int
    #: Rows already done for this input (a run of it that was cut short).
    done: int

    @property
    def to_send(self) -> int:
        """The rest: sent (less those failing before sending, or sharing an answer)."""
        return self.rows - self.reused - self.done

    def note(self) -> str:
        done = f", {self.done:,} done already" if self.done else ""
        return (
            f"the input changed since the last run: of its {plural(self.rows, 'row')}, "
            f"{self.reused:,} ask what was answered before and reuse those answers{done}; "
            f"{self.to_send:,} to send"
        )


def reuse(plan: Plan, journal: Journal) -> Reused:
    """Give every row not done whose request was answered for an earlier input that
    answer; for a thread (it renders every row)."""
    sizer = RowSizer(plan.job, plan.endpoint, plan.renderer)
    failed_too = not plan.options.retry_failed
    rows = reused = done_count = 0
    for batch in limited(plan.source.batches(BATCH_ROWS), plan.options.limit):
        indices = batch.get_column(ROW_INDEX)
        done = journal.done_rows(
            int(indices.min()),  # type: ignore[arg-type]
            int(indices.max()),  # type: ignore[arg-type]
            failed_too=failed_too,
        )
        asked: list[tuple[int, int]] = []
        for row in batch.iter_rows(named=True):
            index = row[ROW_INDEX]
            rows += 1
            if index in done:
                done_count += 1
                continue
            sized = sizer.size(row)
            if isinstance(sized, Item):
                asked.append((index, request_digest(sized.key)))
        reused += journal.reuse(asked, share=plan.job.request.dedupe)
    journal.reused()
    return Reused(rows, reused, done_count)
