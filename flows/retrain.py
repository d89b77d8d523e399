"""The `retrain` flow: re-read the config's data; when it changed, train a challenger, evaluate it and the
production champion on the same dev set, and promote the challenger only when it is at least as good.

Deployed nightly and on the `loraflow.dataset.updated` event (prefect.yaml; `loraflow notify CONFIG`
emits the event). Unchanged data (same file hashes, same config) ends in seconds with "no new data".
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import ValidationError

from loraflow.config import LoraflowConfig, absolute_paths
from tasks.evaluate import evaluate_model, read_evaluation
from tasks.ingest import ingest_table, source_digests
from tasks.models import read_model_info
from tasks.paths import settle_paths, work_store
from tasks.registry import (
    append_history,
    config_digest,
    failed_attempt,
    model_home,
    production_model,
    read_history,
    settle_challenger,
    version_digest,
)
from tasks.report import artifact_key
from tasks.store import Ref

DATASET_EVENT = "loraflow.dataset.updated"


def dataset_resource(name: str) -> str:
    """The Prefect resource id that dataset events about config `name` carry."""
    return f"loraflow.dataset.{name}"


def champion_score(
    config: LoraflowConfig, champion: Path, history: list[dict[str, Any]]
) -> tuple[float, str]:
    """(macro-F1, how it was obtained) of the production model on the config's current dev split."""
    info = read_model_info(champion)
    if info.get("approach") != config.approach:  # another kind of model: only its recorded score compares
        recorded = [r for r in history if r.get("version") == champion.name and r.get("promoted")]
        return recorded[-1]["challenger"]["macro_f1"], f"recorded ({info.get('approach')} model)"
    store = work_store(config)
    columns = config.input_columns
    model = Ref(path=str(champion), digest=version_digest(champion))
    splits = ingest_table(config.data, columns, store)  # cached by the training run that just finished
    if config.approach == "generative":
        from tasks.prompts import format_prompts

        prompts = format_prompts(splits, config.prompt, config.data.answers, store)
        result = evaluate_model(model, prompts, "champion", config.eval, config.model.dtype, store)
    else:
        from tasks.classify import evaluate_classifier, map_labels

        encoded = map_labels(splits, columns, config.classifier, store)
        result = evaluate_classifier(
            model, encoded, config.eval, config.train.max_length, config.model.dtype, store, kind="champion"
        )
    return read_evaluation(result)[0]["macro_f1"], "evaluated on the current dev split"


def _training_flow(config: LoraflowConfig) -> Any:
    if config.approach == "classifier":
        from flows.classifier import train_classifier

        return train_classifier
    from flows.generative import train_generative

    return train_generative


def _record_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """on_failure / on_crashed hook: a failed retraining run is recorded in history.jsonl too."""
    try:
        config = LoraflowConfig.model_validate(flow_run.parameters.get("config"))
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
    logger = get_run_logger()
    started = datetime.now(UTC)
    config = settle_paths(config, registry=True)
    sources, settings = source_digests(config.data), config_digest(config)
    history = read_history(config)
    champion = production_model(config)
    last = next((r for r in reversed(history) if r["decision"] != "failed"), None)
    if champion is not None and last and last["data"] == sources and last["config"] == settings:
        logger.info(
            "no new data: %s unchanged since %s; production stays %s", config.name, last["at"], champion
        )
        return {"decision": "no new data", "production": str(champion), "data": sources}

    run_dir = str(_training_flow(config)(config))
    scored = None
    if champion is not None:
        score, how = champion_score(config, champion, history)
        scored = {"version": champion.name, "macro_f1": score, "score": how}
    opened = {"at": started.isoformat(timespec="seconds"), "data": sources, "config": settings}
    record = settle_challenger(config, opened, run_dir, scored)
    production = production_model(config)
    summary = (
        f"**{record['decision']}**: challenger macro-F1 {record['challenger']['macro_f1']:.4f}"
        + (f" vs champion {scored['macro_f1']:.4f}" if scored else " (no champion)")
        + f"; production: `{production}`; history: `{model_home(config) / 'history.jsonl'}`"
    )
    logger.info(summary)
    create_markdown_artifact(key=f"{artifact_key(config.name)}-promotion", markdown=summary)
    return record | {"production": str(production)}
