"""The classifier's model and its scoring (torch, a tokenizer and a progress display only): the tokenizer
with a pair separator, tokenizing rows, loading a sequence-classification model, and batched logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from loraflow.console import ProgressDisplay
from loraflow.tasks.classifier.prepare import TEXT, TEXT_PAIR
from loraflow.tasks.ingest import read_split
from loraflow.tasks.models import device, load_tokenizer, pick_dtype, quantized_loading, trusts_code
from loraflow.tasks.store import Ref


def _texts(frame: pd.DataFrame) -> tuple[list[str], list[str] | None]:
    pairs = frame[TEXT_PAIR].tolist() if TEXT_PAIR in frame else None
    return frame[TEXT].tolist(), pairs


def classifier_tokenizer(path: str | Path) -> Any:
    """The model's tokenizer, with a pad token and, when its pair encoding joins the two texts with
    nothing between them (most decoder tokenizers), its eos token as separator: `A <eos> B`.

    The tokenizer is saved with the merged model, so `pipeline(...)` encodes pairs the same way."""
    tokenizer = load_tokenizer(path)
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        backend is not None
        and tokenizer.num_special_tokens_to_add(pair=True) == 0
        and tokenizer.eos_token is not None
    ):
        from tokenizers import processors

        separator = tokenizer.eos_token
        backend.post_processor = processors.TemplateProcessing(
            single="$A:0",
            pair=f"$A:0 {separator}:0 $B:1",
            special_tokens=[(separator, tokenizer.eos_token_id)],
        )
    return tokenizer


def tokenize(tokenizer: Any, frame: pd.DataFrame, max_length: int) -> tuple[dict[str, list], int]:
    """Token ids of each row (pairs encoded as text, text_pair), cut to max_length; and how many were cut."""
    texts, pairs = _texts(frame)
    full = tokenizer(texts, pairs, truncation=False)
    truncated = sum(len(ids) > max_length for ids in full["input_ids"])
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length) if truncated else full
    return dict(encoded), truncated


HEADS = ["score", "classifier"]  # the classification head's module name (Llama/Qwen/Mistral, BERT-likes)


def load_classifier(
    path: str | Path, labels: list[str], tokenizer: Any, dtype: str = "auto", quantization: str = "none"
) -> Any:
    """A sequence-classification model with one output per label and the label names in its config;
    quantised with model.quantization, the head kept in full precision."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    loading = quantized_loading(quantization, dtype, keep_in_full=HEADS)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights newly initialized": the head, on purpose
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            problem_type="single_label_classification",
            dtype=pick_dtype(dtype),
            trust_remote_code=trusts_code(path),
            **loading,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    # Decoders pool the last non-pad token: without a pad id they cannot batch rows of different lengths.
    model.config.pad_token_id = tokenizer.pad_token_id
    return (model if loading else model.to(device())).eval()


@torch.no_grad()
def predict_logits(
    model: Any,
    tokenizer: Any,
    frame: pd.DataFrame,
    max_length: int,
    batch_size: int = 16,
    progress: str | None = None,
) -> np.ndarray:
    """(rows × labels) logits, in row order; rows are sorted by length so that a batch pads little.
    `progress` is the progress display's description (None: none shown)."""
    tokens, _ = tokenize(tokenizer, frame, max_length)
    features = [{k: v[i] for k, v in tokens.items()} for i in range(len(frame))]
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    device = next(model.parameters()).device
    logits = np.zeros((len(features), model.config.num_labels), dtype=np.float64)
    with ProgressDisplay(progress, len(order), "rows") as shown:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = tokenizer.pad([features[i] for i in index], return_tensors="pt").to(device)
            logits[index] = model(**batch).logits.float().cpu().numpy()
            shown.update(start + len(index))
    if not np.isfinite(logits).all():
        raise RuntimeError(
            "classifier logits are not finite (NaN/inf): the model's weights or dtype are broken"
        )
    return logits


def train_token_lengths(encoded: Ref, tokenizer: Any) -> list[int]:
    """Each train row's length in tokens, untruncated, encoded as training encodes it (`tokenize`, with the
    `classifier_tokenizer`'s pair separator): what `loraflow plan` and the memory check before training
    measure."""
    tokens, _ = tokenize(tokenizer, read_split(encoded, "train"), max_length=1 << 30)
    return [len(ids) for ids in tokens["input_ids"]]
