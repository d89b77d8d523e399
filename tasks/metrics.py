"""Metrics and evaluation storage both approaches share: accuracy, macro-F1, per-class figures and the
confusion matrix; predictions.parquet and metrics.json of an evaluation, and reading them back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loraflow.tasks.ingest import LABEL
from loraflow.tasks.store import Ref, building

TRAIN_STATS = "train.json"  # in an adapter folder: what training did (steps, loss, time, the dev curve)


def read_train_stats(adapter: Ref) -> dict[str, Any]:
    """train.json of a trained adapter (tasks/lora.py writes it)."""
    return json.loads((Path(adapter.path) / TRAIN_STATS).read_text())


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of label scores into probabilities."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def classification_metrics(
    gold: list[str], predicted: list[str], labels: list[str], kind: str
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (rows = gold)."""
    index = {label: i for i, label in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)), dtype=int)
    for g, p in zip(gold, predicted, strict=True):
        confusion[index[g], index[p]] += 1
    per_class = {}
    for label, i in index.items():
        tp = int(confusion[i, i])
        precision = tp / confusion[:, i].sum() if confusion[:, i].sum() else 0.0
        recall = tp / confusion[i, :].sum() if confusion[i, :].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": int(confusion[i, :].sum()),
        }
    return {
        "kind": kind,
        "accuracy": float(np.trace(confusion) / max(confusion.sum(), 1)),
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def label_columns(labels: list[str], probabilities: np.ndarray, predicted: str) -> pd.DataFrame:
    """The argmax label (column `predicted`) and one `prob_<label>` column per label, a row per input row."""
    out = pd.DataFrame({predicted: [labels[i] for i in probabilities.argmax(axis=1)]})
    for i, label in enumerate(labels):
        out[f"prob_{label}"] = probabilities[:, i]
    return out


def save_evaluation(
    folder: Path,
    dev: pd.DataFrame,
    labels: list[str],
    probabilities: np.ndarray,
    kind: str,
    seconds: float,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write predictions.parquet (dev rows + gold, predicted, prob_<label>) and metrics.json to `folder`."""
    scored = label_columns(labels, probabilities, "predicted")
    predicted = scored["predicted"].tolist()
    predictions = pd.concat([dev.rename(columns={LABEL: "gold"}).reset_index(drop=True), scored], axis=1)
    metrics = classification_metrics(dev[LABEL].tolist(), predicted, labels, kind)
    metrics["eval"] = {
        "seconds": round(seconds, 3),
        "rows_per_second": round(len(dev) / max(seconds, 1e-9), 3),
        **(extra or {}),
    }
    with building(folder) as tmp:
        predictions.to_parquet(tmp / "predictions.parquet", index=False)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))


def read_evaluation(ref: Ref) -> tuple[dict[str, Any], pd.DataFrame]:
    """(metrics, predictions) written by `evaluate_model`."""
    folder = Path(ref.path)
    return json.loads((folder / "metrics.json").read_text()), pd.read_parquet(folder / "predictions.parquet")
