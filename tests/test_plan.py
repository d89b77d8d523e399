"""The GPU memory planner: its parameter counts match the real model and peft, its activation estimate matches
what autograd saves in a real training step, and `loraflow plan` reports, advises and exits as documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

import loraflow.tasks.approaches
from loraflow.cli import main
from loraflow.config import LoraSettings
from loraflow.errors import ResourceError
from loraflow.loading import load_config
from loraflow.tasks.approaches import approach as approach_steps
from loraflow.tasks.ingest import ingest_table
from loraflow.tasks.lora import build_lora_config
from loraflow.tasks.plan import (
    count_parameters,
    model_shape,
    parse_memory,
    saved_activation_bytes,
    trainable_parameters,
)
from tests.conftest import write_config
from tests.test_classifier import write_pair_config

pytestmark = pytest.mark.unit

LORAS = [
    LoraSettings(r=4),
    LoraSettings(r=8, target_modules=["q_proj", "v_proj"]),
    LoraSettings(r=4, use_dora=True),
]


@pytest.mark.parametrize("lora", LORAS, ids=["all-linear", "q-v", "dora"])
def test_parameter_counts_match_the_model_and_peft(tiny_model: Path, lora: LoraSettings) -> None:
    model = LlamaForCausalLM.from_pretrained(tiny_model)
    shape = model_shape(model.config)
    assert count_parameters(shape) == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, build_lora_config(lora))
    assert trainable_parameters(shape, lora) == peft_model.get_nb_trainable_parameters()[0]


def test_classifier_head_is_counted_as_peft_trains_it(tiny_model: Path) -> None:
    lora = LoraSettings(r=4)
    model = LlamaForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    shape = model_shape(model.config)
    assert count_parameters(shape, num_labels=3) == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, build_lora_config(lora, "SEQ_CLS"))
    assert trainable_parameters(shape, lora, num_labels=3) == peft_model.get_nb_trainable_parameters()[0]


def _saved_for_backward(model: torch.nn.Module, batch: int, length: int, vocab: int) -> int:
    """Bytes autograd saves for the backward pass in one forward + loss: the sum of the unique storages
    packed by `saved_tensors_hooks`, leaving out the model's own parameters (the frozen weights a matmul
    keeps for its input gradient are weights, not activations)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    assert loss.requires_grad  # a training step: the LoRA weights get gradients
    return sum(saved.values())


def test_activation_estimate_is_within_a_quarter_of_what_autograd_saves() -> None:
    # Larger than the session's tiny model (hidden 32), so that the per-layer terms dominate; still seconds.
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    lora = LoraSettings()
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), build_lora_config(lora)).train()
    length = 48
    for batch in (1, 2, 4):
        measured = _saved_for_backward(model, batch, length, config.vocab_size)
        estimate = saved_activation_bytes(model_shape(config), lora, batch * length, dtype_bytes=4)
        assert 0.75 <= estimate / measured <= 1.25, (batch, estimate, measured)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GiB", 8 << 30), ("24GB", 24 * 10**9), ("8000MiB", 8000 << 20), ("1.5 gib", 3 << 29)],
)
def test_gpu_memory_sizes_parse(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


def test_plan_that_does_not_fit_prints_ranked_advice_and_exits_3(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, tiny_model)
    # About 516 MiB at batch 8 (the CUDA context's 512 MiB included): 515 MiB fits only with a change.
    assert main(["plan", str(config), "--gpu-memory", "515MiB"]) == 3
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "parameters" in out and "peak GPU memory (estimate)" in out
    advice = [line.strip() for line in out.splitlines() if line.strip()[:2] in ("1.", "2.", "3.")]
    assert advice[0].startswith("1. train.batch_size: 4, train.grad_accum: 2")  # the cheapest change
    assert len(advice) >= 2 and all("→" in line for line in advice)


def test_plan_that_fits_exits_0(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, tiny_model)
    assert main(["plan", str(config), "--gpu-memory", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "NOT" not in out
    assert "tokens per row (p95 / max)" in out
    assert re.search(r"optimizer steps per epoch\s+6\n", out)  # 48 train rows, batch 8


def test_bad_gpu_memory_is_a_one_line_error(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, tiny_model)
    assert main(["plan", str(config), "--gpu-memory", "lots"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        "loraflow: error: --gpu-memory 'lots': expected a size such as 8GiB, 24GB or 8000MiB"
    ]
    assert "Traceback" not in captured.out + captured.err


@pytest.mark.flow
def test_training_on_a_gpu_too_small_for_it_stops_before_training_with_the_advice(
    prefect_server: None, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check both approaches' fit run on a CUDA GPU, before any training: here the classifier's (whose
    token lengths no other test measures; the generative ones are `loraflow plan`'s above), with a GPU of
    512 MiB free (`free_gpu_memory` stands in for torch.cuda.mem_get_info, which this machine lacks)."""
    config = load_config(write_pair_config(tmp_path / "task", tiny_model))
    store = str(tmp_path / "store")
    steps = approach_steps("classifier")
    prepared = steps.prepare(
        config, ingest_table.fn(config.data, config.input_columns, store), store, plain=True
    )
    monkeypatch.setattr(loraflow.tasks.approaches, "free_gpu_memory", lambda: 512 << 20)
    with pytest.raises(
        ResourceError, match=r"(?s)needs about .* of GPU memory and 512 MiB are free; .*(fit|fits)"
    ):
        steps.fit(config, prepared, store)
    assert not list(Path(store).glob("train*"))  # nothing trained, no checkpoint
