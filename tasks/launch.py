"""python -m tasks.launch SPEC.json: one process of a multi-GPU (DDP) training run, started by accelerate.

The training tasks call `train_in_processes` when `compute.processes` > 1: it writes the step's arguments
to SPEC.json next to the output folder and runs `accelerate launch --multi_gpu --num_processes N -m
tasks.launch SPEC.json`. Every process trains on its shard of each batch (the Trainer wraps the model in
DistributedDataParallel); the first process saves the adapter into the output folder, as a single-process
run would, so the task that started them finds a finished folder or fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from loraflow.config import ClassifierSettings, LoraSettings, TrainSettings
from tasks.models import uses_bf16
from tasks.store import Ref, exclusive, is_complete

# The arguments of each step's training function, and how to rebuild them from JSON.
STEPS: dict[str, dict[str, Any]] = {
    "generative": {
        "folder": Path,
        "prompts": Ref.model_validate,
        "model": Ref.model_validate,
        "lora": LoraSettings.model_validate,
        "train": TrainSettings.model_validate,
        "dtype": str,
    },
    "classifier": {
        "folder": Path,
        "encoded": Ref.model_validate,
        "model": Ref.model_validate,
        "lora": LoraSettings.model_validate,
        "train": TrainSettings.model_validate,
        "classifier": ClassifierSettings.model_validate,
        "dtype": str,
    },
}


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
        "tasks.launch",
        str(spec),
    ]


def write_spec(step: str, arguments: dict[str, Any], path: Path) -> Path:
    """The step's arguments as JSON (settings and refs dumped, paths as text)."""
    if set(arguments) != set(STEPS[step]):
        raise ValueError(f"{step} training takes {sorted(STEPS[step])}, got {sorted(arguments)}")
    plain = {
        k: v.model_dump(mode="json") if isinstance(v, BaseModel) else str(v) if isinstance(v, Path) else v
        for k, v in arguments.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"step": step, "arguments": plain}, indent=1))
    return path


def read_spec(path: Path) -> tuple[str, dict[str, Any]]:
    """(step, arguments rebuilt into their types) from a spec written by `write_spec`."""
    spec = json.loads(path.read_text())
    build = STEPS[spec["step"]]
    return spec["step"], {k: build[k](v) for k, v in spec["arguments"].items()}


def run_step(step: str, arguments: dict[str, Any]) -> None:
    """Call the step's training function in this process."""
    if step == "classifier":
        from tasks.classify import train_classifier_into

        train_classifier_into(**arguments)
    else:
        from tasks.train import train_generative_adapter

        train_generative_adapter(**arguments)


def train_once(step: str, arguments: dict[str, Any], processes: int, dtype: str) -> None:
    """Train into `arguments["folder"]` unless a finished result is there; one training per folder at a
    time on this host (a concurrent run of the same config waits, then reuses the result)."""
    folder = Path(arguments["folder"])
    with exclusive(folder):
        if is_complete(folder):
            return
        if processes > 1:
            train_in_processes(step, arguments | {"dtype": dtype}, processes, uses_bf16(dtype))
        else:
            run_step(step, arguments | {"dtype": dtype})


def train_in_processes(step: str, arguments: dict[str, Any], processes: int, bf16: bool) -> None:
    """Run the step's training as `processes` DDP processes; raise unless they leave a finished folder."""
    folder = Path(arguments["folder"])
    spec = write_spec(step, arguments, folder.with_name(f"{folder.name}.launch.json"))
    result = subprocess.run(launch_command(processes, spec, bf16))
    if result.returncode != 0 or not is_complete(folder):
        raise RuntimeError(
            f"{processes}-process training exited with code {result.returncode} without finishing "
            f"{folder}; its output is in the worker's log. A re-run resumes from the last checkpoint."
        )
    spec.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        sys.exit(
            "usage: python -m tasks.launch SPEC.json (started by accelerate launch; see tasks/launch.py)"
        )
    run_step(*read_spec(Path(args[0])))


if __name__ == "__main__":
    main()
