"""The journal: the run's checkpoint, and its one writer.

    journal = Journal.open(Path("out/x.journal.sqlite"), fingerprint, fresh=False)
    writer = Writer(journal, collect=to_results, committed=tally)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(writer.run(tg))   # group commits until writer.close()
        await writer.sending(work)       # durable before the request goes out

`store.py` is the SQLite checkpoint and its durability contract; `files.py` checks a
file before SQLite reads it (the lock, truncation, a lost -wal, --fresh's backup);
`writer.py` is the one task that commits, in groups.
"""

from pipeline.journal.store import (
    FORMAT,
    FORMAT_VERSION,
    RESULTS_SCHEMA,
    SENDING,
    InFlight,
    Journal,
    Totals,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "RESULTS_SCHEMA",
    "SENDING",
    "InFlight",
    "Journal",
    "Totals",
]
