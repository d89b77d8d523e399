"""The `train-generative` flow: the model's own LM head learns to answer each row's label.

Run it with `loraflow run examples/geo/config.yaml`, or deploy it (prefect.yaml) and start it with
`prefect deployment run train-generative/<deployment>`.
"""

from __future__ import annotations

from prefect import flow

from loraflow.config import LoraflowConfig
from tasks.contracts import check_contract
from tasks.evaluate import evaluate_model
from tasks.ingest import ingest_table
from tasks.merge import merge_adapter
from tasks.models import default_cache_dir, resolve_model
from tasks.prompts import format_prompts
from tasks.report import write_run_folder
from tasks.train import train_adapter


@flow(name="train-generative")
def train_generative(config: LoraflowConfig) -> str:
    """Ingest → contract → prompts → model → LoRA → merge → evaluate (zero-shot and tuned) → run folder."""
    store = str(config.output_dir / config.name / "work")
    splits = ingest_table(config.data, config.input_columns, store)
    contract = check_contract(splits, config.input_columns, config.contract, store)
    prompts = format_prompts(splits, config.prompt, config.data.answers, store)
    model = resolve_model(config.model, default_cache_dir())
    adapter = train_adapter(prompts, model, config.lora, config.train, config.model.dtype, store)
    merged = merge_adapter(adapter, model, prompts, config.prompt, config.model.dtype, store)
    baseline = (
        evaluate_model(model, prompts, "zero-shot", config.eval, config.model.dtype, store)
        if config.eval.baseline
        else None
    )
    finetuned = evaluate_model(merged, prompts, "finetuned", config.eval, config.model.dtype, store)
    return write_run_folder(config, splits, contract, adapter, merged, baseline, finetuned)
