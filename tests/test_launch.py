"""Several training processes on one host: the accelerate launch command, the spec it carries, and a real
two-process DDP run of the same entry point on CPU (torchrun with the gloo backend stands in for GPUs).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow.config import ClassifierSettings, LoraSettings, TrainSettings
from loraflow.loading import load_config
from loraflow.tasks.classifier.train import ClassifierTrainJob
from loraflow.tasks.generative.prepare import prepare_inputs
from loraflow.tasks.generative.train import GenerativeTrainJob
from loraflow.tasks.ingest import ingest_table
from loraflow.tasks.launch import launch_command, read_spec, write_spec
from loraflow.tasks.store import Ref, is_complete
from tests.conftest import write_config

REPO = Path(__file__).resolve().parent.parent
TRAIN = TrainSettings(max_steps=3, batch_size=4, lr=0.01, save_steps=2, logging_steps=1, max_length=128)


GENERATIVE = "loraflow.tasks.generative.train:train_into"  # what train_adapter launches


def test_the_launch_command_starts_one_ddp_process_per_gpu_through_accelerate(tmp_path: Path) -> None:
    spec = tmp_path / "train-abc.launch.json"
    command = launch_command(4, spec, bf16=True)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    flags = dict(zip(command[3::2], command[4::2], strict=False))
    assert "--multi_gpu" in command and command[-3:] == ["--module", "loraflow.tasks.launch", str(spec)]
    assert command[command.index("--num_processes") + 1] == "4"
    assert command[command.index("--num_machines") + 1] == "1"
    assert command[command.index("--mixed_precision") + 1] == "bf16"
    assert command[command.index("--main_process_port") + 1] == "0"  # a free port per run
    assert launch_command(2, spec, bf16=False)[command.index("--mixed_precision") + 1] == "no"
    assert flags  # the command alternates flags and values after the module

    # accelerate's own parser accepts it (a typo in a flag name would fail here, not on the GPU host)
    from accelerate.commands.launch import launch_command_parser

    parsed = launch_command_parser().parse_args(command[3:])
    assert parsed.multi_gpu and parsed.num_processes == 4 and parsed.module
    assert parsed.training_script == "loraflow.tasks.launch" and parsed.training_script_args == [str(spec)]


def test_the_spec_rebuilds_the_arguments_exactly(tmp_path: Path) -> None:
    arguments = {
        "folder": tmp_path / "train-abc",
        "prompts": Ref(path="/store/prompts-1", digest="1"),
        "model": Ref(path="/models/tiny", digest="2"),
        "lora": LoraSettings(r=4, target_modules=["q_proj"]),
        "train": TRAIN,
        "dtype": "float32",
    }
    job = GenerativeTrainJob(**arguments)
    path = write_spec(GENERATIVE, job, tmp_path / "spec.json")
    assert read_spec(path) == (GENERATIVE, job)
    with pytest.raises(ValueError, match="classifier"):  # the job model takes exactly its fields
        GenerativeTrainJob(**arguments, classifier=None)
    encoded = {k: v for k, v in arguments.items() if k != "prompts"} | {"encoded": arguments["prompts"]}
    other = ClassifierTrainJob(**encoded, classifier=ClassifierSettings())
    with pytest.raises(ValueError, match="train_into takes a GenerativeTrainJob"):
        write_spec(GENERATIVE, other, tmp_path / "bad.json")


@pytest.mark.flow
def test_two_ddp_processes_train_one_adapter_and_only_the_first_saves(
    tmp_path: Path, tiny_model: Path
) -> None:
    config = load_config(write_config(tmp_path / "task", tiny_model))
    store = str(tmp_path / "store")
    splits = ingest_table.fn(config.data, config.input_columns, store)
    prompts = prepare_inputs.fn(splits, config.prompt, config.data.answers, store)
    folder = tmp_path / "store" / "train-ddp"
    job = GenerativeTrainJob(
        folder=folder,
        prompts=prompts,
        model=Ref(path=str(tiny_model), digest="tiny"),
        lora=LoraSettings(r=4),
        train=TRAIN,
        dtype="float32",
    )
    spec = write_spec(GENERATIVE, job, tmp_path / "spec.json")
    # The module accelerate runs, under torchrun: the same DDP environment (RANK, WORLD_SIZE) on CPU.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}  # DDP over gloo
    result = subprocess.run(
        [*torchrun, "-m", "loraflow.tasks.launch", str(spec)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert is_complete(folder)
    stats = json.loads((folder / "train.json").read_text())
    assert stats["steps"] == 3
    # Data parallel, not two copies: 3 steps × 4 rows × 2 processes cover half of the 48 train rows.
    log = json.loads((folder / "log_history.json").read_text())
    assert log[-1]["epoch"] == pytest.approx(0.5) and any("loss" in entry for entry in log)
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    assert not folder.with_name(f"{folder.name}.checkpoints").exists()
