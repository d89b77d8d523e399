"""The one place that maps an approach name to its package, for the steps where the approach is known only at
run time: training, merge and evaluation on a GPU worker (the `fit` flow), re-scoring a registry champion,
and predicting with a model folder. Each approach's tasks take only the settings they use; the functions
here pick those out of the config. Nothing else branches on the approach name, except the two training
flows, which are each one approach.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task

from loraflow.config import ClassifierConfig, GenerativeConfig
from loraflow.console import quiet_libraries_imported_since, without_kernels_advice
from loraflow.tasks.classifier import evaluate as classifier_evaluate
from loraflow.tasks.classifier import predict as classifier_predict
from loraflow.tasks.classifier import prepare as classifier_prepare
from loraflow.tasks.classifier import scoring as classifier_scoring
from loraflow.tasks.generative import evaluate as generative_evaluate
from loraflow.tasks.generative import predict as generative_predict
from loraflow.tasks.generative import prepare as generative_prepare
from loraflow.tasks.ingest import split_names
from loraflow.tasks.manifest import ModelManifest
from loraflow.tasks.metrics import label_columns
from loraflow.tasks.models import default_cache_dir, load_tokenizer, resolve_model
from loraflow.tasks.plan import check_memory, free_gpu_memory
from loraflow.tasks.predict import PREDICTED, model_folder
from loraflow.tasks.store import Ref

# TRAINING: the train and merge modules of each approach are imported when a fit starts, not with this module.
# They bring peft, trl and the Trainer (about 6 s of imports on 2 CPU cores), which the commands and flows
# that never train (predict, serve, validate, review, a retrain with no new data, a fully cached run, the
# data half of a GPU split) would otherwise wait for; tests/test_layout.py keeps it so.

# adapter, merged, and the evaluations: baseline, finetuned (dev), baseline_test, finetuned_test (None when
# there is no test split or no baseline)
Outputs = dict[str, Ref | None]


def _evaluations(
    prepared: Ref, baseline: Callable[[str], Ref] | None, finetuned: Callable[[str], Ref]
) -> Outputs:
    """Each model scored on dev, then on test (when the data has one) once training and selection are done."""
    out: Outputs = {}
    for split, suffix in (("dev", ""), ("test", "_test")):
        present = split in split_names(prepared)
        out[f"baseline{suffix}"] = baseline(split) if baseline and present else None
        out[f"finetuned{suffix}"] = finetuned(split) if present else None
    return out


def _prepare_generative(config: GenerativeConfig, splits: Ref, store: str, plain: bool = False) -> Ref:
    step = generative_prepare.prepare_inputs
    return (step.fn if plain else step)(splits, config.prompt, config.data.answers, store)


def _prepare_classifier(config: ClassifierConfig, splits: Ref, store: str, plain: bool = False) -> Ref:
    step = classifier_prepare.prepare_inputs
    return (step.fn if plain else step)(splits, config.input_columns, config.classifier, store)


def _lengths_generative(prompts: Ref, model_path: str) -> tuple[list[int], int | None]:
    return generative_prepare.train_token_lengths(prompts, load_tokenizer(model_path)), None


def _lengths_classifier(encoded: Ref, model_path: str) -> tuple[list[int], int | None]:
    tokenizer = classifier_scoring.classifier_tokenizer(model_path)
    labels = classifier_prepare.read_label_map(encoded)["labels"]
    return classifier_scoring.train_token_lengths(encoded, tokenizer), len(labels)


def _fits_the_gpu(config: Any, prepared: Ref, model: Ref) -> None:
    """On a CUDA GPU, before training: the memory plan of this run (tasks/plan.py) against the free memory,
    failing now with the changes that fit rather than out of memory later. Nothing without a GPU."""
    free = free_gpu_memory()
    if free is not None:
        lengths, num_labels = APPROACHES[config.approach].lengths(prepared, model.path)
        check_memory(config, lengths, num_labels, model, free)


def _fit_generative(config: GenerativeConfig, prompts: Ref, store: str) -> Outputs:
    with without_kernels_advice(config.model.quantization):
        from loraflow.tasks.generative import merge as generative_merge  # see TRAINING
        from loraflow.tasks.generative import train as generative_train

    quiet_libraries_imported_since()
    dtype, processes, settings = config.model.dtype, config.compute.processes, config.eval
    model = resolve_model(config.model, default_cache_dir())
    _fits_the_gpu(config, prompts, model)
    quantization = config.model.quantization
    adapter = generative_train.train_adapter(
        prompts, model, config.lora, config.train, dtype, store, processes, settings.batch_size, quantization
    )
    merged = generative_merge.merge_adapter(
        adapter, model, prompts, config.prompt, dtype, store, quantization
    )
    evaluations = _evaluations(
        prompts,  # the base model, zero-shot, with the same prompt
        (lambda split: generative_evaluate.evaluate_baseline(model, prompts, settings, dtype, store, split))
        if settings.baseline
        else None,
        lambda split: generative_evaluate.evaluate_model(
            merged, prompts, "finetuned", settings, dtype, store, split
        ),
    )
    return {"adapter": adapter, "merged": merged, **evaluations}


def _fit_classifier(config: ClassifierConfig, encoded: Ref, store: str) -> Outputs:
    with without_kernels_advice(config.model.quantization):
        from loraflow.tasks.classifier import merge as classifier_merge  # see TRAINING
        from loraflow.tasks.classifier import train as classifier_train

    quiet_libraries_imported_since()
    dtype, max_length, processes = config.model.dtype, config.train.max_length, config.compute.processes
    settings = config.eval
    model = resolve_model(config.model, default_cache_dir())
    _fits_the_gpu(config, encoded, model)
    adapter = classifier_train.train_adapter(
        encoded,
        model,
        config.lora,
        config.train,
        config.classifier,
        dtype,
        store,
        processes,
        settings.batch_size,
        config.model.quantization,
    )
    merged = classifier_merge.merge_adapter(
        adapter, model, encoded, max_length, dtype, store, config.model.quantization
    )
    evaluations = _evaluations(
        encoded,
        (lambda split: classifier_evaluate.evaluate_baseline(encoded, store, split))
        if settings.baseline
        else None,
        lambda split: classifier_evaluate.evaluate_model(
            merged, encoded, settings, max_length, dtype, store, split=split
        ),
    )
    return {"adapter": adapter, "merged": merged, **evaluations}


def _score_generative(config: GenerativeConfig, splits: Ref, model: Ref, store: str) -> Ref:
    prompts = _prepare_generative(config, splits, store)
    return generative_evaluate.evaluate_model(
        model, prompts, "champion", config.eval, config.model.dtype, store
    )


def _score_classifier(config: ClassifierConfig, splits: Ref, model: Ref, store: str) -> Ref:
    encoded = _prepare_classifier(config, splits, store)
    max_length, dtype = config.train.max_length, config.model.dtype
    return classifier_evaluate.evaluate_model(
        model, encoded, config.eval, max_length, dtype, store, kind="champion"
    )


@dataclass(frozen=True)
class Approach:
    """What the run-time steps need of one approach."""

    fit: Callable[[Any, Ref, str], Outputs]  # prepared data → model, adapter, merged, evaluations
    score: Callable[[Any, Ref, Ref, str], Ref]  # (splits, a merged model) → its dev evaluation
    probabilities: Callable[[Path, ModelManifest, pd.DataFrame, int], np.ndarray]  # a model folder's
    # the model folder loaded once → (rows, batch size, progress or None) → probabilities (loraflow serve)
    scorer: Callable[[Path, ModelManifest], Callable[[pd.DataFrame, int, str | None], np.ndarray]]
    # (config, splits, store[, plain]) → the prepared data fit trains on; plain: not as a Prefect task run
    prepare: Callable[..., Ref]
    # (prepared data, the model folder) → each train row's token length, and the head's label count
    lengths: Callable[[Ref, str], tuple[list[int], int | None]]


APPROACHES = {
    "generative": Approach(
        _fit_generative,
        _score_generative,
        generative_predict.probabilities,
        generative_predict.load_scorer,
        _prepare_generative,
        _lengths_generative,
    ),
    "classifier": Approach(
        _fit_classifier,
        _score_classifier,
        classifier_predict.probabilities,
        classifier_predict.load_scorer,
        _prepare_classifier,
        _lengths_classifier,
    ),
}


def approach(name: str) -> Approach:
    """The approach called `name` (the config's `approach`, or a model folder's loraflow.json)."""
    return APPROACHES[name]


@task(name="predict-rows")
def predict_rows(model: str, rows: Ref, batch_size: int) -> Ref:
    """`predicted_label` and one `prob_<label>` column per label for every row, in input order."""
    folder = model_folder(model)
    manifest = ModelManifest.read(folder)
    frame = pd.read_parquet(rows.path)
    probabilities = approach(manifest.approach).probabilities(folder, manifest, frame, batch_size)
    path = Path(rows.path).with_name("predictions.parquet")
    label_columns(manifest.labels, probabilities, PREDICTED).to_parquet(path, index=False)
    return Ref(path=str(path), digest=rows.digest)
