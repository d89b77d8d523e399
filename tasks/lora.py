"""LoRA training plumbing both approaches share, knowing neither: the peft and Trainer builders, MLflow
tracking, the callbacks that log to Prefect, resume from the last checkpoint, out-of-memory advice and
saving a finished adapter folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.exceptions import MissingContextError
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from loraflow.config import LoraSettings, TrainSettings
from loraflow.errors import ConfigError, ResourceError
from loraflow.tasks.store import (
    Ref,
    building,
    run_logger,
)


def build_lora_config(lora: LoraSettings, task_type: str = "CAUSAL_LM") -> LoraConfig:
    """peft LoraConfig from the lora settings (alpha defaults to 2 × r)."""
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha or 2 * lora.r,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type=task_type,
    )


def trainer_arguments(train: TrainSettings, output_dir: Path, bf16: bool) -> dict[str, Any]:
    """TrainingArguments shared by both approaches: schedule, dynamic padding, checkpoints for resume."""
    return {
        "output_dir": str(output_dir),
        "num_train_epochs": train.epochs,
        "max_steps": train.max_steps,
        "per_device_train_batch_size": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "learning_rate": train.lr,
        "lr_scheduler_type": train.scheduler,
        "warmup_steps": train.warmup_ratio,  # a float in [0, 1) is a share of the total steps
        "max_grad_norm": train.max_grad_norm,
        "weight_decay": train.weight_decay,
        "seed": train.seed,
        "data_seed": train.seed,
        "bf16": bf16,
        "activation_checkpointing": train.gradient_checkpointing,  # transformers 5 name
        "save_strategy": "steps",
        "save_steps": train.save_steps,
        "save_total_limit": 2,
        "logging_steps": train.logging_steps,
        "include_num_input_tokens_seen": "non_padding",
        "report_to": ["tensorboard"] + (["mlflow"] if train.tracking_uri else []),
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),
    }


def tracking_setup(train: TrainSettings) -> None:
    """MLflow's tracking URI for the Trainer's MLflow callback, when the config names one."""
    if not train.tracking_uri:
        return
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            f"train.tracking_uri is {train.tracking_uri!r} but MLflow is not installed here: pip install "
            "mlflow (or mlflow-skinny), or remove train.tracking_uri"
        )
    os.environ["MLFLOW_TRACKING_URI"] = train.tracking_uri  # read by transformers' MLflowCallback
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "loraflow")


def work_settings(train: TrainSettings) -> dict[str, Any]:
    """The train settings that shape the adapter (what its work-store key hashes): not where it is logged."""
    return train.model_dump(mode="json", exclude={"tracking_uri"})


PROGRESS_KEY = "training-progress"


PROGRESS_SECONDS = 5.0  # the progress artifact is updated at most this often (and at the end)


class _LogToPrefect(TrainerCallback):
    """Training log lines (loss, learning rate, step) in the Prefect run log at the logging_steps rate, and
    a progress artifact (step / total, loss, learning rate, ETA) updated every few seconds."""

    def __init__(self) -> None:
        try:
            self.logger = get_run_logger()
        except MissingContextError:  # called outside a Prefect run (unit tests call .fn directly)
            self.logger = None
        self.artifact, self.updated, self.started, self.first_step = None, 0.0, 0.0, 0
        self.last: dict[str, float] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.logger and state.is_world_process_zero:
            self.started, self.first_step = time.monotonic(), state.global_step
            self.artifact = create_progress_artifact(
                100 * state.global_step / max(state.max_steps, 1),
                key=PROGRESS_KEY,
                description=f"starting at step {state.global_step}/{state.max_steps}",
            )

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if self.logger and logs:
            self.last |= {k: v for k, v in logs.items() if k in ("loss", "learning_rate")}
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
            self.logger.info("step %d/%d: %s", state.global_step, state.max_steps, shown)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.artifact and time.monotonic() - self.updated >= PROGRESS_SECONDS:
            self._update(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.artifact:
            self._update(state)

    def _update(self, state: Any) -> None:
        self.updated = time.monotonic()
        done, total = state.global_step, max(state.max_steps, 1)
        rate = (done - self.first_step) / max(self.updated - self.started, 1e-9)
        parts = [f"step {done}/{total}"]
        if "loss" in self.last:
            parts.append(f"loss {self.last['loss']:.4f}")
        if "learning_rate" in self.last:
            parts.append(f"lr {self.last['learning_rate']:.2e}")
        if done < total and rate > 0:
            parts.append(f"ETA {timedelta(seconds=round((total - done) / rate))}")
        update_progress_artifact(self.artifact, 100 * done / total, description=" · ".join(parts))


def training_callbacks() -> list[TrainerCallback]:
    """Callbacks attached to every training run."""
    return [_LogToPrefect()]


class _ProgressBar(ProgressCallback):
    """transformers' progress bar without its own copy of each log line."""

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        return None


def _one_copy_of_each_log_line(trainer: Trainer) -> None:
    """In a Prefect run the log lines go to its log (`_LogToPrefect`); transformers would print them again."""
    callbacks = trainer.callback_handler.callbacks
    if not any(isinstance(c, _LogToPrefect) and c.logger for c in callbacks):
        return
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_ProgressBar)


def train_resuming(trainer: Trainer, checkpoints: Path) -> int:
    """`trainer.train`, resumed from the last checkpoint in `checkpoints`; returns its step (0 = fresh)."""
    resume = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    _one_copy_of_each_log_line(trainer)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except torch.OutOfMemoryError as e:
        raise ResourceError(out_of_memory_advice(trainer.args, str(e).splitlines()[0])) from e
    return int(Path(resume).name.split("-")[-1]) if resume else 0


def out_of_memory_advice(args: Any, detail: str) -> str:
    """What to change when training runs out of GPU memory, with the numbers to use."""
    batch, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    smaller = max(batch // 2, 1)
    steps = [
        f"set train.batch_size: {smaller} and train.grad_accum: {accum * batch // smaller} (the same "
        "effective batch)"
        if batch > 1
        else "train.batch_size is already 1",
    ]
    if not args.gradient_checkpointing:
        steps.append("set train.gradient_checkpointing: true (less memory, ~30% slower)")
    steps.append("or lower train.max_length")
    return f"out of GPU memory while training ({detail}); " + "; ".join(steps)


def save_trained(
    folder: Path, trainer: Trainer, seconds: float, resumed_from: int, truncated_rows: int, checkpoints: Path
) -> None:
    """Write the adapter, tokenizer, train.json and log_history.json into `folder`; drop the checkpoints."""
    state = trainer.state
    # The last logged step loss; when no logging step was reached, the run's mean loss logged at the end.
    losses = [e["loss"] for e in state.log_history if "loss" in e] or [
        e["train_loss"] for e in state.log_history if "train_loss" in e
    ]
    tokens = int(state.num_input_tokens_seen)
    stats = {
        "seconds": round(seconds, 3),
        "steps": int(state.global_step),
        "resumed_from_step": resumed_from,
        "tokens": tokens,
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 2),
        "final_loss": float(losses[-1]),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "truncated_rows": truncated_rows,
        "device": str(trainer.args.device),
    }
    if truncated_rows:
        run_logger().warning(
            "%d train row(s) are longer than train.max_length tokens and were truncated (the end of their "
            "text cut, a generative row's answer kept; counted in metrics.json); raise train.max_length to "
            "keep them whole",
            truncated_rows,
        )
    with building(folder) as tmp:
        events = checkpoints / "runs"  # the Trainer's TensorBoard event files (output_dir/runs/<time_host>)
        if events.is_dir():
            shutil.copytree(events, tmp / "tensorboard")
        trainer.save_model(str(tmp / "adapter"))
        trainer.processing_class.save_pretrained(str(tmp / "adapter"))
        (tmp / "train.json").write_text(json.dumps(stats, indent=1))
        (tmp / "log_history.json").write_text(json.dumps(state.log_history, indent=1))
    shutil.rmtree(checkpoints, ignore_errors=True)  # finished: the adapter replaces the checkpoints


def read_train_stats(ref: Ref) -> dict[str, Any]:
    """train.json written by `train_adapter`."""
    return json.loads((Path(ref.path) / "train.json").read_text())
