"""Ingest: read the user's tables (xlsx, tsv, csv, parquet, jsonl) into one parquet file per split.

The cache key is the sha256 of the source bytes plus the data settings, so an unchanged file is never
read twice. When no dev (or test) file is given, a seeded stratified split of train is held out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy

from loraflow.config import DataSettings, normalize_label
from loraflow.errors import shown
from loraflow.tasks.corrections import Corrections
from loraflow.tasks.store import (
    CONTENT_CACHE,
    Ref,
    building,
    digest_of,
    is_complete,
    named_for_config,
    retry_unless_user_error,
    run_logger,
    sha256_file,
    step_output,
)
from loraflow.tasks.tables import ROW, blank_cells, check_cells, read_table, require_file, selected_columns

LABEL = "label"  # the normalised label, as text
SPELLING = "_label_as_written"  # the label cell as read, before normalising (dropped before saving)


def source_digests(data: DataSettings) -> dict[str, str]:
    """sha256 of each data file (train, dev, test, corrections): what makes data "new" to caching and
    retraining."""
    digests = {}
    files = (("train", data.train), ("dev", data.dev), ("test", data.test), ("corrections", data.corrections))
    for field, path in files:
        if path is None:
            continue
        require_file(Path(path), f"check data.{field} in the config (relative to the config's folder)")
        digests[str(path)] = sha256_file(path)
    return digests


def _source_key(_context: Any, inputs: dict[str, Any]) -> str:
    return digest_of(source_digests(inputs["data"]))


def _read_file(path: Path, data: DataSettings) -> pd.DataFrame:
    return read_table(
        path,
        sheet=data.sheet,
        header_row=data.header_row,
        encoding=data.encoding,
        separator=data.separator,
        max_cells=data.max_cells,
    )


def _select(frame: pd.DataFrame, path: Path, columns: list[str], label_column: str) -> pd.DataFrame:
    """The input columns as text and the label normalised, one row per example: rows with nothing in
    any of these columns are dropped (counted in `attrs["blank_rows"]`, with the file's fully blank rows)."""
    selected_columns(frame, path, [*columns, label_column])
    check_cells(frame, path, [*columns, label_column])
    blank = blank_cells(frame[[*columns, label_column]])
    empty = blank.all(axis=1)
    kept = frame[~empty]
    label = kept[label_column].where(~blank[~empty, -1], None)
    out = pd.DataFrame({ROW: kept[ROW]})
    for column in columns:
        out[column] = kept[column].map(lambda v: None if pd.isna(v) else str(v)).astype(object)
    out[LABEL] = label.map(lambda v: None if pd.isna(v) else normalize_label(v)).astype(object)
    out[SPELLING] = label.map(lambda v: None if pd.isna(v) else str(v)).astype(object)
    out = out.reset_index(drop=True)
    out.attrs["blank_rows"] = frame.attrs.get("blank_rows", 0) + int(empty.sum())
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
    task_run_name=named_for_config("ingest"),
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
    blank: dict[str, int] = {}
    corrections = Corrections(data.corrections) if data.corrections is not None else None
    known: list[str] = []  # what a relabel may name: the allowed labels, as the train file has them

    def read(path: Path, splits: tuple[str, ...]) -> pd.DataFrame:
        frame = _select(_read_file(path, data), path, columns, data.label_column)
        blank[str(path)] = frame.attrs["blank_rows"]
        known[:] = known or infer_labels(data, frame[LABEL])  # the train file is read first
        if corrections is not None:  # before any split is held out: a held-out row is a train file row
            frame = corrections.apply(frame, path, splits, known, (LABEL, SPELLING))
        return frame

    held_out_of_train = ("dev",) * (data.dev is None) + ("test",) * (
        data.test is None and data.test_fraction > 0
    )
    train = read(data.train, ("train", *held_out_of_train))
    test = None
    if data.test is not None:
        test = read(data.test, ("test",))
    elif data.test_fraction > 0:  # held out first, so that the dev split never overlaps it
        train, test = split_stratified(train, data.test_fraction, data.split_seed + 1)
    if data.dev is not None:
        dev = read(data.dev, ("dev",))
    else:
        train, dev = split_stratified(train, data.dev_fraction, data.split_seed)
    if any(blank.values()):
        run_logger().info(
            "skipped rows with nothing in the text and label columns: %s",
            "; ".join(f"{path}: {n}" for path, n in blank.items() if n),
        )
    if corrections is not None:
        corrections.check()
    frames = {"train": train, "dev": dev} | ({"test": test} if test is not None else {})
    labels = infer_labels(data, train[LABEL])
    spellings = label_spellings(*frames.values())
    if spellings:
        run_logger().warning(
            "%s: labels written several ways, read as one label each: %s",
            data.label_column,
            "; ".join(f"{label} ← {', '.join(map(shown, written))}" for label, written in spellings.items()),
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
            "blank_rows_skipped": blank,
        }
        if corrections is not None:
            meta["corrections"] = corrections.record(sources[str(data.corrections)])
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
