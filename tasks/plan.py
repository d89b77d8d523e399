"""GPU memory planner: `loraflow plan CONFIG.yaml [--gpu-memory 8GiB]`, and the same check before training.

Everything is estimated from the model's config.json (no weights are loaded) and the token lengths of the
user's own rows after templating. The parts of peak memory:

- weights: every base parameter at model.dtype (auto = bfloat16, as on a GPU that supports it); with
  model.quantization the decoder layers' linears at 0.5 byte (4bit NF4, + double-quantised absmax) or
  1 byte (8bit) per parameter; embeddings, norms and the LM head stay in the compute dtype;
- the trainable parameters (LoRA, DoRA magnitudes, the classifier head) in float32 (peft upcasts adapter
  weights) with AdamW's two float32 moments, and their float32 gradients;
- activations: the tensors autograd saves for the backward pass, per token and decoder layer (norms,
  rotated q/k/v and the attention output, the MLP's gate/up/product, each adapted linear's input and its
  r-wide LoRA projection). With gradient checkpointing only each layer's input is kept and one layer is
  recomputed at a time;
- logits: the generative loss applies the LM head to the answer's positions only (TRL's fused LM head, in
  tiles of at most 4,096 positions × 32,768 words, made to skip the prompt's positions on a CPU too:
  tasks/generative/train.py), so the vocabulary-wide logits of a whole batch never exist: one tile in the
  forward, one in the backward, and the answer positions' float32 hidden-state gradient. With
  train.loss: choice the head runs at one position per distinct answer start (at most batch of them) for
  every row, logits and gradient in the compute dtype;
- overhead: CUDA context and allocator fragmentation, 512 MiB + 10 %.

The peak is taken at the longest row (capped at train.max_length), since batches are padded to their
longest row. Rough speed costs assumed to rank the advice: gradient checkpointing +30 % step time, 4-bit
+40 %, and each halving of batch_size (doubling grad_accum, same effective batch) +10 % per row.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from loraflow.config import LoraflowConfig, LoraSettings, ModelSettings, TrainSettings
from loraflow.errors import ConfigError, ModelError, ResourceError, UserError
from loraflow.tasks.models import trusts_code
from loraflow.tasks.store import Ref, named_for_config, run_logger

GIB = 1 << 30
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}  # auto: bfloat16 on a GPU
# NF4: 4 bits per weight; double quantisation stores each block of 64 weights' absmax in 8 bits, plus one
# float32 per 256 blocks: (8 + 32 / 256) / 64 bits more per weight.
QUANTISED_BYTES = {"none": None, "4bit": 0.5 + (8 + 32 / 256) / 64 / 8, "8bit": 1.0}
OVERHEAD_FIXED, OVERHEAD_SHARE = 512 << 20, 0.10
# Relative step time of each change, to rank the advice (rough figures; see the module docstring).
CHECKPOINTING_COST, FOUR_BIT_COST, HALVED_BATCH_COST = 1.3, 1.4, 1.1
# peft's all-linear: every nn.Linear in the decoder layers (the LM head and a classifier head excluded).
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_memory(text: str) -> int:
    """Bytes from "8GiB", "24GB", "8000MiB" (binary units are powers of 1024, decimal ones of 1000)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*", text, flags=re.IGNORECASE)
    if not found or float(found.group(1)) <= 0:
        raise UserError(f"--gpu-memory {text!r}: expected a size such as 8GiB, 24GB or 8000MiB")
    return int(float(found.group(1)) * _UNITS[found.group(2).lower()])


def shown_bytes(n: float) -> str:
    """A byte count for people: 1.23 GiB, 456 MiB, 12 KiB."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.0f} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a decoder-only (Llama-style) model's config.json."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    biased: tuple[str, ...] = ()  # the decoder-layer linears that have a bias

    @property
    def linears(self) -> dict[str, tuple[int, int]]:
        """Each decoder layer's linear: (in features, out features)."""
        q, kv, h, i = (
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.hidden,
            self.intermediate,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


def model_shape(config: Any) -> ModelShape:
    """The shape of a transformers PretrainedConfig (Llama, Qwen2, Mistral, SmolLM and alike)."""
    needed = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [name for name in needed if getattr(config, name, None) is None]
    if missing:
        raise ModelError(
            f"the memory planner reads decoder-only (Llama-style) configs; this {config.model_type!r} config "
            f"has no {', '.join(missing)}"
        )
    heads = config.num_attention_heads
    return ModelShape(
        vocab=config.vocab_size,
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate=config.intermediate_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        biased=_biased(config),
    )


def _biased(config: Any) -> tuple[str, ...]:
    """Qwen2's q/k/v always have a bias; Llama-style configs say so in attention_bias and mlp_bias."""
    attention = LAYER_LINEARS[:4] if getattr(config, "attention_bias", False) else ()
    if config.model_type == "qwen2":
        attention = LAYER_LINEARS[:3]
    return attention + (LAYER_LINEARS[4:] if getattr(config, "mlp_bias", False) else ())


def layer_linear_parameters(shape: ModelShape) -> int:
    """Parameters of all decoder layers' linears (what quantisation shrinks)."""
    per_layer = sum(i * o + (o if n in shape.biased else 0) for n, (i, o) in shape.linears.items())
    return shape.layers * per_layer


def count_parameters(shape: ModelShape, num_labels: int | None = None) -> int:
    """All base parameters: embeddings, decoder layers (linears + 2 norms), final norm, and the LM head
    (unless tied to the embeddings); with `num_labels`, a classification head instead of the LM head."""
    embeddings = shape.vocab * shape.hidden
    norms = (2 * shape.layers + 1) * shape.hidden
    head = shape.hidden * num_labels if num_labels else 0 if shape.tied else shape.vocab * shape.hidden
    return embeddings + layer_linear_parameters(shape) + norms + head


def targeted_linears(shape: ModelShape, lora: LoraSettings) -> list[str]:
    """The decoder-layer linears LoRA adapts (names as in the model); a name that matches none fails."""
    if lora.target_modules == "all-linear":
        return list(LAYER_LINEARS)
    targets = [lora.target_modules] if isinstance(lora.target_modules, str) else list(lora.target_modules)
    unknown = [t for t in targets if t.split(".")[-1] not in LAYER_LINEARS]
    if unknown:
        raise ConfigError(
            f"lora.target_modules {unknown} are not among the decoder layers' linears {list(LAYER_LINEARS)}"
        )
    return [name for name in LAYER_LINEARS if any(t.split(".")[-1] == name for t in targets)]


def trainable_parameters(shape: ModelShape, lora: LoraSettings, num_labels: int | None = None) -> int:
    """LoRA's r × (in + out) per adapted linear (+ out for DoRA's magnitude), and a classifier head."""
    linears = shape.linears
    per_layer = sum(
        lora.r * (linears[n][0] + linears[n][1]) + (linears[n][1] if lora.use_dora else 0)
        for n in targeted_linears(shape, lora)
    )
    return shape.layers * per_layer + (shape.hidden * num_labels if num_labels else 0)


@dataclass(frozen=True)
class TokenLengths:
    """Token lengths of the train rows after templating, each capped at train.max_length."""

    rows: int
    p95: int
    longest: int
    total: int
    truncated: int

    @classmethod
    def of(cls, lengths: list[int], max_length: int) -> TokenLengths:
        if not lengths:
            raise UserError("the train split has no rows to measure")
        capped = np.minimum(np.asarray(lengths), max_length)
        return cls(
            rows=len(lengths),
            p95=int(np.ceil(np.percentile(capped, 95))),
            longest=int(capped.max()),
            total=int(capped.sum()),
            truncated=int(sum(n > max_length for n in lengths)),
        )

    @classmethod
    def assumed(cls, length: int, rows: int = 1000) -> TokenLengths:
        """Every row `length` tokens (for tables such as the README's)."""
        return cls(rows=rows, p95=length, longest=length, total=rows * length, truncated=0)


@dataclass(frozen=True)
class Estimate:
    """Peak GPU memory of one training run, in bytes, by part."""

    parameters: int
    trainable: int
    weights: int
    optimizer: int  # trainable weights in float32 + AdamW's two moments
    gradients: int
    activations: int  # saved for backward at the longest row
    logits: int
    overhead: int
    tokens_per_epoch: int
    steps_per_epoch: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.gradients + self.activations + self.logits + self.overhead


def saved_activation_bytes(
    shape: ModelShape,
    lora: LoraSettings,
    tokens: int,
    dtype_bytes: int,
    num_labels: int | None = None,
    checkpointing: bool = False,
) -> int:
    """What autograd keeps for the backward pass over `tokens` tokens (batch × length).

    Per token and decoder layer, in elements of the compute dtype: 2 RMSNorms (input and normalised output
    each), rotated q, k, v and the attention output, the MLP's gate, up and SiLU outputs (and their product
    when down_proj is adapted), each adapted linear's input (its dropout output; none more without
    dropout) and its r-wide LoRA projection; on a GPU the dropout mask adds a byte per input element. Then
    the final norm (and the classifier's pooled rows). With checkpointing, each layer keeps only its input,
    and one layer is recomputed at a time in the backward pass. The LM head's share is `logit_bytes`.
    """
    linears, h = shape.linears, shape.hidden
    adapted = targeted_linears(shape, lora)
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    elements = 4 * h + 2 * q + 2 * kv + 2 * shape.head_dim + 3 * shape.intermediate
    elements += shape.intermediate if "down_proj" in adapted else 0
    # Without dropout an adapted linear's input is a tensor counted above (a norm's or attention's output).
    lora_inputs = sum(linears[n][0] for n in adapted) if lora.dropout > 0 else 0
    elements += lora_inputs + lora.r * len(adapted)
    layer = elements * dtype_bytes + lora_inputs  # + the dropout masks, a byte per element
    final = 2 * h * dtype_bytes + (h * dtype_bytes if num_labels else 0)
    kept = h * dtype_bytes * shape.layers + layer if checkpointing else layer * shape.layers
    return tokens * (kept + final)


# The generative loss: tokens of each row's answer the LM head is applied to (the answer and the turn's
# closing tokens; a label's answer is a word or a few), and TRL's tile of the fused head
# (trl/kernels/chunked_logprob.py).
ANSWER_TOKENS, HEAD_TILE_ROWS, HEAD_TILE_WORDS = 4, 4096, 32768


def logit_bytes(shape: ModelShape, train: TrainSettings, dtype_bytes: int, num_labels: int | None) -> int:
    """The LM head's working memory in a generative training step (none for the classifier's head, whose
    logits are a handful per row): see the module docstring."""
    if num_labels:
        return 0
    if train.loss == "choice":  # the head at ≤ batch positions of every row: the logits and their gradient
        return 2 * train.batch_size * train.batch_size * shape.vocab * dtype_bytes
    positions = train.batch_size * ANSWER_TOKENS
    tile = min(positions, HEAD_TILE_ROWS) * min(shape.vocab, HEAD_TILE_WORDS) * dtype_bytes
    return 2 * tile + positions * shape.hidden * 4


def estimate_memory(
    shape: ModelShape,
    model: ModelSettings,
    lora: LoraSettings,
    train: TrainSettings,
    lengths: TokenLengths,
    num_labels: int | None = None,
    processes: int = 1,
) -> Estimate:
    """Peak GPU memory of training with these settings, on rows of these token lengths."""
    dtype_bytes = DTYPE_BYTES[model.dtype]
    parameters = count_parameters(shape, num_labels)
    quantised = QUANTISED_BYTES[model.quantization]
    in_layers = layer_linear_parameters(shape)
    weights = (
        parameters * dtype_bytes
        if quantised is None
        else int(in_layers * quantised + (parameters - in_layers) * dtype_bytes)
    )
    trainable = trainable_parameters(shape, lora, num_labels)
    tokens = train.batch_size * lengths.longest
    activations = saved_activation_bytes(
        shape, lora, tokens, dtype_bytes, num_labels, train.gradient_checkpointing
    )
    logits = logit_bytes(shape, train, dtype_bytes, num_labels)
    subtotal = weights + 16 * trainable + activations + logits
    batches = math.ceil(lengths.rows / (train.batch_size * processes))
    return Estimate(
        parameters=parameters,
        trainable=trainable,
        weights=weights,
        optimizer=12 * trainable,
        gradients=4 * trainable,
        activations=activations,
        logits=logits,
        overhead=int(OVERHEAD_FIXED + OVERHEAD_SHARE * subtotal),
        tokens_per_epoch=lengths.total,
        steps_per_epoch=math.ceil(batches / train.grad_accum),
    )


@dataclass(frozen=True)
class Option:
    """One change to the settings, its estimated peak memory and its rough relative step time."""

    changes: list[str]
    memory: int
    cost: float


def advise(
    shape: ModelShape,
    model: ModelSettings,
    lora: LoraSettings,
    train: TrainSettings,
    lengths: TokenLengths,
    available: int,
    num_labels: int | None = None,
    limit: int = 5,
) -> list[Option]:
    """Changes that fit in `available` bytes, cheapest in step time first: smaller batches with the same
    effective batch, gradient checkpointing, 4-bit quantisation, and their combinations."""
    halvings = range(int(math.log2(train.batch_size)) + 1)
    checkpointing = [False, True] if not train.gradient_checkpointing else [False]
    quantising = [False, True] if model.quantization != "4bit" else [False]
    options = []
    for halved, checkpoint, quantise in itertools.product(halvings, checkpointing, quantising):
        if not (halved or checkpoint or quantise):
            continue
        batch = max(train.batch_size >> halved, 1)
        changes, updates = [], {}
        if halved:
            accum = train.grad_accum * train.batch_size // batch
            changes.append(f"train.batch_size: {batch}, train.grad_accum: {accum}")
            updates |= {"batch_size": batch, "grad_accum": accum}
        if checkpoint:
            changes.append("train.gradient_checkpointing: true")
            updates["gradient_checkpointing"] = True
        settings = model.model_copy(update={"quantization": "4bit"}) if quantise else model
        if quantise:
            changes.append("model.quantization: 4bit")
        memory = estimate_memory(
            shape, settings, lora, train.model_copy(update=updates), lengths, num_labels
        ).total
        cost = (
            HALVED_BATCH_COST**halved
            * (CHECKPOINTING_COST if checkpoint else 1)
            * (FOUR_BIT_COST if quantise else 1)
        )
        if memory <= available:
            options.append(Option(changes, memory, cost))
    options.sort(key=lambda o: (o.cost, o.memory))
    return options[:limit]


@dataclass(frozen=True)
class Plan:
    """A planned run: the estimate, the token lengths it rests on, the memory it must fit and the advice."""

    estimate: Estimate
    lengths: TokenLengths
    available: int | None
    advice: list[Option]

    @property
    def fits(self) -> bool:
        return self.available is None or self.estimate.total <= self.available


def make_plan(
    shape: ModelShape,
    model: ModelSettings,
    lora: LoraSettings,
    train: TrainSettings,
    lengths: TokenLengths,
    available: int | None,
    num_labels: int | None = None,
    processes: int = 1,
) -> Plan:
    """The estimate, and the advice when it does not fit in `available` bytes."""
    estimate = estimate_memory(shape, model, lora, train, lengths, num_labels, processes)
    fits = available is None or estimate.total <= available
    advice = [] if fits else advise(shape, model, lora, train, lengths, available, num_labels)
    return Plan(estimate, lengths, available, advice)


def advice_text(plan: Plan) -> str:
    """The ranked changes that fit, one a line, or what is left when none does."""
    if not plan.advice:
        return (
            "no change of batch size, gradient checkpointing or 4-bit fits: lower train.max_length, "
            "choose a smaller model, or a GPU with more memory"
        )
    lines = [
        "changes that fit, fastest first (assumed: checkpointing +30% step time, 4-bit +40%, "
        "each halving of batch_size +10%):"
    ]
    for n, option in enumerate(plan.advice, 1):
        lines.append(
            f"  {n}. {'; '.join(option.changes)}  →  {shown_bytes(option.memory)} "
            f"(~{option.cost - 1:+.0%} step time)"
        )
    return "\n".join(lines)


def plan_table(plan: Plan, model: ModelSettings, train: TrainSettings) -> str:
    """The plan as a readable table: parameters, each memory part, total, fits or not, and the advice."""
    e, n = plan.estimate, plan.lengths
    rows = [
        ("parameters", f"{e.parameters:,}"),
        ("trainable (LoRA + head)", f"{e.trainable:,} ({e.trainable / e.parameters:.2%})"),
        ("train rows", f"{n.rows:,}"),
        ("tokens per row (p95 / max)", f"{n.p95} / {n.longest} (max_length {train.max_length})"),
        ("rows cut to max_length", f"{n.truncated:,}"),
        ("tokens per epoch", f"{e.tokens_per_epoch:,}"),
        ("optimizer steps per epoch", f"{e.steps_per_epoch:,}"),
        ("", ""),
        (f"weights ({model.dtype}, quantization {model.quantization})", shown_bytes(e.weights)),
        ("LoRA weights + AdamW states (fp32)", shown_bytes(e.optimizer)),
        ("gradients (fp32)", shown_bytes(e.gradients)),
        (
            f"activations (batch {train.batch_size} × {n.longest} tokens"
            f"{', checkpointing' if train.gradient_checkpointing else ''})",
            shown_bytes(e.activations),
        ),
        ("LM head (answer positions' logits)", shown_bytes(e.logits)),
        ("CUDA context + fragmentation", shown_bytes(e.overhead)),
        ("peak GPU memory (estimate)", shown_bytes(e.total)),
    ]
    if plan.available is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        rows.append((f"GPU memory {shown_bytes(plan.available)}", verdict))
    width = max(len(label) for label, _ in rows)
    text = "\n".join(f"{label:<{width}}  {value}" if label else "" for label, value in rows)
    return text if plan.fits else f"{text}\n\n{advice_text(plan)}"


def model_config(path: str | Path) -> Any:
    """The model's PretrainedConfig from its config.json (no weights loaded)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=trusts_code(path))


def plan_of(
    config: LoraflowConfig, lengths: list[int], num_labels: int | None, model_path: str, available: int | None
) -> Plan:
    """The plan of training `config` on rows of these token `lengths` (the approach measures them on its
    prepared train split: tasks/approaches.py) with the resolved model at `model_path`."""
    return make_plan(
        model_shape(model_config(model_path)),
        config.model,
        config.lora,
        config.train,
        TokenLengths.of(lengths, config.train.max_length),
        available,
        num_labels,
        config.compute.processes,
    )


def free_gpu_memory() -> int | None:
    """Bytes free on this process's CUDA GPU; None without one (the check below then does nothing)."""
    import torch

    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None


@task(name="check-memory", task_run_name=named_for_config("check-memory"))
def check_memory(
    config: LoraflowConfig, lengths: list[int], num_labels: int | None, model: Ref, free: int
) -> int:
    """Before training on a CUDA GPU: fail early with a ResourceError and the advice when the estimated
    peak exceeds the GPU's `free` memory; returns the estimate in bytes."""
    plan = plan_of(config, lengths, num_labels, model.path, free)
    if not plan.fits:
        raise ResourceError(
            f"training {config.name} needs about {shown_bytes(plan.estimate.total)} of GPU memory and "
            f"{shown_bytes(free)} are free; {advice_text(plan)}"
        )
    run_logger().info(
        "estimated peak GPU memory %s of %s free", shown_bytes(plan.estimate.total), shown_bytes(free)
    )
    return plan.estimate.total
