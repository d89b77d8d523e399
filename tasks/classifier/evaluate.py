"""Evaluation of the classifier approach: the head's argmax on the dev split, and the majority-class
baseline it must beat.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
from prefect import task

from loraflow.config import EvalSettings
from loraflow.tasks.classifier.prepare import LABEL_ID, TEXT, TEXT_PAIR, read_label_map
from loraflow.tasks.classifier.scoring import classifier_tokenizer, load_classifier, predict_logits, tokenize
from loraflow.tasks.ingest import read_split
from loraflow.tasks.metrics import save_evaluation, softmax
from loraflow.tasks.store import (
    CONTENT_CACHE,
    Ref,
    digest_of,
    is_complete,
    named_for_evaluation,
    step_output,
)


def _rows(encoded: Ref, split: str) -> pd.DataFrame:
    return read_split(encoded, split).drop(columns=[TEXT, TEXT_PAIR, LABEL_ID], errors="ignore")


@task(name="evaluate", task_run_name=named_for_evaluation(), cache_policy=CONTENT_CACHE)
def evaluate_model(
    model: Ref,
    encoded: Ref,
    settings: EvalSettings,
    max_length: int,
    dtype: str,
    store: str,
    kind: str = "finetuned",
    split: str = "dev",
) -> Ref:
    """Classify the dev (or test) split with `model`; write predictions.parquet and metrics.json."""
    key = digest_of(
        "evaluate-cls", model.digest, encoded.digest, settings.batch_size, max_length, dtype, kind, split
    )
    folder, result = step_output(store, "evaluate", key)
    if is_complete(folder):
        return result
    labels = read_label_map(encoded)["labels"]
    dev = read_split(encoded, split)
    tokenizer = classifier_tokenizer(model.path)
    network = load_classifier(model.path, labels, tokenizer, dtype)
    started = time.perf_counter()
    logits = predict_logits(
        network,
        tokenizer,
        dev,
        max_length,
        settings.batch_size,
        progress=f"scoring {split} rows, {kind.replace('finetuned', 'fine-tuned')}",
    )
    seconds = time.perf_counter() - started
    truncated = tokenize(tokenizer, dev, max_length)[1]
    save_evaluation(
        folder,
        _rows(encoded, split),
        labels,
        softmax(logits),
        kind,
        seconds,
        {"truncated_rows": truncated},
    )
    return result


@task(name="majority-baseline", task_run_name=named_for_evaluation("majority"), cache_policy=CONTENT_CACHE)
def evaluate_baseline(encoded: Ref, store: str, split: str = "dev") -> Ref:
    """The baseline a classifier must beat: always the most frequent train label (its train share as
    probabilities)."""
    key = digest_of("majority", encoded.digest, split)
    folder, result = step_output(store, "evaluate", key)
    if is_complete(folder):
        return result
    labels = read_label_map(encoded)["labels"]
    counts = np.bincount(read_split(encoded, "train")[LABEL_ID], minlength=len(labels))
    dev = _rows(encoded, split)
    probabilities = np.tile(counts / counts.sum(), (len(dev), 1))
    save_evaluation(folder, dev, labels, probabilities, "majority", 0.0)
    return result
