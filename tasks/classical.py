"""The classical baseline in every report: TF-IDF (word 1-2-grams, sublinear tf) + logistic regression,
fitted on the train split's input text and scored on dev (and test) like any other model.

It is the model a user gets cheaply, in seconds on a CPU: a fine-tune that does not beat it has not earned
its GPU hours, and the report says so. Its input is what the LLM reads of each row: the rendered template
(the generative prompt's user message, or the classifier's join template), else the input columns joined
by blank lines. Only the train split is ever seen by the fit.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
from prefect import task
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline

from loraflow.config import render
from loraflow.tasks.ingest import LABEL, read_meta, read_split, split_names
from loraflow.tasks.metrics import save_evaluation
from loraflow.tasks.store import CONTENT_CACHE, Ref, digest_of, is_complete, named_for_evaluation, step_output

KIND = "classical"
DESCRIPTION = "TF-IDF + logistic regression"


def input_text(frame: pd.DataFrame, columns: list[str], template: str | None) -> list[str]:
    """Each row's input as one text: the template rendered, else the columns joined by blank lines."""
    rows = frame[columns].to_dict("records")
    if template is not None:
        return [render(template, row) for row in rows]
    return ["\n\n".join(str(row[c]) for c in columns) for row in rows]


# Balanced class weights: the reports' metric is macro-F1, and with scikit-learn's unweighted default a few
# hundred rows of unequal classes leave the smaller class all but unpredicted (measured on the benchmark
# sets, dev macro-F1 unweighted → balanced: Rotten Tomatoes 0.522 → 0.640, VADER 0.620 → 0.698, 20
# Newsgroups 0.770 → 0.777). Choosing C by cross-validation on train added nothing over C = 1 (0.639,
# 0.705, 0.770) at 20-30 times the time, so the baseline stays a fit of seconds.
SETTINGS = {"ngram_range": (1, 2), "sublinear_tf": True, "C": 1.0, "class_weight": "balanced"}


def fit_classical(texts: list[str], labels: list[str], seed: int = 0) -> Pipeline:
    """TF-IDF over word 1-2-grams with sublinear tf, then L2 logistic regression with balanced class
    weights (C = 1, lbfgs), fitted on `texts`."""
    model = make_pipeline(
        TfidfVectorizer(ngram_range=SETTINGS["ngram_range"], sublinear_tf=SETTINGS["sublinear_tf"]),
        LogisticRegression(
            C=SETTINGS["C"], class_weight=SETTINGS["class_weight"], max_iter=2000, random_state=seed
        ),
    )
    return model.fit(texts, labels)


def classical_probabilities(model: Pipeline, texts: list[str], labels: list[str]) -> np.ndarray:
    """P(label) per row in `labels` order (0 for a label the fit never saw)."""
    fitted = model.predict_proba(texts)
    out = np.zeros((len(texts), len(labels)))
    classes = list(model.classes_)
    for i, label in enumerate(labels):
        if label in classes:
            out[:, i] = fitted[:, classes.index(label)]
    return out


def classical_baselines(
    splits: Ref, columns: list[str], template: str | None, enabled: bool, store: str
) -> dict[str, Ref | None]:
    """The classical baseline's dev (`classical`) and test (`classical_test`) evaluations; None when
    eval.classical_baseline is off or there is no test split."""
    present = split_names(splits) if enabled else []
    return {
        name: evaluate_classical(splits, columns, template, store, split) if split in present else None
        for name, split in (("classical", "dev"), ("classical_test", "test"))
    }


@task(name="classical-baseline", task_run_name=named_for_evaluation("classical"), cache_policy=CONTENT_CACHE)
def evaluate_classical(
    splits: Ref, columns: list[str], template: str | None, store: str, split: str = "dev"
) -> Ref:
    """Fit TF-IDF + logistic regression on the train split; score `split`; predictions.parquet and
    metrics.json as for any evaluation."""
    key = digest_of("classical", SETTINGS, splits.digest, columns, template, split)
    folder, result = step_output(store, "evaluate", key)
    if is_complete(folder):
        return result
    labels = read_meta(splits)["labels"]
    train, rows = read_split(splits, "train"), read_split(splits, split)
    started = time.perf_counter()
    model = fit_classical(input_text(train, columns, template), train[LABEL].tolist())
    probabilities = classical_probabilities(model, input_text(rows, columns, template), labels)
    seconds = time.perf_counter() - started
    save_evaluation(folder, rows, labels, probabilities, KIND, seconds, {"model": DESCRIPTION})
    return result
