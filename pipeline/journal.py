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
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import IO

import orjson
import polars as pl

from pipeline.errors import JobError, OutputError, OutputRefused
from pipeline.parse import RESULT_SCHEMA, RowResult

#: Stored beside RESULT_SCHEMA's columns, written to the output only for some jobs.
_OPTIONAL = {"tool_calls": pl.String()}
#: What `results` returns: the row and the output's result columns.
_COLUMNS = ("row", *RESULT_SCHEMA, *_OPTIONAL)
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


@dataclass(frozen=True)
class InFlight:
    """Rows recorded as sent that have no result: sent again on resume."""

    rows: int
    #: Their estimated tokens (prompt + max output): the most they may have cost.
    tokens: int


class Journal:
    def __init__(self, path: Path, connection: sqlite3.Connection, lock: IO[str] | None):
        self.path = path
        self._db = connection
        self._lock = lock
        # Reads come from the producer's thread while the writer commits: a connection
        # of their own, which in WAL mode sees every committed row and never blocks.
        self._reader = _connect(path)
        self._checkpointer = _connect(path)
        # The writer never checkpoints on its own (that would fsync in the event loop);
        # the run calls checkpoint() from a thread instead.
        connection.execute("PRAGMA wal_autocheckpoint=0")

    @classmethod
    def open(cls, path: Path, fingerprint: dict[str, str], *, fresh: bool) -> Journal:
        """Open (or start) the journal for a run: take the lock, check the fingerprint."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputRefused(f"cannot create {path.parent}: {exc.strerror}") from None
        lock = _lock(path)
        try:
            if fresh:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
            db = _connect(path)
            db.executescript(_SCHEMA)
            _add_missing_columns(db)
            journal = cls(path, db, lock)
            journal._check_fingerprint(fingerprint)
        except BaseException:
            lock.close()
            raise
        return journal

    @classmethod
    def read(cls, path: Path) -> Journal:
        """Open an existing journal to read it, even while a run writes to it."""
        if not path.exists():
            raise JobError(f"no checkpoint at {path}: the job has not run yet")
        return cls(path, _connect(path), lock=None)

    def _check_fingerprint(self, fingerprint: dict[str, str]) -> None:
        stored = self.meta("fingerprint")
        if stored is not None:
            previous: dict[str, str] = orjson.loads(stored)
            keys = sorted(fingerprint.keys() | previous.keys())
            changed = [k for k in keys if fingerprint.get(k) != previous.get(k)]
            if changed and self.count() > 0:
                raise JobError(
                    f"the checkpoint {self.path} was written by a different version of this "
                    f"job ({', '.join(changed)} changed since). Run with --fresh to start over "
                    "(its results are discarded), or restore the job as it was to resume"
                )
        self.set_meta(fingerprint=orjson.dumps(fingerprint).decode())

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
    ) -> None:
        """One transaction: rows about to be sent, and results (which end their flight).

        When it returns, all of it is durable against a crash of this process.
        """
        try:
            with self._db:
                if sending:
                    self._db.executemany(_SEND, sending)
                if results:
                    self._db.executemany(_UPSERT, map(_stored, results))
        except sqlite3.Error as exc:
            raise OutputError(f"cannot write the checkpoint {self.path}: {exc}") from None

    def checkpoint(self) -> None:
        """Move the WAL into the database file (the part that fsyncs); for a thread."""
        with contextlib.suppress(sqlite3.Error):  # retried at the next one
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def done_rows(self, first: int, last: int, *, failed_too: bool = True) -> set[int]:
        """Rows in [first, last] that already have a result (an ok one, unless failed_too)."""
        which = _DONE if failed_too else "status = 'ok'"
        cursor = self._reader.execute(
            f"SELECT row FROM results WHERE row BETWEEN ? AND ? AND {which}", (first, last)
        )
        return {r for (r,) in cursor}

    def answered(self, digests: Iterable[int]) -> dict[int, RowResult]:
        """An ok result for each of these request hashes that has one."""
        found: dict[int, RowResult] = {}
        wanted = list(dict.fromkeys(digests))
        for start in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[start : start + _IN_CHUNK]
            marks = ", ".join("?" for _ in chunk)
            cursor = self._reader.execute(
                f"SELECT {', '.join(_STORED)} FROM results "
                f"WHERE status = 'ok' AND attempts > 0 AND request_hash IN ({marks})",
                chunk,
            )
            for values in cursor:
                result = RowResult(*values)
                found.setdefault(int(result.request_hash or 0), result)
        return found

    def results(self, first: int, last: int) -> pl.DataFrame:
        """Results of rows in [first, last], as a frame with `row` and RESULT_SCHEMA."""
        cursor = self._reader.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM results "
            f"WHERE row BETWEEN ? AND ? AND {_DONE} ORDER BY row",
            (first, last),
        )
        schema = {"row": pl.Int64(), **RESULT_SCHEMA, **_OPTIONAL}
        return pl.DataFrame(cursor.fetchall(), schema=schema, orient="row")

    def in_flight(self) -> InFlight:
        rows, tokens = self._reader.execute(
            f"SELECT count(*), total(tokens) FROM results WHERE status = '{SENDING}'"
        ).fetchone()
        return InFlight(int(rows), int(tokens))

    def count(self) -> int:
        (n,) = self._reader.execute(f"SELECT count(*) FROM results WHERE {_DONE}").fetchone()
        return int(n)

    def totals(self) -> Totals:
        row = self._reader.execute(
            "SELECT count(*) FILTER (WHERE status = 'ok'),"
            " count(*) FILTER (WHERE status = 'failed'),"
            " total(cost_usd), total(prompt_tokens), total(completion_tokens),"
            " count(*) FILTER (WHERE finish_reason = 'length') FROM results"
        ).fetchone()
        return Totals(
            int(row[0]), int(row[1]), float(row[2]), int(row[3]), int(row[4]), int(row[5])
        )

    def close(self) -> None:
        self.checkpoint()
        self._checkpointer.close()
        self._reader.close()
        self._db.close()
        if self._lock is not None:
            self._lock.close()  # releases the flock


def _lock(path: Path) -> IO[str]:
    """Hold an exclusive lock beside the journal for the process's lifetime.

    flock locks belong to the open file: the kernel drops them when the process dies,
    `kill -9` included, so a crashed run never leaves a stale lock behind.
    """
    lock_path = Path(f"{path}.lock")
    try:
        handle = open(lock_path, "a+")  # noqa: SIM115 - held open until close()
    except OSError as exc:
        raise OutputRefused(f"cannot create the lock file {lock_path}: {exc.strerror}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise JobError(
            f"another run of this job is in progress (pid {owner}) and holds {path}; "
            "wait for it to finish or stop it, or give this run its own --output"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """A journal from an earlier version of the tool gains the columns added since."""
    have = {name for _, name, *_ in db.execute("PRAGMA table_info(results)")}
    with db:
        for name, dtype in _OPTIONAL.items():
            if name not in have:
                db.execute(f"ALTER TABLE results ADD COLUMN {name} {_sql_type(dtype)}")


def _connect(path: Path) -> sqlite3.Connection:
    # One connection, used by one thread at a time (the writer's to_thread calls are
    # awaited one after another), so the same-thread check only gets in the way.
    db = sqlite3.connect(path, check_same_thread=False, isolation_level="DEFERRED")
    with contextlib.suppress(sqlite3.OperationalError):  # a reader of a busy file
        db.execute("PRAGMA journal_mode=WAL")
    # In WAL mode, NORMAL keeps every commit across a process crash.
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    return db
