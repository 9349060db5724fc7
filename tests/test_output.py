"""output.py's own logic, on its functions, with a real journal on disk.

What the command shows end to end is tested there (test_run.py: columns, CSV and
Parquet, provenance; test_output_safety.py and test_checkpoint.py: an output that is
not the job's, a kill or a failure while writing, leftovers of a live process). Here:
the rows and columns `write_output` makes from journal + input, the format chosen by
suffix, what a write that fails half way leaves, and every branch of
`check_replaceable`, `recorded_output` and `remove_leftovers`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import read_output

from pipeline import output
from pipeline.errors import InputError, OutputError, OutputRefused
from pipeline.journal import Journal
from pipeline.output import (
    OUTPUT_META,
    TEMP_SUFFIX,
    check_replaceable,
    legacy_record,
    output_format,
    output_record,
    pending_record,
    recorded_output,
    remove_leftovers,
    write_output,
)
from pipeline.parse import OutputShape
from pipeline.records import ROW_INDEX, RowResult

SHAPE = OutputShape()
#: Six input rows read in two batches, as the source hands them on.
BATCHES = (range(0, 3), range(3, 6))


def batch(rows: range) -> pl.DataFrame:
    """Input rows as the source yields them: led by ROW_INDEX, then the input columns."""
    return pl.DataFrame(
        {
            ROW_INDEX: pl.Series(list(rows), dtype=pl.UInt64),
            "id": [f"r{r}" for r in rows],
            "text": [f"row {r}" for r in rows],
        }
    )


def answered(row: int) -> RowResult:
    return RowResult(row, row, "ok", attempts=1, response=f"answer {row}", prompt_tokens=5)


def failed(row: int) -> RowResult:
    return RowResult(
        row, row, "failed", error_type="server_error", error="HTTP 500", http_status=500, attempts=3
    )


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    """A real journal, in a folder apart from the output's."""
    opened = Journal.open(tmp_path / "journal" / "out.journal.sqlite", {"job": "t"}, fresh=False)
    try:
        yield opened
    finally:
        opened.close()


def write(path: Path, journal: Journal, *, prefix: str = "") -> int:
    batches = (batch(rows) for rows in BATCHES)
    return write_output(path, batches, journal, shape=SHAPE, prefix=prefix, metadata={})


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- rows and columns -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "prefix"),
    [
        pytest.param("out.parquet", "", id="parquet"),
        pytest.param("out.csv", "", id="csv"),
        pytest.param("out.parquet", "llm_", id="prefixed"),
    ],
)
def test_each_input_row_once_in_input_order_with_its_result_or_pending(
    tmp_path: Path, journal: Journal, name: str, prefix: str
) -> None:
    # Committed out of order, as workers finish; row 2 is in flight; 3 and 5 never sent.
    for result in (answered(4), failed(1), answered(0)):
        journal.write(results=[result])
    journal.write(sending=[(2, 2, 10)])
    path = tmp_path / "out" / name

    written = write(path, journal, prefix=prefix)

    out = read_output(path)
    assert written == out.height == 6
    assert out.columns == ["id", "text", *[prefix + c for c in SHAPE.columns()]]
    assert out["id"].to_list() == [f"r{r}" for r in range(6)]
    assert out["text"].to_list() == [f"row {r}" for r in range(6)]
    status = out[f"{prefix}status"].to_list()
    assert status == ["ok", "failed", "pending", "pending", "ok", "pending"]
    assert out[f"{prefix}response"].to_list() == ["answer 0", None, None, None, "answer 4", None]
    assert out[f"{prefix}error"].to_list() == [None, "HTTP 500", None, None, None, None]
    assert out[f"{prefix}attempts"].to_list() == [1, 3, None, None, 1, None]


def test_a_csv_written_in_batches_has_one_header(tmp_path: Path, journal: Journal) -> None:
    path = tmp_path / "out.csv"

    write(path, journal)

    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("id,text,status,")
    assert len(lines) == 1 + 6
    assert sum(line.startswith("id,") for line in lines) == 1


def test_parquet_batches_are_gathered_into_row_groups_of_about_row_group_bytes(
    tmp_path: Path, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out.parquet"
    write(path, journal)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1  # two small batches, one group

    # Row groups close once they hold that much: here, after every batch.
    monkeypatch.setattr(output, "ROW_GROUP_BYTES", 1)
    write(path, journal)
    assert pq.ParquetFile(path).metadata.num_row_groups == len(BATCHES)
    assert read_output(path)["id"].to_list() == [f"r{r}" for r in range(6)]


# --- the format, by suffix ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "starts"),
    [
        pytest.param("out.parquet", b"PAR1", id="parquet"),
        pytest.param("out.pq", b"PAR1", id="pq"),
        pytest.param("OUT.PARQUET", b"PAR1", id="upper-case-parquet"),
        pytest.param("out.csv", b"id,text,status,", id="csv"),
        pytest.param("out.CSV", b"id,text,status,", id="upper-case-csv"),
    ],
)
def test_the_suffix_chooses_the_format_whatever_its_case(
    tmp_path: Path, journal: Journal, name: str, starts: bytes
) -> None:
    write(tmp_path / name, journal)

    assert (tmp_path / name).read_bytes().startswith(starts)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("out.json", id="json"),
        pytest.param("out.parquet.bak", id="parquet-then-more"),
        pytest.param("out", id="no-suffix"),
    ],
)
def test_a_suffix_that_names_no_format_is_refused_before_writing(
    tmp_path: Path, journal: Journal, name: str
) -> None:
    with pytest.raises(OutputRefused, match=r"use a \.parquet or \.csv file name"):
        output_format(tmp_path / name)
    with pytest.raises(OutputRefused):
        write(tmp_path / "out" / name, journal)

    assert not (tmp_path / "out").exists()


# --- atomic: the old output until the new one is whole --------------------------------


@pytest.mark.parametrize("name", ["out.parquet", "out.csv"])
def test_a_finished_write_replaces_the_old_output_and_leaves_no_temporary_file(
    tmp_path: Path, journal: Journal, name: str
) -> None:
    path = tmp_path / "out" / name
    path.parent.mkdir()
    path.write_bytes(b"the output of an earlier run")

    write(path, journal)

    assert listing(path.parent) == [name]
    assert read_output(path).height == 6


@pytest.mark.parametrize("name", ["out.parquet", "out.csv"])
def test_a_write_that_fails_half_way_keeps_the_old_output_and_no_temporary_file(
    tmp_path: Path, journal: Journal, name: str
) -> None:
    path = tmp_path / "out" / name
    path.parent.mkdir()
    path.write_bytes(b"the output of an earlier run")

    def batches() -> Iterator[pl.DataFrame]:
        yield batch(range(3))  # written to the temporary file...
        raise InputError("the input changed while it was read")  # ...then the input fails

    with pytest.raises(InputError):
        write_output(path, batches(), journal, shape=SHAPE, prefix="", metadata={})

    assert listing(path.parent) == [name]
    assert path.read_bytes() == b"the output of an earlier run"


def test_an_input_with_no_rows_writes_no_parquet_and_keeps_the_old(
    tmp_path: Path, journal: Journal
) -> None:
    path = tmp_path / "out.parquet"
    path.write_bytes(b"the output of an earlier run")

    with pytest.raises(OutputError, match="the input has no rows"):
        write_output(path, iter([]), journal, shape=SHAPE, prefix="", metadata={})

    assert path.read_bytes() == b"the output of an earlier run"
    assert listing(tmp_path) == ["journal", "out.parquet"]


# --- check_replaceable: only a file a run of this job wrote is replaced -----------------
# (test_output_safety.py runs the command against a file of the user's, one edited by
# hand, one its checkpoint no longer records, and one from before outputs were recorded)


def unchanged(path: Path) -> str | None:
    return output_record(path)


def being_written(path: Path) -> str | None:
    """A run killed while writing left its new output, or its old one: both its own."""
    record = pending_record(path)
    path.write_bytes(b"a newer output, longer than the one before")
    return record


def rewritten_same_size(path: Path) -> str | None:
    record = output_record(path)
    before = path.stat()
    path.write_bytes(b"x" * before.st_size)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    return record


def another_files(path: Path) -> str | None:
    other = path.with_name("other.parquet")
    other.write_bytes(path.read_bytes())
    return output_record(other)


def legacy_finished_after(path: Path) -> str | None:
    return legacy_record(path, path.stat().st_mtime + 1)


def legacy_finished_before(path: Path) -> str | None:
    return legacy_record(path, path.stat().st_mtime - 60)


@pytest.mark.parametrize(
    ("record", "refused"),
    [
        pytest.param(unchanged, None, id="recorded-and-unchanged"),
        pytest.param(being_written, None, id="pending-a-killed-write"),
        pytest.param(legacy_finished_after, None, id="legacy-no-newer-than-the-run"),
        pytest.param(rewritten_same_size, "changed since this job wrote it", id="same-size-newer"),
        pytest.param(legacy_finished_before, "changed since this job wrote it", id="legacy-newer"),
        pytest.param(another_files, "was not written by a run of this job", id="another-path"),
        pytest.param(lambda _: "{not json", "was not written by a run", id="garbage-record"),
        pytest.param(lambda _: "[1, 2]", "was not written by a run", id="record-not-an-object"),
    ],
)
def test_an_existing_output_is_replaced_only_when_the_record_says_it_is_the_jobs(
    tmp_path: Path, record: Callable[[Path], str | None], refused: str | None
) -> None:
    path = tmp_path / "out.parquet"
    path.write_bytes(b"an output")
    recorded = record(path)

    if refused is None:
        check_replaceable(path, recorded)
    else:
        with pytest.raises(OutputRefused, match=refused) as caught:
            check_replaceable(path, recorded)
        assert "--output PATH" in str(caught.value)


def test_no_file_is_nothing_to_refuse(tmp_path: Path) -> None:
    check_replaceable(tmp_path / "out.parquet", None)


def test_a_folder_in_the_outputs_place_is_refused_whatever_the_record(tmp_path: Path) -> None:
    path = tmp_path / "out.parquet"
    path.mkdir()

    with pytest.raises(OutputRefused, match="is a folder: give --output a file name"):
        check_replaceable(path, pending_record(path))


# --- recorded_output: what the checkpoint says its job wrote ----------------------------


def checkpoint_with(path: Path, **meta: str) -> Path:
    """A checkpoint of an earlier run, closed, with these meta values."""
    journal = Journal.open(path, {"job": "t"}, fresh=False)
    try:
        journal.set_meta(**meta)
    finally:
        journal.close()
    return path


def test_recorded_output_reads_the_checkpoints_record(tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    output.write_bytes(b"an output")
    record = output_record(output)
    journal = checkpoint_with(tmp_path / "out.journal.sqlite", **{OUTPUT_META: record})

    assert recorded_output(journal, output) == record


@pytest.mark.parametrize(
    ("finished", "expected"),
    [
        pytest.param("1700000000.5", 1700000000.5, id="finished"),
        pytest.param("", None, id="never-finished"),
        pytest.param("yesterday", None, id="unreadable-time"),
    ],
)
def test_a_checkpoint_with_no_record_vouches_for_what_its_last_run_wrote(
    tmp_path: Path, finished: str, expected: float | None
) -> None:
    output = tmp_path / "out.parquet"
    journal = checkpoint_with(tmp_path / "out.journal.sqlite", last_finished=finished)

    found = recorded_output(journal, output)

    assert found == (legacy_record(output, expected) if expected is not None else None)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(None, id="no-checkpoint"),
        pytest.param(b"", id="empty-file"),
        pytest.param(b"not a checkpoint at all", id="not-sqlite"),
    ],
)
def test_no_sound_checkpoint_records_no_output(tmp_path: Path, content: bytes | None) -> None:
    journal = tmp_path / "out.journal.sqlite"
    if content is not None:
        journal.write_bytes(content)

    assert recorded_output(journal, tmp_path / "out.parquet") is None


# --- remove_leftovers -------------------------------------------------------------------
# (test_output_safety.py: a named output's leftovers, a live process's kept, others kept)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(child.stdout)


def leftover(folder: Path, name: str, pid: int) -> Path:
    path = folder / f".{name}.{pid}{TEMP_SUFFIX}"
    path.write_bytes(b"left by a killed run")
    return path


def test_without_a_name_every_files_leftovers_go_and_nothing_else(tmp_path: Path) -> None:
    dead = dead_pid()
    gone = {leftover(tmp_path, n, dead) for n in ("out.parquet", "image-1.png", "a.json")}
    live = leftover(tmp_path, "out.parquet", os.getpid())
    no_pid = tmp_path / f".out.parquet.abc{TEMP_SUFFIX}"
    no_pid.write_bytes(b"not named by a run")
    named_like_one = tmp_path / f".images.{dead}{TEMP_SUFFIX}"
    named_like_one.mkdir()

    removed = remove_leftovers(tmp_path)

    assert set(removed) == gone
    assert all(not p.exists() for p in gone)
    assert live.exists()
    assert no_pid.exists()
    assert named_like_one.is_dir()


def test_a_name_with_glob_characters_matches_only_its_own_leftovers(tmp_path: Path) -> None:
    dead = dead_pid()
    own = leftover(tmp_path, "out[1].parquet", dead)
    lookalike = leftover(tmp_path, "out1.parquet", dead)

    removed = remove_leftovers(tmp_path, "out[1].parquet")

    assert removed == [own]
    assert lookalike.exists()


def test_a_folder_that_is_not_there_has_no_leftovers(tmp_path: Path) -> None:
    assert remove_leftovers(tmp_path / "missing") == []


@pytest.mark.parametrize(
    ("environment", "pool"),
    [
        pytest.param({}, "system", id="the-system-allocator-by-default"),
        pytest.param({"ARROW_DEFAULT_MEMORY_POOL": "mimalloc"}, "mimalloc", id="the-users-choice"),
    ],
)
def test_arrow_allocates_with_the_pool_the_package_sets_unless_the_user_chose(
    environment: dict[str, str], pool: str
) -> None:
    code = "import pipeline.source, pyarrow as pa; print(pa.default_memory_pool().backend_name)"
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, **environment},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.strip() == pool
