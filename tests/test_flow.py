"""The train-generative flow end to end under Prefect's test harness: run folder, caching, CLI."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from uuid import UUID

import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

from loraflow.cli import main
from loraflow.errors import DataError
from loraflow.flows.generative import train_generative
from loraflow.loading import load_config
from tests.conftest import write_config

pytestmark = pytest.mark.flow


def _task_states(flow_run_id: UUID) -> dict[str, list[str]]:
    """Task run name → state names of one flow run."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states: dict[str, list[str]] = {}
    for run in runs:
        states.setdefault(run.name, []).append(run.state.name)
    return states


def _run(config_path: Path, **overrides: str) -> tuple[str, dict[str, list[str]]]:
    config = load_config(config_path, [f"{k}={v}" for k, v in overrides.items()])
    state = train_generative(config, return_state=True)
    return state.result(), _task_states(state.state_details.flow_run_id)


def test_flow_writes_a_complete_run_folder_and_reruns_from_cache(
    prefect_server: None, tmp_path: Path, tiny_model: Path
) -> None:
    path = write_config(tmp_path / "task", tiny_model)
    run_dir, first = _run(path)
    # Each task run's name says what it works on: the config, the evaluated model, the base model.
    assert set(first) == {
        "settle-paths-tiny-geo",
        "ingest-tiny-geo",
        "check-contract-tiny-geo",
        "review-tiny-geo",
        "format-prompts-tiny-geo",
        "evaluate-classical",
        f"resolve-model-{tiny_model.name}",
        "train-adapter-tiny-geo",
        "merge-adapter-tiny-geo",
        "evaluate-zero-shot",
        "evaluate-finetuned",
        "write-run-folder-tiny-geo",
    }, first
    # Model resolution is shared by every config on the machine: an earlier test may have cached it.
    fresh = {name: states for name, states in first.items() if not name.startswith("resolve-model")}
    assert all(states == ["Completed"] for states in fresh.values()), first
    run = Path(run_dir)
    assert run.parent == tmp_path / "task" / "runs" / "tiny-geo"
    for name in (
        "config.yaml",
        "data/train.parquet",
        "data/dev.parquet",
        "contract.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "merged/config.json",
        "merged/model.safetensors",
        "merged/tokenizer.json",
        "merged/loraflow.json",
        "metrics.json",
        "predictions.parquet",
        "report.md",
        "MANIFEST.json",
    ):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) >= {
        "config",
        "approach",
        "model",
        "n_train",
        "n_dev",
        "labels",
        "baseline",
        "finetuned",
        "train",
        "eval",
    }
    assert metrics["approach"] == "generative" and metrics["labels"] == ["0", "1"]
    assert (metrics["n_train"], metrics["n_dev"]) == (48, 16)
    assert metrics["baseline"]["kind"] == "zero-shot" and metrics["finetuned"]["kind"] == "finetuned"
    assert sum(map(sum, metrics["finetuned"]["confusion"])) == 16
    assert set(metrics["train"]) >= {"seconds", "steps", "tokens_per_second", "final_loss", "peak_rss_mb"}
    assert metrics["train"]["steps"] == 4
    predictions = pd.read_parquet(run / "predictions.parquet")
    assert {"requirement", "sample_data", "gold", "predicted", "prob_0", "prob_1"} <= set(predictions.columns)
    assert (predictions[["prob_0", "prob_1"]].sum(axis=1) - 1).abs().max() < 1e-6

    second_dir, second = _run(path)
    assert second_dir != run_dir
    # every step is a cache hit but the run folder and the path check (it runs each time, on purpose)
    cached = {
        name: states
        for name, states in second.items()
        if name not in ("write-run-folder-tiny-geo", "settle-paths-tiny-geo")
    }
    assert second["settle-paths-tiny-geo"] == ["Completed"]
    assert cached and all(set(states) == {"Cached"} for states in cached.values()), second
    assert json.loads((Path(second_dir) / "metrics.json").read_text())["finetuned"] == metrics["finetuned"]

    shutil.rmtree(tmp_path / "task" / "runs" / "tiny-geo" / "work")  # cache records now point at nothing
    third_dir, third = _run(path)
    assert (
        third["train-adapter-tiny-geo"] == ["Completed"]
        and (Path(third_dir) / "merged" / "model.safetensors").is_file()
    )


def test_changing_the_template_reruns_only_what_depends_on_it(
    prefect_server: None, tmp_path: Path, tiny_model: Path
) -> None:
    path = write_config(tmp_path / "task", tiny_model)
    _run(path)
    _, states = _run(path, **{"prompt.template": "'Place list: {sample_data} / need: {requirement}'"})
    assert states["ingest-tiny-geo"] == ["Cached"] and states["check-contract-tiny-geo"] == ["Cached"]
    assert states[f"resolve-model-{tiny_model.name}"] == ["Cached"]
    for name in ("format-prompts", "train-adapter", "merge-adapter"):
        assert states[f"{name}-tiny-geo"] == ["Completed"], (name, states)
    assert states["evaluate-zero-shot"] == states["evaluate-finetuned"] == ["Completed"]


def test_a_failed_contract_stops_the_flow_before_any_model_loads(
    prefect_server: None, tmp_path: Path, tiny_model: Path
) -> None:
    # Training is meant for a GPU deployment: a bad contract must not even publish the data for it.
    path = write_config(
        tmp_path / "task",
        tiny_model,
        contract={"min_rows_per_class": 1000},
        compute={"gpu_deployment": "fit/gpu"},
    )
    config = load_config(path)
    state = train_generative(config, return_state=True)
    assert state.is_failed()
    with pytest.raises(DataError, match="rows_per_class_at_least"):
        state.result()
    states = _task_states(state.state_details.flow_run_id)
    assert states["check-contract-tiny-geo"] == ["Failed"]
    assert not [name for name in states if name.startswith(("resolve-model", "train-adapter"))]
    assert not (tmp_path / "task" / "runs" / "tiny-geo" / "exchange").exists()
    assert not (tmp_path / "task" / "runs" / "tiny-geo").exists() or not any(
        p.name[0].isdigit() for p in (tmp_path / "task" / "runs" / "tiny-geo").iterdir()
    )


def test_cli_prints_metrics_and_user_errors_exit_non_zero_without_traceback(
    prefect_server: None, tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture
) -> None:
    path = write_config(tmp_path / "task", tiny_model)
    # 2 steps with logging every 5: no step loss is logged, the report still has a final loss
    assert main(["run", str(path), "--set", "train.max_steps=2", "--set", "train.logging_steps=5"]) == 0
    out = capsys.readouterr().out
    assert "| zero-shot tiny-llama0 |" in out and "| fine-tuned tiny-llama0 (LoRA r=4) |" in out
    assert "| classical (TF-IDF + logistic regression) |" in out and "run folder:" in out

    assert main(["run", str(path), "--set", "data.label_column=scor"]) == 2
    captured = capsys.readouterr()
    assert "column(s) 'scor' (did you mean 'score'?) not found" in captured.err
    assert "Traceback" not in captured.err + captured.out

    assert main(["validate", str(path), "--set", "lora.rank=4"]) == 2
    assert "lora.rank: unknown key (did you mean 'r'?)" in capsys.readouterr().err


def test_each_training_log_line_is_written_once(
    prefect_server: None,
    tmp_path: Path,
    tiny_model: Path,
    capfd: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The run log has the step lines; transformers' own printer does not repeat them on the terminal."""
    caplog.set_level(logging.INFO, logger="prefect.task_runs")  # the test harness runs at WARNING
    path = write_config(tmp_path / "task", tiny_model)
    config = load_config(path, ["train.max_steps=2", "train.logging_steps=1", "eval.baseline=false"])
    state = train_generative(config, return_state=True)
    assert state.is_completed()
    printed = capfd.readouterr()
    assert "{'loss'" not in printed.out + printed.err
    deadline = time.monotonic() + 30  # run logs reach the API in batches
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
            )
            steps = [log.message for log in logs if log.message.startswith("step 1/2: ")]
            if steps or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert len(steps) == 1 and "loss=" in steps[0], [log.message for log in logs]
