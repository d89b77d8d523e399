"""What ingest is fuzzed with (tests/fuzz_ingest.py runs it): seeds from the examples, and mutations.

The seeds are the examples' first 30 rows: examples/geo/train.xlsx as written (inline strings) and as openpyxl
writes it (shared strings, a second sheet), examples/pairs/train.tsv, and both as .csv, .jsonl and .parquet.
A mutation is byte-level (bit flips, tokens such as NUL, \\xff, '&', quotes, separators and BOMs, long runs,
deleted or repeated chunks, truncation) or structure-aware: a workbook is unzipped, one XML member is edited
(namespace prefixes, a far dimension or cell, merges beyond the data, formulas without values, error cells,
zero-width text, doctypes, ...) or the member list is (dropped, renamed, duplicated, recompressed), then it
is zipped again; JSON lines get lists, objects and deep nesting; parquet columns get list, struct, binary,
... types. Hypothesis draws every choice, so a failing input shrinks to few mutations of a small seed.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import json
import math
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import strategies as st
from openpyxl import Workbook

from loraflow.config import DataSettings
from loraflow.tasks.excel import column_letters

EXAMPLES = Path(__file__).parents[1] / "examples"
ROWS = 30  # rows per seed: enough for every column type, small enough for ~10 ms a read
MAIN_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
SST_REL = "http://schemas.openxmlformats.org/officeDocument/2006/relationships/sharedStrings"
SST_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sharedStrings+xml"

Draw = Callable[[st.SearchStrategy[Any]], Any]
Mutation = Callable[[Draw, bytes], tuple[bytes, str]]


# ---------------------------------------------------------------------------------------------------- seeds


@dataclass(frozen=True)
class Seed:
    name: str  # e.g. geo.xlsx
    family: str  # which example config reads it: geo or pairs
    suffix: str
    data: bytes = field(repr=False)

    @property
    def kind(self) -> str:
        """Which mutations fit: xlsx, text (.csv/.tsv), jsonl or parquet."""
        return {".xlsx": "xlsx", ".csv": "text", ".tsv": "text"}.get(self.suffix, self.suffix.lstrip("."))


def _first_rows_of_workbook(path: Path, rows: int) -> bytes:
    """The workbook as written by its generator (inline strings), cut to the header and `rows` rows."""
    out = io.BytesIO()
    with zipfile.ZipFile(path) as book, zipfile.ZipFile(out, "w") as copied:
        for info in book.infolist():
            content = book.read(info)
            if info.filename.startswith("xl/worksheets/"):
                text = content.decode()
                text = re.sub(
                    r'<row r="(\d+)".*?</row>',
                    lambda m: m[0] if int(m[1]) <= rows + 1 else "",
                    text,
                    flags=re.S,
                )
                text = re.sub(r'<dimension ref="[^"]*"', f'<dimension ref="A1:C{rows + 1}"', text)
                content = text.encode()
            copied.writestr(info, content)
    return out.getvalue()


def _excel_style_workbook(frame: pd.DataFrame) -> bytes:
    """The same rows as Excel saves them: strings in xl/sharedStrings.xml, a notes sheet before the data,
    and the label a formula with its saved value (a computed column), so the formula scan runs too."""
    book = Workbook()
    book.active.title = "notes"
    book.active.append(["rows below come from examples/geo/train.xlsx"])
    sheet = book.create_sheet("data")
    sheet.append(list(frame.columns))
    for row in frame.itertuples(index=False, name=None):
        sheet.append(list(row))
    out = io.BytesIO()
    book.save(out)  # openpyxl 3.1 writes inline strings
    members = _unzip(out.getvalue())
    strings: dict[str, int] = {}

    def shared(m: re.Match[str]) -> str:
        return f'{m[1]} t="s"><v>{strings.setdefault(m[2], len(strings))}</v></c>'

    for i, (name, content, method) in enumerate(members):
        text = content.decode()
        if name.startswith("xl/worksheets/"):
            text = re.sub(r'(<c r="[A-Z]+\d+") t="inlineStr"><is><t[^>]*>([^<]*)</t></is></c>', shared, text)
            text = re.sub(r'(<c r="C(?!1")\d+"[^>]*>)<v>(\d+)</v>', r"\1<f>\2+0</f><v>\2</v>", text)
        elif name == "xl/_rels/workbook.xml.rels":
            text = text.replace(
                "</Relationships>",
                f'<Relationship Type="{SST_REL}" Target="sharedStrings.xml" Id="rId99"/></Relationships>',
            )
        elif name == "[Content_Types].xml":
            text = text.replace(
                "</Types>", f'<Override PartName="/xl/sharedStrings.xml" ContentType="{SST_TYPE}"/></Types>'
            )
        members[i] = (name, text.encode(), method)
    items = "".join(f'<si><t xml:space="preserve">{text}</t></si>' for text in strings)
    sst = f'<sst xmlns="{MAIN_NS}" count="{len(strings)}" uniqueCount="{len(strings)}">{items}</sst>'
    return _zip([*members, ("xl/sharedStrings.xml", sst.encode(), zipfile.ZIP_DEFLATED)])


def _parquet(frame: pd.DataFrame) -> bytes:
    out = io.BytesIO()
    frame.to_parquet(out, index=False)
    return out.getvalue()


@functools.cache
def make_seeds() -> tuple[Seed, ...]:
    """The examples' first ROWS rows in every supported format (computed once per process)."""
    geo = pd.read_excel(EXAMPLES / "geo" / "train.xlsx", sheet_name="data", nrows=ROWS, engine="openpyxl")
    pairs_tsv = b"\n".join((EXAMPLES / "pairs" / "train.tsv").read_bytes().split(b"\n")[: ROWS + 1]) + b"\n"
    pairs = pd.read_csv(io.BytesIO(pairs_tsv), sep="\t", dtype=str)
    return (
        Seed("geo.xlsx", "geo", ".xlsx", _first_rows_of_workbook(EXAMPLES / "geo" / "train.xlsx", ROWS)),
        Seed("geo-excel-style.xlsx", "geo", ".xlsx", _excel_style_workbook(geo)),
        Seed("pairs.tsv", "pairs", ".tsv", pairs_tsv),
        Seed("geo.csv", "geo", ".csv", geo.to_csv(index=False).encode()),
        Seed("pairs.csv", "pairs", ".csv", pairs.to_csv(index=False).encode()),
        Seed(
            "geo.jsonl",
            "geo",
            ".jsonl",
            geo.to_json(orient="records", lines=True, force_ascii=False).encode(),
        ),
        Seed("pairs.jsonl", "pairs", ".jsonl", pairs.to_json(orient="records", lines=True).encode()),
        Seed("geo.parquet", "geo", ".parquet", _parquet(geo)),
        Seed("pairs.parquet", "pairs", ".parquet", _parquet(pairs)),
    )


def _seed_menu() -> list[Seed]:
    """Seeds to draw from, workbooks twice: they have the most structure (and the most readers) to break."""
    seeds = make_seeds()
    workbooks = [s for s in seeds if s.kind == "xlsx"]
    return [*workbooks, *workbooks, *(s for s in seeds if s.kind != "xlsx")]


# ----------------------------------------------------------------------------------------- byte mutations

TOKENS = [
    b"\x00", b"\xff", b"&", b"<", b">", b'"', b"'", b",", b"\t", b";", b"\n", b"\r", b"\r\n", b"\\",
    b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"{", b"}", b"[", b"]", b"\xe2\x80\x8b", b"\xe2\x80\xa8",
    b"\xc3", b"\xed\xa0\x80", b"\x1a", b"\x0c", b"\xc2\x85", b"=SUM(A1)", b"-1", b"1e400", b"NaN", b"null",
    b"#N/A", b"_row", b"label",
]  # fmt: skip
RUN_LENGTHS = [2, 256, 4096, 65536, 1 << 20]  # a run of 1 MiB tokens is a several-MB input: slow readers show


def _position(draw: Draw, data: bytes, *, end: bool = True) -> int:
    return draw(st.integers(0, len(data) if end else max(len(data) - 1, 0)))


def _flip_bit(draw: Draw, data: bytes) -> tuple[bytes, str]:
    if not data:
        return data, "flip a bit (empty: no-op)"
    at, bit = _position(draw, data, end=False), draw(st.integers(0, 7))
    out = bytearray(data)
    out[at] ^= 1 << bit
    return bytes(out), f"flip bit {bit} of byte {at}"


def _insert_token(draw: Draw, data: bytes) -> tuple[bytes, str]:
    at, token = _position(draw, data), draw(st.sampled_from(TOKENS))
    return data[:at] + token + data[at:], f"insert {token!r} at byte {at}"


def _overwrite_token(draw: Draw, data: bytes) -> tuple[bytes, str]:
    at, token = _position(draw, data), draw(st.sampled_from(TOKENS))
    return data[:at] + token + data[at + len(token) :], f"overwrite byte {at} with {token!r}"


def _long_run(draw: Draw, data: bytes) -> tuple[bytes, str]:
    at, token = _position(draw, data), draw(st.sampled_from([b"a", b"0", *TOKENS]))
    times = draw(st.sampled_from(RUN_LENGTHS))
    return data[:at] + token * times + data[at:], f"insert {token!r} x {times} at byte {at}"


def _delete_chunk(draw: Draw, data: bytes) -> tuple[bytes, str]:
    if not data:
        return data, "delete a chunk (empty: no-op)"
    at = _position(draw, data, end=False)
    length = draw(st.integers(1, min(4096, len(data) - at)))
    return data[:at] + data[at + length :], f"delete bytes {at}..{at + length}"


def _duplicate_chunk(draw: Draw, data: bytes) -> tuple[bytes, str]:
    if not data:
        return data, "duplicate a chunk (empty: no-op)"
    at = _position(draw, data, end=False)
    length = draw(st.integers(1, min(512, len(data) - at)))
    times = draw(st.sampled_from([1, 2, 100, 10_000]))
    chunk = data[at : at + length]
    return data[: at + length] + chunk * times + data[
        at + length :
    ], f"repeat bytes {at}..{at + length} x {times}"


def _truncate(draw: Draw, data: bytes) -> tuple[bytes, str]:
    at = _position(draw, data, end=False)
    return data[:at], f"truncate at byte {at}"


REPLACEMENTS = [
    (b"\n", b"\r"), (b"\n", b"\r\n"), (b"\n", b"\n\n"), (b",", b";"), (b",", b"\t"), (b"\t", b","),
    (b'"', b""), (b'"', b"'"), (b" ", b"\xc2\xa0"), (b"\n", b"\xe2\x80\xa8"), (b"e", b"\xc3\xa9"),
]  # fmt: skip


def _replace_all(draw: Draw, data: bytes) -> tuple[bytes, str]:
    old, new = draw(st.sampled_from(REPLACEMENTS))
    return data.replace(old, new), f"replace every {old!r} with {new!r}"


BYTE_MUTATIONS: list[Mutation] = [
    _flip_bit, _insert_token, _overwrite_token, _delete_chunk, _truncate, _duplicate_chunk, _long_run,
    _replace_all,
]  # fmt: skip


def _bytes_of(draw: Draw, data: bytes) -> tuple[bytes, str]:
    """Any byte mutation of the whole file."""
    return draw(st.sampled_from(BYTE_MUTATIONS))(draw, data)


def _reencode(draw: Draw, data: bytes) -> tuple[bytes, str]:
    encoding = draw(st.sampled_from(["utf-16", "utf-8-sig", "cp1252", "latin-1", "utf-16-be", "utf-32"]))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return data, f"re-encode as {encoding} (not utf-8 any more: no-op)"
    return text.encode(encoding, errors="replace"), f"re-encode as {encoding}"


# ------------------------------------------------------------------------------------ text table mutations

LINES = [
    b"", b"sep=,", b"sep=\t", b",,", b"\t\t", b'"unclosed', b'a,"b\nc",d', b"#comment", b"\x00",
    b"a,b,c,d,e,f", b"\xef\xbb\xbf",
]  # fmt: skip
HEADER_NAMES = ["", " ", "_row", "label", "Score", "requirement ", "sentence_a", "\ufeffscore", "\u200b"]


def _lines(draw: Draw, data: bytes) -> tuple[bytes, str]:
    lines = data.split(b"\n")
    at = draw(st.integers(0, len(lines) - 1))
    how = draw(st.sampled_from(["duplicate", "delete", "insert", "swap with the header"]))
    if how == "duplicate":
        lines.insert(at, lines[at])
    elif how == "delete":
        del lines[at]
    elif how == "insert":
        lines.insert(at, draw(st.sampled_from(LINES)))
    else:
        lines[0], lines[at] = lines[at], lines[0]
    return b"\n".join(lines), f"{how} line {at + 1}"


def _header(draw: Draw, data: bytes) -> tuple[bytes, str]:
    head, newline, rest = data.partition(b"\n")
    sep = b"\t" if head.count(b"\t") > head.count(b",") else b","
    names = head.split(sep)
    at = draw(st.integers(0, len(names) - 1))
    how = draw(st.sampled_from(["rename", "duplicate", "drop", "append"]))
    name = draw(st.sampled_from(HEADER_NAMES)).encode()
    if how == "rename":
        names[at] = name
    elif how == "duplicate":
        names.insert(at, names[at])
    elif how == "drop":
        del names[at]
    else:
        names.append(name)
    return sep.join(names) + newline + rest, f"header: {how} column {at + 1} ({name!r})"


# ----------------------------------------------------------------------------------------- jsonl mutations

JSON_VALUES: list[Any] = [
    ["a", "b"], [], [["nested"]], {"key": "value"}, {}, None, True, False, 0, -1, 1.5, 1e308, 10**30, "",
    " ", "\x00", "\u2028", "NaN", math.nan, math.inf, "x" * 100_000,
]  # fmt: skip
JSON_LINES = [
    "[]", "[1, 2]", '"text"', "42", "null", "true", "{}", '{"a": 1, "a": 2}', "[" * 100_000,
    '{"x": ' * 50_000, " ", "\ufeff{}", "\x00", "{'single': 'quotes'}",
]  # fmt: skip


def _json_records(data: bytes) -> list[tuple[int, dict[str, Any]]]:
    records = []
    for number, line in enumerate(data.split(b"\n")):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict) and record:
            records.append((number, record))
    return records


def _json_value(draw: Draw, data: bytes) -> tuple[bytes, str]:
    records = _json_records(data)
    if not records:
        return data, "set a JSON value (no object line: no-op)"
    number, record = draw(st.sampled_from(records))
    key = draw(st.sampled_from(sorted(record)))
    how = draw(st.sampled_from(["set", "delete", "add key"]))
    if how == "set":
        value = draw(st.sampled_from(JSON_VALUES))
        record[key] = value
        what = f"line {number + 1}: {key} = {json.dumps(value)[:40]}"
    elif how == "delete":
        del record[key]
        what = f"line {number + 1}: delete {key}"
    else:
        key = draw(st.sampled_from(HEADER_NAMES))
        record[key] = "x"
        what = f"line {number + 1}: add key {key!r}"
    lines = data.split(b"\n")
    lines[number] = json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return b"\n".join(lines), what


def _json_line(draw: Draw, data: bytes) -> tuple[bytes, str]:
    lines = data.split(b"\n")
    at = draw(st.integers(0, len(lines) - 1))
    line = draw(st.sampled_from(JSON_LINES))
    lines[at] = line.encode()
    return b"\n".join(lines), f"line {at + 1} := {line[:30]!r}"


# --------------------------------------------------------------------------------------- parquet mutations


def _cycle(values: list[Any], n: int) -> list[Any]:
    return [values[i % len(values)] for i in range(n)]


COLUMN_TYPES: dict[str, Callable[[list[Any]], pa.Array]] = {
    "list of two": lambda v: pa.array([[x, x] for x in v]),
    "list of one": lambda v: pa.array([[x] for x in v]),
    "empty lists": lambda v: pa.array([[] for _ in v], pa.list_(pa.string())),
    "nested lists": lambda v: pa.array([[[x]] for x in v]),
    "struct": lambda v: pa.array([{"value": x} for x in v]),
    "map": lambda v: pa.array([[("key", str(x))] for x in v], pa.map_(pa.string(), pa.string())),
    "binary": lambda v: pa.array([str(x).encode() for x in v], pa.binary()),
    "invalid utf-8 bytes": lambda v: pa.array([b"\xff\xfe" + str(x).encode() for x in v], pa.binary()),
    "large string": lambda v: pa.array([str(x) for x in v], pa.large_string()),
    "dictionary": lambda v: pa.array([str(x) for x in v]).dictionary_encode(),
    "all null": lambda v: pa.nulls(len(v)),
    "half null": lambda v: pa.array([x if i % 2 else None for i, x in enumerate(v)]),
    "uint64 max": lambda v: pa.array([2**64 - 1] * len(v), pa.uint64()),
    "floats with nan and inf": lambda v: pa.array(_cycle([math.nan, math.inf, -math.inf, 0.5, -0.0], len(v))),
    "decimal": lambda v: pa.array([Decimal("1.10")] * len(v)),
    "timestamp": lambda v: pa.array([dt.datetime(2026, 1, 1)] * len(v)),
    "timestamp with zone": lambda v: pa.array(
        [dt.datetime(2026, 1, 1)] * len(v), pa.timestamp("ns", tz="Europe/Paris")
    ),
    "date": lambda v: pa.array([dt.date(1, 1, 1)] * len(v)),
    "duration": lambda v: pa.array([dt.timedelta(days=1)] * len(v)),
    "bool": lambda v: pa.array([i % 2 == 0 for i in range(len(v))]),
    "fixed-size list": lambda v: pa.array([[str(x), str(x)] for x in v], pa.list_(pa.string(), 2)),
}
PANDAS_METADATA = [b"{", b"[]", b'{"index_columns": ["nope"], "columns": []}', b'{"columns": 5}', b"null"]
WRITE_OPTIONS: list[dict[str, Any]] = [
    {"row_group_size": 1}, {"compression": "none"}, {"compression": "zstd"}, {"compression": "gzip"},
    {"compression": "brotli"}, {"compression": "lz4"}, {"use_dictionary": False}, {"version": "1.0"},
    {"data_page_version": "2.0"}, {"write_statistics": False},
]  # fmt: skip


def _parquet_table(data: bytes) -> pa.Table | None:
    try:
        return pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError):
        return None  # an earlier byte mutation broke it


def _parquet_bytes(table: pa.Table, **options: Any) -> bytes:
    out = io.BytesIO()
    pq.write_table(table, out, **options)
    return out.getvalue()


def _parquet_column(draw: Draw, data: bytes) -> tuple[bytes, str]:
    table = _parquet_table(data)
    if table is None or not table.num_columns:
        return data, "retype a column (not readable parquet: no-op)"
    at = draw(st.integers(0, table.num_columns - 1))
    kind = draw(st.sampled_from(list(COLUMN_TYPES)))
    try:
        column = COLUMN_TYPES[kind](table.column(at).to_pylist())
        return _parquet_bytes(table.set_column(at, table.field(at).name, column)), f"column {at}: {kind}"
    except (pa.ArrowException, ValueError, TypeError, OverflowError) as e:  # some values do not convert
        return data, f"column {at}: {kind} (does not convert: {type(e).__name__}, no-op)"


def _parquet_shape(draw: Draw, data: bytes) -> tuple[bytes, str]:
    table = _parquet_table(data)
    if table is None or not table.num_columns:
        return data, "reshape (not readable parquet: no-op)"
    names = table.column_names
    at = draw(st.integers(0, len(names) - 1))
    how = draw(st.sampled_from(["rename", "duplicate name", "drop", "no rows", "pandas metadata", "options"]))
    options: dict[str, Any] = {}
    if how == "rename":
        names[at] = draw(st.sampled_from(HEADER_NAMES))
        table, what = table.rename_columns(names), f"rename column {at} to {names[at]!r}"
    elif how == "duplicate name":
        other = draw(st.integers(0, len(names) - 1))
        names[at] = names[other]
        table, what = table.rename_columns(names), f"rename column {at} to {names[at]!r} (twice)"
    elif how == "drop":
        table, what = table.remove_column(at), f"drop column {at}"
    elif how == "no rows":
        table, what = table.slice(0, 0), "no rows"
    elif how == "pandas metadata":
        metadata = draw(st.sampled_from(PANDAS_METADATA))
        table, what = table.replace_schema_metadata({b"pandas": metadata}), f"pandas metadata {metadata!r}"
    else:
        options = draw(st.sampled_from(WRITE_OPTIONS))
        what = f"write with {options}"
    try:
        return _parquet_bytes(table, **options), what
    except (pa.ArrowException, ValueError, OSError) as e:  # e.g. a codec this pyarrow build lacks
        return data, f"{what} (cannot write: {type(e).__name__}, no-op)"


# -------------------------------------------------------------------------------------- workbook mutations
# A workbook between steps is its zip bytes; each step unzips, edits one member (or the member list) and zips.

Members = list[tuple[str, bytes, int]]  # name, content, compression method
SHEETS = re.compile(r"^xl/worksheets/[^/]+\.xml$")
WORKBOOK = re.compile(r"^xl/workbook\.xml$")
RELS = re.compile(r"\.rels$")
TEXTS = re.compile(r"^xl/(worksheets/[^/]+|sharedStrings)\.xml$")
XML = re.compile(r"\.(xml|rels)$")
PREFERRED = ["xl/worksheets/", "xl/workbook.xml", "xl/sharedStrings.xml", "xl/_rels/", "xl/styles.xml"]

# Linear-time patterns only: a mutated member may be megabytes of unclosed tags.
TAG = re.compile(r"<[^<>]*>")
ATTRIBUTE = re.compile(r'([\w:.-]+)="([^"<>]*)"')
CELL_START = re.compile(r"<c\b[^<>]*>")
TEXT_NODE = re.compile(r"(<t\b[^<>]*>)([^<]*)(</t>)")
VALUE_NODE = re.compile(r"(<v>)([^<]*)(</v>)")
ELEMENT_NAME = re.compile(r"<(/?)([A-Za-z_][\w.-]*)(?=[\s/>])")


def _unzip(data: bytes) -> Members | None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as book:
            return [(info.filename, book.read(info), info.compress_type) for info in book.infolist()]
    except Exception:  # zipfile raises BadZipFile, zlib.error, EOFError, NotImplementedError, ... on damage
        return None


def _zip(members: Members, comment: bytes = b"") -> bytes:
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as book:
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": a duplicate member is the mutation
        book.comment = comment
        for name, content, method in members:
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            info.compress_type = method
            book.writestr(info, content)
    return out.getvalue()


def _member_order(members: Members, pattern: re.Pattern[str]) -> list[int]:
    """Indexes of the members `pattern` fits, sheets and workbook first (what hypothesis shrinks toward)."""
    fits = [i for i, (name, _, _) in enumerate(members) if pattern.search(name)]
    rank = {i: next((r for r, p in enumerate(PREFERRED) if members[i][0].startswith(p)), 99) for i in fits}
    return sorted(fits, key=lambda i: (rank[i], members[i][0]))


@dataclass(frozen=True)
class _InMember:
    """An edit of the text of one member that `members` fits."""

    edit: Callable[[Draw, str], tuple[str, str]]
    members: re.Pattern[str] = XML

    def __call__(self, draw: Draw, data: bytes) -> tuple[bytes, str]:
        book = _unzip(data)
        fits = _member_order(book, self.members) if book is not None else []
        if not fits:
            return data, f"{self.edit.__name__.strip('_')} (no such member: no-op)"
        at = draw(st.sampled_from(fits))
        name, content, method = book[at]
        text, what = self.edit(draw, content.decode("utf-8", "surrogateescape"))
        book[at] = (name, text.encode("utf-8", "surrogateescape"), method)
        return _zip(book), f"{name}: {what}"


@dataclass(frozen=True)
class _OnMembers:
    """An edit of the member list itself (drop, rename, recompress, ...)."""

    edit: Callable[[Draw, Members], tuple[Members, str]]

    def __call__(self, draw: Draw, data: bytes) -> tuple[bytes, str]:
        book = _unzip(data)
        if not book:
            return data, f"{self.edit.__name__.strip('_')} (not a readable zip: no-op)"
        book, what = self.edit(draw, book)
        return _zip(book), what


def _pick(draw: Draw, matches: list[re.Match[str]]) -> re.Match[str]:
    return matches[draw(st.integers(0, len(matches) - 1))]


def _set_attribute(tag: str, name: str, value: str | None) -> str:
    """`tag` with attribute `name` set to `value` (added if missing), or removed when value is None."""
    pattern = re.compile(rf'\s{re.escape(name)}="[^"]*"')
    if value is None:
        return pattern.sub("", tag, count=1)
    if pattern.search(tag):
        return pattern.sub(lambda _: f' {name}="{value}"', tag, count=1)  # no template: values hold "\\"
    end = len(tag) - (2 if tag.endswith("/>") else 1)
    return f'{tag[:end]} {name}="{value}"{tag[end:]}'


def _cell(draw: Draw, text: str) -> tuple[int, int, int, str] | None:
    """A drawn cell: (start, end of its start tag, end of the cell, start tag); None if there is none."""
    starts = list(CELL_START.finditer(text))
    if not starts:
        return None
    m = _pick(draw, starts)
    close = -1 if m[0].endswith("/>") else text.find("</c>", m.end())
    return m.start(), m.end(), (m.end() if close < 0 else close + len("</c>")), m[0]


def _cell_text(text: str, cell: tuple[int, int, int, str], tag: str, body: str | None) -> str:
    """One cell rewritten: a new start tag, and a new body (None keeps the old one)."""
    _, tag_end, end, _ = cell
    old_body = text[tag_end : end - len("</c>")] if end > tag_end else ""
    opening = tag[:-2] + ">" if tag.endswith("/>") else tag
    return opening + (old_body if body is None else body) + "</c>"


def _replace_cell(text: str, cell: tuple[int, int, int, str], tag: str, body: str | None) -> str:
    return text[: cell[0]] + _cell_text(text, cell, tag, body) + text[cell[2] :]


def _insert_in_text(draw: Draw, text: str, tokens: list[str]) -> tuple[str, str]:
    nodes = list(TEXT_NODE.finditer(text)) or list(VALUE_NODE.finditer(text))
    if not nodes:
        return text, "no text node: no-op"
    m = _pick(draw, nodes)
    at = m.start(2) + draw(st.integers(0, len(m[2])))
    token = draw(st.sampled_from(tokens))
    return text[:at] + token + text[at:], f"insert {token!r} into {m[2][:20]!r}"


def _unescaped(draw: Draw, text: str) -> tuple[str, str]:
    return _insert_in_text(draw, text, ["&", "<", "&amp", "&bogus;", "&#0;", "&#xFFFF;", "&#x1F600;", "]]>"])


ZERO_WIDTH = ["\u200b", "\u200b\u200c\u200d", "\ufeff", "\u00a0", " ", "", "\u2028", "\u202e", "\U0001f600"]


def _zero_width(draw: Draw, text: str) -> tuple[str, str]:
    nodes = list(TEXT_NODE.finditer(text))
    if not nodes:
        return text, "zero-width text (no text node: no-op)"
    m = _pick(draw, nodes)
    chars = draw(st.sampled_from(ZERO_WIDTH))
    how = draw(st.sampled_from(["replace", "prepend", "append"]))
    new = {"replace": chars, "prepend": chars + m[2], "append": m[2] + chars}[how]
    return text[: m.start(2)] + new + text[m.end(2) :], f"{how} {m[2][:20]!r} with {chars!r}"


def _swap_attributes(draw: Draw, text: str) -> tuple[str, str]:
    tags = [m for m in TAG.finditer(text) if m[0][1] not in "?!" and len(ATTRIBUTE.findall(m[0])) >= 2]
    if not tags:
        return text, "swap attributes (no tag with two: no-op)"
    m = _pick(draw, tags)
    attributes = [a[0] for a in ATTRIBUTE.finditer(m[0])]
    name = re.match(r"<[^\s/>]*", m[0])[0]
    closing = "/>" if m[0].endswith("/>") else ">"
    tag = f"{name} {' '.join(reversed(attributes))}{closing}"
    return text[: m.start()] + tag + text[m.end() :], f"reverse the attributes of {name[:40]}>"


def _namespace_prefix(draw: Draw, text: str) -> tuple[str, str]:
    if 'xmlns="' not in text:
        return text, "namespace prefix (no default namespace: no-op)"
    prefix = draw(st.sampled_from(["x", "main", "s"]))
    text = text.replace('xmlns="', f'xmlns:{prefix}="')
    return ELEMENT_NAME.sub(lambda m: f"<{m[1]}{prefix}:{m[2]}", text), f"elements as {prefix}:name"


# Value lists run from cheap to expensive to read: hypothesis shrinks a choice toward the front, and a
# shrink that stepped onto a 10 s read (a cell at A1048576) at every try would eat the run.
DIMENSIONS = ["", "A1", "A0:C31", "C31:A1", "XFD1048576", "A1:C99999999999", "A1:XFD1048576"]


def _dimension(draw: Draw, text: str) -> tuple[str, str]:
    ref = draw(st.sampled_from(DIMENSIONS))
    tag = f'<dimension ref="{ref}"/>'
    if "<dimension" in text:
        return re.sub(r"<dimension\b[^<>]*>", lambda _: tag, text, count=1), f"dimension {ref!r}"
    return text.replace("<sheetData", tag + "<sheetData", 1), f"add dimension {ref!r}"


FAR_REFS = [
    "", "a1", "$A$1", "A0", "A4294967296", "A1048577", "XFE1", "XFD1048576", "XFD1", "A1048576", "ZZZZ1",
]  # fmt: skip


def _far_cell(draw: Draw, text: str) -> tuple[str, str]:
    cell = _cell(draw, text)
    if cell is None:
        return text, "far cell (no cell: no-op)"
    ref = draw(st.sampled_from(FAR_REFS))
    tag = _set_attribute(cell[3], "r", ref)
    if draw(st.booleans()) and "</sheetData>" in text:  # moved into a row of its own, the sheet's last
        moved = _cell_text(text, cell, tag, None)
        row = re.match(r"[A-Za-z$]*(\d*)", ref)[1] or "0"
        text = text[: cell[0]] + text[cell[2] :]
        text = text.replace("</sheetData>", f'<row r="{row}">{moved}</row></sheetData>', 1)
        return text, f"move {cell[3][:40]} to a last row as {ref!r}"
    return _replace_cell(text, cell, tag, None), f"cell {cell[3][:40]} becomes {ref!r}"


MERGES = [
    "A40:C45", "A31:C40", "A2:A5", "B2:B31", "A1:C1", "A1:A3", "C5:A2", "A2:A2", "D2:F10", "A1:XFD1048576",
    "A1048576:B1048576", "A2", "A2:", "A32:A33",
]  # fmt: skip


def _merge(draw: Draw, text: str) -> tuple[str, str]:
    refs = draw(st.lists(st.sampled_from(MERGES), min_size=1, max_size=3))
    cells = "".join(f'<mergeCell ref="{ref}"/>' for ref in refs)
    if "<mergeCells" in text:
        text = re.sub(r"(<mergeCells\b[^<>]*>)", lambda m: m[1] + cells, text, count=1)
    elif "</sheetData>" in text:
        text = text.replace(
            "</sheetData>", f'</sheetData><mergeCells count="{len(refs)}">{cells}</mergeCells>', 1
        )
    else:
        return text, "merge (no sheetData: no-op)"
    return text, f"merge {', '.join(refs)}"


FORMULAS = ["SUM(C2:C5)", "1/0", "A1&amp;B1", "", "NA()", 'HYPERLINK("x")']


def _formula(draw: Draw, text: str) -> tuple[str, str]:
    cell = _cell(draw, text)
    if cell is None:
        return text, "formula (no cell: no-op)"
    formula = draw(st.sampled_from(FORMULAS))
    how = draw(st.sampled_from(["no value", "empty value", "shared, no value", "with value"]))
    body = {
        "no value": f"<f>{formula}</f>",
        "empty value": f"<f>{formula}</f><v></v>",
        "shared, no value": '<f t="shared" si="0"/>',
        "with value": f"<f>{formula}</f><v>1</v>",
    }[how]
    return _replace_cell(
        text, cell, _set_attribute(cell[3], "t", None), body
    ), f"{cell[3][:40]}: formula, {how}"


ERRORS = ["#N/A", "#DIV/0!", "#VALUE!", "#REF!", "#NAME?", "#NUM!", "#NULL!", "#GETTING_DATA", "garbage", ""]


def _error_value(draw: Draw, text: str) -> tuple[str, str]:
    cell = _cell(draw, text)
    if cell is None:
        return text, "error value (no cell: no-op)"
    error = draw(st.sampled_from(ERRORS))
    return _replace_cell(
        text, cell, _set_attribute(cell[3], "t", "e"), f"<v>{error}</v>"
    ), f"{cell[3][:40]} = {error}"


CELL_TYPES = ["s", "n", "b", "str", "inlineStr", "e", "d", "x", None]


def _cell_type(draw: Draw, text: str) -> tuple[str, str]:
    cell = _cell(draw, text)
    if cell is None:
        return text, "cell type (no cell: no-op)"
    kind = draw(st.sampled_from(CELL_TYPES))
    return _replace_cell(text, cell, _set_attribute(cell[3], "t", kind), None), f"{cell[3][:40]}: t={kind!r}"


VALUES = [
    "999999", "-1", "1e400", "NaN", "", "0x10", "1.5", "\u0663", "99999999999999999999",
    "2026-01-01T00:00",
]  # fmt: skip


def _cell_value(draw: Draw, text: str) -> tuple[str, str]:
    nodes = list(VALUE_NODE.finditer(text))
    if not nodes:
        return text, "value (no <v>: no-op)"
    m = _pick(draw, nodes)
    value = draw(st.sampled_from(VALUES))
    return text[: m.start(2)] + value + text[m.end(2) :], f"<v>{m[2][:20]}</v> becomes {value!r}"


ATTRIBUTE_VALUES = [
    "", "0", "-1", "1", "2", "999999", "99999999999999999999", "XFD1048576", "A1:B", "rId99", "x",
]  # fmt: skip


def _attribute_value(draw: Draw, text: str) -> tuple[str, str]:
    found = list(ATTRIBUTE.finditer(text))
    if not found:
        return text, "attribute value (none: no-op)"
    m = _pick(draw, found)
    value = draw(st.sampled_from(ATTRIBUTE_VALUES))
    return text[: m.start(2)] + value + text[m.end(2) :], f'{m[1]}="{m[2][:30]}" becomes {value!r}'


def _drop_tag(draw: Draw, text: str) -> tuple[str, str]:
    tags = list(TAG.finditer(text))
    if not tags:
        return text, "drop a tag (none: no-op)"
    m = _pick(draw, tags)
    return text[: m.start()] + text[m.end() :], f"drop the tag {m[0][:40]!r}"


def _duplicate_element(draw: Draw, text: str) -> tuple[str, str]:
    name = draw(st.sampled_from(["row", "c", "sheet", "Relationship", "si", "mergeCell", "xf"]))
    starts = list(re.finditer(rf"<{name}\b[^<>]*>", text))
    if not starts:
        return text, f"duplicate a <{name}> (none: no-op)"
    m = _pick(draw, starts)
    close = -1 if m[0].endswith("/>") else text.find(f"</{name}>", m.end())
    end = m.end() if close < 0 else close + len(name) + 3
    return text[:end] + text[m.start() : end] + text[end:], f"duplicate {m[0][:40]!r}"


def _empty_cells(draw: Draw, text: str) -> tuple[str, str]:
    """Styled empty cells (`<c r="D2" s="0"/>`), as Excel writes for a formatted but empty column."""
    rows = list(re.finditer(r'<row r="(\d+)"', text))
    if not rows or "</sheetData>" not in text:
        return text, "empty cells (no rows: no-op)"
    count = draw(st.sampled_from([10, 1000, 10_000, 100_000]))
    how = draw(st.sampled_from(["in the last row", "in rows of their own below"]))
    last = int(rows[-1][1])
    if how == "in the last row":
        cells = "".join(f'<c r="{column_letters(3 + i)}{last}" s="0"/>' for i in range(min(count, 16_000)))
        at = text.rfind("</row>")
        return text[:at] + cells + text[at:], f"{min(count, 16_000)} empty styled cells {how}"
    cells = "".join(f'<row r="{last + 1 + i}"><c r="D{last + 1 + i}" s="0"/></row>' for i in range(count))
    return text.replace("</sheetData>", cells + "</sheetData>", 1), f"{count} empty styled cells {how}"


XML_TOKENS = [
    '<c r="A1">', '<c r="A1"/>', '<c r="A1"><f>1</f>', "<f>1</f>", "<v>", "</v>", '<row r="1">', "</row>",
    "&", "x:", "\x00",
]  # fmt: skip


def _xml_run(draw: Draw, text: str) -> tuple[str, str]:
    at = draw(st.integers(0, len(text)))
    token = draw(st.sampled_from(XML_TOKENS))
    times = draw(st.sampled_from([1, 100, 10_000, 100_000]))
    return text[:at] + token * times + text[at:], f"insert {token!r} x {times} at {at}"


DOCTYPES = [
    '<!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
    '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">]>',
    '<!DOCTYPE x [<!ENTITY d SYSTEM "file:///etc/passwd">]>',
    "<!DOCTYPE x>",
]


def _doctype(draw: Draw, text: str) -> tuple[str, str]:
    doctype = draw(st.sampled_from(DOCTYPES))
    declaration = re.match(r"\s*<\?xml[^<>]*\?>", text)
    at = declaration.end() if declaration else 0
    text = text[:at] + doctype + text[at:]
    if draw(st.booleans()):  # and use the entity in a text node
        text = TEXT_NODE.sub(lambda m: m[1] + "&d;" + m[3], text, count=1)
    return text, f"doctype {doctype[:30]!r}"


DECLARATIONS = [
    '<?xml version="1.0" encoding="UTF-16"?>', '<?xml version="1.1"?>', "",
    '<?xml version="1.0" encoding="ISO-8859-1"?>', '  <?xml version="1.0"?>',
    '\ufeff<?xml version="1.0" encoding="UTF-8" standalone="yes"?>',
]  # fmt: skip


def _declaration(draw: Draw, text: str) -> tuple[str, str]:
    declaration = draw(st.sampled_from(DECLARATIONS))
    text = re.sub(r"^\s*<\?xml[^<>]*\?>", "", text, count=1)
    return declaration + text, f"declaration {declaration!r}"


def _truncate_text(draw: Draw, text: str) -> tuple[str, str]:
    at = draw(st.integers(0, max(len(text) - 1, 0)))
    return text[:at], f"truncate at {at} of {len(text)}"


SHEET_NAMES = ["Data", "data ", " data", "", "data\u200b", "d\u00e1t\u00e1", "d&amp;ta", "data'", "x" * 40]


def _sheet_name(draw: Draw, text: str) -> tuple[str, str]:
    sheets = list(re.finditer(r"<sheet\b[^<>]*>", text))
    if not sheets:
        return text, "sheet name (no <sheet>: no-op)"
    m = _pick(draw, sheets)
    how = draw(st.sampled_from(["rename", "unknown r:id", "second with the same name", "remove"]))
    if how == "rename":
        tag = _set_attribute(m[0], "name", draw(st.sampled_from(SHEET_NAMES)))
    elif how == "unknown r:id":
        tag = _set_attribute(m[0], "r:id", "rId99")
    elif how == "second with the same name":
        tag = m[0] + _set_attribute(m[0], "sheetId", "99")
    else:
        tag = ""
    return text[: m.start()] + tag + text[m.end() :], f"sheet {m[0][:50]!r}: {how} -> {tag[:60]!r}"


TARGETS = [
    "worksheets/sheet1.xml", "/xl/worksheets/sheet1.xml", "../xl/worksheets/sheet1.xml", "",
    "worksheets/missing.xml", "worksheets\\sheet1.xml", "Worksheets/Sheet1.xml", "http://example.com/x.xml",
    "/xl/worksheets/../workbook.xml",
]  # fmt: skip


def _rels_target(draw: Draw, text: str) -> tuple[str, str]:
    relationships = list(re.finditer(r"<Relationship\b[^<>]*>", text))
    if not relationships:
        return text, "target (no <Relationship>: no-op)"
    m = _pick(draw, relationships)
    target = draw(st.sampled_from(TARGETS))
    return text[: m.start()] + _set_attribute(m[0], "Target", target) + text[m.end() :], f"target {target!r}"


def _rich_text(draw: Draw, text: str) -> tuple[str, str]:
    nodes = list(TEXT_NODE.finditer(text))
    if not nodes:
        return text, "rich text (no text node: no-op)"
    m = _pick(draw, nodes)
    half = len(m[2]) // 2
    runs = f"<r><t>{m[2][:half]}</t></r><r><rPr><b/></rPr><t>{m[2][half:]}</t></r>"
    return text[: m.start()] + runs + text[m.end() :], f"split {m[2][:20]!r} into two runs"


def _drop_member(draw: Draw, book: Members) -> tuple[Members, str]:
    at = draw(st.sampled_from(_member_order(book, re.compile(""))))
    return book[:at] + book[at + 1 :], f"drop {book[at][0]}"


def _empty_member(draw: Draw, book: Members) -> tuple[Members, str]:
    at = draw(st.sampled_from(_member_order(book, re.compile(""))))
    name, _, method = book[at]
    return [*book[:at], (name, b"", method), *book[at + 1 :]], f"empty {name}"


RENAMES: dict[str, Callable[[str], str]] = {
    "upper case": str.upper, "leading slash": lambda n: "/" + n, "trailing space": lambda n: n + " ",
    "backslashes": lambda n: n.replace("/", "\\"), "dot segment": lambda n: n.replace("/", "/./", 1),
}  # fmt: skip


def _rename_member(draw: Draw, book: Members) -> tuple[Members, str]:
    at = draw(st.sampled_from(_member_order(book, re.compile(""))))
    how = draw(st.sampled_from(list(RENAMES)))
    name, content, method = book[at]
    return [*book[:at], (RENAMES[how](name), content, method), *book[at + 1 :]], f"rename {name}: {how}"


def _duplicate_member(draw: Draw, book: Members) -> tuple[Members, str]:
    at = draw(st.sampled_from(_member_order(book, re.compile(""))))
    name, content, method = book[at]
    copy_of = draw(st.sampled_from([b"", content[: len(content) // 2], content]))
    return [*book, (name, copy_of, method)], f"a second {name} of {len(copy_of)} bytes"


METHODS = {"stored": zipfile.ZIP_STORED, "bzip2": zipfile.ZIP_BZIP2, "lzma": zipfile.ZIP_LZMA}


def _recompress(draw: Draw, book: Members) -> tuple[Members, str]:
    method = draw(st.sampled_from(list(METHODS)))
    return [(name, content, METHODS[method]) for name, content, _ in book], f"every member {method}"


def _date_style(draw: Draw, book: Members) -> tuple[Members, str]:
    """A date number format on one column's cells (styles.xml and the sheets together)."""
    styles = next((i for i, (name, _, _) in enumerate(book) if name == "xl/styles.xml"), None)
    text = book[styles][1].decode("utf-8", "surrogateescape") if styles is not None else ""
    xfs = re.search(r"<cellXfs\b[^<>]*>(.*?)</cellXfs>", text, re.S)
    if xfs is None:
        return book, "date style (no cellXfs: no-op)"
    index = len(re.findall(r"<xf\b", xfs[1]))
    fmt = draw(st.sampled_from([14, 22, 46, 49]))  # date, date-time, elapsed time, text
    xf = f'<xf numFmtId="{fmt}" fontId="0" fillId="0" borderId="0" applyNumberFormat="1"/>'
    styled = text[: xfs.end(1)] + xf + text[xfs.end(1) :]
    book[styles] = (book[styles][0], styled.encode("utf-8", "surrogateescape"), book[styles][2])
    column = draw(st.sampled_from("ABC"))
    for i, (name, content, method) in enumerate(book):
        if SHEETS.search(name):
            sheet = content.decode("utf-8", "surrogateescape")
            sheet = CELL_START.sub(
                lambda m: _set_attribute(m[0], "s", str(index)) if f'r="{column}' in m[0] else m[0], sheet
            )
            book[i] = (name, sheet.encode("utf-8", "surrogateescape"), method)
    return book, f"number format {fmt} on column {column}"


def _zip_tail(draw: Draw, data: bytes) -> tuple[bytes, str]:
    how = draw(st.sampled_from(["garbage after", "garbage before", "comment"]))
    if how == "garbage after":
        return data + b"\x00garbage" * 16, how
    if how == "garbage before":
        return b"MZ\x90\x00" * 64 + data, how
    book = _unzip(data)
    if book is None:
        return data, "comment (not a readable zip: no-op)"
    return _zip(book, comment=b"<&\x00" * 1000), "a 3000-byte zip comment"


def _member_bytes(draw: Draw, data: bytes) -> tuple[bytes, str]:
    book = _unzip(data)
    if not book:
        return data, "member bytes (not a readable zip: no-op)"
    fits = _member_order(book, XML)
    if not fits:
        return data, "member bytes (no XML member: no-op)"
    at = draw(st.sampled_from(fits))
    name, content, method = book[at]
    content, what = _bytes_of(draw, content)
    book[at] = (name, content, method)
    return _zip(book), f"{name}: {what}"


# Simplest first within each list: hypothesis shrinks a choice toward the front.
MUTATIONS: dict[str, list[Mutation]] = {
    "xlsx": [
        _InMember(_namespace_prefix, WORKBOOK),
        _InMember(_namespace_prefix, SHEETS),
        _InMember(_namespace_prefix),
        _InMember(_unescaped, TEXTS),
        _InMember(_swap_attributes),
        _InMember(_dimension, SHEETS),
        _InMember(_far_cell, SHEETS),
        _InMember(_merge, SHEETS),
        _InMember(_formula, SHEETS),
        _InMember(_error_value, SHEETS),
        _InMember(_zero_width, TEXTS),
        _InMember(_cell_type, SHEETS),
        _InMember(_cell_value),
        _InMember(_attribute_value),
        _InMember(_drop_tag),
        _InMember(_duplicate_element),
        _InMember(_xml_run, SHEETS),
        _InMember(_empty_cells, SHEETS),
        _InMember(_doctype),
        _InMember(_declaration),
        _InMember(_truncate_text),
        _InMember(_sheet_name, WORKBOOK),
        _InMember(_rels_target, RELS),
        _InMember(_rich_text, TEXTS),
        _OnMembers(_date_style),
        _OnMembers(_drop_member),
        _OnMembers(_empty_member),
        _OnMembers(_rename_member),
        _OnMembers(_duplicate_member),
        _OnMembers(_recompress),
        _member_bytes,
        _zip_tail,
        _bytes_of,
    ],
    "text": [*BYTE_MUTATIONS, _lines, _header, _reencode],
    "jsonl": [_json_value, _json_line, *BYTE_MUTATIONS, _lines, _reencode],
    "parquet": [_parquet_column, _parquet_shape, _bytes_of],
}
SUFFIXES = [".xlsx", ".xlsm", ".csv", ".tsv", ".jsonl", ".parquet"]
# Data settings a config may bring; one naming a field this DataSettings lacks is left out.
OVERRIDES: list[dict[str, Any]] = [
    {"header_row": 2}, {"sheet": 0}, {"sheet": 1}, {"sheet": "notes"}, {"encoding": "cp1252"},
    {"encoding": "utf-16"}, {"encoding": "utf-8-sig"}, {"separator": ";"}, {"separator": "\t"},
    {"separator": "|"}, {"max_cells": 60},
]  # fmt: skip


@dataclass(frozen=True)
class FuzzInput:
    seed: Seed
    suffix: str
    data: bytes
    steps: tuple[str, ...]
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example: no bytes
        renamed = f" as {self.suffix}" if self.suffix != self.seed.suffix else ""
        settings_ = f", data settings {self.overrides}" if self.overrides else ""
        return (f"{self.seed.name}{renamed}, {len(self.data)} bytes{settings_}: " + " | ".join(self.steps))[
            :1000
        ]

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis's printer: the same, no bytes
        printer.text(repr(self))


@st.composite
def fuzz_inputs(draw: Draw) -> FuzzInput:
    """A seed, one to three mutations of its kind and, now and then, another suffix or data setting."""
    seed = draw(st.sampled_from(_seed_menu()))
    data, steps = seed.data, []
    for _ in range(draw(st.integers(1, 3))):
        mutated, step = draw(st.sampled_from(MUTATIONS[seed.kind]))(draw, data)
        if mutated != data:  # a step that found nothing to change is no part of the recipe
            data, steps = mutated, [*steps, step]
    suffix = draw(st.sampled_from(SUFFIXES)) if draw(st.integers(0, 15)) == 15 else seed.suffix
    known = [o for o in OVERRIDES if set(o) <= set(DataSettings.model_fields)]
    overrides = draw(st.sampled_from(known)) if draw(st.integers(0, 9)) == 9 else {}
    return FuzzInput(seed, suffix, data, tuple(steps), overrides)
