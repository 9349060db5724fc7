"""What is wrong with an input file, said in one line that names the row, the column and the fix.

    check_file(path)                                 # there, a file, readable
    check_content(path)                              # text, not gzip or a workbook
    header = csv_header(path, ",")                   # the column names, or InputError
    problem = csv_problem(path, separator=",")       # the first bad row, or None
    raise input_error(path, problem)                 # "reviews.csv: row 3 (line 4) has ..."

`source.py` reads on the fast path with polars. Where polars fails, or is silent about a
row it pads (a CSV row with too few fields), it asks here: a careful pass with Python's
`csv` and `orjson` finds the first bad row, line and column, and says what to do. The
checks of a table's column names and its key column (present, never blank, unique) are
here too, so every message about a bad input file is written in this one module.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

import orjson
import polars as pl

from pipeline.errors import InputError
from pipeline.records import ROW_INDEX

if TYPE_CHECKING:
    from _csv import Reader as CsvReader

#: How many column names a message lists before it shortens the list.
NAMES_SHOWN = 8
#: How much of a bad row or line a message quotes.
PREVIEW_CHARS = 60
#: Block size of the byte-level UTF-8 scan; its memory stays near this.
SCAN_BLOCK = 1 << 20
_BOM = codecs.BOM_UTF8
#: Bytes a file's first block is read for, to tell a foreign file from the text it claims.
SNIFF_BYTES = 4096


# --- the file and its content ------------------------------------------------------------


def check_file(path: Path) -> None:
    """The input is a file that can be opened; if it is missing, name the nearest one."""
    if path.is_dir():
        raise input_error(path, "is a directory; name the input file itself")
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError:
        raise input_error(path, f"no such file{_nearest_file(path)}") from None
    except OSError as err:
        raise input_error(
            path, f"cannot be read ({err.strerror}); check the path and its permissions"
        ) from None


def _nearest_file(path: Path) -> str:
    try:
        names = [entry.name for entry in path.parent.iterdir()]
    except OSError:
        return ""
    near = difflib.get_close_matches(path.name, names, n=1)
    return f"; did you mean {path.parent / near[0]}?" if near else ""


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


def check_content(path: Path) -> None:
    """A file read as text (CSV, NDJSON) whose first bytes say it is something else: name
    what it is, and how to turn it into UTF-8 text."""
    with path.open("rb") as file:
        head = file.read(SNIFF_BYTES)
    fixed = path.with_stem(path.stem + "-utf8")
    for magic, problem in _MAGIC:
        if head.startswith(magic):
            raise input_error(path, problem.format(path=path, fixed=fixed))
    # UTF-16 text of ASCII characters has a NUL beside every character; a BOM is optional.
    # (A NUL here and there is data: CSV allows it.)
    even, odd = head[0::2].count(0), head[1::2].count(0)
    if len(head) >= 4 and min(even, odd) == 0 and max(even, odd) >= 0.9 * (len(head) // 2):
        encoding = "utf-16le" if odd else "utf-16be"
        raise input_error(
            path,
            f"looks like {encoding.upper()} text without a byte-order mark (a NUL byte beside "
            f"every character); re-encode it as UTF-8: `iconv -f {encoding} -t utf-8 {path} "
            f"> {fixed}`",
        )


# --- CSV ---------------------------------------------------------------------------------


def csv_header(path: Path, separator: str) -> list[str]:
    """The CSV header's column names; InputError if there is none, or it cannot be read."""
    with _csv_reader(path, separator) as (reader, _):
        try:
            header = next(reader, None)
        except csv.Error as err:
            raise input_error(path, f"the header (line 1) is not valid CSV: {err}") from None
    if header is None:
        raise input_error(path, "is empty: no header and no rows")
    if not header:
        raise input_error(path, "line 1 is blank; the first line must name the columns")
    if any(_has_bad_bytes(name) for name in header):
        problem = _encoding_problem(path, "the header (line 1)", _first_bad_utf8(path))
        raise input_error(path, problem)
    return header


def csv_problem(path: Path, *, separator: str, utf8_checked: bool = False) -> str | None:
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
def _csv_reader(path: Path, separator: str) -> Iterator[tuple[CsvReader, _Lines]]:
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
            f"{where} is blank, the header has {len(header)} fields ({list_names(header)}); "
            "delete the blank line"
        )
    return (
        f"{where} has {len(fields)} fields, the header has {len(header)} ({list_names(header)}): "
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


def check_no_bom(path: Path) -> None:
    """An NDJSON file may not start with a UTF-8 byte-order mark: JSON does not allow one."""
    with path.open("rb") as file:
        if file.read(len(_BOM)) == _BOM:
            raise input_error(
                path,
                "starts with a UTF-8 byte-order mark, which JSON does not allow; remove it: "
                f"`sed -i '1s/^\\xEF\\xBB\\xBF//' {path}`",
            )


def ndjson_problem(path: Path) -> str | None:
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


# --- column names and the key column -----------------------------------------------------


def check_names(path: Path, names: list[str]) -> None:
    """Every column has a name of its own, and none is the reserved `ROW_INDEX`."""
    if not names:
        raise input_error(path, "has no columns")
    seen: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        if not name.strip():
            raise input_error(
                path, f"column {number} has no name ({list_names(names)}); name it or remove it"
            )
        if name in seen:
            raise input_error(
                path,
                f"column `{name}` appears twice (columns {seen[name]} and {number}); "
                "give every column a unique name",
            )
        seen[name] = number
    if ROW_INDEX in seen:
        raise input_error(path, f"column `{ROW_INDEX}` is reserved for the row position; rename it")


def check_key(
    path: Path, indexed: pl.LazyFrame, key: str, schema: Mapping[str, pl.DataType]
) -> None:
    """The key column is in the table (`schema`), and no row's key is blank or repeated.

    `indexed` is the table's rows led by `ROW_INDEX`, read as a run reads them.
    """
    if key not in schema:
        near = difflib.get_close_matches(key, list(schema), n=1)
        hint = f"did you mean `{near[0]}`? " if near else ""
        raise input_error(
            path,
            f"key column `{key}` is not in the input; {hint}the input has: "
            f"{list_names(list(schema))}",
        )
    rows = indexed.select(ROW_INDEX, key)
    _check_blank_keys(path, rows, key, schema[key])
    # One query each: polars streams either alone, but holds the column to do both at once.
    if not _scalar(rows.select(_increasing(key, schema[key]))) and _may_repeat(rows, key):
        _check_duplicates(path, rows, key)


def _check_blank_keys(path: Path, rows: pl.LazyFrame, key: str, dtype: pl.DataType) -> None:
    blank = pl.col(key).is_null()
    if dtype == pl.String:
        blank |= pl.col(key).str.strip_chars() == ""
    first_blank = _scalar(rows.select(pl.col(ROW_INDEX).filter(blank).first()))
    if first_blank is not None:
        raise input_error(
            path,
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


def _check_duplicates(path: Path, rows: pl.LazyFrame, key: str) -> None:
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
    raise input_error(
        path,
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


def input_error(path: Path, problem: str) -> InputError:
    """The one-line `InputError` for `problem` in the file at `path`."""
    # One line, whatever a quoted value held, and printable whatever bytes it held.
    message = f"{path}: {problem}".replace("\r", "\\r").replace("\n", "\\n")
    return InputError(message.encode("utf-8", "backslashreplace").decode("utf-8"))


def list_names(names: list[str]) -> str:
    """Column names for a message, the list shortened past NAMES_SHOWN."""
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown if len(names) <= NAMES_SHOWN else f"{shown}, ... ({len(names)} columns)"


def _preview(value: list[str] | bytes) -> str:
    text = ",".join(value) if isinstance(value, list) else value.decode(errors="replace").strip()
    return f"`{text[:PREVIEW_CHARS]}{'...' if len(text) > PREVIEW_CHARS else ''}`"
