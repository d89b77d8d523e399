"""Training of the classifier approach: LoRA with task SEQ_CLS, the new head trained in full (peft's
modules_to_save) and an optional class-weighted loss.

Reads top to bottom: labels and weights → tokens → model + head → LoRA → Trainer → train → save.
"""

from __future__ import annotations

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
from pydantic import Field
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

from loraflow.config import ClassifierSettings, LoraSettings, TrainSettings, normalize_label
from loraflow.errors import ConfigError
from loraflow.tasks.classifier.prepare import LABEL_ID, read_label_map
from loraflow.tasks.classifier.scoring import classifier_tokenizer, load_classifier, tokenize
from loraflow.tasks.ingest import read_split
from loraflow.tasks.launch import TrainJob, train_once
from loraflow.tasks.lora import (
    build_lora_config,
    checkpoints_of,
    dev_metrics,
    for_training,
    save_trained,
    tracking_setup,
    train_resuming,
    trainer_arguments,
    training_callbacks,
    without_evaluation,
    work_settings,
)
from loraflow.tasks.models import peft_quietly, uses_bf16
from loraflow.tasks.store import (
    CONTENT_CACHE,
    Ref,
    digest_of,
    named_for_config,
    retry_unless_user_error,
    step_output,
)


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


def labelled_tokens(tokenizer: Any, frame: pd.DataFrame, max_length: int) -> tuple[Dataset, int]:
    """The rows' tokens with their label ids as `labels`, and how many rows were truncated."""
    tokens, truncated = tokenize(tokenizer, frame, max_length)
    return Dataset.from_dict({**tokens, "labels": frame[LABEL_ID].tolist()}), truncated


def _loss(scored: Any) -> float:
    """Mean cross-entropy of the dev rows' logits against their labels (unweighted)."""
    logits = torch.as_tensor(np.asarray(scored.predictions), dtype=torch.float32)
    labels = torch.as_tensor(np.asarray(scored.label_ids), dtype=torch.long)
    return float(torch.nn.functional.cross_entropy(logits, labels))


def fit_classifier(
    dataset: Dataset,
    model_path: str,
    labels: list[str],
    lora: LoraSettings,
    train: TrainSettings,
    weights: torch.Tensor | None,
    dtype: str,
    checkpoints: Path,
    dev: Dataset | None = None,
    eval_batch_size: int = 16,
    quantization: str = "none",
) -> tuple[Trainer, int]:
    """Train LoRA + the new head on tokenized rows, classifying the tokenized `dev` rows as it goes with
    the Trainer's own evaluation (without them, nothing is scored or selected); resume from the last
    checkpoint in `checkpoints`."""
    if dev is None:
        train = without_evaluation(train)
    tracking_setup(train)
    tokenizer = classifier_tokenizer(model_path)
    set_seed(train.seed)  # the head's and LoRA's initial weights come from the global RNG
    base = for_training(load_classifier(model_path, labels, tokenizer, dtype, quantization), train).train()
    with peft_quietly():
        network = get_peft_model(base, build_lora_config(lora, "SEQ_CLS"))
    args = TrainingArguments(
        **trainer_arguments(train, checkpoints, uses_bf16(dtype), eval_batch_size),
        train_sampling_strategy="group_by_length",  # rows of similar length share a batch: less padding
        label_names=["labels"],
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=network,
        args=args,
        train_dataset=dataset,
        eval_dataset=dev if train.eval_steps != 0 else None,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_loss_func=weighted_cross_entropy(weights),
        compute_metrics=lambda scored: dev_metrics(scored.label_ids, scored.predictions, _loss(scored)),
        callbacks=training_callbacks(train),
    )
    return trainer, train_resuming(trainer, checkpoints)


@task(
    name="train-classifier-head",
    task_run_name=named_for_config("train-classifier-head"),
    cache_policy=CONTENT_CACHE,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_user_error,
)
def train_adapter(
    encoded: Ref,
    model: Ref,
    lora: LoraSettings,
    train: TrainSettings,
    classifier: ClassifierSettings,
    dtype: str,
    store: str,
    processes: int = 1,
    eval_batch_size: int = 16,
    quantization: str = "none",
) -> Ref:
    """Train LoRA and the classification head on the train split; resume from the last checkpoint. With
    `quantization` (model.quantization) the base is loaded quantised (QLoRA), the head in full precision.

    With `processes` > 1 the training runs as that many DDP processes (one per GPU) through accelerate.
    """
    key = digest_of(
        "train-cls",
        encoded.digest,
        model.digest,
        lora,
        work_settings(train),
        classifier.class_weights,
        eval_batch_size,
        dtype,
        processes,
        quantization,
    )
    folder, result = step_output(store, "train-cls", key)
    job = ClassifierTrainJob(
        folder=folder,
        encoded=encoded,
        model=model,
        lora=lora,
        train=train,
        classifier=classifier,
        dtype=dtype,
        eval_batch_size=eval_batch_size,
        quantization=quantization,
    )
    train_once(f"{__name__}:train_into", job, processes)  # launch finds it by this path
    return result


class ClassifierTrainJob(TrainJob):
    """A classifier training run: the base model, the label-mapped rows and the settings."""

    encoded: Ref = Field(description="The map-labels folder (train/dev inputs, label ids, labels.json).")
    classifier: ClassifierSettings


def train_into(job: ClassifierTrainJob) -> None:
    """Train LoRA + head on the encoded train split into `job.folder` (one process; one of several under
    DDP)."""
    folder, train = job.folder, job.train
    checkpoints = checkpoints_of(folder)
    labels = read_label_map(job.encoded)["labels"]
    frame = read_split(job.encoded, "train")
    weights = class_weights(job.classifier.class_weights, labels, frame[LABEL_ID].tolist())
    tokenizer = classifier_tokenizer(job.model.path)
    dataset, truncated = labelled_tokens(tokenizer, frame, train.max_length)
    dev, _ = labelled_tokens(tokenizer, read_split(job.encoded, "dev"), train.max_length)
    started = time.perf_counter()
    trainer, resumed_from = fit_classifier(
        dataset,
        job.model.path,
        labels,
        job.lora,
        train,
        weights,
        job.dtype,
        checkpoints,
        dev,
        job.eval_batch_size,
        job.quantization,
    )
    if trainer.is_world_process_zero():  # under DDP every process trains, the first one saves
        save_trained(folder, trainer, time.perf_counter() - started, resumed_from, truncated, checkpoints)
