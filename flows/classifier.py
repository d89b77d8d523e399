"""The `train-classifier` flow: a new classification head, with labels mapped to ids from the config.

Run it with `loraflow run CONFIG.yaml` when the config says `approach: classifier`, or deploy it
(prefect.yaml) and start it with `prefect deployment run train-classifier/<deployment>`.
"""

from __future__ import annotations

from prefect import flow

from loraflow.config import LoraflowConfig
from tasks.classify import (
    evaluate_classifier,
    majority_baseline,
    map_labels,
    merge_classifier,
    train_classifier_head,
)
from tasks.contracts import check_contract
from tasks.ingest import ingest_table
from tasks.models import default_cache_dir, resolve_model
from tasks.report import write_run_folder


@flow(name="train-classifier")
def train_classifier(config: LoraflowConfig) -> str:
    """Ingest → contract → label map → model → LoRA + head → merge → evaluate (vs majority) → run folder."""
    store = str(config.output_dir / config.name / "work")
    columns, dtype, max_length = config.input_columns, config.model.dtype, config.train.max_length
    splits = ingest_table(config.data, columns, store)
    contract = check_contract(splits, columns, config.contract, store)
    encoded = map_labels(splits, columns, config.classifier, store)
    model = resolve_model(config.model, default_cache_dir())
    adapter = train_classifier_head(
        encoded, model, config.lora, config.train, config.classifier, dtype, store
    )
    merged = merge_classifier(adapter, model, encoded, max_length, dtype, store)
    baseline = majority_baseline(encoded, store) if config.eval.baseline else None
    finetuned = evaluate_classifier(merged, encoded, config.eval, max_length, dtype, store)
    return write_run_folder(config, splits, contract, adapter, merged, baseline, finetuned)
