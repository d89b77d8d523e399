"""Ingest: read the user's tables (xlsx, tsv, csv, parquet, jsonl) into one parquet file per split.

The cache key is the sha256 of the source bytes plus the data settings, so an unchanged file is never
read twice. When no dev (or test) file is given, a seeded stratified split of train is held out.
"""

from __future__ import annotations

import importlib.util
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy

from loraflow.config import DataSettings, normalize_label
from loraflow.errors import DataError, did_you_mean
from loraflow.tasks.excel import sheet_layout, sniff_not_a_workbook
from loraflow.tasks.store import (
    CONTENT_CACHE,
    Ref,
    building,
    digest_of,
    is_complete,
    retry_unless_user_error,
    run_logger,
    sha256_file,
    step_output,
)

SUPPORTED = (".xlsx", ".xlsm", ".tsv", ".csv", ".parquet", ".jsonl")
# python-calamine (Rust) reads .xlsx several times faster than openpyxl; the cells are the same.
EXCEL_ENGINE = "calamine" if importlib.util.find_spec("python_calamine") else "openpyxl"
ROW = "_row"  # the row number in the source file, kept so every message can point at it
LABEL = "label"  # the normalised label, as text
SPELLING = "_label_as_written"  # the label cell as read, before normalising (dropped before saving)


def source_digests(data: DataSettings) -> dict[str, str]:
    """sha256 of each data file (train, dev, test): what makes data "new" to caching and retraining."""
    digests = {}
    for path in (data.train, data.dev, data.test):
        if path is None:
            continue
        if not Path(path).is_file():
            raise DataError(
                f"data file {path} not found; check data.train / data.dev / data.test in the config"
            )
        digests[str(path)] = sha256_file(path)
    return digests


def _source_key(_context: Any, inputs: dict[str, Any]) -> str:
    return digest_of(source_digests(inputs["data"]))


def _read_excel(path: Path, sheet: str | int, header_row: int) -> pd.DataFrame:
    if not zipfile.is_zipfile(path):
        raise DataError(
            sniff_not_a_workbook(path)
            or f"{path} is not a valid .xlsx workbook (not a zip archive); re-save it from Excel "
            "as .xlsx, or give it the extension that matches its content (.csv, .tsv)"
        )
    try:
        sheets = pd.ExcelFile(path, engine=EXCEL_ENGINE)
    except Exception as e:  # the readers raise many types for broken workbooks
        raise DataError(f"{path}: cannot open workbook ({e}); re-save it from Excel as .xlsx") from e
    with sheets:
        names = sheets.sheet_names
        if isinstance(sheet, int) and not 0 <= sheet < len(names):
            raise DataError(f"{path}: sheet index {sheet} out of range; sheets are {names}")
        if isinstance(sheet, str) and sheet not in names:
            raise DataError(
                f"{path}: sheet '{sheet}' not found{did_you_mean(sheet, names)}; sheets are {names}"
            )
        frame = pd.read_excel(
            sheets, sheet_name=sheet, header=header_row - 1, dtype=object
        )  # cells as written
        name = names[sheet] if isinstance(sheet, int) else sheet
        if frame.columns.empty:
            raise DataError(
                f"{path}: sheet '{name}' is empty (no header row, no data); pick the sheet with data"
            )
    frame.attrs["header"] = _unmangled(list(frame.columns))
    merged, unsaved = sheet_layout(path, sheet)
    _fill_merged(frame, merged, header_row)
    if unsaved:
        shown = ", ".join(unsaved[:10]) + (f" and {len(unsaved) - 10} more" if len(unsaved) > 10 else "")
        raise DataError(
            f"{path}: sheet '{name}': cell(s) {shown} hold a formula with no saved value (the file was "
            "written by a program that does not compute formulas); open and save it in Excel or "
            "LibreOffice, or write the values instead of formulas"
        )
    return frame


def _unmangled(columns: list[Any]) -> list[str]:
    """The header as written, from pandas' names: 'Unnamed: 3' was an empty cell, 'x.1' a second 'x'."""
    names = [str(c).strip() for c in columns]
    header = []
    for name in names:
        repeat = re.fullmatch(r"(.+)\.(\d+)", name)
        if re.fullmatch(r"Unnamed: \d+", name):
            header.append("")
        elif repeat and repeat.group(1) in names:
            header.append(repeat.group(1))
        else:
            header.append(name)
    return header


def _header_names(raw: pd.DataFrame) -> list[str]:
    if raw.empty:
        return []
    return ["" if pd.isna(v) else str(v).strip() for v in raw.iloc[0].tolist()]


def _fill_merged(frame: pd.DataFrame, merged: list[tuple[int, int, int, int]], header_row: int) -> None:
    """A merged range shows its top-left value in every cell: give every row that value."""
    first_data_row = header_row + 1
    for row1, col1, row2, col2 in merged:
        top = row1 - first_data_row
        if top < 0 or col1 >= frame.shape[1]:
            continue  # a merged title above the header, or right of the table
        value = frame.iat[top, col1]
        for column in range(col1, min(col2, frame.shape[1] - 1) + 1):
            frame.iloc[top : row2 - first_data_row + 1, column] = value


def _read_text_table(path: Path, sep: str, header_row: int, encoding: str) -> pd.DataFrame:
    options = {"sep": sep, "encoding": encoding, "dtype": str, "keep_default_na": False, "na_values": [""]}
    try:
        raw = pd.read_csv(path, header=None, skiprows=header_row - 1, nrows=1, **options)
        try:  # pyarrow's multi-threaded parser: ~10x faster than the C parser on large files
            frame = pd.read_csv(path, header=header_row - 1, engine="pyarrow", **options)
        except Exception:  # it is strict and terse: the C parser below names the line or byte that is wrong
            frame = pd.read_csv(path, header=header_row - 1, **options)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not valid {encoding} text at byte {e.start}; set data.encoding "
            "(e.g. cp1252 or latin-1 for files saved by older Excel)"
        ) from e
    except pd.errors.ParserError as e:
        found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        if found is None:
            raise DataError(f"{path}: cannot parse the table ({e}); check quoting and separators") from e
        expected, line, saw = found.groups()
        raise DataError(
            f"{path}: line {line} has {saw} fields, expected {expected} like the header; quote cells that "
            f"contain the separator ({sep!r}), or remove the extra cells"
        ) from e
    frame.attrs["header"] = _header_names(raw)
    return frame


def _read_jsonl(path: Path, encoding: str) -> pd.DataFrame:
    """One JSON object per line; a bad line is named by its number."""
    records = []
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid {encoding} text at byte {e.start}; set data.encoding") from e
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: line {number} is not valid JSON ({e.msg} at column {e.colno}); each line "
                'must be one JSON object such as {"text": "...", "label": "..."}'
            ) from e
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number} is a JSON {type(record).__name__}, not an object")
        records.append(record)
    return pd.DataFrame.from_records(records)


def read_table(
    path: Path, sheet: str | int = 0, header_row: int = 1, encoding: str = "utf-8"
) -> pd.DataFrame:
    """Any supported file as a DataFrame with stripped column names and the source row number in `_row`."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"{path} not found; check data.train / data.dev (relative to the config's folder)")
    if suffix not in SUPPORTED:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use one of {', '.join(SUPPORTED)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty (0 bytes)")
    if suffix in (".xlsx", ".xlsm"):
        frame = _read_excel(path, sheet, header_row)
    elif suffix in (".tsv", ".csv"):
        frame = _read_text_table(path, "\t" if suffix == ".tsv" else ",", header_row, encoding)
    elif suffix == ".parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for damaged files
            raise DataError(f"{path} is not a readable parquet file ({e}); write it again") from e
    else:
        frame = _read_jsonl(path, encoding)
    header = frame.attrs.get("header")
    frame.columns = [str(c).strip() for c in frame.columns]
    frame.attrs["header"] = header or list(frame.columns)
    # Spreadsheet rows are 1-based and the header takes one, so data row i sits on line header_row + 1 + i.
    offset = header_row + 1 if suffix in (".xlsx", ".xlsm", ".tsv", ".csv") else 1
    frame[ROW] = np.arange(len(frame)) + offset
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
        raise DataError(f"{path}: column(s) {details} not found; columns are {available}{hint}")


def _column_name(index: int) -> str:
    letters, n = "", index + 1
    while n:
        n, rest = divmod(n - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return f"column {index + 1} ({letters})"


def _read_file(path: Path, data: DataSettings) -> pd.DataFrame:
    return read_table(path, sheet=data.sheet, header_row=data.header_row, encoding=data.encoding)


def _select(frame: pd.DataFrame, path: Path, columns: list[str], label_column: str) -> pd.DataFrame:
    selected_columns(frame, path, [*columns, label_column])
    out = pd.DataFrame({ROW: frame[ROW]})
    for column in columns:
        out[column] = frame[column].map(lambda v: None if pd.isna(v) else str(v)).astype(object)
    out[LABEL] = frame[label_column].map(lambda v: None if pd.isna(v) else normalize_label(v)).astype(object)
    out[SPELLING] = frame[label_column].map(lambda v: None if pd.isna(v) else str(v)).astype(object)
    return out


def label_spellings(*frames: pd.DataFrame) -> dict[str, list[str]]:
    """Labels written more than one way (1, 1.0, "1", " 1 "): each label's spellings, as read."""
    both = pd.concat([f[[LABEL, SPELLING]] for f in frames]).dropna()
    spelled = both.groupby(LABEL)[SPELLING].agg(lambda v: sorted(set(v)))
    return {label: values for label, values in spelled.items() if len(values) > 1}


def _sort_key(label: str) -> tuple[int, float, str]:
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def infer_labels(data: DataSettings, train_labels: pd.Series) -> list[str]:
    """Allowed labels in id order: the explicit list or label2id, else the answer map's keys, else the
    train labels sorted (numbers numerically, then text)."""
    if isinstance(data.labels, dict):
        return [normalize_label(k) for k, _ in sorted(data.labels.items(), key=lambda item: item[1])]
    if data.labels:
        return [normalize_label(v) for v in data.labels]
    if data.answers:
        return sorted({normalize_label(v) for v in data.answers}, key=_sort_key)
    return sorted(set(train_labels.dropna()), key=_sort_key)


def split_stratified(frame: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out `fraction` of each label's rows (at least one when a label has two or more), seeded."""
    rng = np.random.default_rng(seed)
    dev_index: list[int] = []
    for _, group in frame.groupby(LABEL, sort=True, dropna=False):
        n_dev = int(round(len(group) * fraction))
        n_dev = min(max(n_dev, 1 if len(group) > 1 else 0), len(group) - 1) if len(group) > 1 else 0
        dev_index.extend(rng.choice(group.index.to_numpy(), size=n_dev, replace=False).tolist())
    is_dev = frame.index.isin(dev_index)
    return frame[~is_dev].reset_index(drop=True), frame[is_dev].reset_index(drop=True)


@task(
    name="ingest",
    cache_policy=CONTENT_CACHE + CacheKeyFnPolicy(cache_key_fn=_source_key),
    retries=2,
    retry_delay_seconds=[1, 5],
    retry_condition_fn=retry_unless_user_error,
)
def ingest_table(data: DataSettings, columns: list[str], store: str) -> Ref:
    """Read train (and dev) into `train.parquet` / `dev.parquet` with the normalised label column."""
    sources = source_digests(data)
    key = digest_of("ingest", data, columns, sources)
    folder, result = step_output(store, "ingest", key)
    if is_complete(folder):
        return result
    train = _select(_read_file(data.train, data), data.train, columns, data.label_column)
    test = None
    if data.test is not None:
        test = _select(_read_file(data.test, data), data.test, columns, data.label_column)
    elif data.test_fraction > 0:  # held out first, so that the dev split never overlaps it
        train, test = split_stratified(train, data.test_fraction, data.split_seed + 1)
    if data.dev is not None:
        dev = _select(_read_file(data.dev, data), data.dev, columns, data.label_column)
    else:
        train, dev = split_stratified(train, data.dev_fraction, data.split_seed)
    frames = {"train": train, "dev": dev} | ({"test": test} if test is not None else {})
    labels = infer_labels(data, train[LABEL])
    spellings = label_spellings(*frames.values())
    if spellings:
        run_logger().warning(
            "%s: labels written several ways, read as one label each: %s",
            data.label_column,
            "; ".join(f"{label} ← {', '.join(map(repr, written))}" for label, written in spellings.items()),
        )
    held_out = f"{data.train} (held-out split)"
    files = {"train": str(data.train), "dev": str(data.dev or held_out), "test": str(data.test or held_out)}
    with building(folder) as tmp:
        for split, frame in frames.items():
            frame.drop(columns=[SPELLING]).to_parquet(tmp / f"{split}.parquet", index=False)
        meta = {
            "sources": sources,
            "files": {split: files[split] for split in frames},
            "labels": labels,
            "columns": columns,
            "rows": {split: len(frame) for split, frame in frames.items()},
            "label_spellings": spellings,
        }
        (tmp / "ingest.json").write_text(json.dumps(meta, indent=1))
    return result


def read_split(ref: Ref, split: str) -> pd.DataFrame:
    """Load one split (<split>.parquet) of a step folder: ingest_table's or an approach's prepare_inputs."""
    return pd.read_parquet(Path(ref.path) / f"{split}.parquet")


def split_names(ref: Ref) -> list[str]:
    """The splits of a step folder: train, dev, and test when the data has one."""
    return [split for split in ("train", "dev", "test") if (Path(ref.path) / f"{split}.parquet").is_file()]


def read_meta(ref: Ref) -> dict[str, Any]:
    """Sources, labels, columns and row counts recorded by `ingest_table`."""
    return json.loads((Path(ref.path) / "ingest.json").read_text())
