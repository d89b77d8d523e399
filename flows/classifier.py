"""The `train-classifier` flow: a new classification head, with labels mapped to ids from the config.

Run it with `loraflow run CONFIG.yaml` when the config says `approach: classifier`, or deploy it
(prefect.yaml) and start it with `prefect deployment run train-classifier/<deployment>`.
"""

from __future__ import annotations

from prefect import flow

from loraflow.config import ClassifierConfig
from loraflow.flows.fit import fit_anywhere
from loraflow.tasks.classical import classical_baselines
from loraflow.tasks.classifier.prepare import prepare_inputs
from loraflow.tasks.contracts import check_contract
from loraflow.tasks.hub import push_to_hub
from loraflow.tasks.ingest import ingest_table
from loraflow.tasks.paths import settle_paths, work_store
from loraflow.tasks.report import write_run_folder
from loraflow.tasks.review import review_if_enabled


@flow(name="train-classifier")
def train_classifier(config: ClassifierConfig) -> str:
    """Ingest → contract → review → label map → classical baseline → [model → LoRA + head → merge →
    evaluate vs majority] → run folder (with review.xlsx).

    The bracketed steps run here or on the GPU pool (config `compute.gpu_deployment`; flows/fit.py).
    """
    config = settle_paths(config)  # absolute paths, writable output_dir: fails here, not after training
    store = work_store(config)
    splits = ingest_table(config.data, config.input_columns, store)
    contract = check_contract(splits, config.input_columns, config.contract, store, config.review)
    review = review_if_enabled(splits, config.input_columns, config.classifier.template, config.review, store)
    encoded = prepare_inputs(splits, config.input_columns, config.classifier, store)
    enabled = config.eval.classical_baseline  # TF-IDF + logistic regression, fitted on train here, in seconds
    classical = classical_baselines(splits, config.input_columns, config.classifier.template, enabled, store)
    fitted = fit_anywhere(config, encoded, store)
    run_dir = write_run_folder(config, splits, contract, **fitted, **classical, review=review)
    if config.hub.repo_id:
        push_to_hub(run_dir, config.hub)
    return run_dir
