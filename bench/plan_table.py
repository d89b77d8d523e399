"""`python bench/plan_table.py`: the README's "Fit your GPU" table, from the planner (tasks/plan.py).

Each model's shape is built in code from its published config.json hyper-parameters (nothing is
downloaded), trained at loraflow's default settings (loraflow/config.py) on rows of 128 tokens.
"""

from __future__ import annotations

from loraflow.config import LoraSettings, ModelSettings, TrainSettings
from loraflow.tasks.plan import ModelShape, TokenLengths, make_plan, shown_bytes

LENGTH = 128  # tokens per row assumed for the table
GPUS = {"8 GB": 8 * 10**9, "24 GB": 24 * 10**9}
# hidden, layers, heads, KV heads, intermediate, vocab (all tie their embeddings); Qwen2's q/k/v have a bias.
MODELS = {
    "Qwen2.5-0.5B": (896, 24, 14, 2, 4864, 151936, True),
    "Qwen2.5-1.5B": (1536, 28, 12, 2, 8960, 151936, True),
    "Qwen2.5-3B": (2048, 36, 16, 2, 11008, 151936, True),
    "Llama-3.2-1B": (2048, 16, 32, 8, 8192, 128256, False),
    "Llama-3.2-3B": (3072, 28, 24, 8, 8192, 128256, False),
}


def shape_of(
    hidden: int, layers: int, heads: int, kv: int, inner: int, vocab: int, qkv_bias: bool
) -> ModelShape:
    return ModelShape(
        vocab=vocab,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        head_dim=hidden // heads,
        intermediate=inner,
        tied=True,
        biased=("q_proj", "k_proj", "v_proj") if qkv_bias else (),
    )


def table() -> str:
    lora, train, lengths = LoraSettings(), TrainSettings(), TokenLengths.assumed(LENGTH)
    head = (
        "| model | quantization | peak (estimate) | "
        + " | ".join(GPUS)
        + " | cheapest change that fits 8 GB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, dims in MODELS.items():
        for quantization in ("none", "4bit"):
            model = ModelSettings(quantization=quantization)
            plans = {
                gpu: make_plan(shape_of(*dims), model, lora, train, lengths, size)
                for gpu, size in GPUS.items()
            }
            small = plans["8 GB"]
            change = "—" if small.fits else ("; ".join(small.advice[0].changes) if small.advice else "none")
            cells = [("fits" if p.fits else "no") for p in plans.values()]
            total = shown_bytes(small.estimate.total)
            lines.append(f"| {name} | {quantization} | {total} | " + " | ".join(cells) + f" | {change} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
