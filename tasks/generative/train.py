"""LoRA training of the generative approach: TRL's SFTTrainer on prompt/completion chat messages.

Reads top to bottom: data → tokenizer → model → LoRA config → trainer → train → save. The loss is on the
answer tokens only (prompt-completion data), batches are padded dynamically, and checkpoints go to a
folder named by the inputs' digest, so a retried task or a re-run flow resumes from the last one.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from prefect import task
from pydantic import Field
from transformers import set_seed
from trl import SFTConfig, SFTTrainer

from loraflow.config import LoraSettings, TrainSettings
from loraflow.errors import ConfigError
from loraflow.tasks.generative.prepare import COMPLETION, PROMPT, read_answers, read_prompts
from loraflow.tasks.generative.scoring import encode_choices, score_labels
from loraflow.tasks.ingest import LABEL
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
from loraflow.tasks.models import load_causal_lm, load_tokenizer, peft_quietly, uses_bf16
from loraflow.tasks.store import (
    CONTENT_CACHE,
    Ref,
    digest_of,
    named_for_config,
    retry_unless_user_error,
    step_output,
)


def build_training_args(
    train: TrainSettings, output_dir: Path, bf16: bool, eval_batch_size: int = 16
) -> SFTConfig:
    """SFTConfig from the train settings: answer-only loss on prompt/completion rows."""
    return SFTConfig(
        **trainer_arguments(train, output_dir, bf16, eval_batch_size),
        max_length=train.max_length,
        completion_only_loss=True,
    )


@dataclass(frozen=True)
class DevRows:
    """The dev split as training scores it: each row's prompt messages, its gold label id, the answers."""

    prompts: list[list[dict[str, str]]]
    gold: list[int]
    answers: list[str]

    @classmethod
    def read(cls, prompts: Ref) -> DevRows:
        labels, answers = read_answers(prompts)
        dev = read_prompts(prompts, "dev")
        return cls(dev[PROMPT].tolist(), [labels.index(label) for label in dev[LABEL]], answers)

    def dataset(self) -> Dataset:
        """The rows as prompt/completion messages: the Trainer wants an eval set when it evaluates."""
        completions = [[{"role": "assistant", "content": self.answers[g]}] for g in self.gold]
        return Dataset.from_dict({PROMPT: self.prompts, COMPLETION: completions})


def project_answer_positions_only() -> None:
    """Make TRL's fused LM head project only the positions the loss reads (the answer's) on a CPU too.

    SFTTrainer's forward (trl.trainer.utils.add_fused_lm_head) runs the backbone, then the LM head in tiles
    over the positions whose label is not -100 where Triton runs (CUDA, XPU); on any other device it projects
    every position and masks the result, so that an XLA device (Neuron) compiles one tile shape. A CPU
    compiles nothing, and the prompt's positions are nearly all of a classification row: every step then
    computes and backpropagates vocabulary-wide logits (49,152 for SmolLM2) that the loss never reads.
    The choice is TRL's module-level `_use_triton(device)`, which that forward alone reads; the kernel
    that folds each tile keeps its own. Measured on 2 CPU cores: bench/answer_positions.py.
    """
    import trl.trainer.utils as fused

    chooses_compact = getattr(fused, "_use_triton", None)
    if chooses_compact is None or getattr(chooses_compact, "compact_on_cpu", False):
        return

    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or chooses_compact(device)

    compact.compact_on_cpu = True  # type: ignore[attr-defined]
    compact.__wrapped__ = chooses_compact  # type: ignore[attr-defined]
    fused._use_triton = compact


class LabelScoringTrainer(SFTTrainer):
    """SFTTrainer whose evaluation is the approach's own: each dev prompt's answers scored as in the final
    evaluation (scoring.py), giving dev macro-F1 and accuracy rather than the LM loss. The Trainer's
    machinery (TensorBoard/MLflow logging, best-checkpoint tracking, early stopping) takes it from there."""

    def __init__(self, *args: Any, dev: DevRows | None, choices: list[int] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.dev = dev
        self.choices = None if choices is None else torch.tensor(choices)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """TRL's loss (train.loss: tokens), or with `choices` (train.loss: choice) the cross-entropy of each
        row's answer among the labels' answers, from the logits of their first tokens at the position that
        predicts the answer: the same comparison evaluation makes, through the model's own forward (so DDP
        and PEFT wrappers see a normal call), with the LM head applied at those positions only."""
        if self.choices is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels, ids = inputs["labels"], inputs["input_ids"]
        rows = torch.arange(len(labels), device=labels.device)
        first = (labels != -100).int().argmax(dim=1)  # each row's first answer token
        choices = self.choices.to(ids.device)
        matches = ids[rows, first][:, None] == choices[None, :]
        if not bool(matches.any(dim=1).all()):
            raise RuntimeError("a training row's answer does not begin with one of the labels' first tokens")
        gold = matches.int().argmax(dim=1)
        keep, where = torch.unique(first - 1, return_inverse=True)  # the positions that predict the answers
        outputs = model(
            input_ids=ids, attention_mask=inputs.get("attention_mask"), logits_to_keep=keep, use_cache=False
        )
        logits = outputs.logits[rows, where][:, choices].float()
        loss = torch.nn.functional.cross_entropy(logits, gold)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            loss = loss / self.current_gradient_accumulation_steps  # the Trainer leaves it to the loss then
        mode = "train" if model.training else "eval"
        self._metrics[mode]["answer_accuracy"].append(float((logits.argmax(dim=1) == gold).float().mean()))
        return (loss, outputs) if return_outputs else loss

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        started = time.perf_counter()
        model, training = self.model, self.model.training
        model.eval()
        try:
            with torch.no_grad():
                scores = score_labels(
                    model,
                    self.processing_class,
                    self.dev.prompts,
                    self.dev.answers,
                    self.args.eval_batch_size,
                )
        finally:
            model.train(training)
        gold = np.asarray(self.dev.gold)
        if self.choices is not None:  # train.loss: choice lowers -log p(gold | one of the answers), not this
            scores = scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)
        loss = float(-scores[np.arange(len(gold)), gold].mean())  # -log p(gold answer), per row
        figures = dev_metrics(gold, scores, loss) | {"loss": loss}
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in figures.items()}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - started, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def fit_prompts(tokenizer: Any, frame: pd.DataFrame, max_length: int) -> tuple[pd.DataFrame, int]:
    """Rows whose prompt + answer exceed max_length tokens get the end of their last user message cut (marked
    with "…") until they fit, so the trainer never cuts the answer. Returns (rows, how many were cut)."""
    prompts, cut = [], 0
    for messages, completion in zip(frame[PROMPT], frame[COMPLETION], strict=True):
        fitted = _fit_prompt(tokenizer, [dict(m) for m in messages], completion[0]["content"], max_length)
        prompts.append(fitted or [dict(m) for m in messages])
        cut += fitted is not None
    return frame.assign(**{PROMPT: prompts}), cut


def _fit_prompt(
    tokenizer: Any, messages: list[dict[str, str]], answer: str, max_length: int
) -> list[dict[str, str]] | None:
    """The messages with the end of the last user message cut so that prompt + answer fit, or None if they
    already do."""

    def length(n: int | None) -> int:
        return len(encode_choices(tokenizer, shortened(n), [answer])[0][0])

    def shortened(n: int | None) -> list[dict[str, str]]:
        if n is None:
            return messages
        return [*messages[:user], {**messages[user], "content": text[:n] + "…"}, *messages[user + 1 :]]

    if length(None) <= max_length:
        return None
    user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    text = messages[user]["content"]
    if length(0) > max_length:
        raise ConfigError(
            f"train.max_length is {max_length} tokens but the prompt's fixed text and the answer alone take "
            f"{length(0)}: raise train.max_length or shorten prompt.system"
        )
    low, high = 0, len(text)  # the longest opening of the text that fits: shortened(low) always does
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if length(middle) <= max_length else (low, middle - 1)
    return shortened(low)


def fit_adapter(
    dataset: Dataset,
    model_path: str,
    lora: LoraSettings,
    train: TrainSettings,
    dtype: str,
    checkpoints: Path,
    dev: DevRows | None = None,
    eval_batch_size: int = 16,
    quantization: str = "none",
    answers: list[str] | None = None,
) -> tuple[SFTTrainer, int]:
    """Train LoRA on prompt/completion rows, scoring `dev` as it goes (without it, nothing is scored or
    selected); resume from the last checkpoint in `checkpoints` if any.

    `answers` (each label's answer, in label order) is what train.loss: choice chooses among; it defaults to
    dev's. Returns the trainer (its model is the PEFT model: the best checkpoint's with train.select_best)
    and the step it resumed from (0 for a fresh start).
    """
    if dev is None:
        train = without_evaluation(train)
    tracking_setup(train)
    tokenizer = load_tokenizer(model_path)
    choices = None
    if train.loss == "choice":
        answers = answers if answers is not None else dev.answers if dev is not None else None
        if answers is None:
            raise ValueError("train.loss: choice needs the labels' answers")
        choices = first_answer_tokens(tokenizer, dataset[0][PROMPT], answers)
    set_seed(train.seed)  # LoRA's initial weights come from the global RNG
    network = for_training(load_causal_lm(model_path, dtype, quantization), train)
    project_answer_positions_only()
    with peft_quietly():
        trainer = LabelScoringTrainer(
            model=network,
            args=build_training_args(train, checkpoints, uses_bf16(dtype), eval_batch_size),
            train_dataset=dataset,
            eval_dataset=dev.dataset() if dev is not None and train.eval_steps != 0 else None,
            processing_class=tokenizer,
            peft_config=build_lora_config(lora),
            callbacks=training_callbacks(train),
            dev=dev,
            choices=choices,
        )
    return trainer, train_resuming(trainer, checkpoints)


def first_answer_tokens(tokenizer: Any, messages: list[dict[str, str]], answers: list[str]) -> list[int]:
    """The first token of each answer's turn after this prompt, as the trainer tokenizes it (train.loss:
    choice compares these); a ConfigError when two answers begin with the same token."""
    sequences, starts = encode_choices(tokenizer, messages, answers)
    firsts = [ids[start] for ids, start in zip(sequences, starts, strict=True)]
    shared = [(i, j) for i, j in itertools.combinations(range(len(answers)), 2) if firsts[i] == firsts[j]]
    if shared:
        i, j = shared[0]
        token = tokenizer.convert_ids_to_tokens(firsts[i])
        raise ConfigError(
            f"train.loss is choice, which tells the answers apart by their first token, but {answers[i]!r} "
            f"and {answers[j]!r} both begin with {token!r} for this model: "
            "give them answers that differ from the first word (data.answers), or set train.loss: tokens"
        )
    return firsts


class GenerativeTrainJob(TrainJob):
    """A generative training run: the base model, the formatted prompts and the settings."""

    prompts: Ref = Field(description="The format-prompts folder (train/dev prompt and completion messages).")


def train_into(job: GenerativeTrainJob) -> None:
    """Train LoRA on the formatted train split into `job.folder` (one process; one of several under DDP)."""
    checkpoints = checkpoints_of(job.folder)
    frame, truncated = fit_prompts(
        load_tokenizer(job.model.path), read_prompts(job.prompts, "train"), job.train.max_length
    )
    dataset = Dataset.from_pandas(frame[[PROMPT, COMPLETION]], preserve_index=False)
    started = time.perf_counter()
    trainer, resumed_from = fit_adapter(
        dataset,
        job.model.path,
        job.lora,
        job.train,
        job.dtype,
        checkpoints,
        DevRows.read(job.prompts),
        job.eval_batch_size,
        job.quantization,
        read_answers(job.prompts)[1],
    )
    seconds = time.perf_counter() - started
    if trainer.is_world_process_zero():  # under DDP every process trains, the first one saves
        save_trained(job.folder, trainer, seconds, resumed_from, truncated, checkpoints)


@task(
    name="train-adapter",
    task_run_name=named_for_config("train-adapter"),
    cache_policy=CONTENT_CACHE,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_user_error,
)
def train_adapter(
    prompts: Ref,
    model: Ref,
    lora: LoraSettings,
    train: TrainSettings,
    dtype: str,
    store: str,
    processes: int = 1,
    eval_batch_size: int = 16,
    quantization: str = "none",
) -> Ref:
    """Train a LoRA adapter on the formatted train split, scoring dev as it goes (the best checkpoint is
    kept with train.select_best); resume from the last checkpoint if one exists. With `quantization`
    (model.quantization) the base is loaded quantised (QLoRA).

    With `processes` > 1 the training runs as that many DDP processes (one per GPU) through accelerate.
    """
    key = digest_of(
        "train",
        prompts.digest,
        model.digest,
        lora,
        work_settings(train),
        eval_batch_size,
        dtype,
        processes,
        quantization,
    )
    folder, result = step_output(store, "train", key)
    job = GenerativeTrainJob(
        folder=folder,
        prompts=prompts,
        model=model,
        lora=lora,
        train=train,
        dtype=dtype,
        eval_batch_size=eval_batch_size,
        quantization=quantization,
    )
    train_once(f"{__name__}:train_into", job, processes)  # launch finds it by this path
    return result
