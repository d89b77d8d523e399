"""Prediction tables, for a merged model of either approach: find the model folder, read the input table,
check the model's columns in it, and write the rows with their predictions.

The model folder says how to use it (its loraflow.json manifest, tasks/manifest.py): which columns it reads
and which approach scores them (`predict_rows` in tasks/approaches.py, the approach's predict module).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pandas as pd
from prefect import task

from loraflow.errors import DataError, ModelError
from loraflow.tasks.contracts import describe_violation, run_suites, text_expectations
from loraflow.tasks.manifest import ModelManifest
from loraflow.tasks.store import Ref, building, digest_of, named_for_file, work_dir
from loraflow.tasks.tables import ROW, check_cells, read_table, require_file, selected_columns

PREDICTED = "predicted_label"
OUTPUT_FORMATS = (".xlsx", ".csv", ".tsv", ".parquet")


def model_folder(path: str | Path) -> Path:
    """The merged model in `path` (absolute): a run folder (its merged/), a merged folder, or a registry
    link's target."""
    folder = Path(path)
    if ModelManifest.read(folder / "merged") is not None:
        folder = folder / "merged"
    if ModelManifest.read(folder) is None:
        raise ModelError(
            f"{path} is not a loraflow model: expected a run folder (runs/<name>/<timestamp>), its merged/ "
            "folder or models/<name>/production, with loraflow.json inside"
        )
    return folder


@task(name="read-model-card")
def model_inputs(model: str) -> list[str]:
    """The columns the model at `model` reads (fails with the fix when it is not a loraflow model)."""
    return ModelManifest.read(model_folder(model)).columns


def scratch_store() -> str:
    """Where a prediction run keeps its intermediate files (removed once the output is written)."""
    return str(Path(tempfile.gettempdir()) / "loraflow-predict")


@task(name="read-input", task_run_name=named_for_file("read-input", "path"))
def read_input(
    path: str,
    columns: list[str],
    sheet: str | int,
    header_row: int,
    encoding: str,
    store: str,
    separator: str | None = None,
) -> Ref:
    """The input table as parquet (every column kept, text cells as text), after checking its columns."""
    source = Path(path)
    require_file(source, "check --input")
    frame = read_table(source, sheet=sheet, header_row=header_row, encoding=encoding, separator=separator)
    selected_columns(frame, source, columns)
    check_cells(frame, source, columns)
    for column in frame.columns:  # spreadsheets mix numbers and text in one column: keep text
        if frame[column].dtype == object:
            frame[column] = frame[column].map(lambda v: None if pd.isna(v) else str(v)).astype(object)
    key = digest_of("input", str(source), uuid.uuid4().hex)
    with building(work_dir(store, "input", key)) as tmp:
        frame.to_parquet(tmp / "rows.parquet", index=False)
    return Ref(path=str(work_dir(store, "input", key) / "rows.parquet"), digest=key)


@task(name="check-input")
def check_input(rows: Ref, columns: list[str], source: str) -> None:
    """The data contract's checks on the model's input columns: present, non-null, non-blank."""
    frame = pd.read_parquet(rows.path)
    checks = run_suites({"input": frame}, {"input": text_expectations(columns)})
    violations = [describe_violation(c) for c in checks if not c["success"]]
    if violations:
        raise DataError(
            f"{source}: {len(violations)} problem(s) in the model's input columns (rows are the file's row "
            "numbers):\n" + "\n".join(f"  - {v}" for v in violations)
        )


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """Write by extension (.xlsx, .csv, .tsv, .parquet) under a temporary name, then rename into place."""
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise DataError(
            f"output {path}: unsupported extension '{suffix}'; use one of {', '.join(OUTPUT_FORMATS)}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.partial{suffix}")
    try:
        if suffix == ".xlsx":
            frame.to_excel(tmp, index=False, engine="openpyxl")
        elif suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, sep="\t" if suffix == ".tsv" else ",", index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@task(name="write-predictions", task_run_name=named_for_file("write-predictions", "output"))
def write_predictions(rows: Ref, predictions: Ref, output: str) -> str:
    """The input rows (every column, in order) plus the prediction columns, written to `output`."""
    frame = pd.read_parquet(rows.path).drop(columns=[ROW])
    predicted = pd.read_parquet(predictions.path)
    clash = [c for c in predicted.columns if c in frame.columns]
    frame = frame.drop(columns=clash)  # a re-labelled prediction file: replace the old predictions
    write_table(pd.concat([frame, predicted], axis=1), Path(output))
    shutil.rmtree(Path(rows.path).parent, ignore_errors=True)
    return output
