"""python -m loraflow.tasks.launch SPEC.json: one process of a multi-GPU (DDP) training run, by accelerate.

The training tasks call `train_in_processes` when `compute.processes` > 1: it writes the training function's
import path (`module:name`) and its job (a frozen `TrainJob`, as JSON) to SPEC.json next to the output
folder and runs `accelerate launch --multi_gpu --num_processes N -m loraflow.tasks.launch SPEC.json`; it
knows no approach. Every process
trains on its shard of each batch (the Trainer wraps the model in DistributedDataParallel); the first
process saves the adapter into the output folder, as a single-process run would, so the task that started
them finds a finished folder or fails.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field

from loraflow.config import LoraSettings, TrainSettings
from loraflow.processes import start_in_own_group, stop_group
from loraflow.tasks.lora import checkpoints_of, recording_progress
from loraflow.tasks.models import uses_bf16
from loraflow.tasks.store import Ref, exclusive, is_complete


def launch_command(processes: int, spec: Path, bf16: bool) -> list[str]:
    """The `accelerate launch` command that runs `processes` DDP processes of this module on one host."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_machines",
        "1",
        "--num_processes",
        str(processes),
        "--mixed_precision",
        "bf16" if bf16 else "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",  # a free port: two runs on one host don't collide
        "--module",
        "loraflow.tasks.launch",
        str(spec),
    ]


class TrainJob(BaseModel):
    """What one training run needs, as a frozen model that travels to DDP processes as JSON; each approach
    extends it with its own inputs and settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    folder: Path = Field(description="Where the finished adapter folder goes (the work store's train-<key>).")
    model: Ref = Field(description="The resolved base model.")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="model.quantization: the base is trained quantised (QLoRA)."
    )
    lora: LoraSettings
    train: TrainSettings
    dtype: str = Field(description="model.dtype of the config.")
    eval_batch_size: int = Field(16, description="eval.batch_size: rows per pass scoring dev in training.")


def _function(path: str) -> Callable[[Any], None]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _job_type(function: Callable[[Any], None]) -> type[TrainJob]:
    hints = get_type_hints(function)
    [parameter] = [name for name in hints if name != "return"]  # a training function takes one job
    return hints[parameter]


def write_spec(function: str, job: TrainJob, path: Path) -> Path:
    """The training function (`module:name`, taking one job) and its job as JSON."""
    expected = _job_type(_function(function))
    if type(job) is not expected:
        raise ValueError(f"{function} takes a {expected.__name__}, got a {type(job).__name__}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"function": function, "job": job.model_dump(mode="json")}, indent=1))
    return path


def read_spec(path: Path) -> tuple[str, TrainJob]:
    """(function, its job validated into the job type it takes) from a file written by `write_spec`."""
    spec = json.loads(path.read_text())
    return spec["function"], _job_type(_function(spec["function"])).model_validate(spec["job"])


def run_step(function: str, job: TrainJob) -> None:
    """Call the training function in this process."""
    _function(function)(job)


def train_once(function: str, job: TrainJob, processes: int) -> None:
    """Train into `job.folder` unless a finished result is there; one training per folder at a time on
    this host (a concurrent run of the same config waits, then reuses the result)."""
    with exclusive(job.folder):
        if is_complete(job.folder):
            return
        with recording_progress(checkpoints_of(job.folder)):
            if processes > 1:
                train_in_processes(function, job, processes, uses_bf16(job.dtype))
            else:
                run_step(function, job)


def train_in_processes(function: str, job: TrainJob, processes: int, bf16: bool) -> None:
    """Run the training function as `processes` DDP processes; raise unless they leave a finished folder.

    They run in a process group of their own: when this process is interrupted (Ctrl-C, SIGTERM) it stops
    the whole group (the launcher and every worker) before it goes on, and none outlives it."""
    folder = job.folder
    spec = write_spec(function, job, folder.with_name(f"{folder.name}.launch.json"))
    launcher = start_in_own_group(launch_command(processes, spec, bf16))
    try:
        code = launcher.wait()
    finally:
        stop_group(launcher, grace_seconds=10.0)  # nothing to stop once it has ended by itself
    if code != 0 or not is_complete(folder):
        raise RuntimeError(
            f"{processes}-process training exited with code {code} without finishing "
            f"{folder}; its output is in the worker's log. A re-run resumes from the last checkpoint."
        )
    spec.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        sys.exit("usage: python -m loraflow.tasks.launch SPEC.json (started by accelerate launch)")
    run_step(*read_spec(Path(args[0])))


if __name__ == "__main__":
    main()
