"""The `train-generative` flow: the model's own LM head learns to answer each row's label.

Run it with `loraflow run examples/geo/config.yaml`, or deploy it (prefect.yaml) and start it with
`prefect deployment run train-generative/<deployment>`.
"""

from __future__ import annotations

from prefect import flow

from loraflow.config import GenerativeConfig
from loraflow.flows.fit import fit_anywhere
from loraflow.tasks.classical import classical_baselines
from loraflow.tasks.contracts import check_contract
from loraflow.tasks.generative.prepare import prepare_inputs
from loraflow.tasks.hub import push_to_hub
from loraflow.tasks.ingest import ingest_table
from loraflow.tasks.paths import settle_paths, work_store
from loraflow.tasks.report import write_run_folder
from loraflow.tasks.review import review_if_enabled


@flow(name="train-generative")
def train_generative(config: GenerativeConfig) -> str:
    """Ingest → contract → review → prompts → classical baseline → [model → LoRA → merge → evaluate vs
    zero-shot] → run folder (with review.xlsx).

    The bracketed steps run here or on the GPU pool (config `compute.gpu_deployment`; flows/fit.py).
    """
    config = settle_paths(config)  # absolute paths, writable output_dir: fails here, not after training
    store = work_store(config)
    splits = ingest_table(config.data, config.input_columns, store)
    contract = check_contract(splits, config.input_columns, config.contract, store, config.review)
    review = review_if_enabled(splits, config.input_columns, config.prompt.template, config.review, store)
    prompts = prepare_inputs(splits, config.prompt, config.data.answers, store)
    enabled = config.eval.classical_baseline  # TF-IDF + logistic regression, fitted on train here, in seconds
    classical = classical_baselines(splits, config.input_columns, config.prompt.template, enabled, store)
    fitted = fit_anywhere(config, prompts, store)
    run_dir = write_run_folder(config, splits, contract, **fitted, **classical, review=review)
    if config.hub.repo_id:
        push_to_hub(run_dir, config.hub)
    return run_dir
