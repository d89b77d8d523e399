"""Read a user's table (xlsx, tsv, csv, parquet, jsonl) into a DataFrame, whatever arrives.

Every file is checked for what it really is before a reader sees it; a workbook's XML is scanned first
(tasks/excel.py), so nothing is allocated beyond `data.max_cells`; every reader's failure becomes one
DataError naming the file, the line, row, cell or column, and the fix. Rows keep their number in the
source file (`_row`) for every later message; rows with nothing in them are dropped and counted.
"""

from __future__ import annotations

import codecs
import csv
import errno
import importlib.util
import io
import json
import os
import re
import stat
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loraflow.errors import DataError, did_you_mean, shown, shown_error
from loraflow.tasks.excel import (
    REPAIR,
    column_letters,
    not_a_workbook,
    scan_sheet,
    sheet_members,
)
from loraflow.tasks.sniff import BINARY, mismatch, sniff

SUPPORTED = (".xlsx", ".xlsm", ".tsv", ".csv", ".parquet", ".jsonl")
# python-calamine (Rust) reads .xlsx several times faster than openpyxl; the cells are the same.
EXCEL_ENGINE = "calamine" if importlib.util.find_spec("python_calamine") else "openpyxl"
ROW = "_row"  # the row number in the source file, kept so every message can point at it
# What a cell may hold and still be blank: whitespace, zero-width characters (ZWSP, ZWNJ, ZWJ, word
# joiner, BOM) and NUL bytes. One definition for dropping empty rows and for the contract.
BLANK_CHARS = r"\s\u200b\u200c\u200d\u2060\ufeff\x00"
BLANK = re.compile(f"[{BLANK_CHARS}]*")
SEPARATORS = (",", ";", "\t", "|")
MAX_COLUMNS = 16_384  # Excel's limit (XFD); wider is a wrong separator or a broken file
NOT_TEXT = (list, tuple, dict, set, np.ndarray, bytes, bytearray)  # what a parquet/jsonl cell may hold


def require_file(path: Path, fix: str) -> None:
    """Raise a DataError saying what `path` is when it is no readable file: missing, a folder, a broken
    or looping link, unreadable. `fix` says where the path came from."""
    try:
        info = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            problem = "is a symbolic link that loops (through links, it points back to itself)"
        elif path.is_symlink():
            problem = f"is a symbolic link to {os.readlink(path)}, which does not exist"
        else:
            problem = "not found"
        raise DataError(f"{path} {problem}; {fix}") from e
    if stat.S_ISDIR(info.st_mode):
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in SUPPORTED)[:5]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise DataError(f"{path} is a folder, not a file{hint}; {fix}")
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{path} is not a regular file (a pipe, socket or device); {fix}")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path} cannot be read (permission denied); {fix}")


def _read_excel(path: Path, sheet: str | int, header_row: int, max_cells: int) -> pd.DataFrame:
    if not zipfile.is_zipfile(path) or sniff(path) != "xlsx":
        raise DataError(not_a_workbook(path))
    try:
        with zipfile.ZipFile(path) as book:
            members = sheet_members(book, path)
    except zipfile.BadZipFile as e:
        raise DataError(not_a_workbook(path)) from e
    names = [name for name, _ in members]
    if isinstance(sheet, int) and not 0 <= sheet < len(names):
        raise DataError(f"{path}: sheet index {sheet} out of range; sheets are {names}")
    if isinstance(sheet, str) and sheet not in names:
        raise DataError(f"{path}: sheet '{sheet}' not found{did_you_mean(sheet, names)}; sheets are {names}")
    name, member = members[sheet if isinstance(sheet, int) else names.index(sheet)]
    where = f"{path}: sheet '{name}'"
    scan = scan_sheet(path, member, name, max_cells)
    if scan.unsaved:
        listed = ", ".join(scan.unsaved[:10]) + (
            f" and {len(scan.unsaved) - 10} more" if len(scan.unsaved) > 10 else ""
        )
        raise DataError(
            f"{where}: cell(s) {listed} hold a formula with no saved value (the file was written by a "
            "program that does not compute formulas); open and save it in Excel or LibreOffice, or write "
            "the values instead of formulas"
        )
    if not scan.values:
        raise DataError(f"{where} is empty (no header row, no data); pick the sheet with data")
    if scan.cells() > max_cells:
        far = " and ".join(dict.fromkeys(scan.farthest.values()))
        raise DataError(
            f"{where} has values as far as row {scan.last_row:,} and column {column_letters(scan.last_col)} "
            f"({scan.cells():,} cells to read for {scan.values:,} values, more than data.max_cells = "
            f"{max_cells:,}); the farthest value is in {far}: delete stray cells far from the table "
            "(select the rows or columns past it, right-click → Delete), or raise data.max_cells"
        )
    if scan.farthest and header_row > scan.last_row:
        raise DataError(
            f"{where}: data.header_row is {header_row} but the sheet's values end at row {scan.last_row}"
        )
    try:
        frame = pd.read_excel(path, sheet_name=name, header=header_row - 1, dtype=object, engine=EXCEL_ENGINE)
    except Exception as e:  # the readers raise many types (XmlError, ValueError, ...) for broken parts
        raise DataError(f"{where} cannot be read ({shown_error(e)}); the file is damaged: {REPAIR}") from e
    frame.attrs["header"] = _unmangled(list(frame.columns))
    _fill_merged(frame, scan.merged, header_row)
    errors: dict[int, list[tuple[str, str]]] = {}  # by column position; read_table names them
    for (row, col), value in scan.errors.items():
        if row > header_row and col < frame.shape[1]:
            errors.setdefault(col, []).append((f"{column_letters(col)}{row}", value))
    frame.attrs["excel_errors"] = errors
    frame.attrs["sheet"] = name
    return frame


def _unmangled(columns: list[Any]) -> list[str]:
    """The header as written, from pandas' names: 'Unnamed: 3' was an empty cell, 'x.1' a second 'x'."""
    names = [str(c).strip() for c in columns]
    known = set(names)
    header = []
    for name in names:
        repeat = re.fullmatch(r"(.+)\.(\d+)", name)
        if re.fullmatch(r"Unnamed: \d+", name):
            header.append("")
        elif repeat and repeat.group(1) in known:
            header.append(repeat.group(1))
        else:
            header.append(name)
    return header


def _header_names(raw: pd.DataFrame) -> list[str]:
    if raw.empty:
        return []
    return ["" if pd.isna(v) else str(v).strip() for v in raw.iloc[0].tolist()]


def _fill_merged(frame: pd.DataFrame, merged: list[tuple[int, int, int, int]], header_row: int) -> None:
    """A merged range shows its top-left value in every cell: give every row that value. Ranges above
    the header, right of the table or below the data (formatting that reaches past the last row) are
    cut to the table."""
    first_data_row = header_row + 1
    rows, columns = frame.shape
    for row1, col1, row2, col2 in merged:
        top, bottom = row1 - first_data_row, min(row2 - first_data_row, rows - 1)
        if top < 0 or top >= rows or col1 >= columns:
            continue
        value = frame.iat[top, col1]
        for column in range(col1, min(col2, columns - 1) + 1):
            frame.iloc[top : bottom + 1, column] = value


def _check_text_kind(path: Path, encoding: str) -> None:
    """A text table must be text: say what a gzip, workbook, UTF-16 or HTML file with its name really is."""
    kind = sniff(path)
    utf16 = re.sub(r"[-_]", "", encoding.lower()).startswith("utf16")
    if kind in BINARY or kind in ("html", "spreadsheetml") or (kind == "utf-16" and not utf16):
        raise DataError(mismatch(path, kind))


def _first_lines(path: Path, encoding: str, header_row: int, count: int = 20) -> list[str]:
    lines: list[str] = []
    try:
        with open(path, encoding=encoding, errors="replace", newline="") as file:
            for number, line in enumerate(file, start=1):
                if number >= header_row:
                    lines.append(line)
                if len(lines) >= count:
                    break
    except UnicodeError:  # a codec that refuses outright (UTF-16 without its mark): the reader says so
        return []
    return lines


def _separator_in_use(path: Path, encoding: str, header_row: int, sep: str) -> str | None:
    """Another separator that splits the first lines into the same number (≥ 2) of fields, when `sep`
    does not; None when `sep` fits or nothing else does."""
    lines = _first_lines(path, encoding, header_row)

    def fields(separator: str) -> set[int]:
        try:
            return {len(row) for row in csv.reader(io.StringIO("".join(lines)), delimiter=separator) if row}
        except csv.Error:  # a stray carriage return or NUL: this separator tells nothing
            return set()

    def fits(separator: str) -> bool:
        counts = fields(separator)
        return len(counts) == 1 and min(counts) >= 2

    if fits(sep):
        return None
    fitting = [c for c in SEPARATORS if c != sep and fits(c)]
    return fitting[0] if fitting else None


def _separator_error(path: Path, found: str, sep: str) -> DataError:
    return DataError(
        f"{path}: the columns are separated by {found!r}, not {sep!r} (Excel writes ';' in countries with "
        f"a decimal comma); set data.separator: {json.dumps(found)}"
    )


def _decode_error(path: Path, encoding: str, error: UnicodeError) -> DataError:
    """Where the file stops being `encoding`: the byte offset in the file and its line (the reader's
    own offset counts from the start of a cell or a block)."""
    raw = path.read_bytes()
    fix = (
        "set data.encoding (e.g. cp1252 or latin-1 for files saved by older Excel, utf-16 for Excel's "
        "'Unicode Text')"
    )
    try:
        raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return DataError(
            f"{path}: not valid {encoding} text at byte {e.start} (line {line}: "
            f"{raw[e.start : e.start + 4]!r}…); {fix}"
        )
    except UnicodeError:
        pass
    if "BOM" in str(error):
        fix = "set data.encoding: utf-16-le (or utf-16-be): the file has no byte-order mark"
    return DataError(f"{path}: not valid {encoding} text ({shown_error(error)}); {fix}")


def _count_lines(path: Path) -> int:
    count = 0
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            count += chunk.count(b"\n")
    return count + 1


def _read_text_table(
    path: Path, sep: str, header_row: int, encoding: str, max_cells: int, explicit_sep: bool
) -> pd.DataFrame:
    _check_text_kind(path, encoding)
    options = {
        "sep": sep,
        "encoding": encoding,
        "dtype": str,
        "keep_default_na": False,
        "na_values": [""],
        "skip_blank_lines": False,  # row numbers are the file's lines, as a spreadsheet shows them
    }
    header = _first_lines(path, encoding, header_row, count=1)
    try:
        width = max((len(row) for row in csv.reader(header, delimiter=sep)), default=0)
    except csv.Error:
        width = 0  # the readers below say what is wrong
    if width > MAX_COLUMNS:
        raise DataError(
            f"{path}: the header row has {width:,} columns separated by {sep!r}, more than the "
            f"{MAX_COLUMNS:,} loraflow reads (Excel's limit); check data.separator and data.header_row"
        )
    try:
        # The header and the first data row: a first row wider than the header would otherwise become the
        # index (pandas' implicit index: every column shifted by one, or a 20,000-level index out of memory).
        raw = pd.read_csv(path, header=None, skiprows=header_row - 1, nrows=2, **options)
        if (
            raw.shape[1] == 1
            and not explicit_sep
            and (found := _separator_in_use(path, encoding, header_row, sep))
        ):
            raise _separator_error(path, found, sep)
        cells = _count_lines(path) * raw.shape[1]
        if cells > max_cells:
            raise DataError(
                f"{path}: about {cells:,} cells ({raw.shape[1]} columns), more than data.max_cells = "
                f"{max_cells:,}; split the file or raise data.max_cells"
            )
        try:  # pyarrow's multi-threaded parser: ~10x faster than the C parser on large files
            frame = pd.read_csv(path, header=header_row - 1, engine="pyarrow", **options)
        except Exception:  # it is strict and terse: the C parser below names the line or byte that is wrong
            frame = pd.read_csv(path, header=header_row - 1, **options)
    except UnicodeError as e:
        raise _decode_error(path, encoding, e) from e
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{path}: no rows at or below data.header_row = {header_row}") from e
    except pd.errors.ParserError as e:
        if not explicit_sep and (found := _separator_in_use(path, encoding, header_row, sep)):
            raise _separator_error(path, found, sep) from e
        found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        if found is None:
            raise DataError(
                f"{path}: cannot parse the table ({shown_error(e)}); check quoting and separators"
            ) from e
        expected, line, saw = found.groups()
        raise DataError(
            f"{path}: line {line} has {saw} fields, expected {expected} like the header; quote cells that "
            f"contain the separator ({sep!r}), or remove the extra cells"
        ) from e
    frame.attrs["header"] = _header_names(raw)
    return frame


def _read_jsonl(path: Path, encoding: str) -> pd.DataFrame:
    """One JSON object per line; a bad line is named by its number."""
    _check_text_kind(path, encoding)
    records = []
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeError as e:
        raise _decode_error(path, encoding, e) from e
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            reason = (
                f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deep"
            )
            raise DataError(
                f"{path}: line {number} is not valid JSON ({reason}); each line must be one JSON object "
                'such as {"text": "...", "label": "..."}'
            ) from e
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number} is a JSON {type(record).__name__}, not an object")
        records.append(record)
    return pd.DataFrame.from_records(records)


def _read_parquet(path: Path, max_cells: int) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
        rows, columns = metadata.num_rows, metadata.num_columns
        if columns > MAX_COLUMNS:
            raise DataError(
                f"{path}: {columns:,} columns, more than the {MAX_COLUMNS:,} loraflow reads; keep the "
                "columns the model reads"
            )
        if rows * columns > max_cells:
            raise DataError(
                f"{path}: {rows:,} rows × {columns} columns, more than data.max_cells = {max_cells:,}; "
                "split the file or raise data.max_cells"
            )
        _check_utf8(path)
        return pd.read_parquet(path)
    except DataError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for damaged files
        kind = sniff(path)
        if kind not in (None, "parquet", "text"):
            raise DataError(mismatch(path, kind)) from e
        raise DataError(f"{path} is not a readable parquet file ({shown_error(e)}); write it again") from e


def _check_utf8(path: Path) -> None:
    """Parquet text columns must hold UTF-8; pyarrow reads them without checking, and the first thing that
    looks at the text fails deep in pandas ("Wrapping ... failed"). Check them, and name the rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    text = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    for name, column in zip(text, pq.read_table(path, columns=text).columns, strict=True):
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            raw = column.cast(pa.large_binary()).to_pylist()
            rows = [i + 1 for i, value in enumerate(raw) if value is not None and not _is_utf8(value)]
            more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
            raise DataError(
                f"{path}: column '{name}' holds text that is not valid UTF-8 at row(s) "
                f"{', '.join(map(str, rows[:5]))}{more}; write the file again with its text as UTF-8"
            ) from None


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def blank_cells(frame: pd.DataFrame) -> np.ndarray:
    """True where a cell is empty: null, or text of only whitespace, zero-width characters and NUL
    bytes. One pass over the cells that hold something, whatever the number of columns."""
    values = frame.to_numpy(dtype=object)
    blank = pd.isna(values)
    present = values[~blank]
    text = np.fromiter(
        (isinstance(v, str) and BLANK.fullmatch(v) is not None for v in present),
        dtype=bool,
        count=len(present),
    )
    blank[~blank] = text
    return blank


def read_table(
    path: Path,
    sheet: str | int = 0,
    header_row: int = 1,
    encoding: str = "utf-8",
    separator: str | None = None,
    max_cells: int = 10_000_000,
) -> pd.DataFrame:
    """Any supported file as a DataFrame with stripped column names and the source row number in `_row`;
    rows with nothing in any cell are dropped (their count in `attrs["blank_rows"]`)."""
    suffix = path.suffix.lower()
    require_file(path, "check data.train / data.dev / data.test (relative to the config's folder)")
    if suffix not in SUPPORTED:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use one of {', '.join(SUPPORTED)}")
    if separator is not None and len(separator) != 1:
        raise DataError(f"the column separator must be one character, got {shown(separator)}")
    try:
        codecs.lookup(encoding)
    except LookupError as e:
        raise DataError(f"unknown text encoding {encoding!r}; e.g. utf-8, cp1252, latin-1, utf-16") from e
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty (0 bytes)")
    if suffix in (".xlsx", ".xlsm"):
        frame = _read_excel(path, sheet, header_row, max_cells)
    elif suffix in (".tsv", ".csv"):
        sep = separator or ("\t" if suffix == ".tsv" else ",")
        frame = _read_text_table(
            path, sep, header_row, encoding, max_cells, explicit_sep=separator is not None
        )
    elif suffix == ".parquet":
        frame = _read_parquet(path, max_cells)
    else:
        frame = _read_jsonl(path, encoding)
    attrs = dict(frame.attrs)
    frame.columns = [str(c).strip() for c in frame.columns]
    names = list(frame.columns)
    attrs["header"] = attrs.get("header") or names
    attrs["excel_errors"] = {names[col]: cells for col, cells in attrs.get("excel_errors", {}).items()}
    # Spreadsheet rows are 1-based and the header takes one, so data row i sits on line header_row + 1 + i.
    offset = header_row + 1 if suffix in (".xlsx", ".xlsm", ".tsv", ".csv") else 1
    frame[ROW] = np.arange(len(frame)) + offset
    cells = frame.iloc[:, : len(names)]  # `_row` comes last
    filled = np.flatnonzero(cells.notna().any().to_numpy())  # blank columns cannot make a row non-blank
    empty = blank_cells(cells.iloc[:, filled]).all(axis=1) if len(filled) else np.ones(len(frame), dtype=bool)
    if empty.any():
        frame = frame[~empty].reset_index(drop=True)
    frame.attrs = attrs | {"blank_rows": int(empty.sum())}
    return frame


def selected_columns(frame: pd.DataFrame, path: Path, columns: list[str]) -> None:
    """Raise a DataError naming every missing or ambiguous column, the nearest name and the fix."""
    header = frame.attrs.get("header") or [c for c in frame.columns if c != ROW]
    duplicated = [c for c in dict.fromkeys(columns) if header.count(c) > 1]
    if duplicated:
        where = "; ".join(
            f"'{c}' in " + " and ".join(_column_name(i) for i, h in enumerate(header) if h == c)
            for c in duplicated
        )
        raise DataError(f"{path}: duplicate column name {where}; rename or delete one of them")
    available = [c for c in frame.columns if c != ROW]
    missing = [c for c in columns if c not in available]
    if missing:
        details = "; ".join(f"'{c}'{did_you_mean(c, available)}" for c in missing)
        hint = ""
        unnamed = [_column_name(i) for i, h in enumerate(header) if not h]
        if (
            not header
            or len(unnamed) >= max(2, len(header) - 1)
            or all(c.startswith("Unnamed:") for c in available)
        ):
            hint = "; the header may not be on the first row: set data.header_row"
        elif unnamed:
            hint = f"; {', '.join(unnamed)} has no name: give it one in the header row"
        listed = ", ".join(shown(c, 40) for c in available[:30]) + (" …" if len(available) > 30 else "")
        raise DataError(f"{path}: column(s) {details} not found; columns are [{listed}]{hint}")


def _column_name(index: int) -> str:
    return f"column {index + 1} ({column_letters(index)})"


def check_cells(frame: pd.DataFrame, path: Path, columns: list[str]) -> None:
    """Raise a DataError when a column holds lists, objects or bytes (parquet, jsonl) or Excel errors
    (#N/A, #DIV/0!, ...) instead of text or numbers: which column, which rows or cells, and the fix."""
    for column in columns:
        values = frame[column]
        if values.dtype != object:
            continue
        odd = values.map(lambda v: isinstance(v, NOT_TEXT)).to_numpy(dtype=bool)
        if odd.any():
            rows = frame.loc[odd, ROW].tolist()
            first = values[odd].iloc[0]
            kind = {dict: "an object", bytes: "bytes", bytearray: "bytes"}.get(type(first), "a list")
            more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
            raise DataError(
                f"{path}: column '{column}' holds {kind} instead of one text or number at row(s) "
                f"{', '.join(map(str, rows[:5]))}{more} (e.g. {shown(_plain(first))}); make each cell one "
                "value (join a list into one text, or pick the field you mean) before training"
            )
    errors = frame.attrs.get("excel_errors", {})
    found = [(column, cell, value) for column in columns for cell, value in errors.get(column, [])]
    if found:
        listed = ", ".join(f"{cell} ({value})" for _, cell, value in found[:10])
        more = f" and {len(found) - 10} more" if len(found) > 10 else ""
        in_columns = ", ".join(f"'{c}'" for c in dict.fromkeys(column for column, _, _ in found))
        raise DataError(
            f"{path}: sheet '{frame.attrs.get('sheet')}': cell(s) {listed}{more} in column(s) {in_columns} "
            "hold Excel errors, not values; fix the formulas or the cells in Excel and save, or delete "
            "those rows"
        )


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value
