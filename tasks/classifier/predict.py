"""Prediction with a merged classifier: the rows joined as in training, the head's softmax."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from loraflow.tasks.classifier.prepare import join_inputs
from loraflow.tasks.classifier.scoring import classifier_tokenizer, load_classifier, predict_logits
from loraflow.tasks.manifest import ModelManifest
from loraflow.tasks.metrics import softmax


def load_scorer(
    folder: Path, manifest: ModelManifest
) -> Callable[[pd.DataFrame, int, str | None], np.ndarray]:
    """The model in `folder` (its loraflow.json is `manifest`), loaded once: (rows, batch size, progress
    description or None) → (rows × labels) probabilities, in row order. `loraflow serve` keeps one."""
    tokenizer = classifier_tokenizer(folder)
    model = load_classifier(folder, manifest.labels, tokenizer, "auto")

    def score(frame: pd.DataFrame, batch_size: int, progress: str | None = None) -> np.ndarray:
        inputs = join_inputs(frame, manifest.columns, manifest.template)
        return softmax(predict_logits(model, tokenizer, inputs, manifest.max_length, batch_size, progress))

    return score


def probabilities(folder: Path, manifest: ModelManifest, frame: pd.DataFrame, batch_size: int) -> np.ndarray:
    """(rows × labels) probabilities of the model in `folder` (its loraflow.json is `manifest`), row order."""
    return load_scorer(folder, manifest)(frame, batch_size, "labelling rows")
