"""The retrain flow and the model registry: promote on new data only, never replace with a worse model."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

import loraflow.flows.retrain
from loraflow.cli import main
from loraflow.flows.retrain import retrain
from loraflow.loading import load_config
from loraflow.tasks.registry import read_history
from tests.conftest import write_config
from tests.tiny import geo_rows

pytestmark = pytest.mark.flow


def _append_rows(path: Path, n: int, seed: int) -> None:
    frame = pd.concat(
        [pd.read_excel(path, sheet_name="data", engine="openpyxl"), geo_rows(n, seed=seed)], ignore_index=True
    )
    frame.to_excel(path, index=False, sheet_name="data", engine="openpyxl")


def test_retrain_promotes_skips_unchanged_data_and_keeps_a_better_champion(
    prefect_server: None, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path / "task", tiny_model)
    home = tmp_path / "task" / "models" / "tiny-geo"

    state = retrain(load_config(path), return_state=True)
    first = state.result()
    assert first["decision"] == "promoted" and "champion" not in first
    with get_client(sync_client=True) as client:  # the training run it started says what it is
        [challenger] = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    assert challenger.name == "tiny-geo-challenger-1"
    production = home / "production"
    assert production.is_symlink() and (production / "model.safetensors").is_file()
    assert (production / "MANIFEST.json").is_file()
    first_version = production.resolve()

    second = retrain(load_config(path))
    assert second["decision"] == "no new data" and production.resolve() == first_version
    assert len(read_history(load_config(path))) == 1  # nothing trained, nothing recorded

    _append_rows(tmp_path / "task" / "train.xlsx", 8, seed=5)  # new data: a challenger trains
    third = retrain(load_config(path))
    assert third["champion"]["score"] == "evaluated on the current dev split"
    assert third["promoted"] == (third["challenger"]["macro_f1"] >= third["champion"]["macro_f1"])
    history = read_history(load_config(path))
    assert [r["decision"] for r in history][0] == "promoted" and len(history) == 2
    assert history[1]["data"] != history[0]["data"]
    assert set(history[1]) >= {"at", "finished", "data", "config", "challenger", "champion", "decision"}
    champion_now = production.resolve()

    # A challenger worse than the champion never replaces it.
    monkeypatch.setattr(loraflow.flows.retrain, "champion_score", lambda *args: (1.01, "patched"))
    _append_rows(tmp_path / "task" / "train.xlsx", 8, seed=6)
    fourth = retrain(load_config(path))
    assert fourth["decision"] == "kept champion" and production.resolve() == champion_now

    # A failed run (here: the new data breaks the contract) is recorded and changes nothing.
    frame = pd.read_excel(tmp_path / "task" / "train.xlsx", sheet_name="data", engine="openpyxl")
    frame.loc[0, "requirement"] = "   "
    frame.to_excel(tmp_path / "task" / "train.xlsx", index=False, sheet_name="data", engine="openpyxl")
    assert main(["retrain", str(path)]) == 2
    last = read_history(load_config(path))[-1]
    assert last["decision"] == "failed" and "DataError" in last["error"]
    assert production.resolve() == champion_now
    lines = (home / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["decision"] for line in lines][-2:] == ["kept champion", "failed"]
