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

Polars reads on the fast path. Where polars fails, or is silent about a row it pads (a CSV
row with too few fields), a second, careful pass with Python's `csv` and `orjson` finds
the first bad row so the message can point at it; that pass runs only when needed.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar, get_args

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.records import ROW_INDEX

if TYPE_CHECKING:
    from _csv import Reader as CsvReader

_T = TypeVar("_T")

Format = Literal["csv", "parquet", "ndjson"]
FORMATS: tuple[Format, ...] = get_args(Format)
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
#: How many column names a message lists before it shortens the list.
NAMES_SHOWN = 8
#: How much of a bad row or line a message quotes.
PREVIEW_CHARS = 60
#: Block size of the byte-level UTF-8 scan; its memory stays near this.
SCAN_BLOCK = 1 << 20
_BOM = codecs.BOM_UTF8
#: Bytes a file's first block is read for, to tell a foreign file from the text it claims.
SNIFF_BYTES = 4096


@dataclass(frozen=True)
class Source:
    """A validated input table. Build it with `open_source`."""

    path: Path
    format: Format
    columns: tuple[str, ...]
    schema: dict[str, pl.DataType] = field(hash=False)
    key: str | None
    #: The rows the validation pass found; None for a Source built by hand.
    _rows: int | None = field(default=None, repr=False, compare=False)
    #: CSV's field separator.
    separator: str = CSV_SEPARATOR

    def batches(self, size: int = 10_000, *, start: int = 0) -> Iterator[pl.DataFrame]:
        """Yield the rows from position `start` on, in order, at most `size` at a time.

        Memory stays bounded by `size` and polars' read buffers, whatever the file size.

        >>> sum(batch.height for batch in source.batches(1_000)) == source.count()
        True
        """
        if size < 1 or start < 0:
            raise ValueError(f"need size >= 1 and start >= 0, got size={size}, start={start}")
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
            problem = f"changed or became unreadable while reading: {_first_line(err)}"
            raise _input_error(self.path, problem) from err

    def _parquet_batches(self, size: int, start: int) -> Iterator[pl.DataFrame]:
        """Parquet one row group at a time, through pyarrow: polars' streaming scan
        buffers more the bigger the file (334 MB at 2M rows against 76 MB at 20k)."""
        position = 0
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
            problem = f"changed or became unreadable while reading: {_first_line(err)}"
            raise _input_error(self.path, problem) from err

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
    _check_file(path)
    fmt = _format_of(path, format)
    if fmt != "csv" and separator != CSV_SEPARATOR:
        raise _input_error(path, f"is {fmt}, and [input] separator is for CSV only; remove it")
    _check_content(path, fmt)
    if fmt == "csv":
        schema, rows = _read_csv(path, separator)
    else:
        schema, rows = _READERS[fmt](path)
    source = Source(path, fmt, tuple(schema), schema, key, rows, separator)
    _check_key(source)
    return source


class _Checked(NamedTuple):
    """What a format's validation pass found."""

    schema: dict[str, pl.DataType]
    rows: int


# --- the file and its format -------------------------------------------------------------


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise _input_error(path, "is a directory; name the input file itself")
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError:
        raise _input_error(path, f"no such file{_nearest_file(path)}") from None
    except OSError as err:
        raise _input_error(
            path, f"cannot be read ({err.strerror}); check the path and its permissions"
        ) from None


def _nearest_file(path: Path) -> str:
    try:
        names = [entry.name for entry in path.parent.iterdir()]
    except OSError:
        return ""
    near = difflib.get_close_matches(path.name, names, n=1)
    return f"; did you mean {path.parent / near[0]}?" if near else ""


def _format_of(path: Path, format: str | None) -> Format:
    if format is not None:
        if format not in FORMATS:
            raise _input_error(
                path, f"unknown format `{format}`; valid formats are {', '.join(FORMATS)}"
            )
        return format
    if path.suffix.lower() in EXTENSIONS:
        return EXTENSIONS[path.suffix.lower()]
    raise _input_error(
        path,
        f"unknown extension `{path.suffix}`; valid extensions are {', '.join(EXTENSIONS)}, "
        f"or name the format ({', '.join(FORMATS)})",
    )


#: Leading bytes of files people name .csv or .ndjson by mistake, and what to do instead.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "is gzip-compressed, not text: decompress it first (`gunzip -k {path}`)"),
    (
        b"PK\x03\x04",
        "is a ZIP archive (an Excel .xlsx workbook is one), not text: export the sheet as "
        '"CSV UTF-8", or unzip it',
    ),
    (
        b"\xd0\xcf\x11\xe0",
        "is an Excel .xls workbook (or another OLE file), not text: export the sheet as "
        '"CSV UTF-8"',
    ),
    (b"PAR1", 'is a Parquet file: name it .parquet, or set [input] format = "parquet"'),
    (b"SQLite format 3\x00", "is an SQLite database, not a table file: export a table first"),
    (b"%PDF", "is a PDF document, not a table file"),
    (
        codecs.BOM_UTF32_LE,
        "is UTF-32 text; re-encode it as UTF-8: `iconv -f utf-32 -t utf-8 {path} > {fixed}`",
    ),
    (
        codecs.BOM_UTF32_BE,
        "is UTF-32 text; re-encode it as UTF-8: `iconv -f utf-32 -t utf-8 {path} > {fixed}`",
    ),
    (
        codecs.BOM_UTF16_LE,
        "is UTF-16 text; re-encode it as UTF-8: `iconv -f utf-16 -t utf-8 {path} > {fixed}`",
    ),
    (
        codecs.BOM_UTF16_BE,
        "is UTF-16 text; re-encode it as UTF-8: `iconv -f utf-16 -t utf-8 {path} > {fixed}`",
    ),
)


def _check_content(path: Path, fmt: Format) -> None:
    """A text format whose first bytes say it is something else: name what it is."""
    if fmt == "parquet":
        return
    with path.open("rb") as file:
        head = file.read(SNIFF_BYTES)
    fixed = path.with_stem(path.stem + "-utf8")
    for magic, problem in _MAGIC:
        if head.startswith(magic):
            raise _input_error(path, problem.format(path=path, fixed=fixed))
    # UTF-16 text of ASCII characters has a NUL beside every character; a BOM is optional.
    # (A NUL here and there is data: CSV allows it.)
    even, odd = head[0::2].count(0), head[1::2].count(0)
    if len(head) >= 4 and min(even, odd) == 0 and max(even, odd) >= 0.9 * (len(head) // 2):
        encoding = "utf-16le" if odd else "utf-16be"
        raise _input_error(
            path,
            f"looks like {encoding.upper()} text without a byte-order mark (a NUL byte beside "
            f"every character); re-encode it as UTF-8: `iconv -f {encoding} -t utf-8 {path} "
            f"> {fixed}`",
        )


# --- CSV ---------------------------------------------------------------------------------


def _scan_csv_text(path: Path, separator: str = CSV_SEPARATOR) -> pl.LazyFrame:
    # Every column is read as text, exactly as written. CSV carries no types: a guess
    # turns a zip code `01234` into 1234, an id `007` into 7, a 20-digit id into an
    # integer Parquet cannot store, and a value that breaks the guess at row 5,000,000
    # would crash the run there. A template that needs a number says so: {{ n | int }}.
    return pl.scan_csv(path, infer_schema=False, glob=False, separator=separator)


def _read_csv(path: Path, separator: str = CSV_SEPARATOR) -> _Checked:
    header = _csv_header(path, separator)
    _check_names(path, header)

    def diagnose(path: Path) -> str | None:
        return _csv_problem(path, separator=separator)

    names = _polars(path, "csv", lambda: _scan_csv_text(path, separator).collect_schema(), diagnose)
    guess: dict[str, pl.DataType] = {name: pl.String() for name in names}
    stats = _polars(path, "csv", lambda: _csv_stats(path, guess, separator), diagnose)
    if stats[ROW_INDEX] == 0:
        raise _input_error(path, f"has no rows, only a header ({_names(header)})")
    # polars pads a row with too few fields with nulls, silently. Such a row leaves the last
    # column null, so only a file with nulls there needs the careful pass to tell them apart.
    if stats["__maybe_short"]:
        # the polars pass read every field
        problem = _csv_problem(path, utf8_checked=True, separator=separator)
        if problem is not None:
            raise _input_error(path, problem)
    return _Checked(guess, stats[ROW_INDEX])


def _csv_stats(
    path: Path, schema: dict[str, pl.DataType], separator: str = CSV_SEPARATOR
) -> dict[str, int]:
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


def _csv_header(path: Path, separator: str = CSV_SEPARATOR) -> list[str]:
    with _csv_reader(path, separator) as (reader, _):
        try:
            header = next(reader, None)
        except csv.Error as err:
            raise _input_error(path, f"the header (line 1) is not valid CSV: {err}") from None
    if header is None:
        raise _input_error(path, "is empty: no header and no rows")
    if not header:
        raise _input_error(path, "line 1 is blank; the first line must name the columns")
    if any(_has_bad_bytes(name) for name in header):
        problem = _encoding_problem(path, "the header (line 1)", _first_bad_utf8(path))
        raise _input_error(path, problem)
    return header


def _csv_problem(
    path: Path, *, utf8_checked: bool = False, separator: str = CSV_SEPARATOR
) -> str | None:
    """The first row polars would reject or misread, by a careful pass over the whole file."""
    bad_byte = None if utf8_checked else _first_bad_utf8(path)
    bad_line = bad_byte.line if bad_byte else sys.maxsize
    with _csv_reader(path, separator) as (reader, lines):
        width = len(header := next(reader))
        row, end, quotes = 0, reader.line_num, lines.quotes
        try:
            # The loop only looks; `_row_problem` says what it saw, once.
            for fields in reader:
                row, start, end = row + 1, end + 1, reader.line_num
                odd_quotes = (lines.quotes - quotes) % 2 == 1
                ragged = len(fields) != width and (fields or width > 1)
                if end >= bad_line or odd_quotes or ragged:
                    where = _where(row, start, end)
                    bad = bad_byte if end >= bad_line else None
                    return _row_problem(path, where, fields, header, bad, odd_quotes)
                quotes = lines.quotes
        except csv.Error as err:
            return (
                f"{_where(row + 1, end + 1, reader.line_num)} is not valid CSV ({err}); {_QUOTING}"
            )
    return None


def _row_problem(
    path: Path,
    where: str,
    fields: list[str],
    header: list[str],
    bad_byte: _BadByte | None,
    odd_quotes: bool,
) -> str:
    if bad_byte is not None:
        return _encoding_problem(path, f"{where}{_column_with_bad_bytes(fields, header)}", bad_byte)
    if odd_quotes:
        return f'{where} has an unmatched `"`: {_preview(fields)}; {_QUOTING}'
    return _ragged(where, fields, header)


_QUOTING = 'a field that contains `"` must be quoted, with the `"` doubled: "say ""hi"""'


class _Lines:
    """Feeds a file's lines to `csv.reader` the way polars splits them, counting `"`.

    polars ends a line at a line feed only, so a lone carriage return is data; Python's csv
    would end the record there, or fail, so it is shown as `␍` instead. polars also splits
    records by the parity of `"`: an odd count in one record (as in `1,say "hi,2`) makes
    polars read on past the line end, where Python's csv does not, so the count is kept to
    catch it. Undecodable bytes stay in the text as surrogates (surrogateescape), so the
    pass can name the column that holds them.
    """

    def __init__(self, file: IO[str]) -> None:
        self.file = file
        self.quotes = 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = next(self.file)
        self.quotes += line.count('"')
        if "\r" in line and "\r" in (body := line.rstrip("\r\n")):
            line = body.replace("\r", "\u240d") + line[len(body) :]
        return line


@contextmanager
def _csv_reader(path: Path, separator: str = CSV_SEPARATOR) -> Iterator[tuple[CsvReader, _Lines]]:
    limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)  # a long document in one field is normal input here
    try:
        # newline="\n" splits lines at line feeds only, as polars does; utf-8-sig drops a
        # byte-order mark from the first column's name, as polars does.
        with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="\n") as file:
            lines = _Lines(file)
            yield csv.reader(lines, strict=True, delimiter=separator), lines
    finally:
        csv.field_size_limit(limit)


def _where(row: int, start: int, end: int) -> str:
    lines = f"line {start}" if start == end else f"lines {start}-{end}"
    return f"row {row} ({lines})"


def _ragged(where: str, fields: list[str], header: list[str]) -> str:
    if not fields:
        return (
            f"{where} is blank, the header has {len(header)} fields ({_names(header)}); "
            "delete the blank line"
        )
    return (
        f"{where} has {len(fields)} fields, the header has {len(header)} ({_names(header)}): "
        f"{_preview(fields)}; quote values that contain commas or line breaks, and keep "
        "empty values as empty fields (`1,,x`)"
    )


def _column_with_bad_bytes(fields: list[str], header: list[str]) -> str:
    for i, value in enumerate(fields):
        if _has_bad_bytes(value):
            return f", column `{header[i]}`" if i < len(header) else f", field {i + 1}"
    return ""


def _has_bad_bytes(text: str) -> bool:
    # surrogateescape maps each undecodable byte to a lone surrogate U+DC80..U+DCFF.
    return not text.isascii() and any("\udc80" <= char <= "\udcff" for char in text)


# --- NDJSON ------------------------------------------------------------------------------


def _read_ndjson(path: Path) -> _Checked:
    with path.open("rb") as file:
        if file.read(len(_BOM)) == _BOM:
            raise _input_error(
                path,
                "starts with a UTF-8 byte-order mark, which JSON does not allow; remove it: "
                f"`sed -i '1s/^\\xEF\\xBB\\xBF//' {path}`",
            )
    # The whole file is read to infer types (an extra pass): with a sample, a key first
    # seen after it would be dropped silently, and a type change would fail mid-run.
    schema = _polars(path, "ndjson", lambda: _ndjson_schema(path))
    _check_names(path, list(schema))
    rows = _polars(path, "ndjson", lambda: _count_decoded(_scan_ndjson(path, schema=schema)))
    if rows == 0:
        raise _input_error(path, "has no rows")
    return _Checked(schema, rows)


def _ndjson_schema(path: Path) -> dict[str, pl.DataType]:
    return dict(_scan_ndjson(path, schema=None).collect_schema())


def _scan_ndjson(path: Path, *, schema: dict[str, pl.DataType] | None) -> pl.LazyFrame:
    # scan_ndjson has no glob=False; a glob character in brackets matches only itself.
    literal = re.sub(r"[][*?]", r"[\g<0>]", str(path))
    return pl.scan_ndjson(literal, schema=schema, infer_schema_length=None)


def _ndjson_problem(path: Path) -> str | None:
    """The first line that is not one JSON object, by a careful pass over the whole file."""
    bad_byte = _first_bad_utf8(path)
    empty = True
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            if bad_byte is not None and bad_byte.line == number:
                return _encoding_problem(path, f"line {number}", bad_byte)
            if line.strip():
                empty = False
                problem = _json_problem(line)
                if problem is not None:
                    return f"line {number} {problem}; each line must be one JSON object"
    return "is empty: no rows" if empty else None


def _json_problem(line: bytes) -> str | None:
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as err:
        return f"is not valid JSON ({err.msg} at column {err.colno}): {_preview(line)}"
    if not isinstance(value, dict):
        return f"is a JSON {type(value).__name__}, not an object: {_preview(line)}"
    return None


# --- Parquet -----------------------------------------------------------------------------


def _scan_parquet(path: Path) -> pl.LazyFrame:
    return pl.scan_parquet(path, glob=False)


def _read_parquet(path: Path) -> _Checked:
    schema = _polars(path, "parquet", lambda: dict(_scan_parquet(path).collect_schema()))
    _check_names(path, list(schema))
    # The footer alone gives the schema and count; decoding every page is what finds a
    # corrupt one before the run instead of in the middle of it.
    rows = _polars(path, "parquet", lambda: _count_decoded(_scan_parquet(path)))
    if rows == 0:
        raise _input_error(path, f"has no rows, only columns ({_names(list(schema))})")
    return _Checked(schema, rows)


# --- shared checks -----------------------------------------------------------------------

_READERS: dict[Format, Callable[[Path], _Checked]] = {
    "csv": _read_csv,
    "parquet": _read_parquet,
    "ndjson": _read_ndjson,
}
_DIAGNOSES: dict[Format, Callable[[Path], str | None]] = {
    "csv": _csv_problem,
    "parquet": lambda path: None,  # polars' own message is as precise as it gets
    "ndjson": _ndjson_problem,
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
        found = _first_line(err).removeprefix("parquet: ")
        problem = (diagnose or _DIAGNOSES[fmt])(path) or _UNREADABLE[fmt].format(found)
        raise _input_error(path, problem) from err


def _count_decoded(frame: pl.LazyFrame) -> int:
    # null_count makes polars decode every value of every column, not just count lines.
    stats = frame.select(pl.len().alias(ROW_INDEX), pl.all().null_count())
    return int(stats.collect(engine="streaming")[ROW_INDEX].item())


def _check_names(path: Path, names: list[str]) -> None:
    if not names:
        raise _input_error(path, "has no columns")
    seen: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        if not name.strip():
            raise _input_error(
                path, f"column {number} has no name ({_names(names)}); name it or remove it"
            )
        if name in seen:
            raise _input_error(
                path,
                f"column `{name}` appears twice (columns {seen[name]} and {number}); "
                "give every column a unique name",
            )
        seen[name] = number
    if ROW_INDEX in seen:
        raise _input_error(
            path, f"column `{ROW_INDEX}` is reserved for the row position; rename it"
        )


def _check_key(source: Source) -> None:
    key = source.key
    if key is None:
        return
    if key not in source.schema:
        near = difflib.get_close_matches(key, source.columns, n=1)
        hint = f"did you mean `{near[0]}`? " if near else ""
        raise _input_error(
            source.path,
            f"key column `{key}` is not in the input; {hint}the input has: "
            f"{_names(list(source.columns))}",
        )
    rows = source._indexed().select(ROW_INDEX, key)
    _check_blank_keys(source, rows, key)
    # One query each: polars streams either alone, but holds the column to do both at once.
    if not _scalar(rows.select(_increasing(key, source.schema[key]))) and _may_repeat(rows, key):
        _check_duplicates(source, rows, key)


def _check_blank_keys(source: Source, rows: pl.LazyFrame, key: str) -> None:
    blank = pl.col(key).is_null()
    if source.schema[key] == pl.String:
        blank |= pl.col(key).str.strip_chars() == ""
    first_blank = _scalar(rows.select(pl.col(ROW_INDEX).filter(blank).first()))
    if first_blank is not None:
        raise _input_error(
            source.path,
            f"key column `{key}` is empty at row {first_blank + 1}; give every row a key, or "
            "leave the key out to identify rows by position",
        )


def _scalar(query: pl.LazyFrame) -> Any:
    return query.collect(engine="streaming").item()


def _increasing(key: str, dtype: pl.DataType) -> pl.Expr:
    # Keys in increasing order (the common case: ids) are unique, proved without holding
    # any of them in memory.
    if dtype.is_numeric() or dtype.is_temporal() or dtype == pl.String:
        return (pl.col(key) > pl.col(key).shift(1)).all()
    return pl.lit(False)


def _may_repeat(rows: pl.LazyFrame, key: str) -> bool:
    # Sorted 8-byte hashes hold ~15 bytes a row however long the keys (a hash set takes
    # ~40); a collision only costs the exact search, which then finds nothing.
    hashes = rows.select(pl.col(key).hash().sort().alias("hash"))
    return bool(_scalar(hashes.select((pl.col("hash") == pl.col("hash").shift(1)).any())))


def _check_duplicates(source: Source, rows: pl.LazyFrame, key: str) -> None:
    first = (
        rows.group_by(key)
        .agg(pl.len().alias("__count"), pl.col(ROW_INDEX).min().alias("__first"))
        .filter(pl.col("__count") > 1)
        .sort("__first")
        .head(1)
        .collect(engine="streaming")
    )
    if first.is_empty():
        return
    value = first[key].item()
    at = rows.filter(pl.col(key) == value).head(2).collect()[ROW_INDEX].to_list()
    raise _input_error(
        source.path,
        f"key column `{key}` has the value `{value}` at rows {at[0] + 1} and {at[1] + 1} "
        f"({first['__count'].item()} times in all); keys must be unique",
    )


# --- bytes that are not UTF-8 ------------------------------------------------------------


class _BadByte(NamedTuple):
    line: int  # 1-based
    offset: int  # 0-based, from the start of the file
    value: int


def _first_bad_utf8(path: Path) -> _BadByte | None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with path.open("rb") as file:
        while True:
            block = file.read(SCAN_BLOCK)
            # The decoder holds back the first bytes of a character split between blocks.
            held = len(decoder.getstate()[0])
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                at = err.start - held  # negative: the bad byte was held from the last block
                line += block.count(b"\n", 0, max(at, 0))
                return _BadByte(line, offset + at, err.object[err.start])
            if not block:
                return None
            line += block.count(b"\n")
            offset += len(block)


def _encoding_problem(path: Path, where: str, bad: _BadByte | None) -> str:
    found = f"byte 0x{bad.value:02X} at offset {bad.offset}" if bad else "a byte"
    with path.open("rb") as file:
        start = file.read(2)
    source = "utf-16" if start in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "latin1"
    return (
        f"{where}: {found} is not valid UTF-8; re-encode the file as UTF-8, e.g. "
        f"`iconv -f {source} -t utf-8 {path} > {path.with_stem(path.stem + '-utf8')}`"
    )


# --- messages ----------------------------------------------------------------------------


def _input_error(path: Path, problem: str) -> InputError:
    # One line, whatever a quoted value held, and printable whatever bytes it held.
    message = f"{path}: {problem}".replace("\r", "\\r").replace("\n", "\\n")
    return InputError(message.encode("utf-8", "backslashreplace").decode("utf-8"))


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown if len(names) <= NAMES_SHOWN else f"{shown}, ... ({len(names)} columns)"


def _preview(value: list[str] | bytes) -> str:
    text = ",".join(value) if isinstance(value, list) else value.decode(errors="replace").strip()
    return f"`{text[:PREVIEW_CHARS]}{'...' if len(text) > PREVIEW_CHARS else ''}`"


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__
