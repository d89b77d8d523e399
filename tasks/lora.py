"""LoRA training plumbing both approaches share, knowing neither: the peft and Trainer builders, MLflow
tracking, the callbacks that log to Prefect, resume from the last complete checkpoint (a torn one is set
aside), how far training got (for the CLI to say when a run is interrupted), out-of-memory advice and
saving a finished adapter folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import shutil
import signal
import struct
import threading
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, prepare_model_for_kbit_training
from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.exceptions import MissingContextError
from transformers import (
    EarlyStoppingCallback,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
)
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from loraflow.config import LoraSettings, TrainSettings
from loraflow.console import ProgressDisplay
from loraflow.errors import ConfigError, ResourceError
from loraflow.tasks.metrics import TRAIN_STATS, classification_metrics
from loraflow.tasks.models import peft_quietly
from loraflow.tasks.store import (
    building,
    run_logger,
)


def for_training(model: Any, train: TrainSettings) -> Any:
    """A quantised base made ready for LoRA training as peft prescribes for QLoRA (layer norms and embeddings
    in float32, input gradients for checkpointing); other models as they are."""
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        return model
    with peft_quietly():
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing)


def build_lora_config(lora: LoraSettings, task_type: str = "CAUSAL_LM") -> LoraConfig:
    """peft LoraConfig from the lora settings (alpha defaults to 2 × r)."""
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha or 2 * lora.r,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type=task_type,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
    )


# What picks the checkpoint and stops early: dev macro-F1, ties broken by the lower dev loss (a small dev
# set often scores two checkpoints the same; the one that fits the gold answers better is kept).
SELECTION_METRIC = "selection_score"


def selection_arguments(train: TrainSettings) -> dict[str, Any]:
    """Evaluation during training and best-checkpoint selection, with the Trainer's own machinery.

    Dev macro-F1 is scored once per epoch (a run of 2 epochs or more), else at every 25% of the run (a
    ratio the Trainer turns into steps), or every `eval_steps`; the Trainer also scores the last step. With
    select_best, checkpoints fall on the evaluations (the Trainer requires it) and it keeps the best one,
    which it loads at the end, so that the best is what gets saved and merged; its state (best metric,
    best checkpoint) is in every checkpoint, so a resumed run keeps the best so far.
    """
    if train.eval_steps == 0:
        return {"eval_strategy": "no", "save_strategy": "steps", "save_steps": train.save_steps}
    if train.eval_steps is None and train.max_steps < 0 and train.epochs >= 2:
        when: dict[str, Any] = {"eval_strategy": "epoch"}
    else:
        when = {"eval_strategy": "steps", "eval_steps": train.eval_steps or 0.25}
    saves = (
        {"save_strategy": when["eval_strategy"], "save_steps": when.get("eval_steps", train.save_steps)}
        if train.select_best
        else {"save_strategy": "steps", "save_steps": train.save_steps}
    )
    return {
        **when,
        **saves,
        "metric_for_best_model": SELECTION_METRIC,
        "greater_is_better": True,
        "load_best_model_at_end": train.select_best,
    }


def without_evaluation(train: TrainSettings) -> TrainSettings:
    """The settings for a run that has no dev rows to score: nothing evaluated, the last step kept."""
    return train.model_copy(update={"eval_steps": 0, "select_best": False, "early_stopping_patience": None})


def selection_callbacks(train: TrainSettings) -> list[TrainerCallback]:
    """Early stopping on dev macro-F1, when train.early_stopping_patience is set, and the floors of
    train.stop_below."""
    callbacks: list[TrainerCallback] = [_StopBelow(train.stop_below)] if train.stop_below else []
    if train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=train.early_stopping_patience))
    return callbacks


class _StopBelow(TrainerCallback):
    """train.stop_below: at an evaluation at or past a share of the run, a best dev macro-F1 so far below
    that share's floor stops training (a sweep's median rule). The best so far is read from the Trainer's
    log history, which a resumed run restores, so the rule needs no state of its own."""

    def __init__(self, floors: dict[float, float]) -> None:
        self.floors = floors
        self.stopped: dict[str, Any] | None = None

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        scores = [e["eval_macro_f1"] for e in state.log_history if "eval_macro_f1" in e]
        if not scores or not state.max_steps or state.global_step >= state.max_steps:
            return
        share, best = state.global_step / state.max_steps, max(scores)
        for at, floor in self.floors.items():
            if at <= share + 1e-9 and best < floor:
                self.stopped = {"step": state.global_step, "share": at, "floor": floor, "best_macro_f1": best}
                run_logger().info(
                    "stopping at step %d of %d: the best dev macro-F1 so far, %.4f, is below %.4f, the floor "
                    "at %d%% of the run (train.stop_below)",
                    state.global_step,
                    state.max_steps,
                    best,
                    floor,
                    round(at * 100),
                )
                control.should_training_stop = True
                return


def stopped_below(trainer: Trainer) -> dict[str, Any] | None:
    """Where train.stop_below stopped the trainer's run: step, share, floor and best; None if it did not."""
    rule = next((c for c in trainer.callback_handler.callbacks if isinstance(c, _StopBelow)), None)
    return rule.stopped if rule else None


def dev_metrics(gold: Sequence[int], scores: np.ndarray, loss: float) -> dict[str, float]:
    """The figures of one evaluation during training, from label ids, per-label scores (logits or log-probs)
    and the dev loss: macro-F1 and accuracy as in the final evaluation, and the selection score: macro-F1
    less at most 1e-7 for the loss, which orders checkpoints of equal macro-F1 and no others (one dev row
    moves macro-F1 by far more)."""
    names = [str(i) for i in range(scores.shape[1])]
    found = classification_metrics(
        [str(int(g)) for g in gold], [str(int(p)) for p in np.asarray(scores).argmax(axis=1)], names, "dev"
    )
    return {
        "macro_f1": found["macro_f1"],
        "accuracy": found["accuracy"],
        SELECTION_METRIC: found["macro_f1"] - 1e-7 * loss / (1 + loss),
    }


def trainer_arguments(
    train: TrainSettings, output_dir: Path, bf16: bool, eval_batch_size: int
) -> dict[str, Any]:
    """TrainingArguments shared by both approaches: schedule, dynamic padding, checkpoints for resume, and
    evaluation on dev during training (`selection_arguments`)."""
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
        **selection_arguments(train),
        "per_device_eval_batch_size": eval_batch_size,
        "save_total_limit": 2,  # the last checkpoint (to resume from) and, with select_best, the best
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
            per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            steps = (
                f"steps {state.global_step + 1} to {state.max_steps}"
                if state.global_step
                else f"{state.max_steps} steps"
            )
            loader = kwargs.get("train_dataloader")
            rows = len(loader.dataset) if loader is not None and hasattr(loader.dataset, "__len__") else 0
            epochs = f"{state.max_steps * per_step / rows:.3g} epochs of {rows} rows, " if rows else ""
            self.logger.info("training %s (%s%d rows per step)", steps, epochs, per_step)
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
            scored = {k.removeprefix("eval_"): v for k, v in logs.items() if k.startswith("eval_")}
            shown = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in (scored or logs).items()
            )
            what = " dev" if scored else ""  # an evaluation during training, or a training log line
            self.logger.info("step %d/%d%s: %s", state.global_step, state.max_steps, what, shown)

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


def training_callbacks(train: TrainSettings) -> list[TrainerCallback]:
    """Callbacks attached to every training run: the Prefect log and progress, and early stopping."""
    return [_LogToPrefect(), *selection_callbacks(train)]


class _TrainingDisplay(TrainerCallback):
    """The one progress display of a training run (loraflow/console.py): step / total, the last logged
    loss, tokens per second and the time left; on the first process only, under DDP."""

    def __init__(self) -> None:
        self.display: ProgressDisplay | None = None
        self.started, self.first_tokens, self.loss = 0.0, 0, ""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.started, self.first_tokens = time.monotonic(), int(state.num_input_tokens_seen)
            self.display = ProgressDisplay("training", state.max_steps, "steps", completed=state.global_step)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if logs and "loss" in logs:
            self.loss = f"{logs['loss']:.4f}"

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.display is None:
            return
        seconds = max(time.monotonic() - self.started, 1e-9)
        rate = (int(state.num_input_tokens_seen) - self.first_tokens) / seconds
        loss = f"loss {self.loss} · " if self.loss else ""
        self.display.update(state.global_step, f"{loss}{rate:,.0f} tokens/s")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the display (also when training ends in an exception, which skips on_train_end)."""
        if self.display is not None:
            self.display.close()
            self.display = None


def _one_progress_display(trainer: Trainer) -> _TrainingDisplay:
    """transformers' tqdm bar and its printed copy of each log line make way for `_TrainingDisplay`: in a
    Prefect run the log lines go to its log (`_LogToPrefect`), which the console shows above the display."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    shown = next((c for c in trainer.callback_handler.callbacks if isinstance(c, _TrainingDisplay)), None)
    if shown is None:
        shown = _TrainingDisplay()
        trainer.add_callback(shown)
    return shown


def checkpoints_of(folder: Path) -> Path:
    """Where the Trainer writes the checkpoints of the training whose adapter goes to `folder`."""
    return folder.with_name(f"{folder.name}.checkpoints")


def torn_checkpoints_of(checkpoints: Path) -> Path:
    """Where torn checkpoints are set aside: next to `checkpoints`, where neither the Trainer's resume nor its
    rotation (both look for `checkpoint-*` inside it) sees them, and which a finished run does not delete."""
    return checkpoints.with_name(f"{checkpoints.name}.torn")


def checkpoint_step(folder: Path) -> int:
    """The step of a `checkpoint-<step>` folder."""
    return int(folder.name.rsplit("-", 1)[1])


def _checkpoint_folders(checkpoints: Path) -> list[Path]:
    """The Trainer's `checkpoint-<step>` folders in `checkpoints`, the newest first."""
    if not checkpoints.is_dir():
        return []
    found = [
        p
        for p in checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()
    ]
    return sorted(found, key=checkpoint_step, reverse=True)


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is not whole: its size must be 8 + its header's length + its data's end."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} is cut short ({size} bytes)"
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            return f"{path.name} is cut short ({size:,} bytes; its header alone says {8 + length:,})"
        try:
            header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return f"{path.name} has an unreadable header"
    if 8 + length + end != size:
        return f"{path.name} is cut short ({size:,} of {8 + length + end:,} bytes)"
    return None


def checkpoint_problems(folder: Path) -> list[str]:
    """Everything missing or cut short in a Trainer checkpoint folder; none when it is whole.

    The Trainer (transformers 5 `_save_checkpoint`) writes straight into `checkpoint-<step>`, not under a
    temporary name: the weights, optimizer.pt, scheduler.pt, the RNG state, and trainer_state.json last;
    a kill on the way leaves a folder that has the name of a finished one."""
    problems = []
    try:
        state = folder / TRAINER_STATE_NAME
        if not state.is_file():
            problems.append(f"there is no {TRAINER_STATE_NAME}")
        else:
            try:
                int(json.loads(state.read_text())["global_step"])
            except (ValueError, KeyError, TypeError):
                problems.append(f"{TRAINER_STATE_NAME} is cut short or unreadable")
        weights = sorted(folder.glob("*.safetensors"))
        if not weights:
            problems.append("there are no weights (*.safetensors)")
        problems += [
            f"there is no {name}"
            for name in (OPTIMIZER_NAME, SCHEDULER_NAME)
            if not (folder / name).is_file()
        ]
        problems += [problem for path in weights if (problem := _safetensors_problem(path))]
        problems += [  # torch.save writes zip files: the directory that ends one is written last
            f"{path.name} is cut short ({path.stat().st_size:,} bytes, not a complete zip file)"
            for path in sorted([*folder.glob("*.pt"), *folder.glob("*.pth")])
            if not zipfile.is_zipfile(path)
        ]
    except OSError as e:  # a file vanished or cannot be read
        problems.append(f"it cannot be read ({e})")
    return problems


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint in `checkpoints` with nothing missing or cut short, or None."""
    return next((c for c in _checkpoint_folders(checkpoints) if not checkpoint_problems(c)), None)


def set_aside_torn_checkpoints(checkpoints: Path) -> Path | None:
    """Move the checkpoints newer than the last complete one (torn by a kill while they were written) to
    `torn_checkpoints_of(checkpoints)`, with a warning in the run log for each; return the last complete one.

    Left in place, the Trainer would resume from a torn checkpoint (and fail on it, or load a half-written
    optimizer), and later write its new checkpoint of that step into the torn folder."""
    torn, resume = [], None
    for folder in _checkpoint_folders(checkpoints):
        problems = checkpoint_problems(folder)
        if not problems:
            resume = folder
            break
        torn.append((folder, problems))
    for folder, problems in torn:
        aside = torn_checkpoints_of(checkpoints)
        aside.mkdir(exist_ok=True)
        target, n = aside / folder.name, 1
        while target.exists():
            n += 1
            target = aside / f"{folder.name}.{n}"
        os.replace(folder, target)
        run_logger().warning(
            "%s in %s is torn, as a run stopped while the Trainer wrote it leaves it: %s. Moved it to %s "
            "(delete it when you no longer need it); %s",
            folder.name,
            checkpoints,
            "; ".join(problems),
            target,
            f"resuming from {resume.name}" if resume else "starting at step 0: no checkpoint is complete",
        )
    return resume


@dataclass
class TrainingProgress:
    """How far the training under way in this process got: the CLI says it when a run is interrupted."""

    checkpoints: Path
    step: int | None = None  # None: not known here (the training runs in DDP processes)
    max_steps: int | None = None

    def last_checkpoint(self) -> int | None:
        """The step of the last complete checkpoint: where the next run resumes; None before the first."""
        complete = last_complete_checkpoint(self.checkpoints)
        return checkpoint_step(complete) if complete else None


_under_way: TrainingProgress | None = None


def training_under_way() -> TrainingProgress | None:
    """The training this process was in the middle of when an exception ended it, if any."""
    return _under_way


@contextmanager
def recording_progress(checkpoints: Path) -> Iterator[TrainingProgress]:
    """Record the training of the body as under way (`training_under_way`) until it ends, except when an
    interruption (KeyboardInterrupt, a termination signal: not an Exception) ends it: the CLI reports that."""
    global _under_way
    _under_way = TrainingProgress(checkpoints)
    try:
        with _no_lost_stop_signals():
            yield _under_way
    except Exception:
        _under_way = None
        raise
    _under_way = None


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_stop_requested: list[tuple[int, Any]] = []  # (signal, the handler it was given to), while training


@contextmanager
def _no_lost_stop_signals() -> Iterator[None]:
    """Python runs a signal's handler between two bytecodes of the main thread, which may be inside a
    finalizer (`__del__`, a weakref callback, a generator closed by the garbage collector): the exception
    the handler raises there is printed as "Exception ignored" and the run goes on as if no Ctrl-C or
    SIGTERM had come. While training, each stop signal is noted before it goes to its handler (the CLI's or
    Prefect's); `_RecordProgress` hands a noted one to its handler again at the next step's end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def note_then_handle(signum: int, frame: Any) -> None:
        handler = previous[signal.Signals(signum)]
        _stop_requested.append((signum, handler))
        handler(signum, frame)

    for sig, handler in previous.items():
        if callable(handler):  # SIG_IGN and SIG_DFL stay as they are
            signal.signal(sig, note_then_handle)
    try:
        yield
    finally:
        _stop_requested.clear()
        for sig, handler in previous.items():
            if callable(handler):
                signal.signal(sig, handler)


def stop_if_a_signal_was_lost() -> None:
    """Raise the stop signal noted during training whose exception never reached the training loop."""
    if _stop_requested:
        signum, handler = _stop_requested.pop()
        _stop_requested.clear()
        handler(signum, None)


class _RecordProgress(TrainerCallback):
    """Keeps `training_under_way()` at the step the Trainer reached."""

    def __init__(self, progress: TrainingProgress) -> None:
        self.progress = progress

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.progress.step, self.progress.max_steps = state.global_step, state.max_steps

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.progress.step = state.global_step
        stop_if_a_signal_was_lost()
        stop_if_the_process_is_ending()


_stop_threads = threading.Event()


def stop_training_threads() -> None:
    """Ask every training thread of this process (a sweep's trials) to stop at its next step's end: a
    Ctrl-C or SIGTERM reached the main thread, which would otherwise wait for them to train to the end."""
    _stop_threads.set()


def stop_if_the_process_is_ending() -> None:
    """In a thread that trains (a sweep's trial): stop at this step's end when `stop_training_threads` was
    called or the main thread has ended, not after the last step. The checkpoints stay: the next run
    resumes from the last one."""
    if threading.current_thread() is threading.main_thread():
        return
    if _stop_threads.is_set() or not threading.main_thread().is_alive():
        raise KeyboardInterrupt("the process is stopping: training stops at this step")


def train_resuming(trainer: Trainer, checkpoints: Path) -> int:
    """`trainer.train`, resumed from the last complete checkpoint in `checkpoints` (torn ones newer than it
    are set aside first, by the first of several DDP processes); returns its step (0 = fresh)."""
    if trainer.is_world_process_zero():
        resume = set_aside_torn_checkpoints(checkpoints)
        if resume:
            run_logger().info("resuming from %s (step %d)", resume, checkpoint_step(resume))
    else:  # the others pass over the torn ones the first process moves
        resume = last_complete_checkpoint(checkpoints)
    display = _one_progress_display(trainer)
    if _under_way is not None and _under_way.checkpoints == checkpoints:
        trainer.add_callback(_RecordProgress(_under_way))
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except torch.OutOfMemoryError as e:
        raise ResourceError(out_of_memory_advice(trainer.args, str(e).splitlines()[0])) from e
    finally:
        display.close()
    return checkpoint_step(resume) if resume else 0


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
        "selection": selection_record(state, trainer.args.load_best_model_at_end, stopped_below(trainer)),
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
        (tmp / TRAIN_STATS).write_text(json.dumps(stats, indent=1))
        (tmp / "log_history.json").write_text(json.dumps(state.log_history, indent=1))
    shutil.rmtree(checkpoints, ignore_errors=True)  # finished: the adapter replaces the checkpoints


def selection_record(
    state: Any, select_best: bool, stopped_below: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The dev curve scored during training and which step was kept (train.json's `selection`); None when
    nothing was scored during training."""
    curve = [
        {
            "step": e["step"],
            "epoch": e.get("epoch"),
            "macro_f1": e["eval_macro_f1"],
            "accuracy": e.get("eval_accuracy"),
            "loss": e.get("eval_loss"),
        }
        for e in state.log_history
        if "eval_macro_f1" in e
    ]
    if not curve:
        return None
    best = state.best_global_step or max(curve, key=lambda point: point["macro_f1"])["step"]
    return {
        "metric": "dev macro-F1 (ties: the lower dev loss)",
        "kept": "best" if select_best else "last",
        "kept_step": best if select_best else state.global_step,
        "best_step": best,
        "best_macro_f1": max(point["macro_f1"] for point in curve),
        "stopped_early": state.global_step < state.max_steps,
        "stopped_below": stopped_below,
        "max_steps": int(state.max_steps),
        "curve": curve,
    }
