"""Prediction with a merged generative model: each row's prompt, every label's answer scored (scoring.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from loraflow.tasks.generative.prepare import build_messages
from loraflow.tasks.generative.scoring import score_labels
from loraflow.tasks.manifest import ModelManifest
from loraflow.tasks.metrics import softmax
from loraflow.tasks.models import load_causal_lm, load_tokenizer


def probabilities(folder: Path, manifest: ModelManifest, frame: pd.DataFrame, batch_size: int) -> np.ndarray:
    """(rows × labels) probabilities of the model in `folder` (its loraflow.json is `manifest`), row order."""
    tokenizer, model = load_tokenizer(folder), load_causal_lm(folder, "auto").eval()
    prompts = [build_messages(manifest.prompt, row) for row in frame.to_dict("records")]
    answers = manifest.answers  # in label order
    return softmax(score_labels(model, tokenizer, prompts, answers, batch_size, progress="labelling rows"))
