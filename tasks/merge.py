"""Merge: fold the LoRA adapter into the base weights and save a standard Hugging Face model folder.

Before saving, a few dev rows are scored with the adapter model and with the merged model; the merge is
accepted only when both give the same label scores within float tolerance.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from prefect import task

from loraflow.config import PromptSettings
from tasks.models import load_causal_lm, load_tokenizer, peft_quietly, trusts_code
from tasks.prompts import PROMPT, read_answers, read_prompts
from tasks.scoring import score_labels
from tasks.store import CONTENT_CACHE, Ref, building, digest_of, is_complete, work_dir

CHECK_ROWS = 4
TOLERANCE = 1e-3  # absolute, on summed log-probs or logits in float32


@task(name="merge-adapter", cache_policy=CONTENT_CACHE)
def merge_adapter(
    adapter: Ref, model: Ref, prompts: Ref, prompt: PromptSettings, dtype: str, store: str
) -> Ref:
    """Write `merged/` (safetensors + tokenizer + loraflow.json) after checking it scores like the adapter."""
    key = digest_of("merge", adapter.digest, model.digest, prompts.digest, prompt, dtype)
    folder = work_dir(store, "merge", key)
    result = Ref(path=str(folder / "merged"), digest=key)
    if is_complete(folder):
        return result
    labels, answers = read_answers(prompts)
    rows = read_prompts(prompts, "dev")[PROMPT].tolist()[:CHECK_ROWS]
    tokenizer = load_tokenizer(model.path)
    base = load_causal_lm(model.path, "float32")  # merge in full precision, cast on save if asked
    adapted = load_adapter(base, Path(adapter.path) / "adapter")
    merged, difference = merge_checked(adapted, lambda m: score_labels(m, tokenizer, rows, answers))
    info = {
        "approach": "generative",
        "labels": labels,
        "answers": answers,
        "prompt": prompt.model_dump(mode="json"),
        "trust_remote_code": trusts_code(model.path),
        "merge_check": {"rows": len(rows), "max_abs_diff": difference},
    }
    save_merged(folder, merged, tokenizer, dtype, info)
    return result


def load_adapter(base: Any, folder: Path) -> PeftModel:
    """The trained adapter on its base model, in eval mode."""
    with peft_quietly():
        return PeftModel.from_pretrained(base, str(folder)).eval()


def merge_checked(adapted: PeftModel, outputs: Callable[[Any], np.ndarray]) -> tuple[Any, float]:
    """Fold the adapter into the base weights; `outputs(model)` (scores or logits on a few dev rows) must
    agree before and after within TOLERANCE, else nothing is saved. Returns (merged model, max difference)."""
    before = outputs(adapted)
    merged = adapted.merge_and_unload().eval()
    after = outputs(merged)
    difference = float(np.max(np.abs(before - after))) if before.size else 0.0
    if difference > TOLERANCE:
        raise RuntimeError(
            f"the merged model's outputs differ from the adapter model's by {difference:.2e} "
            f"(> {TOLERANCE}); the merge is not saved"
        )
    return merged, difference


def save_merged(folder: Path, merged: Any, tokenizer: Any, dtype: str, info: dict[str, Any]) -> None:
    """Write `folder/merged/` (safetensors in the configured dtype, tokenizer, loraflow.json) atomically."""
    if dtype not in ("auto", "float32"):
        merged = merged.to(getattr(torch, dtype))
    with building(folder) as tmp:
        merged.save_pretrained(str(tmp / "merged"))
        tokenizer.save_pretrained(str(tmp / "merged"))
        (tmp / "merged" / "loraflow.json").write_text(json.dumps(info, indent=1))
