"""The real thing: `prefect server start`, the `gpu` process pool, `prefect deploy --all` of the repository's
prefect.yaml in a copy of the checkout (each deployment's parameters as shipped, only the model swapped for
a tiny one and the step counts cut), a `prefect worker start --pool gpu` subprocess, and deployments run
through the Prefect CLI, on a schedule's flow and on a custom event.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID

import pandas as pd
import pytest
import yaml
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterName,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterName,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_API_URL, temporary_settings

pytestmark = pytest.mark.server
REPO = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")
LORAFLOW = [sys.executable, "-m", "loraflow.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _prefect(env: dict[str, str], *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The Prefect CLI in env's PWD, as a user's shell runs it there (prefect.yaml reads `$PWD`)."""
    result = subprocess.run(
        [PREFECT, *args], cwd=env["PWD"], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Prefect server on a free loopback port with its database in a temp folder; yields the env."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_LOGGING_LEVEL": "INFO",
        # SQLite waits this long for a write lock (default 10 s): on two loaded cores the worker's heartbeats,
        # the runs' states and their log batches queue for it, and a write that gives up is lost
        "PREFECT_API_DATABASE_TIMEOUT": "60",
    }
    log = open(home / "server.log", "w")  # noqa: SIM115 (closed below, after the process)
    process = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, (home / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Prefect server did not answer within 180 s"
            time.sleep(1)
        yield env
    finally:
        _stop(process)
        log.close()


# What the test changes in the shipped deployments' configs: the model, and step counts sized for seconds.
TINY_TRAIN = {"max_steps": 4, "save_steps": 2, "logging_steps": 2}


def _user_checkout(folder: Path, tiny_model: Path) -> Path:
    """The repository as a user deploys it: prefect.yaml, examples/ and data_contracts/ as shipped (the code
    folders linked), with only each deployment config's model swapped for a tiny one, its steps cut, and a
    sweep's trials cut to two."""
    folder.mkdir(parents=True)
    for name in ("flows", "tasks", "loraflow"):
        (folder / name).symlink_to(REPO / name, target_is_directory=True)
    for name in ("examples", "data_contracts"):
        shutil.copytree(REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        config = deployment.get("parameters", {}).get("config")
        if config:  # paths, names, prompts, data and every other setting stay as shipped
            config["model"] = {"name": str(tiny_model)}
            config["train"] = config["train"] | TINY_TRAIN
            if config.get("sweep"):  # two of its trials: as many as it trains at once
                config["sweep"] = config["sweep"] | {"trials": 2}
    (folder / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


@contextmanager
def _client(env: dict[str, str]) -> Iterator[SyncPrefectClient]:
    """A Prefect API client of the test server (this process may also run the harness's server)."""
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            yield client


def _flow_runs(env: dict[str, str], deployment: str) -> list[FlowRun]:
    """Flow runs of FLOW/DEPLOYMENT that have started, newest first (a schedule's future runs left out)."""
    flow, name = deployment.split("/")
    with _client(env) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
        )
    return [run for run in runs if not (run.state and run.state.is_scheduled() and run.auto_scheduled)]


def _artifact_keys(env: dict[str, str], flow_run_id: UUID) -> set[str]:
    with _client(env) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key for a in found}


def _run_deployment(env: dict[str, str], name: str, *options: str) -> float:
    started = time.perf_counter()
    result = _prefect(
        env,
        "deployment",
        "run",
        name,
        *options,
        "--watch",
        "--watch-interval",
        "1",  # the default 5 s, paid at every run's end
        "--watch-timeout",
        "600",
        timeout=700,
    )
    assert "Completed" in result.stdout, result.stdout
    return time.perf_counter() - started


def _run_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("2*") if (p / "MANIFEST.json").is_file())


def test_the_shipped_deployments_run_as_the_readme_says_on_a_real_server_and_worker(
    server: dict[str, str], tmp_path: Path, tiny_model: Path
) -> None:
    """README Deploy, verbatim, in a user's checkout: prefect.yaml's own parameters (relative paths such as
    `output_dir: runs`), only the model swapped for a tiny one; outputs land where the README says."""
    user = _user_checkout(tmp_path / "checkout", tiny_model)
    env = {**server, "PWD": str(user)}
    _prefect(env, "work-pool", "create", "gpu", "--type", "process")
    deployed = _prefect(env, "--no-prompt", "deploy", "--all")
    for name in (
        "train-generative/geo",
        "train-classifier/pairs",
        "retrain/geo-nightly",
        "fit/gpu",
        "predict/geo",
        "sweep/pairs",
    ):
        assert name in deployed.stdout, deployed.stdout

    worker_log = open(tmp_path / "worker.log", "w")  # noqa: SIM115 (closed below, after the process)
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "gpu"],
        cwd=user,
        # The worker's own disk, as on a separate GPU host: what it needs travels through the exchange. It
        # looks for scheduled runs every second (the default 10 s would be waited out at every run's start);
        # its output is written as it comes (the test reads it).
        env={
            **env,
            "LORAFLOW_WORK_DIR": str(tmp_path / "gpu-host"),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PYTHONUNBUFFERED": "1",
        },
        stdout=worker_log,
        stderr=subprocess.STDOUT,
    )
    try:
        # A sweep: its data steps here, each trial's training a run of fit/gpu, two at a time on the worker;
        # the best trial is registered.
        seconds = _run_deployment(env, "sweep/pairs")
        [swept] = _flow_runs(env, "sweep/pairs")
        fits = _flow_runs(env, "fit/gpu")
        assert len(fits) == 2 and all(f.state.is_completed() for f in fits)
        assert {"pairs-sweep", "pairs-sweep-report"} <= _artifact_keys(env, swept.id)
        [sweep_json] = (user / "runs" / "pairs" / "sweeps").glob("*/sweep.json")
        trials = json.loads(sweep_json.read_text())["trials"]
        assert [t["state"] for t in trials] == ["finished", "finished"], trials
        # Each trial is a run of the classifier training flow with the shipped config (the train-classifier/
        # pairs deployment's, by the same YAML anchor): its run folder runs/pairs/<UTC timestamp>/ and the
        # training flow's artifacts, as a `prefect deployment run train-classifier/pairs` leaves them.
        assert sorted(t["run"] for t in trials) == [str(p) for p in _run_folders(user / "runs" / "pairs")]
        for t in trials:
            metrics = json.loads((Path(t["run"]) / "metrics.json").read_text())
            assert metrics["config"] == "pairs" and (Path(t["run"]) / "merged" / "loraflow.json").is_file()
        with _client(env) as client:
            trial_runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["pairs-trial-1", "pairs-trial-2"]))
            )
        assert len(trial_runs) == 2 and all(r.state.is_completed() for r in trial_runs)
        # Two at a time: a trial's training flow run is created once the trial holds a slot of the sweep's
        # concurrency limit, so with one slot the second would be created only after the first ended. Not the
        # fit runs: on an idle worker the first tiny fit can end before the other trial, slowed by the tests
        # beside it, has reached its own fit (seen in CI, 5 s after).
        first, second = sorted(trial_runs, key=lambda r: r.created)
        assert second.created < first.end_time, (first, second)
        for trial_run in trial_runs:
            assert {"pairs-report", "pairs-metrics", "pairs-run-folder"} <= _artifact_keys(env, trial_run.id)
        history = [
            json.loads(line)
            for line in (user / "models" / "pairs" / "history.jsonl").read_text().splitlines()
        ]
        assert history[-1]["decision"] == "promoted" and history[-1]["source"].startswith("sweep ")
        exchange = user / "runs" / "pairs" / "exchange"
        published = {p.name.split("-")[0] for p in exchange.glob("*-*") if (p / "MANIFEST.json").is_file()}
        assert {"labels", "train", "merge", "evaluate"} <= published, published
        gpu_host = {p.name.split("-")[0] for p in (tmp_path / "gpu-host" / "pairs").iterdir()}
        assert {"labels", "train", "merge", "evaluate"} <= gpu_host
        with _client(env) as client:  # the data steps ran in the sweep, none in a fit run
            fitted = client.read_task_runs(
                task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[f.id for f in fits]))
            )
        assert {r.name.split("-")[0] for r in fitted} >= {"train", "merge"}
        assert not [r.name for r in fitted if r.name.startswith(("ingest", "check-contract"))]
        print(f"sweep/pairs, 2 trials on fit/gpu two at a time: {seconds:.1f} s")

        # Retraining: the first run trains geo's generative model on the worker (its training flow run, the
        # run folder and its artifacts) and promotes it; unchanged data: the triggered run below. A challenger
        # against a champion: tests/test_retrain.py, in-process.
        history = user / "models" / "geo" / "history.jsonl"
        first = _run_deployment(env, "retrain/geo-nightly")
        records = [json.loads(line) for line in history.read_text().splitlines()]
        assert [r["decision"] for r in records] == ["promoted"]
        assert (user / "models" / "geo" / "production" / "config.json").is_file()
        [run_dir] = _run_folders(user / "runs" / "geo")
        assert json.loads((run_dir / "metrics.json").read_text())["config"] == "geo"
        [challenger] = _flow_runs(env, "retrain/geo-nightly")  # its training run is a subflow run
        with _client(env) as client:
            [trained] = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[challenger.id])
                )
            )
        assert trained.name == "geo-challenger-1" and trained.state.is_completed()
        assert {"geo-report", "geo-metrics", "geo-run-folder"} <= _artifact_keys(env, trained.id)
        print(f"retrain wall time, first run: {first:.1f} s")

        # The champion labels the dev table through the predict deployment, with its shipped parameters.
        _run_deployment(env, "predict/geo")
        predicted = pd.read_excel(user / "runs" / "geo" / "predictions" / "dev.xlsx", engine="openpyxl")
        assert len(predicted) == 160 and {"predicted_label", "prob_0", "prob_1"} <= set(predicted.columns)

        # The custom event starts the retrain deployment through its trigger.
        before = len(_flow_runs(env, "retrain/geo-nightly"))
        notified = subprocess.run(
            [*LORAFLOW, "notify", "examples/geo/config.yaml"],
            cwd=user,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert notified.returncode == 0, notified.stderr
        deadline = time.monotonic() + 240
        while True:
            runs = _flow_runs(env, "retrain/geo-nightly")
            triggered = [r for r in runs if r.created_by and r.created_by.type == "AUTOMATION"]
            if len(runs) > before and triggered and triggered[0].state.is_completed():
                break
            assert time.monotonic() < deadline, f"no triggered run completed: {runs}"
            time.sleep(2)
        lines = [line for line in history.read_text().splitlines() if line.strip()]
        assert len(lines) == 1  # the data did not change since: "no new data", nothing recorded
        with _client(env) as client:  # it checked for new data and trained nothing
            steps = client.read_task_runs(
                task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[triggered[0].id]))
            )
        assert sorted(r.name for r in steps) == ["check-for-new-data-geo", "settle-paths-geo"]
        # It said why, in its run log: the last lines reach the server after the run's state does (the process
        # ships them as it exits).
        deadline, said = time.monotonic() + 60, []
        while time.monotonic() < deadline and not [
            m for m in said if m.startswith("no new data: geo unchanged")
        ]:
            time.sleep(2)
            with _client(env) as client:
                logs = client.read_logs(
                    log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[triggered[0].id]))
                )
            said = [log.message for log in logs]
        if not [m for m in said if m.startswith("no new data: geo unchanged")]:
            # Seen twice in CI on a loaded machine: the server's SQLite refused the log batch ("database is
            # locked") and the lines are only in the worker's output. Accepted only with that evidence.
            server_log = Path(server["PREFECT_HOME"]) / "server.log"
            assert "database is locked" in server_log.read_text(), said
            assert "no new data: geo unchanged since" in (tmp_path / "worker.log").read_text()
            print("the triggered run's log lines did not reach the server's database (SQLite locked)")
    finally:
        _stop(worker)
        worker_log.close()
        print((tmp_path / "worker.log").read_text()[-4000:])
