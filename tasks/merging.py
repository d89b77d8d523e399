"""Merging both approaches share: fold a LoRA adapter into its base weights, check that a few dev rows
score the same before and after (within float tolerance), and save a standard Hugging Face model folder
with its loraflow.json manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from loraflow.tasks.manifest import ModelManifest
from loraflow.tasks.models import peft_quietly
from loraflow.tasks.store import building

CHECK_ROWS = 4


TOLERANCE = 1e-3  # absolute, on summed log-probs or logits in float32
# A quantised layer computes with its own kernels (the CPU's packs NF4 weights its own way, int8 rounds the
# inputs to float16): against the same de-quantised weights in float32 it differs by a few 1e-3 on a tiny
# random model's logits (tests/test_training.py measures it); 5e-2 is an order of magnitude above that.
QUANTIZED_TOLERANCE = 5e-2


def load_adapter(base: Any, folder: Path) -> PeftModel:
    """The trained adapter on its base model, in eval mode."""
    with peft_quietly():
        return PeftModel.from_pretrained(base, str(folder)).eval()


def checked_against(quantization: str) -> str:
    """What a merge's outputs were compared with (loraflow.json's merge_check.against)."""
    return "the adapter model" if quantization == "none" else f"the {quantization}-quantised adapter model"


def merge_checked(
    adapted: PeftModel, outputs: Callable[[Any], np.ndarray], reference: np.ndarray | None = None
) -> tuple[Any, float]:
    """Fold the adapter into the base weights; `outputs(model)` (scores or logits on a few dev rows) must
    agree before and after within TOLERANCE, else nothing is saved. Returns (merged model, max difference).
    `reference`: the outputs the merged model must match instead of the adapted model's (those of the
    quantised model the adapter was trained on), within QUANTIZED_TOLERANCE."""
    if reference is not None:
        merged = adapted.merge_and_unload().eval()
        difference = float(np.max(np.abs(reference - outputs(merged)))) if reference.size else 0.0
        if difference > QUANTIZED_TOLERANCE:
            raise RuntimeError(
                f"the de-quantised merged model's outputs differ from the quantised adapter model's by "
                f"{difference:.2e} (> {QUANTIZED_TOLERANCE}); the merge is not saved"
            )
        return merged, difference
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


def save_merged(folder: Path, merged: Any, tokenizer: Any, dtype: str, manifest: ModelManifest) -> None:
    """Write `folder/merged/` (safetensors in the configured dtype, tokenizer, loraflow.json) atomically."""
    if dtype not in ("auto", "float32"):
        merged = merged.to(getattr(torch, dtype))
    with building(folder) as tmp:
        merged.save_pretrained(str(tmp / "merged"))
        tokenizer.save_pretrained(str(tmp / "merged"))
        manifest.write(tmp / "merged")
