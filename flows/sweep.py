"""The `sweep` flow: train the config once per trial of its `sweep` section, rank the trials on dev, and
register the best one as the challenger of the production model.

Run it with `loraflow sweep examples/pairs/config.yaml`, or deploy it (prefect.yaml `sweep/pairs`) and start
it with `prefect deployment run sweep/pairs`. Each trial is a subflow run of the training flow, started in a
task run of its own (`trial-<n>`), at most `sweep.parallel` at a time: each takes a slot of the Prefect
concurrency limit `sweep-<name>`. With `compute.gpu_deployment` set, each trial's training is a run of the
`fit` deployment on the GPU pool, so trials train on as many workers as the pool has. The data steps hit
the cache in every trial but the first; a killed sweep started again keeps its finished trials
(tasks/sweep.py).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.futures import PrefectFuture

from loraflow.config import LoraflowConfig
from loraflow.flows import training_flow
from loraflow.flows.retrain import challenge_champion
from loraflow.tasks.contracts import check_contract
from loraflow.tasks.ingest import ingest_table
from loraflow.tasks.paths import settle_paths, work_store
from loraflow.tasks.registry import open_attempt
from loraflow.tasks.sweep import finish_sweep, next_finished, open_sweep, record_trial, trial_outcome


@task(name="run-trial", task_run_name="trial-{number}", cache_policy=NO_CACHE)
def run_trial(config: LoraflowConfig, number: int, limit: str) -> str:
    """One trial: the training flow of the trial's config, as a subflow run `<name>-trial-<n>`, holding one
    slot of the sweep's concurrency limit while it runs; returns its run folder."""
    with concurrency(limit, occupy=1, strict=True):
        name = f"{config.name}-trial-{number}".replace("{", "{{").replace("}", "}}")
        return str(training_flow(config.approach).with_options(flow_run_name=name)(config))


@flow(name="sweep")
def sweep(config: LoraflowConfig) -> dict[str, Any]:
    """Trials (grid, random or TPE) → each a training run, `parallel` at a time → leaderboard → the best
    trial challenges the production model (promoted only if at least as good)."""
    config = settle_paths(config, registry=True)
    search = open_sweep(config)
    store = work_store(config)  # the data steps, once: every trial finds them in the cache
    splits = ingest_table(config.data, config.input_columns, store)
    check_contract(splits, config.input_columns, config.contract, store, config.review)  # broken: no trial
    running: dict[PrefectFuture, dict[str, Any]] = {}
    while True:
        while len(running) < search.settings.parallel and (trial := search.next_trial()):
            trial_config = search.trial_config(trial)
            running[run_trial.submit(trial_config, trial["number"], search.limit)] = trial
        if not running:
            break
        done = next_finished(list(running))
        record_trial(search, running.pop(done), *trial_outcome(done))
    best = finish_sweep(search)  # no trial finished: an error, after the leaderboard says why
    best_config = search.trial_config(best)
    attempt = open_attempt(best_config) | {"source": f"sweep {search.folder.name}, trial {best['number']}"}
    if attempt["unchanged_since"]:  # the champion has these settings on this data already
        return {"sweep": str(search.folder), "best": best, "decision": "no new data"}
    decision = challenge_champion(best_config, attempt, best["run"])
    return {"sweep": str(search.folder), "best": best, "decision": decision["decision"]}
