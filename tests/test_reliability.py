"""Faults and secrets: kill and resume, interrupted writes, concurrent runs, retries, out-of-memory advice,
unsafe model files, and the HF token nowhere in what a run leaves behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from transformers import LlamaForCausalLM, Trainer

import loraflow.tasks.ingest
import loraflow.tasks.report
from loraflow.config import ModelSettings
from loraflow.errors import DataError, ModelError, ResourceError
from loraflow.flows.generative import train_generative
from loraflow.flows.validate import validate_data
from loraflow.loading import load_config
from loraflow.tasks.generative.prepare import prepare_inputs
from loraflow.tasks.generative.train import train_adapter
from loraflow.tasks.ingest import ingest_table
from loraflow.tasks.models import load_causal_lm, resolve_model
from loraflow.tasks.store import Ref, building, is_complete
from tests.conftest import write_config

pytestmark = pytest.mark.flow
REPO = Path(__file__).resolve().parent.parent
FAKE_TOKEN = "hf_loraflowTestTokenDoNotLeak0123456789"


def _cli_env(home: Path) -> dict[str, str]:
    """The environment of a user's `loraflow` process: its own Prefect home and temporary server."""
    env = {**os.environ, "PREFECT_HOME": str(home), "HF_TOKEN": FAKE_TOKEN, "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("PREFECT_API_URL", None)  # not the test harness's server
    return env


def _start_run(config: Path, home: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "loraflow.cli", "run", str(config)],
        cwd=REPO,
        env=_cli_env(home),
        stdout=open(log, "w"),  # noqa: SIM115 (the child owns it)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_a_killed_training_run_resumes_from_its_checkpoint(tmp_path: Path, tiny_model: Path) -> None:
    train = {"max_steps": 300, "save_steps": 10, "logging_steps": 50, "batch_size": 8, "select_best": False}
    config = write_config(tmp_path / "task", tiny_model, train=train, eval={"baseline": False})
    work = tmp_path / "task" / "runs" / "tiny-geo" / "work"
    first = _start_run(config, tmp_path / "home", tmp_path / "first.log")
    deadline = time.monotonic() + 300
    while not list(work.glob("train-*.checkpoints/checkpoint-*/trainer_state.json")):
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the whole process: no handler, no cleanup
    first.wait()
    assert not list((tmp_path / "task" / "runs" / "tiny-geo").glob("2*"))  # nothing looks finished
    [checkpoints] = work.glob("train-*.checkpoints")
    saved = max(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    assert 0 < saved < 300

    second = _start_run(config, tmp_path / "home", tmp_path / "second.log")
    assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    [adapter] = [p for p in work.glob("train-*") if p.is_dir() and is_complete(p)]
    stats = json.loads((adapter / "train.json").read_text())
    assert stats["resumed_from_step"] >= saved and stats["steps"] == 300  # continued, not restarted
    history = json.loads((adapter / "log_history.json").read_text())
    assert min(e["step"] for e in history if "loss" in e) > stats["resumed_from_step"]
    assert not checkpoints.exists()  # the finished adapter replaced them


def test_two_runs_of_one_config_at_once_finish_in_separate_folders_and_leak_no_token(
    tmp_path: Path, tiny_model: Path
) -> None:
    config = write_config(tmp_path / "task", tiny_model, train={"max_steps": 6})
    runs = [_start_run(config, tmp_path / f"home-{i}", tmp_path / f"run-{i}.log") for i in range(2)]
    for i, run in enumerate(runs):
        assert run.wait(timeout=600) == 0, (tmp_path / f"run-{i}.log").read_text()[-3000:]
    folders = sorted((tmp_path / "task" / "runs" / "tiny-geo").glob("2*"))
    assert len(folders) == 2 and all(is_complete(f) and (f / "metrics.json").is_file() for f in folders)
    assert [json.loads((f / "metrics.json").read_text())["train"]["steps"] for f in folders] == [6, 6]

    # The token was in both processes' environment: it is in no log, artifact, parameter, result,
    # database row, run folder or work-store file.
    hits = [
        str(path)
        for path in tmp_path.rglob("*")
        if path.is_file() and FAKE_TOKEN.encode() in path.read_bytes()
    ]
    assert not hits, hits
    assert (tmp_path / "home-0" / "prefect.db").is_file()  # the database was among the files searched


def test_a_crash_while_writing_leaves_nothing_that_looks_finished(
    prefect_server: None, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"), building(final) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 100)
        raise OSError("disk full")
    assert not final.exists() and not list(tmp_path.glob(".out.partial-*"))

    def crash(*_args: object, **_kwargs: object) -> str:
        raise OSError("killed while writing report.md")

    monkeypatch.setattr(loraflow.tasks.report, "render_report", crash)
    config = load_config(write_config(tmp_path / "task", tiny_model, train={"max_steps": 2}))
    state = train_generative(config, return_state=True)
    assert state.is_failed()
    parent = tmp_path / "task" / "runs" / "tiny-geo"
    assert not list(parent.glob("2*")) and not list(parent.glob(".run-*"))
    work = parent / "work"
    for folder in [p for p in work.iterdir() if p.is_dir() and not p.name.endswith(".checkpoints")]:
        assert is_complete(folder), f"{folder} has no manifest but was left behind"


def test_transient_faults_are_retried_and_user_errors_are_not(
    prefect_server: None, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(write_config(tmp_path / "task", tiny_model))
    real, calls = loraflow.tasks.ingest.read_table, []

    def flaky(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("network file system hiccup")
        return real(*args, **kwargs)

    monkeypatch.setattr(loraflow.tasks.ingest, "read_table", flaky)
    state = validate_data(config, return_state=True)
    assert state.is_completed() and len(calls) == 3  # failed once, retried: train + dev read
    with get_client(sync_client=True) as client:
        [ingest] = [
            r
            for r in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
            if r.name.startswith("ingest")
        ]
    assert ingest.run_count == 2

    calls.clear()

    def mistaken(*_args: object, **_kwargs: object) -> None:
        calls.append(1)
        raise DataError("train.xlsx: a user's mistake")

    monkeypatch.setattr(loraflow.tasks.ingest, "read_table", mistaken)
    fresh = load_config(write_config(tmp_path / "other", tiny_model))
    assert validate_data(fresh, return_state=True).is_failed() and len(calls) == 1  # not retried


def test_out_of_gpu_memory_says_what_to_change(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(
        write_config(tmp_path / "task", tiny_model, train={"batch_size": 8, "grad_accum": 2})
    )
    store = str(tmp_path / "store")
    splits = ingest_table.fn(config.data, config.input_columns, store)
    prompts = prepare_inputs.fn(splits, config.prompt, config.data.answers, store)

    def out_of_memory(*_args: object, **_kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "training_step", out_of_memory)
    with pytest.raises(ResourceError) as error:
        train_adapter.fn(
            prompts, Ref(path=str(tiny_model), digest="tiny"), config.lora, config.train, "float32", store
        )
    message = str(error.value)
    assert "out of GPU memory while training (CUDA out of memory. Tried to allocate 2.00 GiB)" in message
    assert "train.batch_size: 4 and train.grad_accum: 4" in message
    assert "train.gradient_checkpointing: true" in message and "train.max_length" in message


def test_models_load_from_safetensors_only_and_never_run_shipped_code(
    tmp_path: Path, tiny_model: Path
) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    torch.save(LlamaForCausalLM.from_pretrained(tiny_model).state_dict(), pickled / "pytorch_model.bin")
    assert (pickled / "pytorch_model.bin").is_file()
    cache = str(tmp_path / "cache")
    with pytest.raises(
        ModelError, match=r"pickle-based weights only \(pytorch_model\.bin\).*allow_pickle_weights"
    ):
        resolve_model.fn(ModelSettings(name=str(pickled)), cache)
    converted = resolve_model.fn(ModelSettings(name=str(pickled), allow_pickle_weights=True), cache)
    assert (Path(converted.path) / "model.safetensors").is_file()
    reloaded = LlamaForCausalLM.from_pretrained(converted.path, use_safetensors=True)
    original = LlamaForCausalLM.from_pretrained(tiny_model).state_dict()
    assert all(torch.equal(value, original[name]) for name, value in reloaded.state_dict().items())

    custom = tmp_path / "custom"
    shutil.copytree(tiny_model, custom)
    settings = json.loads((custom / "config.json").read_text())
    (custom / "modeling_shipped.py").write_text(SHIPPED_CODE % str(tmp_path / "shipped-code-ran"))
    settings["auto_map"] = {"AutoModelForCausalLM": "modeling_shipped.ShippedForCausalLM"}
    (custom / "config.json").write_text(json.dumps(settings))
    with pytest.raises(ModelError, match=r"needs custom code.*model\.trust_remote_code: true"):
        resolve_model.fn(ModelSettings(name=str(custom)), cache)
    assert not (tmp_path / "shipped-code-ran").exists()

    trusted = resolve_model.fn(ModelSettings(name=str(custom), trust_remote_code=True), cache)
    model = load_causal_lm(trusted.path, "float32")  # opted in: the shipped class is the one loaded
    assert type(model).__name__ == "ShippedForCausalLM" and (tmp_path / "shipped-code-ran").exists()
    assert not (custom / ".loraflow-trusts-remote-code").exists()  # the user's folder is left as it was


SHIPPED_CODE = """
from pathlib import Path
from transformers import LlamaForCausalLM

class ShippedForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        Path(%r).touch()  # proof that this file's code ran
"""
