"""The checkpoint: every row's result in SQLite, committed before it counts as done.

    journal = Journal.open(Path("out/summarise.journal.sqlite"), fingerprint, fresh=False)
    journal.write([result, ...])          # one transaction: a group commit
    journal.done_rows(0, 999)             # rows already answered, skipped on resume
    journal.results(0, 999)               # a polars frame of results, for the output

WAL mode with synchronous=NORMAL: a commit survives the process being killed at any
instant (it is in the WAL before `write` returns); one writer, many readers.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

import orjson
import polars as pl

from pipeline.errors import JobError, OutputError
from pipeline.parse import RESULT_SCHEMA, RowResult

_COLUMNS = ("row", *RESULT_SCHEMA)


def _sql_type(dtype: pl.DataType) -> str:
    if dtype == pl.String():
        return "TEXT"
    return "REAL" if dtype == pl.Float64() else "INTEGER"


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    row INTEGER PRIMARY KEY,
    {", ".join(f"{name} {_sql_type(dtype)}" for name, dtype in RESULT_SCHEMA.items())}
);
"""
_INSERT = (
    f"INSERT OR REPLACE INTO results ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _COLUMNS)})"
)


@dataclass(frozen=True)
class Totals:
    ok: int
    failed: int
    cost_usd: float
    prompt_tokens: int
    completion_tokens: int


class Journal:
    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._db = connection
        # Reads come from the producer's thread while the writer commits: a connection
        # of their own, which in WAL mode sees every committed row and never blocks.
        self._reader = _connect(path)

    @classmethod
    def open(cls, path: Path, fingerprint: dict[str, str], *, fresh: bool) -> Journal:
        """Open (or start) the journal; refuse one written by a different job."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if fresh:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
            db = _connect(path)
            db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise OutputError(f"cannot open the checkpoint {path}: {exc}") from None
        journal = cls(path, db)
        journal._check_fingerprint(fingerprint)
        return journal

    def _check_fingerprint(self, fingerprint: dict[str, str]) -> None:
        stored = self._meta("fingerprint")
        if stored is None:
            self._set_meta("fingerprint", orjson.dumps(fingerprint).decode())
            self._set_meta("created", str(time.time()))
            return
        previous: dict[str, str] = orjson.loads(stored)
        changed = [
            k
            for k in sorted(fingerprint.keys() | previous.keys())
            if fingerprint.get(k) != previous.get(k)
        ]
        if changed and self.count() > 0:
            raise JobError(
                f"the checkpoint {self.path} was written by a different version of this job "
                f"({', '.join(changed)} changed since). Run with --fresh to start over "
                "(its results are discarded), or restore the job as it was to resume"
            )
        self._set_meta("fingerprint", orjson.dumps(fingerprint).decode())

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def write(self, results: Sequence[RowResult]) -> None:
        """Commit `results` in one transaction. When it returns, they are durable."""
        try:
            with self._db:
                self._db.executemany(_INSERT, [astuple(r) for r in results])
        except sqlite3.Error as exc:
            raise OutputError(f"cannot write the checkpoint {self.path}: {exc}") from None

    def done_rows(self, first: int, last: int, *, failed_too: bool = True) -> set[int]:
        """Rows in [first, last] that already have a result (an ok one, unless failed_too)."""
        only_ok = "" if failed_too else " AND status = 'ok'"
        cursor = self._reader.execute(
            f"SELECT row FROM results WHERE row BETWEEN ? AND ?{only_ok}", (first, last)
        )
        return {r for (r,) in cursor}

    def results(self, first: int, last: int) -> pl.DataFrame:
        """Results of rows in [first, last], as a frame with `row` and RESULT_SCHEMA."""
        cursor = self._reader.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM results WHERE row BETWEEN ? AND ? ORDER BY row",
            (first, last),
        )
        schema = {"row": pl.Int64(), **RESULT_SCHEMA}
        return pl.DataFrame(cursor.fetchall(), schema=schema, orient="row")

    def count(self) -> int:
        (n,) = self._db.execute("SELECT count(*) FROM results").fetchone()
        return int(n)

    def totals(self) -> Totals:
        row = self._db.execute(
            "SELECT count(*) FILTER (WHERE status = 'ok'), count(*) FILTER (WHERE status != 'ok'),"
            " total(cost_usd), total(prompt_tokens), total(completion_tokens) FROM results"
        ).fetchone()
        return Totals(int(row[0]), int(row[1]), float(row[2]), int(row[3]), int(row[4]))

    def close(self) -> None:
        self._reader.close()
        self._db.close()


def _connect(path: Path) -> sqlite3.Connection:
    # One connection, used by one thread at a time (the writer's to_thread calls are
    # awaited one after another), so the same-thread check only gets in the way.
    db = sqlite3.connect(path, check_same_thread=False, isolation_level="DEFERRED")
    db.execute("PRAGMA journal_mode=WAL")
    # In WAL mode, NORMAL keeps every commit across a process crash; only power loss
    # can take the last transactions, and never corrupts the file.
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    return db
