"""The GPU half of a training run: model → LoRA → merge → evaluate, here or on the `gpu` work pool.

The training flows prepare the data where they start (ingest, contract, prompts or label map), then call
`fit_anywhere`. With no `compute.gpu_deployment` in the config the steps run in the same flow (the
embedded default). With one, the prepared folder is published to `compute.storage` (a folder or fsspec
URL), the deployed `fit` flow runs on a GPU worker through `run_deployment`, and its results come back
through the same storage. A failed contract stops the flow before this point, so it never takes a GPU.

Deploy it with prefect.yaml's `fit/gpu` deployment; `prefect deployment run` is not how it is started:
the training flows start it with their prepared data.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import fsspec
from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from loraflow.config import LoraflowConfig
from loraflow.errors import UserError
from tasks.exchange import fetch, publish
from tasks.models import default_cache_dir, resolve_model
from tasks.paths import exchange_storage, work_store
from tasks.store import Ref

OUTPUTS = ("adapter", "merged", "baseline", "finetuned")


def fit_steps(config: LoraflowConfig, prepared: Ref, store: str) -> dict[str, Ref | None]:
    """Resolve the model, train, merge and evaluate in this flow; returns the output folders by name."""
    dtype, max_length, processes = config.model.dtype, config.train.max_length, config.compute.processes
    model = resolve_model(config.model, default_cache_dir())
    if config.approach == "classifier":
        from tasks.classify import (
            evaluate_classifier,
            majority_baseline,
            merge_classifier,
            train_classifier_head,
        )

        adapter = train_classifier_head(
            prepared, model, config.lora, config.train, config.classifier, dtype, store, processes
        )
        merged = merge_classifier(adapter, model, prepared, max_length, dtype, store)
        baseline = majority_baseline(prepared, store) if config.eval.baseline else None
        finetuned = evaluate_classifier(merged, prepared, config.eval, max_length, dtype, store)
    else:
        from tasks.evaluate import evaluate_model
        from tasks.merge import merge_adapter
        from tasks.train import train_adapter

        adapter = train_adapter(prepared, model, config.lora, config.train, dtype, store, processes)
        merged = merge_adapter(adapter, model, prepared, config.prompt, dtype, store)
        baseline = (
            evaluate_model(model, prepared, "zero-shot", config.eval, dtype, store)
            if config.eval.baseline
            else None
        )
        finetuned = evaluate_model(merged, prepared, "finetuned", config.eval, dtype, store)
    return {"adapter": adapter, "merged": merged, "baseline": baseline, "finetuned": finetuned}


@flow(name="fit")
def fit(config: LoraflowConfig, prepared: Ref, storage: str, outbox: str) -> dict[str, Any]:
    """On a GPU worker: fetch the prepared data, fit, publish the outputs, write their list to `outbox`."""
    store = work_store(config)
    outputs = fit_steps(config, fetch(prepared, storage, store), store)
    published = {
        name: publish(ref, storage, store).model_dump() if ref else None for name, ref in outputs.items()
    }
    with fsspec.open(outbox, "w") as f:
        json.dump(published, f)
    return published


def fit_anywhere(config: LoraflowConfig, prepared: Ref, store: str) -> dict[str, Ref | None]:
    """`fit_steps` in this flow, or the `fit` deployment named by compute.gpu_deployment; same outputs."""
    deployment = config.compute.gpu_deployment
    if not deployment:
        return fit_steps(config, prepared, store)
    storage = exchange_storage(config)
    outbox = f"{storage.rstrip('/')}/results/{uuid.uuid4().hex}.json"
    logger = get_run_logger()
    logger.info("training on deployment %s; data and results travel through %s", deployment, storage)
    run = run_deployment(
        name=deployment,
        parameters={
            "config": config.model_dump(mode="json"),
            "prepared": publish(prepared, storage, store).model_dump(),
            "storage": storage,
            "outbox": outbox,
        },
        timeout=None,  # wait for as long as training takes
    )
    if not run.state or not run.state.is_completed():
        ended = run.state.name if run.state else "without a state"
        raise UserError(
            f"the GPU run {run.name} of {deployment} ended {ended}: its logs are in the Prefect UI "
            f"(flow run {run.id})"
        )
    with fsspec.open(outbox, "r") as f:
        published = json.load(f)
    return {
        name: fetch(Ref(**published[name]), storage, store) if published[name] else None for name in OUTPUTS
    }
