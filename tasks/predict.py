"""Prediction with a merged model of either approach: read a table, check its columns, label every row.

The model folder says how to use it (`loraflow.json`, written by the merge): the generative approach's
prompt, labels and answers, or the classifier's input columns, join template and label map. Rows are
scored in length-sorted batches (label scoring, or the head's logits) and come back in input order.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task

from loraflow.config import PromptSettings, template_fields
from loraflow.errors import DataError, ModelError
from tasks.contracts import describe_violation, run_suites, text_expectations
from tasks.ingest import ROW, read_table, selected_columns
from tasks.store import Ref, building, digest_of, work_dir

PREDICTED = "predicted_label"
OUTPUT_FORMATS = (".xlsx", ".csv", ".tsv", ".parquet")


def model_folder(path: str | Path) -> Path:
    """The merged model in `path` (absolute): a run folder (its merged/), a merged folder, or a registry
    link's target."""
    folder = Path(path)
    if (folder / "merged" / "loraflow.json").is_file():
        folder = folder / "merged"
    if not (folder / "loraflow.json").is_file():
        raise ModelError(
            f"{path} is not a loraflow model: expected a run folder (runs/<name>/<timestamp>), its merged/ "
            "folder or models/<name>/production, with loraflow.json inside"
        )
    return folder


def read_model_card(folder: Path) -> dict[str, Any]:
    """loraflow.json: approach, labels and how inputs become model inputs."""
    return json.loads((folder / "loraflow.json").read_text())


def input_columns(info: dict[str, Any]) -> list[str]:
    """The table columns the model reads."""
    if info["approach"] == "classifier":
        return list(info["columns"])
    return template_fields(info["prompt"]["template"])


@task(name="read-model-card")
def model_inputs(model: str) -> list[str]:
    """The columns the model at `model` reads (fails with the fix when it is not a loraflow model)."""
    return input_columns(read_model_card(model_folder(model)))


def scratch_store() -> str:
    """Where a prediction run keeps its intermediate files (removed once the output is written)."""
    return str(Path(tempfile.gettempdir()) / "loraflow-predict")


@task(name="read-input")
def read_input(
    path: str, columns: list[str], sheet: str | int, header_row: int, encoding: str, store: str
) -> Ref:
    """The input table as parquet (every column kept, text cells as text), after checking its columns."""
    source = Path(path)
    if not source.is_file():
        raise DataError(f"input file {source} not found")
    frame = read_table(source, sheet=sheet, header_row=header_row, encoding=encoding)
    selected_columns(frame, source, columns)
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


def _probabilities(folder: Path, info: dict[str, Any], frame: pd.DataFrame, batch_size: int) -> np.ndarray:
    from tasks.scoring import softmax

    if info["approach"] == "classifier":
        from tasks.classify import classifier_tokenizer, join_inputs, load_classifier, predict_logits

        tokenizer = classifier_tokenizer(folder)
        model = load_classifier(folder, info["labels"], tokenizer, "auto")
        inputs = join_inputs(frame, info["columns"], info.get("template"))
        return softmax(
            predict_logits(model, tokenizer, inputs, info["max_length"], batch_size, progress=True)
        )
    from tasks.models import load_causal_lm, load_tokenizer
    from tasks.prompts import build_messages
    from tasks.scoring import score_labels

    prompt = PromptSettings.model_validate(info["prompt"])
    tokenizer, model = load_tokenizer(folder), load_causal_lm(folder, "auto").eval()
    prompts = [build_messages(prompt, row) for row in frame.to_dict("records")]
    answers = info["answers"]  # in label order
    return softmax(score_labels(model, tokenizer, prompts, answers, batch_size, progress=True))


@task(name="predict-rows")
def predict_rows(model: str, rows: Ref, batch_size: int) -> Ref:
    """`predicted_label` and one `prob_<label>` column per label for every row, in input order."""
    folder = model_folder(model)
    info = read_model_card(folder)
    frame = pd.read_parquet(rows.path)
    probabilities = _probabilities(folder, info, frame, batch_size)
    labels = info["labels"]
    out = pd.DataFrame({PREDICTED: [labels[i] for i in probabilities.argmax(axis=1)]})
    for j, label in enumerate(labels):
        out[f"prob_{label}"] = probabilities[:, j]
    path = Path(rows.path).with_name("predictions.parquet")
    out.to_parquet(path, index=False)
    return Ref(path=str(path), digest=rows.digest)


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


@task(name="write-predictions")
def write_predictions(rows: Ref, predictions: Ref, output: str) -> str:
    """The input rows (every column, in order) plus the prediction columns, written to `output`."""
    frame = pd.read_parquet(rows.path).drop(columns=[ROW])
    predicted = pd.read_parquet(predictions.path)
    clash = [c for c in predicted.columns if c in frame.columns]
    frame = frame.drop(columns=clash)  # a re-labelled prediction file: replace the old predictions
    write_table(pd.concat([frame, predicted], axis=1), Path(output))
    shutil.rmtree(Path(rows.path).parent, ignore_errors=True)
    return output
