"""Prediction with a merged generative model: each row's prompt, every label's answer scored (scoring.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from loraflow.tasks.generative.prepare import build_messages
from loraflow.tasks.generative.scoring import score_labels
from loraflow.tasks.manifest import ModelManifest
from loraflow.tasks.metrics import softmax
from loraflow.tasks.models import load_causal_lm, load_tokenizer


def load_scorer(
    folder: Path, manifest: ModelManifest
) -> Callable[[pd.DataFrame, int, str | None], np.ndarray]:
    """The model in `folder` (its loraflow.json is `manifest`), loaded once: (rows, batch size, progress
    description or None) → (rows × labels) probabilities, in row order. `loraflow serve` keeps one."""
    tokenizer, model = load_tokenizer(folder), load_causal_lm(folder, "auto").eval()
    answers = manifest.answers  # in label order

    def score(frame: pd.DataFrame, batch_size: int, progress: str | None = None) -> np.ndarray:
        prompts = [build_messages(manifest.prompt, row) for row in frame.to_dict("records")]
        return softmax(score_labels(model, tokenizer, prompts, answers, batch_size, progress=progress))

    return score


def probabilities(folder: Path, manifest: ModelManifest, frame: pd.DataFrame, batch_size: int) -> np.ndarray:
    """(rows × labels) probabilities of the model in `folder` (its loraflow.json is `manifest`), row order."""
    return load_scorer(folder, manifest)(frame, batch_size, "labelling rows")
