"""Journal + input -> the output table, in input order, written atomically.

    rows = write_output(Path("out/x.parquet"), batches, journal, shape=OutputShape(),
                        prefix="", metadata={"pipeline.version": "0.1.0"})
    table = output_frame(batches, journal, shape=OutputShape(), prefix="")  # in memory

One output row per input row: the input columns unchanged, then the result columns.
A row with no result yet (the run stopped early) has status "pending". The table is
built batch by batch, so memory does not grow with the input, into a temporary file
that replaces the target only once it is complete and on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import (
    CheckpointError,
    InputError,
    JobError,
    OutputError,
    OutputRefused,
    SpecError,
    first_line,
)
from pipeline.journal import RESULTS_SCHEMA, Journal
from pipeline.parse import OutputShape
from pipeline.records import ROW_INDEX, Answer, Work

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
#: Ends the name of a file being written (`.out.parquet.<pid>.pipeline-tmp`): a run
#: killed mid-write leaves it behind, and the next run of the job finds and removes it.
TEMP_SUFFIX = ".pipeline-tmp"
_TEMP_PID = re.compile(r"\.(\d+)" + re.escape(TEMP_SUFFIX) + "$")
#: Parquet output is written in row groups of about this much Arrow data: big enough
#: that the footer the writer keeps until it closes stays small (a row group per
#: 2,000-row batch grew a 5M-row run's memory by ~90 MB while writing), small enough
#: to hold in memory for a moment; and no more rows than this in one.
ROW_GROUP_BYTES = 16 * 2**20
ROW_GROUP_ROWS = 1_000_000


def output_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OutputRefused(
            f"cannot tell the output format of {path}: use a .parquet or .csv file name"
        )
    return fmt


def write_output(
    path: Path,
    batches: Iterable[pl.DataFrame],
    journal: Journal,
    *,
    shape: OutputShape,
    prefix: str,
    metadata: Mapping[str, str],
    only_run: int | None = None,
) -> int:
    """Write the output; return its row count. The old file stays until the new is whole.
    `only_run`: only the rows that run of the job answered (`--new-only`)."""
    fmt = output_format(path)
    frames = (_with_results(b, journal, shape, prefix, only_run) for b in batches)
    writer = _write_parquet if fmt == "parquet" else _write_csv
    return atomic_write(path, lambda tmp: writer(tmp, frames, metadata))


def output_frame(
    batches: Iterable[pl.DataFrame],
    journal: Journal,
    *,
    shape: OutputShape,
    prefix: str,
    only_run: int | None = None,
) -> pl.DataFrame:
    """The output as one DataFrame in memory (`pipeline.run_frame`): the same columns,
    names and types `write_output` writes to Parquet, built batch by batch the same way."""
    frames = [_with_results(b, journal, shape, prefix, only_run) for b in batches]
    if not frames:
        raise OutputError("the input has no rows: nothing to return")
    # Every batch has the first one's types, as the Parquet writer casts them to.
    return pl.concat(frames, how="vertical", rechunk=True)


def _with_results(
    batch: pl.DataFrame,
    journal: Journal,
    shape: OutputShape,
    prefix: str,
    only_run: int | None = None,
) -> pl.DataFrame:
    rows = batch.get_column(ROW_INDEX)
    results = journal.results(int(rows.min() or 0), int(rows.max() or 0))  # type: ignore[arg-type]
    if only_run is not None:
        answered = results.filter(pl.col("run") == only_run).get_column("row")
        batch = batch.filter(pl.col(ROW_INDEX).is_in(answered.implode()))
    return _joined(batch, results, shape, prefix)


def _joined(
    batch: pl.DataFrame, results: pl.DataFrame, shape: OutputShape, prefix: str
) -> pl.DataFrame:
    """The batch's input columns, then its results' columns as the output has them.

    The results are lined up with the batch's rows and shaped apart from the input, then
    put beside it: an input column named like a result (`status`) stays the input's, and
    the prefix keeps the two apart."""
    aligned = (
        batch.select(ROW_INDEX)
        .join(results, left_on=ROW_INDEX, right_on="row", how="left", maintain_order="left")
        .with_columns(
            pl.col("status").fill_null("pending"),
            pl.from_epoch((pl.col("answered_at") * 1000).round().cast(pl.Int64), time_unit="ms")
            .dt.replace_time_zone("UTC")
            .alias("answered_at"),
        )
    )
    if shape.answer == "embedding":
        aligned = aligned.with_columns(
            pl.col("response").str.json_decode(pl.List(pl.Float32())).alias("response")
        )
    if shape.fields is not None:
        aligned = _decode_fields(aligned, shape.fields)
    names = shape.columns()
    aligned = aligned.rename({"response": shape.answer}).select(names)
    aligned = aligned.rename({c: prefix + c for c in names})
    return pl.concat([batch.drop(ROW_INDEX), aligned], how="horizontal")


def _decode_fields(frame: pl.DataFrame, fields: pl.Struct) -> pl.DataFrame:
    """A JSON answer's fields as typed columns, after `response`; null where not ok."""
    # Unnested in place: a temporary column's name could be an input column's.
    decoded = pl.when(pl.col("status") == "ok").then(pl.col("response")).str.json_decode(fields)
    return frame.with_columns(decoded.struct.unnest())


def _write_parquet(tmp: Path, frames: Iterator[pl.DataFrame], metadata: Mapping[str, str]) -> int:
    """Write the frames as row groups of about ROW_GROUP_BYTES (one `write_table` a
    batch made a row group of every 2,000 rows, whose footer the writer holds to the end)."""
    rows = 0
    writer: pq.ParquetWriter | None = None
    pending: list[pa.Table] = []
    pending_bytes = 0
    try:
        for frame in frames:
            table = frame.to_arrow()
            if writer is None:
                schema = table.schema.with_metadata(dict(metadata))
                writer = pq.ParquetWriter(tmp, schema, compression="zstd")
            pending.append(table.cast(writer.schema))
            pending_bytes += table.nbytes
            rows += frame.height
            if pending_bytes >= ROW_GROUP_BYTES:
                writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
                pending, pending_bytes = [], 0
        if writer is not None and pending:
            writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise OutputError("the input has no rows: nothing to write")
    return rows


def _write_csv(tmp: Path, frames: Iterator[pl.DataFrame], metadata: Mapping[str, str]) -> int:
    rows = 0
    with open(tmp, "wb") as handle:
        for frame in frames:
            _flat(frame).write_csv(handle, include_header=rows == 0)
            rows += frame.height
    return rows


def _flat(frame: pl.DataFrame) -> pl.DataFrame:
    """CSV has no nested values: lists and structs become JSON text."""
    nested = [c for c, t in frame.schema.items() if isinstance(t, pl.List | pl.Struct | pl.Array)]
    return frame.with_columns(
        pl.Series(c, [_json(v) for v in frame.get_column(c).to_list()], dtype=pl.String)
        for c in nested
    )


def _json(value: Any) -> str | None:
    # `default=str`: a value orjson has no form for (a Decimal in a list, say) is written
    # as its text rather than failing the write of a table whose answers are paid for.
    return None if value is None else orjson.dumps(value, default=str).decode()


def atomic_write(path: Path, write: Callable[[Path], int]) -> int:
    """Run `write(tmp)`, fsync, then rename over `path`: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        result = write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return result


def remove_leftovers(directory: Path, name: str | None = None) -> list[Path]:
    """Delete the temporary files that runs killed while writing `name` left in
    `directory` (every file's, by default); return them. A temp of a live process
    (another run writing now) is kept."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for tmp in directory.glob(f".{glob.escape(name) if name else '*'}.*{TEMP_SUFFIX}"):
        match = _TEMP_PID.search(tmp.name)
        if match is None or _alive(int(match.group(1))) or tmp.is_dir():
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, and is another user's
        return True
    return True


def output_record(path: Path) -> str:
    """What identifies the output a run wrote, kept in its checkpoint (`OUTPUT_META`)."""
    stat = path.stat()
    return orjson.dumps(
        {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    ).decode()


def pending_record(path: Path) -> str:
    """Kept in the checkpoint while the output is being written: a run killed then has
    left either its old output or its new one there, both its own."""
    return orjson.dumps({"path": str(path), "pending": True}).decode()


def legacy_record(path: Path, finished: float) -> str:
    """For a checkpoint an earlier version wrote, which kept no record: its run that
    finished at `finished` wrote the output, so a file no newer than that is its."""
    return orjson.dumps({"path": str(path), "written_by": finished}).decode()


#: The checkpoint's meta key for the output it wrote.
OUTPUT_META = "output_file"


def check_replaceable(path: Path, recorded: str | None) -> None:
    """Refuse to replace a file that no run of this job wrote (nothing is sent yet).

    `recorded` is the checkpoint's `OUTPUT_META`: the output is this job's if it is
    the file recorded there, unchanged since, or the one a killed run was writing.
    """
    if not os.path.lexists(path):
        return
    if path.is_dir():
        raise OutputRefused(f"the output {path} is a folder: give --output a file name")
    try:
        record = orjson.loads(recorded) if recorded else {}
    except orjson.JSONDecodeError:
        record = {}
    if isinstance(record, dict) and record.get("path") == str(path):
        if record.get("pending"):
            return
        stat = path.stat()
        if (record.get("size"), record.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
            return
        if stat.st_mtime <= record.get("written_by", -1.0):
            return
        why = "changed since this job wrote it"
    else:
        why = "was not written by a run of this job (its checkpoint has no record of it)"
    raise OutputRefused(
        f"the output {path} already exists and {why}: nothing was sent. Write elsewhere "
        "with --output PATH, or move or remove that file and run again"
    )


def recorded_output(path: Path, output: Path) -> str | None:
    """The output the checkpoint at `path` says its job wrote, if it says."""
    if not path.exists():
        return None
    try:
        checkpoint = Journal.read(path)
    except (sqlite3.Error, CheckpointError):  # not a sound one: Journal.open says so next
        return None
    try:
        record = checkpoint.meta(OUTPUT_META)
        finished = checkpoint.meta("last_finished")
    except sqlite3.Error:
        return None
    finally:
        checkpoint.close()
    if record is None and finished:
        # A checkpoint from before outputs were recorded: its last run wrote the output.
        with contextlib.suppress(ValueError):
            return legacy_record(output, float(finished))
    return record


def write_bytes_atomic(path: Path, data: bytes) -> None:
    def write(tmp: Path) -> int:
        tmp.write_bytes(data)
        return len(data)

    atomic_write(path, write)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: What a dry write stands in for each row's answer (its type is the job's: the JSON
#: schema's fields, a vector, text), so that the decoding runs as it will at the end.
_SAMPLE_ANSWERS = {"embedding": "[0.0]"}
#: What a writer raises for a type its format cannot hold.
_WRITE_ERRORS = (pl.exceptions.PolarsError, pa.ArrowException, ValueError, TypeError)


def check_writable(path: Path, batch: pl.DataFrame, *, shape: OutputShape, prefix: str) -> None:
    """Write `batch`, with a made-up answer per row, through the real writer to a temporary
    file; raise JobError naming the column if the output could not be written at the end.

    Every batch is cast to the one schema the input check found, and the result columns'
    types are the job's, so what writes here writes for the whole table.
    """
    fmt = output_format(path)
    if path.is_dir():
        raise OutputRefused(f"the output {path} is a directory: name a .parquet or .csv file")
    frame = _sample_output(batch, shape, prefix, f"the output {path}")
    with tempfile.TemporaryDirectory(prefix="pipeline-check-") as folder:
        problem = _write_problem(Path(folder) / f"all{path.suffix}", fmt, frame)
        if problem is None:
            return
        for index, name in enumerate(frame.columns):  # which column is it?
            tmp = Path(folder) / f"column{index}{path.suffix}"
            reason = _write_problem(tmp, fmt, frame.select(name))
            if reason is not None:
                raise _column_error(path, fmt, name, frame.schema[name], shape, prefix, reason)
    raise JobError(
        f"{path}: the output cannot be written as {fmt} ({problem}); choose the other format "
        "with --output (.parquet or .csv)"
    )


def check_joinable(batch: pl.DataFrame, *, shape: OutputShape, prefix: str) -> None:
    """`check_writable` for an output returned in memory (`pipeline.run_frame`): the
    input's rows and made-up answers make the output's columns; nothing is written."""
    _sample_output(batch, shape, prefix, "the output DataFrame")


def _sample_output(batch: pl.DataFrame, shape: OutputShape, prefix: str, what: str) -> pl.DataFrame:
    try:
        return _joined(batch, _sample_results(batch, shape), shape, prefix)
    except _WRITE_ERRORS as exc:
        raise JobError(
            f"{what} cannot be made from this input and job ({first_line(exc)}); rename "
            'the input\'s columns or set [output] prefix = "llm_"'
        ) from None


def _sample_results(batch: pl.DataFrame, shape: OutputShape) -> pl.DataFrame:
    """A result per row shaped like the journal's: status ok, an answer, the rest null."""
    answer = "{}" if shape.fields is not None else _SAMPLE_ANSWERS.get(shape.answer, "x")
    values = {"status": "ok", "response": answer}
    height = batch.height
    columns = [batch.get_column(ROW_INDEX).cast(RESULTS_SCHEMA["row"]).alias("row")]
    columns.extend(
        pl.Series(name, [values.get(name)] * height, dtype=dtype)
        for name, dtype in RESULTS_SCHEMA.items()
        if name != "row"
    )
    return pl.DataFrame(columns)


def _write_problem(tmp: Path, fmt: str, frame: pl.DataFrame) -> str | None:
    writer = _write_parquet if fmt == "parquet" else _write_csv
    try:
        writer(tmp, iter([frame]), {})
    except _WRITE_ERRORS as exc:
        return first_line(exc)
    return None


def _column_error(
    path: Path,
    fmt: str,
    name: str,
    dtype: pl.DataType,
    shape: OutputShape,
    prefix: str,
    reason: str,
) -> JobError:
    fields = {prefix + f.name for f in shape.fields.fields} if shape.fields is not None else set()
    other = "x.csv" if fmt == "parquet" else "x.parquet"
    if fmt == "csv":
        fix = f"CSV cannot hold {dtype} values: write Parquet instead (--output {other})"
    elif dtype in (pl.Int128, pl.UInt128):
        fix = (
            "its integers do not fit in 64 bits, which Parquet cannot store: write them as "
            f'text in the input (NDJSON: "123..."), or write CSV (--output {other})'
        )
    elif "no child field" in reason:
        fix = "it holds objects with no fields ({}), which Parquet cannot store: " + (
            "give that object `properties` in the JSON schema, or make it a string"
            if name in fields
            else f"drop the column from the input, or write CSV (--output {other})"
        )
    else:
        fix = f"write CSV instead (--output {other}), or change the column's type ({reason})"
    if name in fields:
        return SpecError(
            f"the JSON schema's property `{name.removeprefix(prefix)}` ({dtype}) cannot be "
            f"written to {path}: {fix}"
        )
    return InputError(f"input column `{name}` ({dtype}) cannot be written to {path}: {fix}")


def result_columns(shape: OutputShape, prefix: str) -> list[str]:
    """The result column names of the output, in order (for collision checks)."""
    return [prefix + n for n in shape.columns()]


#: Disk a run needs at the least: SQLite and Parquet need room to work, and every
#: row's result takes a few hundred bytes in the journal and again in the output.
MIN_FREE_BYTES = 64 * 2**20
BYTES_PER_ROW = 512


def check_disk(directories: Iterable[Path], rows: int) -> None:
    """Stop before spending if the output or the checkpoint cannot be written."""
    for directory in directories:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / f".pipeline-probe-{time.monotonic_ns()}"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as exc:
            raise OutputRefused(
                f"cannot write to {directory} ({exc.strerror or exc}): choose another "
                "--output (or --journal) or fix the folder's permissions"
            ) from None
        free = shutil.disk_usage(directory).free
        need = MIN_FREE_BYTES + rows * BYTES_PER_ROW
        if free < need:
            raise OutputRefused(
                f"only {free / 2**20:,.0f} MiB free on {directory}; the run needs at least "
                f"{need / 2**20:,.0f} MiB. Free some space or choose another --output / --journal"
            )


def save_files(files_dir: Path, work: Work, answers: list[Answer]) -> list[Answer]:
    """Write the files answers carry (generated images) beside the output.

    The answer's text becomes the file's path; the file is on disk before the result
    that names it is committed.
    """
    saved = []
    for row, answer in zip(work.rows, answers, strict=True):
        if answer.data is None:
            saved.append(answer)
            continue
        suffix = _safe_suffix(str(answer.extra.get("file_suffix") or ".bin"))
        path = files_dir / f"{row}{suffix}"
        write_bytes_atomic(path, answer.data)
        saved.append(dataclasses.replace(answer, text=str(path), data=None))
    return saved


def _safe_suffix(suffix: str) -> str:
    """A file suffix the server chose (an image's format), kept only if it is plainly
    one: "png/../../x" must not choose where the file goes."""
    return suffix if _SUFFIX.fullmatch(suffix) else ".bin"


_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,10}")
