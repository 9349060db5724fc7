"""Tests for pipeline.source: real files in tmp_path, every input problem, batch invariants."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from pipeline.errors import InputError
from pipeline.input_checks import SCAN_BLOCK
from pipeline.records import ROW_INDEX
from pipeline.source import Source, open_source

# A table that exercises quoting, non-ASCII text and nulls in every format.
TABLE = pl.DataFrame(
    {
        "id": [1, 2, 3, 4],
        "title": ["café", "naïve, quoted", 'say "hi"', "日本語 🚀"],
        "body": ["line one\nline two", None, "", "e\u0301 combining"],
        "score": [0.5, None, 2.0, -1.25],
        "ok": [True, False, None, True],
    }
)


def write(directory: Path, name: str, content: bytes | str) -> Path:
    path = directory / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def error_of(path: Path, **options: str) -> str:
    with pytest.raises(InputError) as caught:
        open_source(path, **options)
    message = str(caught.value)
    assert "\n" not in message, "a message is one line"
    assert message.startswith(f"{path}: "), "a message names the file first"
    return message


def rows_of(path: Path) -> pl.DataFrame:
    return pl.concat(open_source(path).batches())


# --- CSV problems ------------------------------------------------------------------------

RAGGED_LATE = "id,title\n" + "".join(f"{i},t{i}\n" for i in range(12_000)) + "12000,a,b\n"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(
            "id,title,body\n1,a,b\n2,c,d,e\n",
            ["row 2 (line 3) has 4 fields, the header has 3 (id, title, body)", "`2,c,d,e`"],
            id="ragged-more-fields",
        ),
        pytest.param(
            "id,title,body\n1,a,b\n2,c\n3,e,\n",
            ["row 2 (line 3) has 2 fields, the header has 3 (id, title, body)", "quote values"],
            id="ragged-fewer-fields",
        ),
        pytest.param(
            RAGGED_LATE,
            ["row 12001 (line 12002) has 3 fields, the header has 2"],
            id="ragged-after-type-sample",
        ),
        pytest.param(
            'id,text,x\n1,"two\nlines",c\n2,d\n',
            ["row 2 (line 4) has 2 fields"],
            id="ragged-after-multiline-field",
        ),
        pytest.param(
            "id,text\n1,a\n\n2,b\n",
            ["row 2 (line 3) is blank", "delete the blank line"],
            id="blank-line",
        ),
        pytest.param(
            'id,text\n1,say "hi\n2,ok\n',
            ['row 1 (line 2) has an unmatched `"`', '"say ""hi"""'],
            id="stray-quote",
        ),
        pytest.param(
            'id,text\n1,"never closed\n2,ok\n',
            ["row 1 (lines 2-3) is not valid CSV", "unexpected end of data"],
            id="unclosed-quote",
        ),
        pytest.param(
            'id,text\n1,"x"y\n',
            ["row 1 (line 2) is not valid CSV"],
            id="text-after-closing-quote",
        ),
        pytest.param(
            b"id,title\n1,ok\n2,caf\xe9\n",
            ["row 2 (line 3), column `title`", "byte 0xE9 at offset 19", "iconv -f latin1"],
            id="latin1-byte",
        ),
        pytest.param(
            b"id,caf\xe9\n1,ok\n",
            ["the header (line 1)", "byte 0xE9 at offset 6", "is not valid UTF-8"],
            id="latin1-in-header",
        ),
        pytest.param(
            "id,text\n1,a\n".encode("utf-16"),
            ["is UTF-16 text", "iconv -f utf-16 -t utf-8"],
            id="utf16-file",
        ),
        pytest.param(
            "id,title,id\n1,a,2\n",
            ["column `id` appears twice (columns 1 and 3)", "unique name"],
            id="duplicate-column",
        ),
        pytest.param("id,,body\n1,2,3\n", ["column 2 has no name"], id="blank-column"),
        pytest.param("id, \n1,2\n", ["column 2 has no name"], id="whitespace-column"),
        pytest.param("__row,a\n1,2\n", ["`__row` is reserved"], id="reserved-column"),
        pytest.param("", ["is empty: no header and no rows"], id="empty-file"),
        pytest.param("id,title\n", ["has no rows, only a header (id, title)"], id="header-only"),
        pytest.param("\nid\n1\n", ["line 1 is blank"], id="blank-first-line"),
    ],
)
def test_csv_problem_is_named(tmp_path: Path, content: str | bytes, expected: list[str]) -> None:
    message = error_of(write(tmp_path, "in.csv", content))
    for fragment in expected:
        assert fragment in message


def test_bad_byte_split_between_scan_blocks(tmp_path: Path) -> None:
    # The lead byte of a two-byte character ends one block; the next starts with no follower.
    prefix = b"id,t\n1,"
    filler = b"a" * (SCAN_BLOCK - 1 - len(prefix))
    path = write(tmp_path, "in.csv", prefix + filler + b"\xc3A\n2,b\n")
    message = error_of(path)
    assert f"row 1 (line 2), column `t`: byte 0xC3 at offset {SCAN_BLOCK - 1}" in message


def test_long_header_is_shortened(tmp_path: Path) -> None:
    header = ",".join(f"c{i}" for i in range(20))
    message = error_of(write(tmp_path, "wide.csv", f"{header}\n1,2\n"))
    assert "c0, c1, c2, c3, c4, c5, c6, c7, ... (20 columns)" in message


# --- NDJSON and Parquet problems ----------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(
            '{"a": 1}\n{"a": ]\n',
            ["line 2 is not valid JSON", "at column 7", '`{"a": ]`'],
            id="malformed-line",
        ),
        pytest.param(
            '{"a": 1}\n\n{"a": 2} trailing\n', ["line 3 is not valid JSON"], id="trailing-text"
        ),
        pytest.param('{"a": 1}\n[1, 2]\n', ["line 2 is a JSON list, not an object"], id="array"),
        pytest.param(
            b'{"a": 1}\n{"a": "caf\xe9"}\n',
            ["line 2: byte 0xE9 at offset 19 is not valid UTF-8", "iconv"],
            id="latin1-byte",
        ),
        pytest.param(b'\xef\xbb\xbf{"a": 1}\n', ["byte-order mark", "sed -i"], id="bom"),
        pytest.param("", ["is empty: no rows"], id="empty-file"),
        pytest.param("\n  \n", ["is empty: no rows"], id="blank-lines-only"),
        pytest.param("{}\n{}\n", ["has no columns"], id="no-columns"),
        pytest.param('{"": 1}\n', ["column 1 has no name"], id="blank-key"),
        pytest.param(
            '{"a": {"b": 1}}\n{"a": [1]}\n',
            ["cannot be read as NDJSON", "same type for a key"],
            id="conflicting-types",
        ),
    ],
)
def test_ndjson_problem_is_named(tmp_path: Path, content: str | bytes, expected: list[str]) -> None:
    message = error_of(write(tmp_path, "in.ndjson", content))
    for fragment in expected:
        assert fragment in message


def corrupt_middle(path: Path) -> bytes:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 200] = bytes(range(200))
    return bytes(data)


def test_parquet_problems_are_named(tmp_path: Path) -> None:
    good = tmp_path / "good.parquet"
    pl.DataFrame({"t": [f"row {i} " * (i % 9) for i in range(50_000)]}).write_parquet(
        good, row_group_size=5_000
    )
    cases = {
        "junk.parquet": b"this is not parquet",
        "empty.parquet": b"",
        "truncated.parquet": good.read_bytes()[: good.stat().st_size // 2],
        "corrupt-page.parquet": corrupt_middle(good),
    }
    for name, content in cases.items():
        message = error_of(write(tmp_path, name, content))
        assert "is not a readable Parquet file" in message, name
        assert "download finished" in message, name


def test_parquet_without_rows(tmp_path: Path) -> None:
    path = tmp_path / "zero.parquet"
    TABLE.head(0).write_parquet(path)
    assert "has no rows, only columns (id, title, body, score, ok)" in error_of(path)


# --- the file itself ---------------------------------------------------------------------


def test_missing_file_suggests_a_near_name(tmp_path: Path) -> None:
    write(tmp_path, "reviews.csv", "id\n1\n")
    message = error_of(tmp_path / "review.csv")
    assert "no such file" in message
    assert f"did you mean {tmp_path / 'reviews.csv'}?" in message


def test_directory_is_refused(tmp_path: Path) -> None:
    assert "is a directory" in error_of(tmp_path)


def test_unreadable_path(tmp_path: Path) -> None:
    not_a_dir = write(tmp_path, "file.csv", "id\n1\n")
    assert "cannot be read (Not a directory)" in error_of(not_a_dir / "in.csv")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_permission_denied(tmp_path: Path) -> None:
    path = write(tmp_path, "secret.csv", "id\n1\n")
    path.chmod(0)
    assert "cannot be read (Permission denied)" in error_of(path)


def test_unknown_extension_lists_the_valid_ones(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "in.tsv", "id\n1\n"))
    assert "unknown extension `.tsv`" in message
    assert ".csv, .parquet, .pq, .ndjson, .jsonl" in message


def test_unknown_format_lists_the_valid_ones(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "in.csv", "id\n1\n"), format="xlsx")
    assert "unknown format `xlsx`; valid formats are csv, parquet, ndjson" in message


def test_format_overrides_the_extension(tmp_path: Path) -> None:
    source = open_source(write(tmp_path, "export.txt", '{"a": 1}\n'), format="ndjson")
    assert source.format == "ndjson"
    assert source.head(5)["a"].to_list() == [1]


@pytest.mark.parametrize(
    "name", [pytest.param("x[1].csv", id="brackets"), pytest.param("x*.ndjson", id="star")]
)
def test_glob_characters_in_the_name_are_literal(tmp_path: Path, name: str) -> None:
    body = "a\n7\n" if name.endswith(".csv") else '{"a": "7"}\n'
    write(tmp_path, name.replace("[1]", "1").replace("*", "y"), body.replace("7", "8"))
    assert open_source(write(tmp_path, name, body)).head(5)["a"].to_list() == ["7"]


# --- key column --------------------------------------------------------------------------


def as_format(directory: Path, frame: pl.DataFrame, fmt: str) -> Path:
    path = directory / f"in.{fmt}"
    if fmt == "csv":
        frame.write_csv(path)
    elif fmt == "parquet":
        frame.write_parquet(path)
    else:
        frame.write_ndjson(path)
    return path


FORMATS = [pytest.param(fmt, id=fmt) for fmt in ("csv", "parquet", "ndjson")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_key_not_in_input_suggests_nearest(tmp_path: Path, fmt: str) -> None:
    message = error_of(as_format(tmp_path, TABLE, fmt), key="titel")
    assert "key column `titel` is not in the input; did you mean `title`?" in message
    assert "the input has: id, title, body, score, ok" in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_key_with_null_names_the_row(tmp_path: Path, fmt: str) -> None:
    frame = pl.DataFrame({"id": [1, 2, None, 4], "x": ["a", "b", "c", "d"]})
    message = error_of(as_format(tmp_path, frame, fmt), key="id")
    assert "key column `id` is empty at row 3" in message


def test_key_blank_string_names_the_row(tmp_path: Path) -> None:
    path = write(tmp_path, "in.csv", 'id,x\nk1,a\n"  ",b\n')
    assert "key column `id` is empty at row 2" in error_of(path, key="id")


@pytest.mark.parametrize("fmt", FORMATS)
def test_duplicate_key_names_value_and_rows(tmp_path: Path, fmt: str) -> None:
    frame = pl.DataFrame({"id": ["a", "b", "c", "b", "d", "b"], "x": list(range(6))})
    message = error_of(as_format(tmp_path, frame, fmt), key="id")
    assert "key column `id` has the value `b` at rows 2 and 4 (3 times in all)" in message


def test_keys_are_compared_as_written(tmp_path: Path) -> None:
    # CSV has no types: "01" and "1" are two keys, as written.
    path = write(tmp_path, "in.csv", "id,x\n01,a\n2,b\n1,c\n")
    assert open_source(path, key="id").head(5)["id"].to_list() == ["01", "2", "1"]


def test_unique_key_is_accepted(tmp_path: Path) -> None:
    source = open_source(as_format(tmp_path, TABLE, "csv"), key="id")
    assert source.key == "id"


# --- reading -----------------------------------------------------------------------------


def test_bom_stays_out_of_the_first_column(tmp_path: Path) -> None:
    source = open_source(
        write(tmp_path, "bom.csv", b"\xef\xbb\xbfid,title\n1,caf\xc3\xa9\n"), key="id"
    )
    assert source.columns == ("id", "title")
    assert source.head(1).rows() == [(0, "1", "café")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(tmp_path: Path, fmt: str) -> None:
    source = open_source(as_format(tmp_path, TABLE, fmt))
    # CSV carries no types: its columns read back as the text that was written.
    expected = TABLE.cast(pl.String) if fmt == "csv" else TABLE
    assert source.columns == tuple(TABLE.columns)
    assert source.schema == dict(expected.schema)
    # polars writes an empty string as `""` and a null as nothing, so CSV keeps both apart.
    assert_frame_equal(pl.concat(source.batches(3)).drop(ROW_INDEX), expected)


def test_csv_nulls_and_empty_strings(tmp_path: Path) -> None:
    path = write(tmp_path, "in.csv", 'id,n,t\n1,,\n2,5,""\n3,7,x\n')
    assert rows_of(path).drop(ROW_INDEX).rows() == [
        ("1", None, None),
        ("2", "5", ""),
        ("3", "7", "x"),
    ]


def test_csv_values_are_kept_as_written(tmp_path: Path) -> None:
    lines = "".join(f"{i},{i}\n" for i in range(10_500))
    source = open_source(write(tmp_path, "in.csv", f'id,n\n{lines}10500,""\n007,01234\n'))
    assert source.schema == {"id": pl.String, "n": pl.String}
    assert pl.concat(source.batches())["n"][-3:].to_list() == ["10499", "", "01234"]


def test_crlf_line_endings(tmp_path: Path) -> None:
    path = write(tmp_path, "in.csv", "id,t\r\n1,a\r\n2,\r\n")
    assert rows_of(path).drop(ROW_INDEX).rows() == [("1", "a"), ("2", None)]


def test_single_column_blank_line_is_a_null(tmp_path: Path) -> None:
    assert rows_of(write(tmp_path, "in.csv", "id\n1\n\n2\n"))["id"].to_list() == ["1", None, "2"]


def test_ndjson_keys_and_types_from_the_whole_file(tmp_path: Path) -> None:
    lines = [f'{{"id": {i}, "v": {i}}}\n' for i in range(500)]
    path = write(tmp_path, "in.ndjson", "".join(lines) + '{"id": 500, "v": "x", "late": 1}\n')
    source = open_source(path)
    assert source.schema == {"id": pl.Int64, "v": pl.String, "late": pl.Int64}
    frame = pl.concat(source.batches(128))
    assert frame["v"][-2:].to_list() == ["499", "x"]
    assert frame["late"][-1] == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_batches_shape(tmp_path: Path, fmt: str) -> None:
    frame = pl.DataFrame({"id": range(1_000), "t": [f"r{i}" for i in range(1_000)]})
    source = open_source(as_format(tmp_path, frame, fmt))
    batches = list(source.batches(300))
    assert [batch.height for batch in batches] == [300, 300, 300, 100]
    for batch in batches:
        assert batch.columns == [ROW_INDEX, "id", "t"]
        assert batch.schema[ROW_INDEX] == pl.UInt64
    assert pl.concat(batches)[ROW_INDEX].to_list() == list(range(1_000))


@pytest.mark.parametrize("fmt", FORMATS)
def test_start_skips_rows(tmp_path: Path, fmt: str) -> None:
    frame = pl.DataFrame({"id": range(100), "t": [f"r{i}" for i in range(100)]})
    source = open_source(as_format(tmp_path, frame, fmt))
    tail = pl.concat(source.batches(7, start=95))
    assert tail[ROW_INDEX].to_list() == [95, 96, 97, 98, 99]
    assert tail["t"].to_list() == ["r95", "r96", "r97", "r98", "r99"]
    assert list(source.batches(7, start=100)) == []
    assert list(source.batches(7, start=1_000)) == []


def test_bad_batch_arguments(tmp_path: Path) -> None:
    source = open_source(write(tmp_path, "in.csv", "id\n1\n"))
    with pytest.raises(ValueError, match="size >= 1"):
        next(source.batches(0))
    with pytest.raises(ValueError, match="start >= 0"):
        next(source.batches(10, start=-1))


def test_stopping_early_then_reading_again(tmp_path: Path) -> None:
    frame = pl.DataFrame({"id": range(5_000)})
    source = open_source(as_format(tmp_path, frame, "csv"))
    for batch in source.batches(10):
        assert batch[ROW_INDEX].to_list() == list(range(10))
        break
    assert sum(batch.height for batch in source.batches(1_000)) == 5_000


@pytest.mark.parametrize("fmt", FORMATS)
def test_count_and_head(tmp_path: Path, fmt: str) -> None:
    path = as_format(tmp_path, TABLE, fmt)
    source = open_source(path)
    assert source.count() == 4
    # A Source built without the validation pass counts by streaming over the file.
    assert Source(path, source.format, source.columns, source.schema, None).count() == 4
    head = source.head(2)
    assert head.columns == [ROW_INDEX, *TABLE.columns]
    assert head[ROW_INDEX].to_list() == [0, 1]
    assert_frame_equal(head.drop(ROW_INDEX), pl.concat(source.batches()).drop(ROW_INDEX).head(2))


def test_file_changed_after_validation(tmp_path: Path) -> None:
    path = write(tmp_path, "in.csv", "id,t\n1,a\n")
    source = open_source(path)
    path.write_text("id,t\n1,a,extra\n")
    with pytest.raises(InputError, match="changed or became unreadable"):
        list(source.batches())


# --- properties --------------------------------------------------------------------------

ORDER_TABLE = pl.DataFrame({"id": range(257), "t": [f"row {i}" for i in range(257)]})


@pytest.fixture(scope="module")
def order_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("order")
    return {fmt: as_format(directory, ORDER_TABLE, fmt) for fmt in ("csv", "parquet", "ndjson")}


@given(
    fmt=st.sampled_from(["csv", "parquet", "ndjson"]),
    size=st.integers(1, 300),
    start=st.integers(0, 260),
)
@settings(max_examples=60, deadline=None)
def test_batches_concatenate_to_the_file(
    order_files: dict[str, Path], fmt: str, size: int, start: int
) -> None:
    batches = list(open_source(order_files[fmt]).batches(size, start=start))
    assert all(0 < batch.height <= size for batch in batches)
    rows = pl.concat(batches) if batches else pl.DataFrame()
    expected = list(range(start, 257))
    assert (rows[ROW_INDEX].to_list() if batches else []) == expected
    assert (rows["t"].to_list() if batches else []) == [f"row {i}" for i in expected]


# Text a CSV writer must quote: separators, quotes, line breaks, non-ASCII. The "s" prefix
# keeps a value from being empty or a number.
CELL = st.text(
    alphabet=st.sampled_from(list("ab ,\"\n\r'é日🚀\t;")) | st.characters(codec="utf-8"),
    max_size=12,
)


@given(
    rows=st.lists(st.tuples(CELL, st.none() | CELL), min_size=1, max_size=30),
    size=st.integers(1, 8),
)
@settings(max_examples=60, deadline=None)
def test_any_valid_csv_reads_back(rows: list[tuple[str, str | None]], size: int) -> None:
    frame = pl.DataFrame(
        {
            "a": [f"s{a}" for a, _ in rows],
            # Nulls in the last column send the file through the careful pass too.
            "b": [None if b is None else f"s{b}" for _, b in rows],
        },
        schema={"a": pl.String, "b": pl.String},
    )
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "in.csv"
        frame.write_csv(path)
        back = pl.concat(open_source(path).batches(size))
    assert back[ROW_INDEX].to_list() == list(range(len(rows)))
    assert_frame_equal(back.drop(ROW_INDEX), frame)


@given(
    width=st.integers(2, 3),
    rows=st.lists(st.lists(CELL, min_size=1, max_size=4), min_size=1, max_size=20),
)
@settings(max_examples=60, deadline=None)
def test_first_ragged_row_is_the_one_named(width: int, rows: list[list[str]]) -> None:
    header = [f"c{i}" for i in range(width)]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "in.csv"
        with path.open("w", newline="", encoding="utf-8") as file:
            csv.writer(file, lineterminator="\n").writerows(
                [header, *(list(map("s{}".format, row)) for row in rows)]
            )
        ragged = [i for i, row in enumerate(rows, start=1) if len(row) != width]
        if not ragged:
            assert open_source(path).count() == len(rows)
            return
        with pytest.raises(InputError) as caught:
            open_source(path)
    row = ragged[0]
    assert f": row {row} (line" in str(caught.value)
    assert f"has {len(rows[row - 1])} fields, the header has {width}" in str(caught.value)


def test_parquet_batches_cross_row_groups_in_order_from_any_start(tmp_path: Path) -> None:
    path = tmp_path / "groups.parquet"
    pl.DataFrame({"id": range(50), "text": [f"t{i}" for i in range(50)]}).write_parquet(
        path, row_group_size=7
    )
    source = open_source(path)

    batches = list(source.batches(5, start=12))

    rows = pl.concat(batches)
    assert all(b.height <= 5 for b in batches)
    assert rows[ROW_INDEX].to_list() == list(range(12, 50))
    assert rows["id"].to_list() == list(range(12, 50))
    assert rows.columns == [ROW_INDEX, "id", "text"]
    assert rows.schema[ROW_INDEX] == pl.UInt64
