"""Evaluation by label scoring (tasks/scoring.py): no free generation and no answer parsing. The same scorer
serves the zero-shot baseline (base model, same prompt) and the fine-tuned model; the metrics, the saved
predictions and the evaluate task live here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task

from loraflow.config import EvalSettings
from tasks.ingest import LABEL
from tasks.models import load_causal_lm, load_tokenizer
from tasks.prompts import COMPLETION, PROMPT, read_answers, read_prompts
from tasks.scoring import score_labels, softmax
from tasks.store import CONTENT_CACHE, Ref, building, digest_of, is_complete, work_dir


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


@task(name="evaluate", cache_policy=CONTENT_CACHE)
def evaluate_model(
    model: Ref, prompts: Ref, kind: str, settings: EvalSettings, dtype: str, store: str
) -> Ref:
    """Score the dev split with `model`; write predictions.parquet and metrics.json."""
    key = digest_of("evaluate", model.digest, prompts.digest, kind, settings, dtype)
    folder = work_dir(store, "evaluate", key)
    if is_complete(folder):
        return Ref(path=str(folder), digest=key)
    labels, answers = read_answers(prompts)
    dev = read_prompts(prompts, "dev")
    tokenizer = load_tokenizer(model.path)
    network = load_causal_lm(model.path, dtype)
    started = time.perf_counter()
    scores = score_labels(network, tokenizer, dev[PROMPT].tolist(), answers, settings.batch_size)
    seconds = time.perf_counter() - started
    gold = [labels.index(label) for label in dev[LABEL]]
    loss = float(-scores[np.arange(len(gold)), gold].mean())  # the dev loss: -log p(gold answer), per row
    rows = dev.drop(columns=[PROMPT, COMPLETION])
    save_evaluation(folder, rows, labels, softmax(scores), kind, seconds, extra={"answer_loss": loss})
    return Ref(path=str(folder), digest=key)


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
    predicted = [labels[i] for i in probabilities.argmax(axis=1)]
    predictions = dev.rename(columns={LABEL: "gold"})
    predictions["predicted"] = predicted
    for i, label in enumerate(labels):
        predictions[f"prob_{label}"] = probabilities[:, i]
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
