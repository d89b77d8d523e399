"""The classifier approach: a new classification head on any `AutoModelForSequenceClassification` model.

Reads top to bottom: labels → ids and rows → model inputs (one text, a tokenizer pair, or a join
template) → LoRA with task SEQ_CLS, the new head trained in full (peft's modules_to_save) and an optional
class-weighted loss → merge that keeps the head, with id2label/label2id in config.json so that
`pipeline("text-classification", model=merged)` answers with the label names → batched evaluation and
the majority-class baseline. Ingest, contract, run folder and metrics are shared with the generative flow.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from peft import get_peft_model
from prefect import task
from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

from loraflow.config import ClassifierSettings, EvalSettings, LoraSettings, TrainSettings, normalize_label
from loraflow.errors import ConfigError
from tasks.evaluate import save_evaluation
from tasks.ingest import LABEL, read_meta, read_split
from tasks.launch import train_once
from tasks.merge import CHECK_ROWS, load_adapter, merge_checked, save_merged
from tasks.models import load_tokenizer, peft_quietly, pick_dtype, trusts_code, uses_bf16
from tasks.prompts import render
from tasks.scoring import softmax
from tasks.store import (
    CONTENT_CACHE,
    Ref,
    building,
    digest_of,
    is_complete,
    retry_unless_user_error,
    work_dir,
)
from tasks.train import (
    build_lora_config,
    save_trained,
    tracking_setup,
    train_resuming,
    trainer_arguments,
    training_callbacks,
    work_settings,
)

TEXT, TEXT_PAIR, LABEL_ID = "text", "text_pair", "label_id"
LABEL_MAP = "labels.json"


# Labels and inputs ----------------------------------------------------------------------------------------


def join_inputs(frame: pd.DataFrame, columns: list[str], template: str | None) -> pd.DataFrame:
    """`text` (and `text_pair` for two columns without a template) from the input columns of each row."""
    out = pd.DataFrame(index=frame.index)
    if template is not None:
        out[TEXT] = [render(template, row) for row in frame[columns].to_dict("records")]
    elif len(columns) == 2:
        out[TEXT], out[TEXT_PAIR] = frame[columns[0]], frame[columns[1]]
    else:  # one column as is; more joined by blank lines
        out[TEXT] = frame[columns].astype(str).agg("\n\n".join, axis=1)
    return out


@task(name="map-labels", cache_policy=CONTENT_CACHE)
def map_labels(splits: Ref, columns: list[str], classifier: ClassifierSettings, store: str) -> Ref:
    """Write train/dev parquet files with the model inputs (`text`, `text_pair`), `label_id`, labels.json."""
    key = digest_of("labels", splits.digest, columns, classifier.template)
    folder = work_dir(store, "labels", key)
    if is_complete(folder):
        return Ref(path=str(folder), digest=key)
    labels = read_meta(splits)["labels"]
    label2id = {label: i for i, label in enumerate(labels)}
    with building(folder) as tmp:
        for split in ("train", "dev"):
            frame = read_split(splits, split)
            frame = pd.concat([frame, join_inputs(frame, columns, classifier.template)], axis=1)
            frame[LABEL_ID] = frame[LABEL].map(label2id).astype("int64")
            frame.to_parquet(tmp / f"{split}.parquet", index=False)
        label_map = {
            "labels": labels,
            "label2id": label2id,
            "id2label": {str(i): label for label, i in label2id.items()},
            "columns": columns,
            "template": classifier.template,
        }
        (tmp / LABEL_MAP).write_text(json.dumps(label_map, indent=1))
    return Ref(path=str(folder), digest=key)


def read_encoded(ref: Ref, split: str) -> pd.DataFrame:
    """One split written by `map_labels`."""
    return pd.read_parquet(Path(ref.path) / f"{split}.parquet")


def read_label_map(ref: Ref) -> dict[str, Any]:
    """labels.json written by `map_labels`: labels in id order, label2id, id2label, columns, template."""
    return json.loads((Path(ref.path) / LABEL_MAP).read_text())


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


# Model and loss -------------------------------------------------------------------------------------------


def load_classifier(path: str | Path, labels: list[str], tokenizer: Any, dtype: str = "auto") -> Any:
    """A sequence-classification model with one output per label and the label names in its config."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

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
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    # Decoders pool the last non-pad token: without a pad id they cannot batch rows of different lengths.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def class_weights(setting: str | dict, labels: list[str], train_ids: list[int]) -> torch.Tensor | None:
    """Per-label loss weights: none, balanced (n / (classes × rows of the class)), or the given mapping."""
    if setting == "none":
        return None
    if setting == "balanced":
        counts = np.bincount(train_ids, minlength=len(labels)).astype(np.float64)
        return torch.tensor(len(train_ids) / (len(labels) * np.maximum(counts, 1)), dtype=torch.float32)
    given = {normalize_label(k): float(v) for k, v in setting.items()}
    unknown = sorted(set(given) - set(labels))
    if unknown:
        raise ConfigError(
            f"classifier.class_weights: {', '.join(repr(u) for u in unknown)} not among the labels {labels}"
        )
    return torch.tensor([given.get(label, 1.0) for label in labels], dtype=torch.float32)


def weighted_cross_entropy(weights: torch.Tensor | None) -> Callable[..., torch.Tensor]:
    """Trainer `compute_loss_func`: cross-entropy (class-weighted when given), summed over the rows and
    divided by the rows in the whole accumulated batch, so gradient accumulation matches one big batch."""

    def loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        logits = outputs.logits.float()
        weight = weights.to(logits.device) if weights is not None else None
        total = torch.nn.functional.cross_entropy(logits, labels, weight=weight, reduction="sum")
        return total / (num_items_in_batch if num_items_in_batch is not None else labels.numel())

    return loss


def fit_classifier(
    dataset: Dataset,
    model_path: str,
    labels: list[str],
    lora: LoraSettings,
    train: TrainSettings,
    weights: torch.Tensor | None,
    dtype: str,
    checkpoints: Path,
) -> tuple[Trainer, int]:
    """Train LoRA + the new head on tokenized rows; resume from the last checkpoint in `checkpoints`."""
    tracking_setup(train)
    tokenizer = classifier_tokenizer(model_path)
    set_seed(train.seed)  # the head's and LoRA's initial weights come from the global RNG
    base = load_classifier(model_path, labels, tokenizer, dtype).train()
    with peft_quietly():
        network = get_peft_model(base, build_lora_config(lora, "SEQ_CLS"))
    args = TrainingArguments(
        **trainer_arguments(train, checkpoints, bf16=uses_bf16(dtype)),
        train_sampling_strategy="group_by_length",  # rows of similar length share a batch: less padding
        label_names=["labels"],
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=network,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_loss_func=weighted_cross_entropy(weights),
        callbacks=training_callbacks(),
    )
    return trainer, train_resuming(trainer, checkpoints)


@task(
    name="train-classifier-head",
    cache_policy=CONTENT_CACHE,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_user_error,
)
def train_classifier_head(
    encoded: Ref,
    model: Ref,
    lora: LoraSettings,
    train: TrainSettings,
    classifier: ClassifierSettings,
    dtype: str,
    store: str,
    processes: int = 1,
) -> Ref:
    """Train LoRA and the classification head on the train split; resume from the last checkpoint.

    With `processes` > 1 the training runs as that many DDP processes (one per GPU) through accelerate.
    """
    key = digest_of(
        "train-cls",
        encoded.digest,
        model.digest,
        lora,
        work_settings(train),
        classifier.class_weights,
        dtype,
        processes,
    )
    folder = work_dir(store, "train-cls", key)
    arguments = {"folder": folder, "encoded": encoded, "model": model, "lora": lora, "train": train}
    train_once("classifier", arguments | {"classifier": classifier}, processes, dtype)
    return Ref(path=str(folder), digest=key)


def train_classifier_into(
    folder: Path,
    encoded: Ref,
    model: Ref,
    lora: LoraSettings,
    train: TrainSettings,
    classifier: ClassifierSettings,
    dtype: str,
) -> None:
    """Train LoRA + head on the encoded train split into `folder` (one process; one of several under DDP)."""
    checkpoints = folder.with_name(f"{folder.name}.checkpoints")
    labels = read_label_map(encoded)["labels"]
    frame = read_encoded(encoded, "train")
    weights = class_weights(classifier.class_weights, labels, frame[LABEL_ID].tolist())
    tokens, truncated = tokenize(classifier_tokenizer(model.path), frame, train.max_length)
    dataset = Dataset.from_dict({**tokens, "labels": frame[LABEL_ID].tolist()})
    started = time.perf_counter()
    trainer, resumed_from = fit_classifier(
        dataset, model.path, labels, lora, train, weights, dtype, checkpoints
    )
    if trainer.is_world_process_zero():  # under DDP every process trains, the first one saves
        save_trained(folder, trainer, time.perf_counter() - started, resumed_from, truncated, checkpoints)


# Prediction, merge, evaluation ----------------------------------------------------------------------------


@torch.no_grad()
def predict_logits(
    model: Any,
    tokenizer: Any,
    frame: pd.DataFrame,
    max_length: int,
    batch_size: int = 16,
    progress: bool = False,
) -> np.ndarray:
    """(rows × labels) logits, in row order; rows are sorted by length so that a batch pads little."""
    tokens, _ = tokenize(tokenizer, frame, max_length)
    features = [{k: v[i] for k, v in tokens.items()} for i in range(len(frame))]
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    device = next(model.parameters()).device
    logits = np.zeros((len(features), model.config.num_labels), dtype=np.float64)
    for start in tqdm(
        range(0, len(order), batch_size), desc="predicting", unit="batch", disable=not progress
    ):
        index = order[start : start + batch_size]
        batch = tokenizer.pad([features[i] for i in index], return_tensors="pt").to(device)
        logits[index] = model(**batch).logits.float().cpu().numpy()
    if not np.isfinite(logits).all():
        raise RuntimeError(
            "classifier logits are not finite (NaN/inf): the model's weights or dtype are broken"
        )
    return logits


@task(name="merge-classifier", cache_policy=CONTENT_CACHE)
def merge_classifier(adapter: Ref, model: Ref, encoded: Ref, max_length: int, dtype: str, store: str) -> Ref:
    """Write `merged/` (base + LoRA folded in + the trained head, label names in config.json) after
    checking that it gives the adapter model's logits."""
    key = digest_of("merge-cls", adapter.digest, model.digest, encoded.digest, max_length, dtype)
    folder = work_dir(store, "merge-cls", key)
    result = Ref(path=str(folder / "merged"), digest=key)
    if is_complete(folder):
        return result
    label_map = read_label_map(encoded)
    rows = read_encoded(encoded, "dev").head(CHECK_ROWS)
    tokenizer = classifier_tokenizer(model.path)
    base = load_classifier(model.path, label_map["labels"], tokenizer, "float32")
    adapted = load_adapter(base, Path(adapter.path) / "adapter")
    merged, difference = merge_checked(adapted, lambda m: predict_logits(m, tokenizer, rows, max_length))
    info = {
        "approach": "classifier",
        "labels": label_map["labels"],
        "label2id": label_map["label2id"],
        "columns": label_map["columns"],
        "template": label_map["template"],
        "max_length": max_length,
        "trust_remote_code": trusts_code(model.path),
        "merge_check": {"rows": len(rows), "max_abs_diff": difference},
    }
    save_merged(folder, merged, tokenizer, dtype, info)
    return result


def _dev_rows(encoded: Ref) -> pd.DataFrame:
    return read_encoded(encoded, "dev").drop(columns=[TEXT, TEXT_PAIR, LABEL_ID], errors="ignore")


@task(name="evaluate", cache_policy=CONTENT_CACHE)
def evaluate_classifier(
    model: Ref,
    encoded: Ref,
    settings: EvalSettings,
    max_length: int,
    dtype: str,
    store: str,
    kind: str = "finetuned",
) -> Ref:
    """Classify the dev split with `model`; write predictions.parquet and metrics.json."""
    key = digest_of("evaluate-cls", model.digest, encoded.digest, settings, max_length, dtype, kind)
    folder = work_dir(store, "evaluate", key)
    if is_complete(folder):
        return Ref(path=str(folder), digest=key)
    labels = read_label_map(encoded)["labels"]
    dev = read_encoded(encoded, "dev")
    tokenizer = classifier_tokenizer(model.path)
    network = load_classifier(model.path, labels, tokenizer, dtype)
    started = time.perf_counter()
    logits = predict_logits(network, tokenizer, dev, max_length, settings.batch_size)
    seconds = time.perf_counter() - started
    truncated = tokenize(tokenizer, dev, max_length)[1]
    save_evaluation(
        folder,
        _dev_rows(encoded),
        labels,
        softmax(logits),
        kind,
        seconds,
        {"truncated_rows": truncated},
    )
    return Ref(path=str(folder), digest=key)


@task(name="majority-baseline", cache_policy=CONTENT_CACHE)
def majority_baseline(encoded: Ref, store: str) -> Ref:
    """The baseline a classifier must beat: always the most frequent train label (its train share as
    probabilities)."""
    key = digest_of("majority", encoded.digest)
    folder = work_dir(store, "evaluate", key)
    if is_complete(folder):
        return Ref(path=str(folder), digest=key)
    labels = read_label_map(encoded)["labels"]
    counts = np.bincount(read_encoded(encoded, "train")[LABEL_ID], minlength=len(labels))
    dev = _dev_rows(encoded)
    probabilities = np.tile(counts / counts.sum(), (len(dev), 1))
    save_evaluation(folder, dev, labels, probabilities, "majority", 0.0)
    return Ref(path=str(folder), digest=key)
