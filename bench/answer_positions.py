"""python bench/answer_positions.py [--batch 4] [--repeat 6]

A generative training step with the LM head projecting only the answer positions (what loraflow does since
tasks/generative/train.py `project_answer_positions_only`) against TRL's own choice on a CPU (every position
projected, then masked), side by side in one process on the same batches: the embedded SmolLM2-135M, LoRA
r 16, the geo example's rows through the real trainer (`fit_adapter` with train.loss: tokens, SFTTrainer's
fused LM head), `trainer.training_step` (forward + backward) timed in alternation. Also checks that both
give the same loss. Prints the median seconds per step of each and their ratio; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import trl.trainer.utils as fused
from datasets import Dataset

from loraflow.config import ModelSettings
from loraflow.loading import load_config
from loraflow.tasks.generative.prepare import build_messages
from loraflow.tasks.generative.train import fit_adapter
from loraflow.tasks.models import default_cache_dir, resolve_model

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "geo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=6, help="timed steps of each mode")
    args = parser.parse_args()
    config = load_config(EXAMPLE / "config.yaml")
    rows = pd.read_excel(EXAMPLE / "train.xlsx", sheet_name="data")
    answers = {int(k): v for k, v in config.data.answers.items()}
    dataset = Dataset.from_dict(
        {
            "prompt": [build_messages(config.prompt, row) for row in rows.to_dict("records")],
            "completion": [[{"role": "assistant", "content": answers[int(s)]}] for s in rows["score"]],
        }
    )
    path = resolve_model.fn(ModelSettings(name=config.model.name), default_cache_dir()).path
    train = config.train.model_copy(
        update={
            "batch_size": args.batch,
            "max_steps": 1,  # fit_adapter trains; the steps timed below are extra
            "eval_steps": 0,
            "select_best": False,
            "loss": "tokens",
        }
    )
    with tempfile.TemporaryDirectory() as folder:
        trainer, _ = fit_adapter(dataset, path, config.lora, train, "float32", Path(folder))
        compact_choice = fused._use_triton  # installed by fit_adapter
        every_position = compact_choice.__wrapped__  # TRL's own choice
        batches = iter(trainer.get_train_dataloader())
        modes = {"answer positions only": compact_choice, "every position (TRL on a CPU)": every_position}
        seconds: dict[str, list[float]] = {name: [] for name in modes}
        losses: dict[str, float] = {}
        model = trainer.model
        for i in range(args.repeat + 1):  # the first round warms up and is not counted
            batch = trainer._prepare_inputs(next(batches))
            for name, choice in modes.items():
                fused._use_triton = choice
                model.eval()
                with torch.no_grad():
                    losses[name] = float(trainer.compute_loss(model, dict(batch)))
                model.train()
                started = time.perf_counter()
                trainer.training_step(model, dict(batch))
                if i:
                    seconds[name].append(time.perf_counter() - started)
                model.zero_grad(set_to_none=True)
            a, b = losses.values()
            assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), f"the two modes' losses differ: {losses}"
        fused._use_triton = compact_choice
    print(
        f"SmolLM2-135M, LoRA r {config.lora.r}, batches of {args.batch} geo rows, {args.repeat} steps of "
        "each mode in alternation; the same loss in both modes"
    )
    for name, values in seconds.items():
        print(
            f"  {name:32s} median {statistics.median(values):.3f} s/step "
            f"(min {min(values):.3f}, max {max(values):.3f})"
        )
    fast, slow = (statistics.median(v) for v in seconds.values())
    print(f"  ratio every-position / answer-only: {slow / fast:.2f}x")


if __name__ == "__main__":
    main()
