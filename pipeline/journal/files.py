"""The checkpoint's files on disk: the lock, the checks before SQLite reads a file, the
side file of commits, and --fresh's backup.

    handle = hold_lock(path)       # one run per checkpoint; the kernel drops it on exit
    check_file(path)               # CheckpointError for an empty, truncated or foreign file
    db = connect(path)             # WAL mode, synchronous=NORMAL
    note = discard(path)           # --fresh: the old checkpoint kept as a backup, or None

Everything here looks at a file before (or beside) the journal that reads it:
`store.py` calls these, and nothing here knows a row.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from pathlib import Path
from typing import IO

from pipeline.errors import CheckpointError, JobError, OutputRefused

#: What every SQLite file starts with.
_SQLITE_MAGIC = b"SQLite format 3\x00"
#: The size of SQLite's file header.
_HEADER_BYTES = 100
#: The size of a -wal's header: a -wal no larger holds no commits.
_WAL_HEADER_BYTES = 32


def hold_lock(path: Path) -> IO[str]:
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


def check_file(path: Path) -> None:
    """Refuse, before SQLite reads it, a file at `path` that cannot be a sound checkpoint.

    SQLite reads an empty file as an empty database and a truncated one until it meets
    the missing page (mid-run): either would look like a checkpoint with fewer answers,
    and the rows it lost would be sent and billed again.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header = handle.read(_HEADER_BYTES)
    except FileNotFoundError:
        return  # a new checkpoint
    except OSError as exc:
        raise CheckpointError(f"cannot read the checkpoint {path}: {exc.strerror}") from None
    fix = "move it away or give this run its own --journal; --fresh sets it aside and starts over"
    if size == 0:
        raise CheckpointError(
            f"the checkpoint {path} is empty (0 bytes): it lost whatever it held, so a "
            f"resume cannot tell which rows were paid for; {fix}"
        )
    if len(header) < _HEADER_BYTES or not header.startswith(_SQLITE_MAGIC):
        raise CheckpointError(f"{path} is not a checkpoint (not a SQLite file); {fix}")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # The header's page count is valid when its "version valid for" matches the
    # change counter (SQLite's file format, section 1.3.7). With a -wal beside it, a
    # shorter file is a checkpoint cut short (a full disk): the -wal holds the pages.
    wal = Path(f"{path}-wal")
    wal_size = wal.stat().st_size if wal.exists() else 0
    if header[92:96] == header[24:28] and size < page_size * pages and not wal_size:
        raise CheckpointError(
            f"the checkpoint {path} is truncated ({size:,} bytes of the "
            f"{page_size * pages:,} its header says): restore it from a copy, or {fix}"
        )


def wal_found(path: Path) -> bool:
    """Whether a -wal with frames is beside `path`, looked at before a connection makes
    one (an empty one is what a connection leaves when it found none)."""
    wal = Path(f"{path}-wal")
    return wal.exists() and wal.stat().st_size > _WAL_HEADER_BYTES


def tally_path(path: Path) -> Path:
    return Path(f"{path}.commits")


def read_tally(tally: Path) -> int | None:
    """The commits the side file was told of; None without one (an older pipeline's
    checkpoint, or one moved without it: nothing to compare with)."""
    try:
        return int(tally.read_text(encoding="ascii").strip() or 0)
    except (OSError, ValueError):
        return None


def check_tables(path: Path, db: sqlite3.Connection, *, creating: bool = True) -> bool:
    """Refuse another program's SQLite file; True if the file holds a checkpoint's
    tables. `creating`: a file with no tables may become a checkpoint."""
    names = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if {"meta", "results"} <= names:
        return True
    if creating and not names:
        return False
    what = f"tables: {', '.join(sorted(names))}" if names else "no tables"
    raise CheckpointError(
        f"{path} is a SQLite file but not a pipeline checkpoint ({what}); give this run its "
        "own --journal (or --output), or move that file away"
    )


def unreadable(path: Path, exc: sqlite3.DatabaseError) -> CheckpointError:
    return CheckpointError(
        f"the checkpoint {path} cannot be read ({exc}): restore it from a copy, or move it "
        "away; --fresh sets it aside and starts over"
    )


def discard(path: Path) -> str | None:
    """--fresh: keep what the old checkpoint holds in a backup file, and say where.

    A checkpoint with no rows is deleted; one with answers (paid for) is moved to
    `<stem>.discarded-<time>.sqlite`, its -wal folded in first (a rename: no copy of
    a large file), or copied if that cannot be done; a file that cannot be read as one
    is moved there as it is (it may be someone's).
    """
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S")
    backup = path.with_name(f"{path.stem}.discarded-{stamp}{path.suffix}")
    copied = False
    try:
        check_file(path)
        with contextlib.closing(connect(path)) as db:
            check_tables(path, db)
            held = db.execute("SELECT count(*), total(cost_usd) FROM results").fetchone()
            busy = held[0] and db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            if busy:  # a reader (`pipeline status`) holds part of the -wal: copy it all
                with contextlib.closing(sqlite3.connect(backup)) as copy:
                    db.backup(copy)
                copied = True
        if held[0] and not copied:
            os.replace(path, backup)  # the -wal is folded in: the file holds it all
    except (CheckpointError, sqlite3.DatabaseError):
        os.replace(path, backup)
        if Path(f"{path}-wal").exists():
            os.replace(f"{path}-wal", f"{backup}-wal")
        Path(f"{path}-shm").unlink(missing_ok=True)
        tally_path(path).unlink(missing_ok=True)
        return f"--fresh: {path} was not a readable checkpoint; it is moved to {backup}"
    for suffix in ("", "-wal", "-shm", ".commits"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    if not held[0]:
        return None
    return (
        f"--fresh: the old checkpoint held {held[0]:,} rows (${held[1]:.4f} spent); it is "
        f"kept as {backup} (--journal {backup} with another --output writes its answers "
        "out again; delete it when you no longer need it)"
    )


def connect(path: Path) -> sqlite3.Connection:
    # One connection, used by one thread at a time (the writer's to_thread calls are
    # awaited one after another), so the same-thread check only gets in the way.
    db = sqlite3.connect(path, check_same_thread=False, isolation_level="DEFERRED")
    with contextlib.suppress(sqlite3.OperationalError):  # a reader of a busy file
        db.execute("PRAGMA journal_mode=WAL")
    # In WAL mode, NORMAL keeps every commit across a process crash.
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    return db
