"""Paths in flow parameters: relative ones resolve once, against the flow's working directory, and a run
that could not write its outputs fails in seconds, before any model loads (tasks/paths.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from loraflow.cli import main
from loraflow.config import validate_config
from loraflow.errors import ConfigError
from loraflow.flows.generative import train_generative
from loraflow.flows.predict import predict
from loraflow.flows.retrain import retrain
from loraflow.loading import absolute_paths
from loraflow.tasks.paths import settle_paths
from loraflow.tasks.registry import read_history
from tests.conftest import write_config


def _deployment_parameters(config_path: Path) -> dict:
    """The config as a deployment carries it: the YAML's own (relative) paths, unresolved."""
    return yaml.safe_load(config_path.read_text())


@pytest.mark.unit
def test_relative_paths_resolve_against_the_base_and_absolute_ones_and_urls_stay() -> None:
    raw = {
        "name": "x",
        "data": {
            "train": "data/train.xlsx",
            "dev": "/abs/dev.xlsx",
            "label_column": "y",
            "text_columns": ["t"],
        },
        "approach": "classifier",
        "contract": {"extra_suite": "suites/x.json"},
        "compute": {"storage": "s3://bucket/prefix"},
        "output_dir": "runs",
        "registry": "../models",
    }
    config = absolute_paths(validate_config(raw), Path("/srv/project"))
    assert config.data.train == Path("/srv/project/data/train.xlsx")
    assert config.data.dev == Path("/abs/dev.xlsx")
    assert config.contract.extra_suite == Path("/srv/project/suites/x.json")
    assert config.output_dir == Path("/srv/project/runs") and config.registry == Path("/srv/models")
    assert config.compute.storage == "s3://bucket/prefix"
    local = absolute_paths(
        config.model_copy(update={"compute": config.compute.model_copy(update={"storage": "exchange"})}),
        Path("/srv/project"),
    )
    assert local.compute.storage == "/srv/project/exchange"


@pytest.mark.unit
def test_settle_paths_names_the_setting_that_cannot_be_written(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = _deployment_parameters(write_config(tmp_path / "task", tiny_model))
    monkeypatch.chdir(tmp_path / "task")
    settled = settle_paths.fn(validate_config(raw), registry=True)
    assert settled.output_dir == tmp_path / "task" / "runs" and settled.output_dir.is_dir()
    assert settled.data.train == tmp_path / "task" / "train.xlsx"
    assert not any(p.name.startswith(".loraflow-write-check") for p in settled.output_dir.iterdir())

    (tmp_path / "task" / "notes.txt").write_text("a file, not a folder")
    for setting in ("output_dir", "registry"):
        bad = validate_config(raw | {setting: "notes.txt/runs"})
        with pytest.raises(ConfigError, match=rf"^{setting}: cannot write to .*notes.txt/runs"):
            settle_paths.fn(bad, registry=True)
    remote = raw | {"compute": {"gpu_deployment": "fit/gpu", "storage": "nosuchprotocol://bucket/x"}}
    with pytest.raises(ConfigError, match=r"^compute.storage: cannot write to nosuchprotocol://bucket/x"):
        settle_paths.fn(validate_config(remote))


@pytest.mark.flow
def test_a_deployment_config_with_relative_paths_writes_under_the_working_directory(
    prefect_server: None, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prefect.yaml's configs say `output_dir: runs`: the run must complete and land in <cwd>/runs."""
    raw = _deployment_parameters(write_config(tmp_path / "task", tiny_model, name="relative-geo"))
    assert raw["output_dir"] == "runs" and raw["data"]["train"] == "train.xlsx"
    monkeypatch.chdir(tmp_path / "task")
    state = train_generative(validate_config(raw), return_state=True)
    assert state.is_completed(), state.message
    run_dir = Path(state.result())
    assert run_dir.is_absolute() and run_dir.parent == tmp_path / "task" / "runs" / "relative-geo"
    assert (run_dir / "metrics.json").is_file()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["output_dir"] == str(
        tmp_path / "task" / "runs"
    )
    with get_client(sync_client=True) as client:
        [link] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["relative-geo-run-folder"]))
        )
    assert link.data == f"[{run_dir}]({run_dir.as_uri()})"  # a link artifact holds markdown

    # predict's model, input and output, relative to the working directory as well
    relative_run = run_dir.relative_to(tmp_path / "task")
    written = predict(model=str(relative_run), input="dev.xlsx", output="labelled/dev.csv", sheet="data")
    assert Path(written) == tmp_path / "task" / "labelled" / "dev.csv" and Path(written).is_file()


@pytest.mark.flow
def test_a_failed_retrain_with_a_relative_registry_is_recorded_under_the_working_directory(
    prefect_server: None, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = _deployment_parameters(
        write_config(
            tmp_path / "task", tiny_model, name="relative-retrain", contract={"min_rows_per_class": 999}
        )
    )
    monkeypatch.chdir(tmp_path / "task")
    state = retrain(validate_config(raw), return_state=True)
    assert state.is_failed()
    history = tmp_path / "task" / "models" / "relative-retrain" / "history.jsonl"
    [record] = [json.loads(line) for line in history.read_text().splitlines()]
    assert record["decision"] == "failed" and "rows_per_class" in record["error"]
    settled = absolute_paths(validate_config(raw), tmp_path / "task")
    assert read_history(settled) == [record]


@pytest.mark.flow
def test_an_output_dir_that_cannot_be_written_fails_in_seconds_before_training(
    prefect_server: None, tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture
) -> None:
    path = write_config(tmp_path / "task", tiny_model, name="blocked")
    blocker = tmp_path / "task" / "notes.txt"
    blocker.write_text("a file where a folder would go")
    for command, setting in (("run", "output_dir"), ("retrain", "registry"), ("validate", "output_dir")):
        started = time.perf_counter()
        assert main([command, str(path), "--set", f"{setting}={blocker}/out"]) == 2
        seconds = time.perf_counter() - started
        captured = capsys.readouterr()
        print(f"loraflow {command} with an unwritable {setting}: exit 2 after {seconds:.1f} s")
        assert f"loraflow: error: {setting}: cannot write to {blocker}/out" in captured.err
        assert "Traceback" not in captured.err + captured.out
    # nothing was trained or even ingested: the work store was never created
    assert not (tmp_path / "task" / "runs" / "blocked").exists()
