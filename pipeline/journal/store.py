"""The checkpoint: every row's result in SQLite, committed before it counts as done.

    journal = Journal.open(Path("out/x.journal.sqlite"), fingerprint, fresh=False)
    journal.write(sending=[(row, digest, tokens)], results=[result])  # one group commit
    journal.done_rows(0, 999)        # rows already answered, skipped on resume
    journal.results(0, 999)          # a polars frame of results, for the output
    journal.in_flight()              # rows recorded as sending with no answer: a crash's toll

A row is recorded with status "sending" before its request goes out, and that record
becomes its result in one upsert, so after a crash the rows that may have been sent
(and billed) without an answer on record are known exactly.

WAL mode with synchronous=NORMAL: a commit survives the process being killed at any
instant; only power loss can take the last transactions, and it never corrupts the
file. One writer (an OS lock that dies with its process), many readers.

A checkpoint is trusted only when it is sound: a file that is empty, not SQLite,
truncated, another program's database, another job's or a newer format's checkpoint,
or one whose `-wal` was lost after a crash is refused with a CheckpointError (exit 2),
never read as if it were empty (which would send, and bill, every row again).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import IO, Any, Concatenate, ParamSpec, TypeVar

import orjson
import polars as pl

from pipeline import __version__
from pipeline.errors import CheckpointError, JobError, OutputError, OutputRefused
from pipeline.journal.files import (
    check_file,
    check_tables,
    connect,
    discard,
    hold_lock,
    read_tally,
    tally_path,
    unreadable,
    wal_found,
)
from pipeline.parse import RESULT_SCHEMA
from pipeline.records import RowResult

#: Stored beside RESULT_SCHEMA's columns, written to the output only for some jobs.
_OPTIONAL = {"tool_calls": pl.String()}
#: What `results` returns: the row and the output's result columns.
_COLUMNS = ("row", *RESULT_SCHEMA, *_OPTIONAL)
#: The frame `results` returns: the row, then every result column with its type.
RESULTS_SCHEMA: dict[str, pl.DataType] = {"row": pl.Int64(), **RESULT_SCHEMA, **_OPTIONAL}
#: What is stored: RowResult's fields, in order.
_STORED = ("row", "request_hash", *RESULT_SCHEMA, *_OPTIONAL)
#: SQLite allows 999 parameters in one statement on old builds; stay well under.
_IN_CHUNK = 500


def _sql_type(dtype: pl.DataType) -> str:
    if dtype == pl.String():
        return "TEXT"
    return "REAL" if dtype == pl.Float64() else "INTEGER"


#: The status of a row recorded as sent whose answer is not in yet.
SENDING = "sending"

#: meta `format`: marks a SQLite file as a pipeline checkpoint.
FORMAT = "pipeline-journal"
#: meta `format_version`: raised when a change would make an older pipeline misread a
#: checkpoint. A checkpoint without one is from before it existed: read as version 1.
FORMAT_VERSION = 1
#: meta `commits`: the journal's write transactions so far, counted in each of them.
#: After each commit the count is also written to a side file, `<journal>.commits`: a
#: checkpoint that holds fewer commits than its side file says lost some (its `-wal`,
#: which holds every commit since the last checkpoint, went missing, or an older copy
#: came back), and resuming from it would send and bill their rows again. A flag for
#: "open" with a check for a missing `-wal` would not do: any SQLite tool that opens
#: the checkpoint after a crash folds the `-wal` in and deletes it, losing nothing.
_COMMITS = "commits"
_COUNT = f"INSERT OR REPLACE INTO meta VALUES ('{_COMMITS}', ?)"
#: meta `reusing`: "1" from the open that found a new input until a reuse pass ends.
_REUSING = "reusing"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    row INTEGER PRIMARY KEY,
    request_hash INTEGER,
    {", ".join(f"{name} {_sql_type(dtype)}" for name, dtype in RESULT_SCHEMA.items())},
    {", ".join(f"{name} {_sql_type(dtype)}" for name, dtype in _OPTIONAL.items())},
    -- estimated tokens of a request in flight: what it may have cost
    tokens INTEGER
);
-- Only answers that were sent are looked up by hash (to share them): a partial index
-- costs nothing for rows in flight or for shared copies (attempts = 0), and finds
-- one row per request however many rows share its answer.
CREATE INDEX IF NOT EXISTS sent_answers_by_hash ON results (request_hash)
    WHERE status = 'ok' AND attempts > 0;
-- Answers of an earlier input, by request: what a changed input reuses (`reuse`).
CREATE TABLE IF NOT EXISTS earlier (
    request_hash INTEGER PRIMARY KEY,
    {", ".join(f"{name} {_sql_type(dtype)}" for name, dtype in RESULT_SCHEMA.items())},
    {", ".join(f"{name} {_sql_type(dtype)}" for name, dtype in _OPTIONAL.items())}
);
"""
_SEND = (
    "INSERT OR REPLACE INTO results (row, request_hash, status, tokens) "
    f"VALUES (?, ?, '{SENDING}', ?)"
)
# One statement whether or not the row was recorded as sending (rows rejected before
# sending, and shared answers, were not).
_UPSERT = (
    f"INSERT INTO results ({', '.join(_STORED)}) VALUES ({', '.join('?' for _ in _STORED)}) "
    "ON CONFLICT (row) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in _STORED[1:])
)
#: The columns an earlier input's answer keeps: all but its row.
_ANSWER = _STORED[1:]
# A new input: every answer sent for the old one is kept by its request (one per
# request; a shared copy, attempts 0, was not sent), and the old rows' results go.
_KEEP = (
    f"INSERT OR IGNORE INTO earlier ({', '.join(_ANSWER)}) "
    f"SELECT {', '.join(_ANSWER)} FROM results "
    "WHERE status = 'ok' AND attempts > 0 AND request_hash IS NOT NULL"
)
#: Answers sent for this input (not shared copies, attempts 0), as the index has them.
_SENT_OK = "results WHERE status = 'ok' AND attempts > 0"
_FORGET_ROWS = f"DELETE FROM results WHERE status != '{SENDING}'"
# A row of the new input takes the answer its request got before, as it was billed;
# not a row recorded as sending (its note comes first), nor a second row asking the
# same (it shares the first's answer, at no cost, as dedupe does: _SHARE).
_REUSE = (
    f"INSERT OR IGNORE INTO results ({', '.join(_STORED)}) "
    f"SELECT ?, {', '.join(_ANSWER)} FROM earlier AS e WHERE e.request_hash = ? "
    "AND NOT EXISTS (SELECT 1 FROM results AS r WHERE r.request_hash = e.request_hash "
    "AND r.status = 'ok' AND r.attempts > 0)"
)
#: A shared copy's columns (`dedupe.shared`): not sent for its row, so not billed again.
_SHARED_AS = {"attempts": "0", "cost_usd": "0.0", "latency_ms": "NULL"}
# A second row asking what a reused row asks shares its answer, as dedupe would share it
# during the run; done here, the run need not render the row again.
_SHARE = (
    f"INSERT OR IGNORE INTO results ({', '.join(_STORED)}) "
    f"SELECT ?, {', '.join(_SHARED_AS.get(c, c) for c in _ANSWER)} FROM results "
    "WHERE request_hash = ? AND status = 'ok' AND attempts > 0 LIMIT 1"
)
# A row recorded as sending whose request never left (the run stopped first).
_UNSEND = f"DELETE FROM results WHERE row = ? AND status = '{SENDING}'"
_DONE = f"status != '{SENDING}'"
#: A RowResult as the tuple _UPSERT takes (dataclasses.astuple deep-copies: slow).
_stored = attrgetter(*_STORED)


@dataclass(frozen=True)
class Totals:
    ok: int
    failed: int
    cost_usd: float
    prompt_tokens: int
    completion_tokens: int
    #: Rows whose answer stopped at max_tokens.
    cut_off: int = 0
    #: Rows answered without `usage`: their cost is unknown (cost_usd null).
    without_usage: int = 0


@dataclass(frozen=True)
class InFlight:
    """Rows recorded as sent that have no result: sent again on resume."""

    rows: int
    #: Their estimated tokens (prompt + max output): the most they may have cost.
    tokens: int


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _reading(
    method: Callable[Concatenate[Journal, _P], _R],
) -> Callable[Concatenate[Journal, _P], _R]:
    """A read during the run that meets a damaged page (a file damaged in a way its
    header does not show) stops the run with a line, not a traceback."""

    def read(self: Journal, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            raise OutputError(
                f"cannot read the checkpoint {self.path} ({exc}); what was committed before "
                "is kept there: restore the file from a copy, or move it away to start over"
            ) from None

    read.__name__, read.__doc__ = method.__name__, method.__doc__
    return read


class Journal:
    def __init__(self, path: Path, connection: sqlite3.Connection, lock: IO[str] | None):
        self.path = path
        self._db = connection
        self._lock = lock
        # Reads come from the producer's thread while the writer commits: a connection
        # of their own, which in WAL mode sees every committed row and never blocks.
        self._reader = connect(path)
        self._folder = connect(path)
        # The writer never folds the WAL in on its own (that would fsync in the event
        # loop); the journal's Writer calls fold_wal() from a thread instead.
        connection.execute("PRAGMA wal_autocheckpoint=0")
        #: Write transactions so far (meta `commits`), and the side file told of them.
        self._commits = 0
        self._tally: int | None = None

    #: With --fresh: a line saying where the discarded checkpoint was kept, if it was.
    set_aside: str | None = None

    @classmethod
    def open(
        cls,
        path: Path,
        fingerprint: dict[str, str] | None,
        *,
        fresh: bool,
        job: str | None = None,
        inputs: frozenset[str] = frozenset(),
    ) -> Journal:
        """Open (or start) the journal for a run: take the lock, check that the file is
        a sound checkpoint of this job, check the fingerprint. `job`: the job's name;
        `inputs`: the fingerprint's parts that name the input, whose change alone is a
        new input (its rows start over, its requests' answers are kept to reuse).
        `fingerprint` None: an existing checkpoint opened to maintain it (`prune`),
        whatever the job looks like now."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputRefused(f"cannot create {path.parent}: {exc.strerror}") from None
        lock = hold_lock(path)
        db: sqlite3.Connection | None = None
        journal: Journal | None = None
        try:
            set_aside = discard(path) if fresh else None
            if not path.exists():  # deleted to start over: its count goes with it
                tally_path(path).unlink(missing_ok=True)
            check_file(path)
            wal = wal_found(path)
            db = connect(path)
            journal = cls(path, db, lock)
            # Every check reads only: a file that is refused is left as it was found
            # (a -wal put back later must still match it).
            tables = check_tables(path, db)
            if tables:
                journal._check_identity(job)
            journal._check_commits(wal, tables)
            db.executescript(_SCHEMA)
            _add_missing_columns(db)
            if fingerprint is not None:
                journal._check_fingerprint(fingerprint, inputs)
            elif not tables:
                raise JobError(f"no checkpoint at {path}: the job has not run yet")
            journal.set_aside = set_aside
            journal._claim(job)
            journal._open_tally()
        except BaseException as exc:
            _close_refused(journal, db)
            lock.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise unreadable(path, exc) from None
            raise
        return journal

    @classmethod
    def read(cls, path: Path, job: str | None = None) -> Journal:
        """Open an existing journal to read it, even while a run writes to it; `job`:
        the name of the job it must belong to."""
        if not path.exists():
            raise JobError(f"no checkpoint at {path}: the job has not run yet")
        check_file(path)
        wal = wal_found(path)
        db: sqlite3.Connection | None = None
        journal: Journal | None = None
        try:
            db = connect(path)
            tables = check_tables(path, db)
            journal = cls(path, db, lock=None)
            journal._check_commits(wal, tables)
            if not tables:
                raise CheckpointError(f"{path} holds no checkpoint yet (no tables)")
            journal._check_identity(job)
        except BaseException as exc:
            _close_refused(journal, db)
            if isinstance(exc, sqlite3.DatabaseError):
                raise unreadable(path, exc) from None
            raise
        return journal

    def _check_identity(self, job: str | None) -> None:
        """Refuse another program's, another job's or a newer pipeline's checkpoint."""
        fmt, version = self.meta("format"), self.meta("format_version")
        if fmt is not None and fmt != FORMAT:
            raise CheckpointError(
                f"{self.path} is not a pipeline checkpoint (its meta says format {fmt!r}); "
                "give this run its own --journal (or --output), or move that file away"
            )
        if version is not None and (not version.isdigit() or int(version) > FORMAT_VERSION):
            raise CheckpointError(
                f"the checkpoint {self.path} is in format {version!r}, written by a newer "
                f"pipeline ({self.meta('pipeline_version') or 'unknown version'}); this one "
                f"reads format {FORMAT_VERSION}: run it with that pipeline, or use --fresh "
                "(its answers are set aside in a backup file)"
            )
        stored = self.meta("job")
        if job is not None and stored is not None and stored != job and self.count() > 0:
            raise CheckpointError(
                f"the checkpoint {self.path} belongs to job `{stored}`, not `{job}`: give this "
                "job its own --output (or --journal), or rename the job file back to "
                f"{stored}.toml if it is the same job"
            )

    def _claim(self, job: str | None) -> None:
        """Mark the file as this job's checkpoint, in this pipeline's format."""
        mine = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
        self.set_meta(**mine, pipeline_version=__version__, **({"job": job} if job else {}))

    def _check_commits(self, wal_found: bool, tables: bool = True) -> None:
        """Refuse a checkpoint that holds fewer commits than were made to it;
        `wal_found`: whether its -wal was there before this process opened it;
        `tables`: whether the file holds a checkpoint's tables (without its -wal, a new
        checkpoint's main file may hold nothing yet)."""
        self._commits = int(self.meta(_COMMITS) or 0) if tables else 0
        tally = tally_path(self.path)
        told = read_tally(tally)
        if told is None or self._commits >= told:
            return
        wal = Path(f"{self.path}-wal")
        why = (
            f"its write-ahead log {wal.name}, which holds them, is missing"
            if not wal_found
            else f"it is an older copy, or {wal.name} is not its own"
        )
        raise CheckpointError(
            f"the checkpoint {self.path} holds {self._commits:,} of the {told:,} commits made "
            f"to it ({why}): put the {wal.name} it was written with back beside it (copy the "
            f"files together), or delete {tally} to resume from what it holds (the rows of "
            "the lost commits are sent, and billed, again)"
        )

    def _open_tally(self) -> None:
        tally = tally_path(self.path)
        try:
            self._tally = os.open(tally, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputRefused(f"cannot create {tally}: {exc.strerror}") from None
        self._tell()

    def _tell(self) -> None:
        """Tell the side file the count; fixed width, so it is rewritten in place."""
        if self._tally is not None:
            with contextlib.suppress(OSError):  # not told: the next check is laxer only
                os.pwrite(self._tally, f"{self._commits:020d}\n".encode(), 0)

    def _check_fingerprint(self, fingerprint: dict[str, str], inputs: frozenset[str]) -> None:
        """Refuse a checkpoint of another version of the job; a changed input (only
        the parts in `inputs` differ) starts a new input instead (`_new_input`)."""
        stored = self.meta("fingerprint")
        if stored is not None:
            previous: dict[str, str] = orjson.loads(stored)
            keys = sorted(fingerprint.keys() | previous.keys())
            # A part an older pipeline did not record cannot be compared: it is taken
            # as it is now (and recorded, so that the next resume compares it).
            changed = [k for k in keys if k in previous and fingerprint.get(k) != previous[k]]
            if "input" in changed and "input ctime" in changed:  # an edit moves both
                changed.remove("input ctime")
            if changed and all(k in inputs for k in changed):
                self._new_input()
                changed = []
            if changed and self.count() > 0:
                raise JobError(
                    f"the checkpoint {self.path} was written by a different version of this "
                    f"job ({', '.join(_describe(k) for k in changed)} changed since). Run with "
                    "--fresh to start over (its answers are set aside in a backup file), or "
                    "restore the job as it was to resume"
                )
        self.set_meta(fingerprint=orjson.dumps(fingerprint).decode())

    def _new_input(self) -> None:
        """The input changed: keep every answer sent by its request, forget the rows
        (positions that now hold other rows), and mark the new rows as still to be given
        their answers (`reusing`). Rows recorded as sending stay, to be reported as in
        flight and sent again if their row still asks."""

        def change(db: sqlite3.Connection) -> None:
            db.execute(_KEEP)
            db.execute(_FORGET_ROWS)
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, '1')", (_REUSING,))

        self._commit(change)

    def earlier_answers(self) -> int:
        """Answers kept from earlier inputs (`reuse` gives them to the rows that ask)."""
        if not self._has_earlier():
            return 0
        (n,) = self._reader.execute("SELECT count(*) FROM earlier").fetchone()
        return int(n)

    def prune(self) -> int:
        """Drop the answers kept from earlier inputs (the latest input's rows hold every
        one they reuse) and give their space back; return how many went."""
        if self.reusing:
            raise JobError(
                f"the checkpoint {self.path} has a new input whose rows have not all been "
                "given their earlier answers yet: run the job first, then prune"
            )
        dropped = self.earlier_answers()
        self._commit(lambda db: db.execute("DELETE FROM earlier"))
        try:
            self._db.execute("VACUUM")
        except sqlite3.Error as exc:
            raise OutputError(f"cannot compact the checkpoint {self.path}: {exc}") from None
        return dropped

    def same_input(self, fingerprint: dict[str, str], inputs: frozenset[str]) -> bool:
        """Whether the last run read the input `fingerprint` names (its `inputs` parts
        unchanged): then its rows are this input's rows, by position."""
        stored = self.meta("fingerprint")
        previous: dict[str, str] = orjson.loads(stored) if stored else {}
        return all(previous.get(k) == fingerprint.get(k) for k in inputs if k in previous)

    def known(self, digests: Sequence[int]) -> set[int]:
        """Which of these request hashes have an answer a run would reuse: sent `ok`
        for the last input, or kept from an earlier one (`pipeline estimate`)."""
        tables = [f"{_SENT_OK} AND"]
        if self._has_earlier():
            tables.append("earlier WHERE")
        return {
            digest
            for where in tables
            for (digest,) in self._in_chunks(
                f"SELECT request_hash FROM {where} request_hash IN ({{}})", digests
            )
        }

    def _has_earlier(self) -> bool:
        """A checkpoint from before inputs could change has no `earlier` table."""
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'earlier'"
        return self._reader.execute(query).fetchone() is not None

    @property
    def reusing(self) -> bool:
        """Whether the rows of a new input are still to be given their earlier answers
        (`reuse.reuse`): from the open that found the input changed until a pass ends."""
        return self.meta(_REUSING) == "1"

    def reuse(self, asked: Sequence[tuple[int, int]], *, share: bool = True) -> int:
        """Give each (row, request hash) the answer an earlier input's request got, as it
        was billed, in one transaction; return how many rows ask what was answered. A
        row asking what a row before it took shares it (attempts 0, cost 0), unless
        `share` is off (a job with dedupe off sends each identical request)."""
        query = "SELECT request_hash FROM earlier WHERE request_hash IN ({})"
        found = {d for (d,) in self._in_chunks(query, [digest for _, digest in asked])}
        rows = [(row, digest) for row, digest in asked if digest in found]

        def give(db: sqlite3.Connection) -> None:
            db.executemany(_REUSE, rows)
            if share:
                db.executemany(_SHARE, rows)  # ignored for the rows _REUSE gave an answer

        if rows:
            self._commit(give)
        return len(rows) if share else len({digest for _, digest in rows})

    def reused(self) -> None:
        """A reuse pass ended: the next start need not run one."""
        self._commit(lambda db: db.execute(f"DELETE FROM meta WHERE key = '{_REUSING}'"))

    def _commit(self, change: Callable[[sqlite3.Connection], object]) -> None:
        """One counted transaction (see `_COMMITS`)."""
        try:
            with self._db:
                change(self._db)
                self._db.execute(_COUNT, (str(self._commits + 1),))
        except sqlite3.Error as exc:
            raise OutputError(f"cannot write the checkpoint {self.path}: {exc}") from None
        self._commits += 1
        self._tell()

    def meta(self, key: str) -> str | None:
        row = self._reader.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, **values: str) -> None:
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())

    def write(
        self,
        *,
        sending: Sequence[tuple[int, int, int]] = (),
        results: Sequence[RowResult] = (),
        unsent: Sequence[int] = (),
    ) -> None:
        """One transaction: rows about to be sent, results (which end their flight), and
        rows recorded as sending that the run stopped before they could be billed.

        When it returns, all of it is durable against a crash of this process.
        """

        def change(db: sqlite3.Connection) -> None:
            if sending:
                db.executemany(_SEND, sending)
            if results:
                db.executemany(_UPSERT, map(_stored, results))
            if unsent:
                db.executemany(_UNSEND, ((row,) for row in unsent))

        self._commit(change)

    def fold_wal(self) -> None:
        """Move the WAL into the database file (SQLite's "WAL checkpoint", the part that
        fsyncs; named otherwise here, where "checkpoint" is the journal); for a thread."""
        with contextlib.suppress(sqlite3.Error):  # retried at the next one
            self._folder.execute("PRAGMA wal_checkpoint(PASSIVE)")

    @_reading
    def done_rows(self, first: int, last: int, *, failed_too: bool = True) -> set[int]:
        """Rows in [first, last] that already have a result (an ok one, unless failed_too)."""
        which = _DONE if failed_too else "status = 'ok'"
        cursor = self._reader.execute(
            f"SELECT row FROM results WHERE row BETWEEN ? AND ? AND {which}", (first, last)
        )
        return {r for (r,) in cursor}

    @_reading
    def answered(self, digests: Iterable[int]) -> dict[int, RowResult]:
        """An ok result for each of these request hashes that has one."""
        found: dict[int, RowResult] = {}
        wanted = list(dict.fromkeys(digests))
        query = f"SELECT {', '.join(_STORED)} FROM {_SENT_OK} AND request_hash IN ({{}})"
        for values in self._in_chunks(query, wanted):
            result = RowResult(*values)
            found.setdefault(int(result.request_hash or 0), result)
        # An earlier input's answer, for a row the reuse pass left (one that was in
        # flight at a crash): shared, as an answer of this input would be.
        rest = [d for d in wanted if d not in found]
        query = f"SELECT 0, {', '.join(_ANSWER)} FROM earlier WHERE request_hash IN ({{}})"
        for values in self._in_chunks(query, rest):
            result = RowResult(*values)
            found[int(result.request_hash or 0)] = result
        return found

    def _in_chunks(self, query: str, digests: Sequence[int]) -> Iterator[tuple[Any, ...]]:
        """The rows of `query`, whose `{}` takes the placeholders of a chunk of digests,
        run over `digests` _IN_CHUNK at a time."""
        for start in range(0, len(digests), _IN_CHUNK):
            chunk = list(digests[start : start + _IN_CHUNK])
            yield from self._reader.execute(query.format(", ".join("?" for _ in chunk)), chunk)

    @_reading
    def results(self, first: int, last: int) -> pl.DataFrame:
        """Results of rows in [first, last], as a frame with `row` and RESULT_SCHEMA."""
        cursor = self._reader.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM results "
            f"WHERE row BETWEEN ? AND ? AND {_DONE} ORDER BY row",
            (first, last),
        )
        return pl.DataFrame(cursor.fetchall(), schema=RESULTS_SCHEMA, orient="row")

    @_reading
    def in_flight(self) -> InFlight:
        rows, tokens = self._reader.execute(
            f"SELECT count(*), total(tokens) FROM results WHERE status = '{SENDING}'"
        ).fetchone()
        return InFlight(int(rows), int(tokens))

    def count(self) -> int:
        (n,) = self._reader.execute(f"SELECT count(*) FROM results WHERE {_DONE}").fetchone()
        return int(n)

    @_reading
    def totals(self) -> Totals:
        row = self._reader.execute(
            "SELECT count(*) FILTER (WHERE status = 'ok'),"
            " count(*) FILTER (WHERE status = 'failed'),"
            " total(cost_usd), total(prompt_tokens), total(completion_tokens),"
            " count(*) FILTER (WHERE finish_reason = 'length'),"
            " count(*) FILTER (WHERE status = 'ok' AND cost_usd IS NULL) FROM results"
        ).fetchone()
        return Totals(
            int(row[0]),
            int(row[1]),
            float(row[2]),
            int(row[3]),
            int(row[4]),
            int(row[5]),
            int(row[6]),
        )

    def close(self) -> None:
        if self._tally is not None:
            os.close(self._tally)
        self.fold_wal()
        self._folder.close()
        self._reader.close()
        self._db.close()
        if self._lock is not None:
            self._lock.close()  # releases the flock


#: How the refusal of a changed job names a fingerprint's part, where its key is terse.
_PARTS = {
    "input": "the input file (its size or modification time)",
    "input ctime": (
        "the input file (its inode change time: edited in place, perhaps with its "
        "modification time put back)"
    ),
    "price": "the price (--price or [price])",
    "key": "the input's key column ([input] key)",
}


def _describe(part: str) -> str:
    return _PARTS.get(part, part)


def _close_refused(journal: Journal | None, db: sqlite3.Connection | None) -> None:
    """Close what a refused open had opened (the lock is the caller's)."""
    with contextlib.suppress(sqlite3.Error):
        if journal is not None:
            journal._lock = None
            journal.close()
        elif db is not None:
            db.close()


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """A journal from an earlier version of the tool gains the columns added since."""
    with db:
        for table in ("results", "earlier"):
            have = {name for _, name, *_ in db.execute(f"PRAGMA table_info({table})")}
            for name, dtype in {**RESULT_SCHEMA, **_OPTIONAL}.items():
                if name not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {_sql_type(dtype)}")
