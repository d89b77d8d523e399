"""Sweeps: the samplers' plans from a seed, the config checks, the median rule, and the sweep flow on a tiny
model: data steps once, a failing trial recorded while the others go on, the leaderboard artifact read back
from Prefect, a killed sweep continued, and the best trial registered. Two trials at a time, each training
on the worker: tests/test_server.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterName,
    TaskRunFilter,
    TaskRunFilterName,
)
from prefect.client.schemas.sorting import ArtifactSort

import loraflow.flows.retrain
from loraflow.cli import main
from loraflow.config import SweepSettings
from loraflow.errors import ConfigError
from loraflow.flows.sweep import sweep
from loraflow.loading import load_config
from loraflow.tasks.registry import read_history
from loraflow.tasks.sweep import (
    FINISHED,
    SWEEP_FILE,
    GridSampler,
    RandomSampler,
    TPESampler,
    check_trials,
    median_floors,
    sweep_folder,
)
from tests.conftest import write_config

pytestmark = pytest.mark.flow


def _plan(sampler: object, n: int = 50) -> list[dict]:
    trials: list[dict] = []
    while len(trials) < n and (params := sampler.next(trials)) is not None:  # type: ignore[attr-defined]
        trials.append({"number": len(trials) + 1, "params": params, "state": FINISHED, "macro_f1": 0.5})
    return [t["params"] for t in trials]


def test_the_samplers_plan_the_same_trials_from_a_seed() -> None:
    grid = SweepSettings(space={"lora.r": [8, 16, 32], "train.lr": [1e-4, 1e-3]})
    assert _plan(GridSampler(grid)) == [
        {"lora.r": r, "train.lr": lr} for r in (8, 16, 32) for lr in (1e-4, 1e-3)
    ]  # every combination, in the order the space lists them
    some = grid.model_copy(update={"trials": 3, "seed": 7})
    assert _plan(GridSampler(some)) == _plan(GridSampler(some)) and len(_plan(GridSampler(some))) == 3
    assert _plan(GridSampler(some)) != _plan(GridSampler(some.model_copy(update={"seed": 8})))

    space = {
        "lora.r": [4, 8],
        "train.lr": {"log_uniform": [1e-4, 2e-3]},
        "train.epochs": {"int_uniform": [1, 3]},
    }
    drawn = SweepSettings(space=space, sampler="random", trials=6, seed=3)
    plan = _plan(RandomSampler(drawn))
    assert plan == _plan(RandomSampler(drawn)) and len(plan) == 6
    assert all(
        p["lora.r"] in (4, 8) and 1e-4 <= p["train.lr"] <= 2e-3 and p["train.epochs"] in (1, 2, 3)
        for p in plan
    )
    assert len({json.dumps(p, sort_keys=True) for p in plan}) == 6  # no trial twice
    assert (
        _plan(RandomSampler(drawn.model_copy(update={"trials": 8})))[:6] == plan
    )  # a bigger budget extends it
    lists = SweepSettings(space={"lora.r": [4, 8]}, sampler="random", trials=5)
    assert sorted(p["lora.r"] for p in _plan(RandomSampler(lists))) == [4, 8]  # two combinations, then done

    tpe = SweepSettings(
        space={"lora.r": [4, 8, 16], "train.lr": {"log_uniform": [1e-4, 2e-3]}}, sampler="tpe", trials=4
    )
    first = _plan(TPESampler(tpe), 4)
    assert first == _plan(TPESampler(tpe), 4) and all(1e-4 <= p["train.lr"] <= 2e-3 for p in first)
    # A sweep continued: the finished trials are told to a new study before it asks for the next one.
    sampler = TPESampler(tpe)
    done = [
        {"number": i + 1, "params": p, "state": FINISHED, "macro_f1": 0.1 * i}
        for i, p in enumerate(first[:3])
    ]
    assert sampler.next(done) is not None and len(sampler.study.trials) == 4


def _config(tmp_path: Path, tiny_model: Path, sweep_section: dict, **sections: dict) -> Path:
    return write_config(
        tmp_path / "task", tiny_model, sweep=sweep_section, eval={"baseline": False}, **sections
    )


def test_a_sweep_is_checked_whole_before_anything_trains(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_path = _config(tmp_path, tiny_model, {"space": {"lora.rank": [4, 8], "output_dir": ["x"]}})
    with pytest.raises(ConfigError) as caught:
        load_config(bad_path)
    assert "sweep.space: lora.rank: no setting 'rank' in lora (did you mean 'r'?)" in str(caught.value)
    assert "output_dir: a sweep varies training" in str(caught.value)

    ranged_grid = _config(tmp_path, tiny_model, {"space": {"train.lr": {"log_uniform": [1e-4, 1e-3]}}})
    with pytest.raises(ConfigError, match="a grid needs lists of values"):
        load_config(ranged_grid)
    no_budget = _config(tmp_path, tiny_model, {"space": {"lora.r": [4]}, "sampler": "random"})
    with pytest.raises(ConfigError, match=r"sweep\.trials: the random sampler needs a budget"):
        load_config(no_budget)

    two_here = _config(tmp_path, tiny_model, {"space": {"lora.r": [4]}, "parallel": 2})
    with pytest.raises(ConfigError, match=r"sweep\.parallel: 2 trials at once need compute\.gpu_deployment"):
        load_config(two_here)

    # A value the training settings refuse is found in the plan, with the trial that has it.
    bad_value = _config(tmp_path, tiny_model, {"space": {"lora.r": [4, 0]}})
    with pytest.raises(ConfigError, match=r"sweep trial 2 \(lora\.r=0\): lora\.r: Input should be greater"):
        check_trials(load_config(bad_value))
    assert main(["sweep", str(bad_value)]) == 2
    assert "sweep trial 2 (lora.r=0)" in capsys.readouterr().err
    assert not (tmp_path / "task" / "runs").exists()  # nothing ran


def test_the_median_rule_sets_floors_from_the_finished_trials_only() -> None:
    def trial(state: str, curve: list[list[float]]) -> dict:
        return {"state": state, "curve": curve}

    trials = [
        trial(FINISHED, [[0.25, 0.2], [0.5, 0.4], [0.75, 0.5], [1.0, 0.6]]),
        trial(FINISHED, [[0.5, 0.6], [1.0, 0.55]]),
        trial(FINISHED, [[0.34, 0.3], [0.67, 0.7], [1.0, 0.8]]),
        trial("failed", [[0.5, 0.99]]),
    ]
    assert median_floors(trials[:2], prune_after=3) == {}  # too few to judge
    # best by half the run: 0.4, 0.6, 0.3 → 0.4; by three quarters: 0.5, 0.6, 0.7 → 0.6
    assert median_floors(trials, prune_after=3) == {0.5: 0.4, 0.75: 0.6}


def _task_runs(name: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[name])))


def test_a_sweep_runs_its_trials_once_records_a_failure_and_registers_the_best(
    prefect_server: None, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    space = {"model.name": [str(tiny_model), str(tmp_path / "no-such-model")], "lora.r": [2, 4]}
    path = _config(tmp_path, tiny_model, {"space": space}, name="tiny-sweep")
    config = load_config(path)
    ingests_before = len(_task_runs("ingest-tiny-sweep"))

    state = sweep(config, return_state=True)
    result = state.result()
    record = json.loads((sweep_folder(config) / SWEEP_FILE).read_text())
    trials = record["trials"]
    assert [t["params"]["lora.r"] for t in trials] == [2, 4, 2, 4]
    assert [t["state"] for t in trials] == ["finished", "finished", "failed", "failed"]
    assert all("no-such-model" in t["error"] for t in trials[2:])  # recorded; the sweep went on
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("sweep-tiny-sweep").limit == 1
    runs = sorted(
        p for p in (tmp_path / "task" / "runs" / "tiny-sweep").glob("2*") if (p / "MANIFEST.json").is_file()
    )
    assert sorted(t["run"] for t in trials[:2]) == [str(p) for p in runs]
    for t in trials[:2]:  # each trial is a run of the config with its settings, and no sweep of its own
        run_config = yaml.safe_load((Path(t["run"]) / "config.yaml").read_text())
        assert run_config["lora"]["r"] == t["params"]["lora.r"] and run_config["sweep"] is None

    # The data steps ran once, in the sweep: every trial found them in the cache.
    ingests = _task_runs("ingest-tiny-sweep")
    assert len(ingests) - ingests_before == 5
    assert sorted(r.state.name for r in ingests) == ["Cached"] * 4 + ["Completed"]
    contracts = sorted(r.state.name for r in _task_runs("check-contract-tiny-sweep"))
    assert contracts == ["Cached"] * 4 + ["Completed"]

    # Each trial is a subflow run named after it, under the sweep's flow run.
    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=[f"tiny-sweep-trial-{n}" for n in range(1, 5)])
            )
        )
        parents = {client.read_task_run(f.parent_task_run_id).flow_run_id for f in subflows}
        [board] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tiny-sweep-sweep"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    assert len(subflows) == 4 and parents == {state.state_details.flow_run_id}
    table = json.loads(board.data) if isinstance(board.data, str) else board.data
    assert [row["trial"] for row in table][:2] == sorted([1, 2], key=lambda n: -trials[n - 1]["macro_f1"])
    assert {row["state"].split(":")[0] for row in table[2:]} == {"failed"}

    # The best trial challenged the (absent) champion and was promoted, with where it came from.
    best = max(trials[:2], key=lambda t: (t["macro_f1"], -t["number"]))
    assert result["best"]["number"] == best["number"] and result["decision"] == "promoted"
    [promoted] = read_history(config)
    assert promoted["challenger"]["run"] == best["run"] and promoted["source"].endswith(
        f"trial {best['number']}"
    )
    leaderboard = (sweep_folder(config) / "leaderboard.md").read_text()
    assert "| rank | trial | model.name | lora.r | dev macro-F1 |" in leaderboard
    assert (sweep_folder(config) / "plots" / "sweep.png").stat().st_size > 1000

    # Started again, the sweep keeps its finished trials (no new run folder) and runs the failed ones again;
    # the champion has the best trial's settings on this data already: nothing is registered twice.
    again = sweep(config)
    assert again["decision"] == "no new data" and len(read_history(config)) == 1
    assert len([p for p in runs[0].parent.glob("2*") if (p / "MANIFEST.json").is_file()]) == 2

    # A challenger worse than the champion is recorded and not promoted.
    monkeypatch.setattr(loraflow.flows.retrain, "champion_score", lambda *args: (1.01, "patched"))
    other = write_config(
        tmp_path / "task",
        tiny_model,
        name="tiny-sweep",
        sweep={"space": {"lora.r": [3]}},
        eval={"baseline": False},
    )
    worse = sweep(load_config(other))
    assert worse["decision"] == "kept champion" and read_history(config)[-1]["promoted"] is False


def test_a_killed_sweep_started_again_reruns_only_its_unfinished_trial(
    prefect_server: None, tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = {"space": {"lora.r": [2, 3, 4]}, "trials": 1, "seed": 1, "prune": False}
    config = load_config(_config(tmp_path, tiny_model, grid, name="tiny-resume"))
    sweep(config)
    folder = sweep_folder(config)
    record = json.loads((folder / SWEEP_FILE).read_text())
    [first] = record["trials"]
    # Killed while training trial 2: sweep.json says it was running.
    plan = GridSampler(config.sweep.model_copy(update={"trials": 2})).planned
    record["trials"].append(
        {"number": 2, "params": plan[1], "state": "running", "started": "then", "error": None}
    )
    (folder / SWEEP_FILE).write_text(json.dumps(record))

    bigger = load_config(_config(tmp_path, tiny_model, grid | {"trials": 2}, name="tiny-resume"))
    assert sweep_folder(bigger) == folder  # the same sweep: the budget is not part of its id
    assert main(["sweep", str(tmp_path / "task" / "config.yaml")]) == 0  # as a user starts it again
    printed = capsys.readouterr().out
    trials = json.loads((folder / SWEEP_FILE).read_text())["trials"]
    assert [t["state"] for t in trials] == ["finished", "finished"] and trials[0] == first
    assert trials[1]["params"] == plan[1]
    assert "| rank | trial | lora.r | dev macro-F1 |" in printed and f"sweep folder: {folder}" in printed
    runs = [
        p for p in (tmp_path / "task" / "runs" / "tiny-resume").glob("2*") if (p / "MANIFEST.json").is_file()
    ]
    assert len(runs) == 2  # trial 1 was not trained again
    assert main(["runs", str(tmp_path / "task" / "config.yaml"), "--sweep"]) == 0
    shown = capsys.readouterr().out
    assert f"# Sweep {folder.name} of tiny-resume" in shown and "2 of 2 trial(s) finished" in shown
