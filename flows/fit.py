"""The GPU half of a training run: model → LoRA → merge → evaluate, here or on the `gpu` work pool.

The training flows prepare the data where they start (ingest, contract, prompts or label map), then call
`fit_anywhere`. With no `compute.gpu_deployment` in the config the approach's fit steps
(tasks/approaches.py) run in the same flow (the embedded default). With one, the prepared folder is
published to `compute.storage` (a folder or fsspec URL), the deployed `fit` flow runs on a GPU worker
through `run_deployment`, and its results come back through the same storage. A failed contract stops the
flow before this point, so it never takes a GPU.

Deploy it with prefect.yaml's `fit/gpu` deployment; `prefect deployment run` is not how it is started:
the training flows start it with their prepared data.
"""

from __future__ import annotations

import uuid
from typing import Any

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from loraflow.config import LoraflowConfig
from loraflow.errors import UserError
from loraflow.tasks.approaches import approach
from loraflow.tasks.exchange import fetch_from_exchange, fetch_outputs, publish_outputs, publish_to_exchange
from loraflow.tasks.paths import exchange_storage, work_store
from loraflow.tasks.store import Ref


@flow(name="fit")
def fit(config: LoraflowConfig, prepared: Ref, storage: str, outbox: str) -> dict[str, Any]:
    """On a GPU worker: fetch the prepared data, fit, publish the outputs, write their list to `outbox`."""
    store = work_store(config)
    outputs = approach(config.approach).fit(config, fetch_from_exchange(prepared, storage, store), store)
    return publish_outputs(outputs, storage, store, outbox)


def fit_anywhere(config: LoraflowConfig, prepared: Ref, store: str) -> dict[str, Ref | None]:
    """The approach's fit steps in this flow, or the `fit` deployment named by compute.gpu_deployment; same
    outputs."""
    deployment = config.compute.gpu_deployment
    if not deployment:
        return approach(config.approach).fit(config, prepared, store)
    storage = exchange_storage(config)
    outbox = f"{storage.rstrip('/')}/results/{uuid.uuid4().hex}.json"
    get_run_logger().info(
        "training on deployment %s; data and results travel through %s", deployment, storage
    )
    run = run_deployment(
        name=deployment,
        flow_run_name=f"fit-{config.name}",
        parameters={
            "config": config.model_dump(mode="json"),
            "prepared": publish_to_exchange(prepared, storage, store).model_dump(),
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
    return fetch_outputs(outbox, storage, store)
