"""The `retrain` flow: re-read the config's data; when it changed, train a challenger, evaluate it and the
production champion on the same dev set, and promote the challenger only when it is at least as good.

Deployed nightly and on the `loraflow.dataset.updated` event (prefect.yaml; `loraflow notify CONFIG`
emits the event). Unchanged data (same file hashes, same config) ends in seconds with "no new data".
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow
from pydantic import ValidationError

from loraflow.config import LoraflowConfig, validate_config
from loraflow.flows import training_flow
from loraflow.loading import absolute_paths
from loraflow.tasks.approaches import approach
from loraflow.tasks.ingest import ingest_table
from loraflow.tasks.manifest import ModelManifest
from loraflow.tasks.metrics import read_evaluation
from loraflow.tasks.paths import settle_paths, work_store
from loraflow.tasks.registry import (
    announce_decision,
    append_history,
    failed_attempt,
    open_attempt,
    read_history,
    settle_challenger,
    version_digest,
)
from loraflow.tasks.store import Ref

DATASET_EVENT = "loraflow.dataset.updated"


def dataset_resource(name: str) -> str:
    """The Prefect resource id that dataset events about config `name` carry."""
    return f"loraflow.dataset.{name}"


def champion_score(
    config: LoraflowConfig, champion: Path, history: list[dict[str, Any]]
) -> tuple[float, str]:
    """(macro-F1, how it was obtained) of the production model on the config's current dev split."""
    manifest = ModelManifest.read(champion)
    kind = manifest.approach if manifest else None
    if kind != config.approach:  # another kind of model: only its recorded score compares
        recorded = [r for r in history if r.get("version") == champion.name and r.get("promoted")]
        return recorded[-1]["challenger"]["macro_f1"], f"recorded ({kind} model)"
    store = work_store(config)
    model = Ref(path=str(champion), digest=version_digest(champion))
    splits = ingest_table(config.data, config.input_columns, store)  # cached by the training run just now
    result = approach(config.approach).score(config, splits, model, store)
    return read_evaluation(result)[0]["macro_f1"], "evaluated on the current dev split"


def _record_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """on_failure / on_crashed hook: a failed retraining run is recorded in history.jsonl too."""
    try:
        config = validate_config(flow_run.parameters.get("config"))
    except ValidationError:  # the run never started: Prefect's own message names the bad parameter
        return
    config = absolute_paths(config, Path.cwd())  # as the flow's settle-paths step does
    error = (state.message or state.name).removeprefix("Flow run encountered an exception: ")
    try:
        append_history(config, failed_attempt(config, flow_run.start_time, error))
    except OSError as e:  # the registry itself cannot be written (the run's own error says so): no record
        logging.getLogger("loraflow").warning(
            "the failure of %s is not recorded: %s cannot be written (%s)", flow_run.name, config.registry, e
        )


@flow(name="retrain", on_failure=[_record_failure], on_crashed=[_record_failure])
def retrain(config: LoraflowConfig) -> dict[str, Any]:
    """New data → challenger → compare with the champion → promote if at least as good; record it."""
    config = settle_paths(config, registry=True)
    attempt = open_attempt(config)
    if attempt["unchanged_since"]:
        return {"decision": "no new data", "production": attempt["champion"], "data": attempt["data"]}
    attempt_number = len(read_history(config)) + 1  # this one's: the failed ones are in the history too
    challenger = f"{config.name}-challenger-{attempt_number}".replace("{", "{{").replace("}", "}}")
    run_dir = str(training_flow(config.approach).with_options(flow_run_name=challenger)(config))
    return challenge_champion(config, attempt, run_dir)


def challenge_champion(config: LoraflowConfig, attempt: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """The run's model against the production champion on the current dev split: promoted when it is at
    least as good, recorded in history.jsonl either way (retraining, and a sweep's best trial)."""
    champion = Path(attempt["champion"]) if attempt["champion"] else None
    scored = None
    if champion is not None:
        score, how = champion_score(config, champion, read_history(config))
        scored = {"version": champion.name, "macro_f1": score, "score": how}
    record = settle_challenger(config, attempt, run_dir, scored)
    return announce_decision(config, record)
