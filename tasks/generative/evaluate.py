"""Evaluation of the generative approach by label scoring (scoring.py): no free generation and no answer
parsing. The same task scores the zero-shot baseline (base model, same prompt) and the fine-tuned model.
"""

from __future__ import annotations

import time

import numpy as np
from prefect import task

from loraflow.config import EvalSettings
from loraflow.tasks.generative.prepare import COMPLETION, PROMPT, read_answers, read_prompts
from loraflow.tasks.generative.scoring import score_labels
from loraflow.tasks.ingest import LABEL
from loraflow.tasks.metrics import save_evaluation, softmax
from loraflow.tasks.models import load_causal_lm, load_tokenizer
from loraflow.tasks.store import CONTENT_CACHE, Ref, digest_of, is_complete, named_for_evaluation, step_output


@task(name="evaluate", task_run_name=named_for_evaluation(), cache_policy=CONTENT_CACHE)
def evaluate_model(
    model: Ref, prompts: Ref, kind: str, settings: EvalSettings, dtype: str, store: str, split: str = "dev"
) -> Ref:
    """Score the dev (or test) split with `model`; write predictions.parquet and metrics.json."""
    key = digest_of("evaluate", model.digest, prompts.digest, kind, settings.batch_size, dtype, split)
    folder, result = step_output(store, "evaluate", key)
    if is_complete(folder):
        return result
    labels, answers = read_answers(prompts)
    dev = read_prompts(prompts, split)
    tokenizer = load_tokenizer(model.path)
    network = load_causal_lm(model.path, dtype)
    started = time.perf_counter()
    scores = score_labels(
        network,
        tokenizer,
        dev[PROMPT].tolist(),
        answers,
        settings.batch_size,
        progress=f"scoring {split} rows, {kind.replace('finetuned', 'fine-tuned')}",
    )
    seconds = time.perf_counter() - started
    gold = [labels.index(label) for label in dev[LABEL]]
    loss = float(-scores[np.arange(len(gold)), gold].mean())  # the dev loss: -log p(gold answer), per row
    rows = dev.drop(columns=[PROMPT, COMPLETION])
    save_evaluation(folder, rows, labels, softmax(scores), kind, seconds, extra={"answer_loss": loss})
    return result


def evaluate_baseline(
    model: Ref, prompts: Ref, settings: EvalSettings, dtype: str, store: str, split: str = "dev"
) -> Ref:
    """The generative baseline: the base model zero-shot with the same prompt, scored the same way."""
    return evaluate_model(model, prompts, "zero-shot", settings, dtype, store, split)
