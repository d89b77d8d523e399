"""python bench/gpu.py [--out DIR] [--steps 10] [--tiny]

LoRA training throughput on an NVIDIA GPU, side by side in one process: a Qwen2-shaped model of about
0.5B parameters built from a config with random weights (nothing is downloaded), LoRA r=16 on every
linear layer, bf16, rows of random tokens with lengths spread over 64..1024. Variants:

  padded           every row padded to 1024 (the seed's notebook), SDPA attention
  dynamic          rows sorted by length into batches, padded to the batch's longest row
  dynamic+ckpt     the same with gradient checkpointing
  packed           padding-free: a batch's rows concatenated into one sequence, position ids restarting
                   per row; flash-attention-2 varlen kernels when flash-attn is installed, else SDPA with
                   the block-causal mask transformers derives from the position ids
  packed+ckpt      the same with gradient checkpointing
  *+liger          each of the above with Liger kernels, when liger-kernel is installed

For each: real (non-padding) tokens/s, model FLOPs utilisation against the GPU's bf16 dense peak, peak
GPU memory. Then prediction: loraflow's label scoring (tasks/generative/scoring.py) of geo-shaped chat
prompts with a shared system message, length-sorted batches vs one row at a time, rows/s on the same
model. Writes gpu.json into --out (default $OUT, else bench/results) and prints the tables. --tiny runs
a 2-layer model on the CPU in float32 to check that the script works where there is no GPU (no MFU).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tasks/, tests/ for prediction

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
MAX_LENGTH, MIN_LENGTH = 1024, 64


def qwen2_config(tiny: bool) -> Any:
    from transformers import Qwen2Config

    if tiny:
        return Qwen2Config(
            vocab_size=4096,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=MAX_LENGTH,
        )
    # Qwen2.5-0.5B's shape: 24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4864, vocab 151,936.
    return Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )


def build_model(tiny: bool, attention: str, checkpointing: bool, liger: bool, device: str) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2()
    config = qwen2_config(tiny)
    config._attn_implementation = attention
    torch.manual_seed(0)
    dtype = torch.float32 if tiny else torch.bfloat16
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lora)


def rows(n: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(MIN_LENGTH, MAX_LENGTH + 1, (n,), generator=generator)
    return [torch.randint(0, vocab, (int(n),), generator=generator) for n in lengths]


def batches(samples: list[torch.Tensor], size: int, how: str, device: str) -> list[dict[str, torch.Tensor]]:
    """Model inputs per step: padded to MAX_LENGTH, padded to the batch maximum, or packed into one row."""
    order = list(range(len(samples)))
    if how != "padded":  # length grouping: similar lengths share a batch
        order.sort(key=lambda i: len(samples[i]))
    out = []
    for start in range(0, len(order), size):
        chunk = [samples[i] for i in order[start : start + size]]
        if how == "packed":
            ids = torch.cat(chunk)[None]
            positions = torch.cat([torch.arange(len(c)) for c in chunk])[None]
            labels = torch.cat([torch.cat([torch.full((1,), -100), c[1:]]) for c in chunk])[None]
            out.append({"input_ids": ids, "position_ids": positions, "labels": labels})
            continue
        width = MAX_LENGTH if how == "padded" else max(len(c) for c in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, c in enumerate(chunk):
            ids[i, : len(c)], mask[i, : len(c)] = c, 1
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return [{k: v.to(device) for k, v in b.items()} for b in out]


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def flops_per_token(model: Any, config: Any, mean_length: float) -> float:
    """Useful training FLOPs per real token with LoRA: frozen weights need forward (2N) and input
    gradients (2N), trainable ones also weight gradients (6N); causal attention adds 6·layers·hidden·S."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    attention = 6 * config.num_hidden_layers * config.hidden_size * mean_length
    return 4 * frozen + 6 * trainable + attention


def run_variant(name: str, how: str, attention: str, ckpt: bool, liger: bool, args: Any, device: str) -> dict:
    model = build_model(args.tiny, attention, ckpt, liger, device)
    model.train()
    config = model.base_model.model.config
    samples = rows(args.batch * (args.steps + 2), config.vocab_size)
    steps = batches(samples, args.batch, how, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, seconds, tokens = [], [], []
    for i, batch in enumerate(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up steps (kernel selection, allocator)
            seconds.append(time.perf_counter() - started)
            tokens.append(real_tokens(batch))
            losses.append(float(loss))
    total_s, total_tokens = sum(seconds), sum(tokens)
    mean_length = statistics.mean(len(s) for s in samples)
    result = {
        "variant": name,
        "real_tokens_per_s": total_tokens / total_s,
        "step_s_median": statistics.median(seconds),
        "steps": len(seconds),
        "final_loss": losses[-1],
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }
    peak = args.peak_tflops
    if peak:
        result["mfu"] = flops_per_token(model, config, mean_length) * total_tokens / total_s / (peak * 1e12)
    del model, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


SYSTEM = (
    "You are an expert in geography. Task: decide whether a list of places contains a place matching a "
    "requirement. Answer Yes if at least one place matches, otherwise No."
)
PLACES = ["Lima", "Zurich", "Cairo", "Oslo", "Denver", "Perth", "Quito", "Doha", "Nairobi", "Hanoi"]


def geo_prompts(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Chat prompts shaped like the geo example's, with 2 to 80 places each (mixed lengths)."""
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(n):
        count = int(torch.randint(2, 81, (1,), generator=generator))
        places = [PLACES[int(i)] for i in torch.randint(0, len(PLACES), (count,), generator=generator)]
        user = f"Is the condition met?\nRequirement: on the seashore\nSample data: {', '.join(places)}"
        prompts.append([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])
    return prompts


def run_prediction(args: Any, device: str, folder: Path) -> dict[str, Any]:
    """Label scoring rows/s: length-sorted batches (the predict flow's way) vs one row at a time."""
    from transformers import Qwen2ForCausalLM

    from loraflow.tasks.generative.scoring import score_labels
    from tests.tiny import build_tokenizer

    tokenizer = build_tokenizer(folder)
    config = qwen2_config(args.tiny)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype).eval()
    prompts, answers = geo_prompts(args.predict_rows), ["Yes", "No"]
    one_rows = prompts[: max(len(prompts) // 4, 1)]

    def timed(fn: Any) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    score_labels(model, tokenizer, prompts[:8], answers, batch_size=4)  # warm-up: kernels, allocator
    batched_s = timed(lambda: score_labels(model, tokenizer, prompts, answers, batch_size=args.predict_batch))
    one_s = timed(lambda: [score_labels(model, tokenizer, [p], answers, batch_size=1) for p in one_rows])
    batched, one = len(prompts) / batched_s, len(one_rows) / one_s
    lengths = [len(tokenizer.apply_chat_template(p, tokenize=False)) for p in prompts]
    return {
        "rows": len(prompts),
        "batch": args.predict_batch,
        "prompt_chars": [min(lengths), max(lengths)],
        "batched_rows_per_s": batched,
        "one_row_at_a_time_rows_per_s": one,
        "one_row_at_a_time_rows": len(one_rows),
        "speedup": batched / one,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", Path(__file__).parent / "results"))
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--tiny", action="store_true", help="2-layer model on the CPU: checks the script runs"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="bf16 dense peak (default: by GPU name)"
    )
    parser.add_argument("--predict-rows", type=int, default=256, help="rows scored in the prediction part")
    parser.add_argument("--predict-batch", type=int, default=32)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cpu" and not args.tiny:
        raise SystemExit("no CUDA GPU here: run with --tiny to check the script on the CPU")
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    if args.peak_tflops is None and device == "cuda":
        args.peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    flash = importlib.util.find_spec("flash_attn") is not None and device == "cuda"
    liger = importlib.util.find_spec("liger_kernel") is not None and device == "cuda"
    # Packed rows are told apart by their position ids: flash-attention-2 runs them as varlen sequences;
    # without it, transformers builds a block-causal mask for SDPA from the same position ids.
    packed_attention = "flash_attention_2" if flash else "sdpa"
    variants = [
        ("padded", "padded", "sdpa", False),
        ("dynamic", "dynamic", "sdpa", False),
        ("dynamic+ckpt", "dynamic", "sdpa", True),
        ("packed", "packed", packed_attention, False),
        ("packed+ckpt", "packed", packed_attention, True),
    ]
    results, skipped = [], {}
    started = time.perf_counter()
    for use_liger in [False] + ([True] if liger else []):
        for name, how, attention, ckpt in variants:
            label = name + ("+liger" if use_liger else "")
            results.append(run_variant(label, how, attention, ckpt, use_liger, args, device))
            print(f"{label}: {results[-1]['real_tokens_per_s']:.0f} real tokens/s", flush=True)
    if not liger:
        skipped["*+liger"] = "liger-kernel is not installed" if device == "cuda" else "CPU run"
    with tempfile.TemporaryDirectory() as tmp:
        prediction = run_prediction(args, device, Path(tmp))
    print(f"prediction: {prediction['speedup']:.1f}x rows/s, batched vs one row at a time", flush=True)
    padded = next(r for r in results if r["variant"] == "padded")["real_tokens_per_s"]
    for r in results:
        r["vs_padded"] = r["real_tokens_per_s"] / padded
    record = {
        "packed_attention": packed_attention,
        "device": gpu,
        "torch": torch.__version__,
        "tiny": args.tiny,
        "batch": args.batch,
        "lengths": [MIN_LENGTH, MAX_LENGTH],
        "peak_bf16_tflops": args.peak_tflops,
        "results": results,
        "prediction": prediction,
        "skipped": skipped,
        "seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(record, indent=1))
    print(f"\n{gpu}, batch {args.batch}, lengths {MIN_LENGTH}..{MAX_LENGTH}")
    print("| variant | real tokens/s | vs padded | MFU | peak GPU memory |\n|---|---|---|---|---|")
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        memory = f"{r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] else "-"
        print(f"| {r['variant']} | {r['real_tokens_per_s']:.0f} | {r['vs_padded']:.2f}× | {mfu} | {memory} |")
    print(
        f"\nprediction ({prediction['rows']} rows, label scoring): batches of {prediction['batch']} "
        f"{prediction['batched_rows_per_s']:.1f} rows/s, one row at a time "
        f"{prediction['one_row_at_a_time_rows_per_s']:.1f} rows/s: {prediction['speedup']:.1f}×"
    )
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")


if __name__ == "__main__":
    main()
