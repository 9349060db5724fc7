"""The input table: CSV, Parquet or NDJSON, read lazily with polars in bounded batches.

`open_source` checks the whole file once, streaming, before any request is sent, and
turns every problem into an `InputError` of one line that names the file, the row (and
line) and column where they are knowable, and the fix. `Source.batches` then yields the
rows in input order, each batch led by `ROW_INDEX`, the row's 0-based position in the file.

    >>> source = open_source(Path("reviews.csv"), key="review_id")
    >>> source.columns
    ('review_id', 'product', 'text')
    >>> for batch in source.batches(10_000, start=done):  # resume after `done` rows
    ...     handle(batch)  # columns: __row, review_id, product, text
    >>> frame_source(pl.DataFrame({"id": [1, 2], "text": ["a", "b"]}), key="id").count()
    2

`frame_source` is the same over a polars DataFrame held in memory (`pipeline.run_frame`):
no file is written or read, and the checks that apply to a table in memory (column
names, the key column) run and name the row and column as they do for a file.

Polars reads on the fast path. Where polars fails, or is silent about a row it pads (a CSV
row with too few fields), a second, careful pass finds the first bad row so the message
can point at it; that pass runs only when needed, and it and every message about a bad
file are in `input_checks.py`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, TypeVar, get_args

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import first_line
from pipeline.input_checks import (
    check_content,
    check_file,
    check_key,
    check_names,
    check_no_bom,
    csv_header,
    csv_problem,
    input_error,
    list_names,
    ndjson_problem,
)
from pipeline.records import ROW_INDEX

_T = TypeVar("_T")

Format = Literal["csv", "parquet", "ndjson"]
FORMATS: tuple[Format, ...] = get_args(Format)
#: A Source's format: a file's, or "frame" for a DataFrame in memory.
SourceFormat = Format | Literal["frame"]
#: What messages call a DataFrame given in memory, where a file's path would be.
FRAME_NAME = "the input DataFrame"
EXTENSIONS: dict[str, Format] = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
}

#: CSV's field separator unless [input] separator says otherwise.
CSV_SEPARATOR = ","
#: Separators a one-column CSV header is searched for, to say the file is not comma-separated.
OTHER_SEPARATORS = (";", "\t", "|")


@dataclass(frozen=True)
class Source:
    """A validated input table. Build it with `open_source` (a file) or `frame_source`."""

    #: The file; None for a DataFrame in memory (`frame`).
    path: Path | None
    format: SourceFormat
    columns: tuple[str, ...]
    schema: dict[str, pl.DataType] = field(hash=False)
    key: str | None
    #: The rows the validation pass found; None for a Source built by hand.
    _rows: int | None = field(default=None, repr=False, compare=False)
    #: CSV's field separator.
    separator: str = CSV_SEPARATOR
    #: The table itself, when it is a DataFrame in memory rather than a file.
    frame: pl.DataFrame | None = field(default=None, repr=False, compare=False, hash=False)
    #: Where relative file names in rows (images, audio) resolve: the file's folder, or
    #: for a DataFrame the working folder of the code that passed it.
    folder: Path = field(default_factory=Path.cwd, compare=False)

    @property
    def name(self) -> str:
        """The input as messages name it: the file's path, or FRAME_NAME."""
        return FRAME_NAME if self.path is None else str(self.path)

    def batches(self, size: int = 10_000, *, start: int = 0) -> Iterator[pl.DataFrame]:
        """Yield the rows from position `start` on, in order, at most `size` at a time.

        Memory stays bounded by `size` and polars' read buffers, whatever the file size.

        >>> sum(batch.height for batch in source.batches(1_000)) == source.count()
        True
        """
        if size < 1 or start < 0:
            raise ValueError(f"need size >= 1 and start >= 0, got size={size}, start={start}")
        if self.frame is not None:
            yield from self._frame_batches(size, start)
            return
        if self.format == "parquet":
            yield from self._parquet_batches(size, start)
            return
        frame = self._indexed().slice(start)
        try:
            for chunk in frame.collect_batches(chunk_size=size, lazy=True):
                # `chunk_size` is what polars buffers, not a promise; slices are zero-copy.
                for offset in range(0, chunk.height, size):
                    yield chunk.slice(offset, size)
        except (pl.exceptions.PolarsError, OSError) as err:
            problem = f"changed or became unreadable while reading: {first_line(err)}"
            raise input_error(Path(self.name), problem) from err

    def _frame_batches(self, size: int, start: int) -> Iterator[pl.DataFrame]:
        """A DataFrame in memory, in zero-copy slices led by their positions."""
        assert self.frame is not None
        for offset in range(start, self.frame.height, size):
            part = self.frame.slice(offset, size)
            index = pl.int_range(offset, offset + part.height, dtype=pl.UInt64, eager=True)
            yield part.insert_column(0, index.alias(ROW_INDEX))

    def _parquet_batches(self, size: int, start: int) -> Iterator[pl.DataFrame]:
        """Parquet one row group at a time, through pyarrow: polars' streaming scan
        buffers more the bigger the file (334 MB at 2M rows against 76 MB at 20k)."""
        position = 0
        assert self.path is not None  # a parquet Source is a file
        try:
            reader = pq.ParquetFile(self.path)
            for part in reader.iter_batches(batch_size=size, columns=list(self.columns)):
                rows = part.num_rows
                if position + rows > start:
                    frame = pl.DataFrame(pl.from_arrow(part)).cast(self.schema)  # type: ignore[arg-type]
                    index = pl.int_range(position, position + rows, dtype=pl.UInt64, eager=True)
                    frame = frame.insert_column(0, index.alias(ROW_INDEX))
                    yield frame.slice(max(0, start - position))
                position += rows
        except (pa.ArrowException, OSError) as err:
            problem = f"changed or became unreadable while reading: {first_line(err)}"
            raise input_error(self.path, problem) from err

    def head(self, n: int) -> pl.DataFrame:
        """The first `n` rows, shaped like a batch."""
        return self._indexed().head(n).collect()

    def count(self) -> int:
        """The number of rows: the validation pass's count, or a streaming count."""
        if self._rows is not None:
            return self._rows
        # Decoding one column keeps memory at polars' read buffers; a bare `pl.len()` on a
        # CSV maps the whole file into memory to count its lines.
        counted = self._lazy().select(pl.len(), pl.first().null_count())
        return int(counted.collect(engine="streaming").item(0, 0))

    def _lazy(self) -> pl.LazyFrame:
        if self.frame is not None:
            return self.frame.lazy()
        assert self.path is not None  # a Source is a file or a frame
        if self.format == "csv":
            return _scan_csv_text(self.path, self.separator)
        if self.format == "parquet":
            return _scan_parquet(self.path)
        return _scan_ndjson(self.path, schema=self.schema)

    def _indexed(self) -> pl.LazyFrame:
        # polars' index type is UInt32 in this build; the contract is a 64-bit position.
        return (
            self._lazy().with_row_index(ROW_INDEX).with_columns(pl.col(ROW_INDEX).cast(pl.UInt64))
        )


def open_source(
    path: Path,
    *,
    format: str | None = None,
    key: str | None = None,
    separator: str = CSV_SEPARATOR,
) -> Source:
    """Check the input table once, whole, and return a `Source` to read it in batches.

    `format` is "csv", "parquet" or "ndjson"; None reads it from the extension. `key`
    names the column that identifies a row; None keys rows by their position. A CSV's
    columns are all text, exactly as written (`007` stays `007`): CSV carries no types.
    Raises `InputError` with one line naming the file, row and column, and the fix.

    >>> open_source(Path("data/reviews.csv"), key="id").count()
    120000
    """
    path = Path(path)
    check_file(path)
    fmt = _format_of(path, format)
    if fmt != "csv" and separator != CSV_SEPARATOR:
        raise input_error(path, f"is {fmt}, and [input] separator is for CSV only; remove it")
    if fmt != "parquet":
        check_content(path)
    if fmt == "csv":
        schema, rows = _read_csv(path, separator)
    else:
        schema, rows = _READERS[fmt](path)
    source = Source(path, fmt, tuple(schema), schema, key, rows, separator, folder=path.parent)
    if key is not None:
        check_key(path, source._indexed(), key, schema)
    return source


def frame_source(frame: pl.DataFrame, *, key: str | None = None) -> Source:
    """A `Source` over a polars DataFrame in memory, checked as a file's rows are: every
    column named and none reserved, at least one row, and `key` (when given) present,
    never blank, and unique. Raises `InputError` naming FRAME_NAME, the row and column.

    >>> frame_source(pl.DataFrame({"id": ["a", "b"], "text": ["x", "y"]}), key="id").count()
    2
    """
    where = Path(FRAME_NAME)  # input_checks' messages begin with the input's name
    check_names(where, frame.columns)
    if frame.height == 0:
        raise input_error(where, f"has no rows, only columns ({list_names(frame.columns)})")
    schema = dict(frame.schema)
    source = Source(None, "frame", tuple(schema), schema, key, frame.height, frame=frame)
    if key is not None:
        check_key(where, source._indexed(), key, schema)
    return source


class _Checked(NamedTuple):
    """What a format's validation pass found."""

    schema: dict[str, pl.DataType]
    rows: int


# --- the format --------------------------------------------------------------------------


def _format_of(path: Path, format: str | None) -> Format:
    if format is not None:
        if format not in FORMATS:
            raise input_error(
                path, f"unknown format `{format}`; valid formats are {', '.join(FORMATS)}"
            )
        return format
    if path.suffix.lower() in EXTENSIONS:
        return EXTENSIONS[path.suffix.lower()]
    raise input_error(
        path,
        f"unknown extension `{path.suffix}`; valid extensions are {', '.join(EXTENSIONS)}, "
        f"or name the format ({', '.join(FORMATS)})",
    )


# --- CSV ---------------------------------------------------------------------------------


def _scan_csv_text(path: Path, separator: str) -> pl.LazyFrame:
    # Every column is read as text, exactly as written. CSV carries no types: a guess
    # turns a zip code `01234` into 1234, an id `007` into 7, a 20-digit id into an
    # integer Parquet cannot store, and a value that breaks the guess at row 5,000,000
    # would crash the run there. A template that needs a number says so: {{ n | int }}.
    return pl.scan_csv(path, infer_schema=False, glob=False, separator=separator)


def _read_csv(path: Path, separator: str) -> _Checked:
    header = csv_header(path, separator)
    check_names(path, header)

    def diagnose(path: Path) -> str | None:
        return csv_problem(path, separator=separator)

    names = _polars(path, "csv", lambda: _scan_csv_text(path, separator).collect_schema(), diagnose)
    guess: dict[str, pl.DataType] = {name: pl.String() for name in names}
    stats = _polars(path, "csv", lambda: _csv_stats(path, guess, separator), diagnose)
    if stats[ROW_INDEX] == 0:
        raise input_error(path, f"has no rows, only a header ({list_names(header)})")
    # polars pads a row with too few fields with nulls, silently. Such a row leaves the last
    # column null, so only a file with nulls there needs the careful pass to tell them apart.
    if stats["__maybe_short"]:
        # the polars pass read every field
        problem = csv_problem(path, utf8_checked=True, separator=separator)
        if problem is not None:
            raise input_error(path, problem)
    return _Checked(guess, stats[ROW_INDEX])


def _csv_stats(path: Path, schema: dict[str, pl.DataType], separator: str) -> dict[str, int]:
    """One streaming pass: the row count, and the rows that may be short."""
    last = next(reversed(schema))
    checks = [
        pl.len().alias(ROW_INDEX),
        pl.col(last).is_null().sum().alias("__maybe_short"),
        # Every column is touched, so polars checks every field's UTF-8.
        *(pl.col(name).str.len_bytes().sum().alias(f"__bytes{i}") for i, name in enumerate(schema)),
    ]
    scan = _scan_csv_text(path, separator)
    return scan.select(checks).collect(engine="streaming").row(0, named=True)


# --- NDJSON ------------------------------------------------------------------------------


def _read_ndjson(path: Path) -> _Checked:
    check_no_bom(path)
    # The whole file is read to infer types (an extra pass): with a sample, a key first
    # seen after it would be dropped silently, and a type change would fail mid-run.
    schema = _polars(path, "ndjson", lambda: _ndjson_schema(path))
    check_names(path, list(schema))
    rows = _polars(path, "ndjson", lambda: _count_decoded(_scan_ndjson(path, schema=schema)))
    if rows == 0:
        raise input_error(path, "has no rows")
    return _Checked(schema, rows)


def _ndjson_schema(path: Path) -> dict[str, pl.DataType]:
    return dict(_scan_ndjson(path, schema=None).collect_schema())


def _scan_ndjson(path: Path, *, schema: dict[str, pl.DataType] | None) -> pl.LazyFrame:
    # scan_ndjson has no glob=False; a glob character in brackets matches only itself.
    literal = re.sub(r"[][*?]", r"[\g<0>]", str(path))
    return pl.scan_ndjson(literal, schema=schema, infer_schema_length=None)


# --- Parquet -----------------------------------------------------------------------------


def _scan_parquet(path: Path) -> pl.LazyFrame:
    return pl.scan_parquet(path, glob=False)


def _read_parquet(path: Path) -> _Checked:
    schema = _polars(path, "parquet", lambda: dict(_scan_parquet(path).collect_schema()))
    check_names(path, list(schema))
    # The footer alone gives the schema and count; decoding every page is what finds a
    # corrupt one before the run instead of in the middle of it.
    rows = _polars(path, "parquet", lambda: _count_decoded(_scan_parquet(path)))
    if rows == 0:
        raise input_error(path, f"has no rows, only columns ({list_names(list(schema))})")
    return _Checked(schema, rows)


# --- shared ------------------------------------------------------------------------------

#: CSV is read with its separator (`_read_csv`), and diagnosed with it, not here.
_READERS: dict[Format, Callable[[Path], _Checked]] = {
    "parquet": _read_parquet,
    "ndjson": _read_ndjson,
}
_DIAGNOSES: dict[Format, Callable[[Path], str | None]] = {
    "parquet": lambda path: None,  # polars' own message is as precise as it gets
    "ndjson": ndjson_problem,
}
#: What a message says when the careful pass finds nothing more precise than polars.
_UNREADABLE: dict[Format, str] = {
    "csv": "cannot be read as CSV ({}); check that it is comma-separated UTF-8 text",
    "parquet": "is not a readable Parquet file ({}); re-export it, or check that the copy or "
    "download finished",
    "ndjson": "cannot be read as NDJSON ({}); each line must be one JSON object, with the same "
    "type for a key on every line",
}


def _polars(
    path: Path,
    fmt: Format,
    read: Callable[[], _T],
    diagnose: Callable[[Path], str | None] | None = None,
) -> _T:
    """Run a polars read; if it fails, find out where with the careful pass."""
    try:
        return read()
    except pl.exceptions.PolarsError as err:
        found = first_line(err).removeprefix("parquet: ")
        problem = (diagnose or _DIAGNOSES[fmt])(path) or _UNREADABLE[fmt].format(found)
        raise input_error(path, problem) from err


def _count_decoded(frame: pl.LazyFrame) -> int:
    # null_count makes polars decode every value of every column, not just count lines.
    stats = frame.select(pl.len().alias(ROW_INDEX), pl.all().null_count())
    return int(stats.collect(engine="streaming")[ROW_INDEX].item())
