"""make bench | python bench/run.py [--out bench/results] [--only ingest,eval,...]

loraflow side by side with the seed's way, in one process on this machine. Every figure is a ratio of two
timings measured in the same run (absolute times are printed beside them for context only); each timing
is repeated and reported as median and spread (min-max). Writes bench/results/<UTC date>.json and .md.

  ingest    100,000-row .xlsx and 1,000,000-row .tsv to parquet: loraflow's reader vs pandas defaults
  eval      label scoring (one batched pass, labels share the prompt's KV cache) vs generate-and-parse
  predict   batched, length-sorted scoring vs one row at a time
  training  loraflow's training step (dynamic padding, answer-only loss) vs the seed's padded Trainer
  rerun     a cached re-run of an unchanged config vs its first run, and the flow's orchestration overhead

Models are the embedded SmolLM2-135M on the geo example (CPU here; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

GEO = REPO / "examples" / "geo" / "config.yaml"


def timings(fn: Callable[[], Any], repeat: int, warmup: int = 0) -> tuple[list[float], Any]:
    """Wall seconds of `repeat` calls of fn after `warmup` untimed ones, and the last call's result."""
    for _ in range(warmup):  # thread pools, allocator arenas, file cache
        fn()
    seconds, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - started)
    return seconds, result


def summary(seconds: list[float]) -> dict[str, float]:
    return {
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "n": len(seconds),
    }


def ratio(baseline: list[float], ours: list[float]) -> float:
    """How many times faster loraflow is (median baseline time / median loraflow time)."""
    return statistics.median(baseline) / statistics.median(ours)


# ---- ingest -------------------------------------------------------------------------------------------


def bench_ingest(folder: Path) -> dict[str, Any]:
    from openpyxl import Workbook

    import loraflow.tasks.tables
    from loraflow.tasks.tables import read_table
    from tests.tiny import geo_rows

    rows = pd.concat([geo_rows(100)] * 1000, ignore_index=True)
    rows["sample_data"] += " #" + pd.Series(range(len(rows))).astype(str)
    xlsx = folder / "rows100k.xlsx"
    book = Workbook(write_only=True)
    sheet = book.create_sheet("data")
    sheet.append(list(rows.columns))
    for row in rows.itertuples(index=False, name=None):
        sheet.append(list(row))
    book.save(xlsx)
    tsv = folder / "rows1m.tsv"
    pd.concat([rows] * 10, ignore_index=True).to_csv(tsv, sep="\t", index=False)

    def to_parquet(frame: pd.DataFrame, name: str) -> pd.DataFrame:
        frame.to_parquet(folder / name, index=False)
        return frame

    out: dict[str, Any] = {}
    for name, path, baseline in (
        ("xlsx_100k", xlsx, lambda: to_parquet(pd.read_excel(xlsx, engine="openpyxl"), "base.parquet")),
        ("tsv_1m", tsv, lambda: to_parquet(pd.read_csv(tsv, sep="\t"), "base.parquet")),
    ):
        base_s, base = timings(baseline, 5, warmup=1)
        ours_s, ours = timings(
            lambda path=path: to_parquet(read_table(path, sheet=0), "ours.parquet"), 5, warmup=1
        )
        same = ours.drop(columns=["_row"]).astype(str).equals(base.astype(str))
        if name == "xlsx_100k":  # the fast reader must write the parquet the openpyxl reader writes
            engine, loraflow.tasks.tables.EXCEL_ENGINE = loraflow.tasks.tables.EXCEL_ENGINE, "openpyxl"
            try:
                slow = read_table(path, sheet=0)
            finally:
                loraflow.tasks.tables.EXCEL_ENGINE = engine
            ours.to_parquet(folder / "fast.parquet", index=False)
            slow.to_parquet(folder / "slow.parquet", index=False)
            identical = (folder / "fast.parquet").read_bytes() == (folder / "slow.parquet").read_bytes()
        out[name] = {
            "rows": len(base),
            "baseline": summary(base_s)
            | {
                "what": "pandas "
                + ("read_excel(openpyxl)" if "xlsx" in name else "read_csv")
                + ", to_parquet"
            },
            "loraflow": summary(ours_s) | {"what": "loraflow.tasks.tables.read_table, to_parquet"},
            "speedup": ratio(base_s, ours_s),
            "rows_per_s": len(base) / statistics.median(ours_s),
            "same_cells": bool(same),
        }
        if name == "xlsx_100k":
            out[name] |= {
                "engine": loraflow.tasks.tables.EXCEL_ENGINE,
                "parquet_identical_to_openpyxl": identical,
            }
        else:  # loraflow keeps every cell as written ("007", "1.0"); pandas' way to do that, for reference
            text_s, _ = timings(
                lambda: to_parquet(
                    pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False), "text.parquet"
                ),
                5,
                warmup=1,
            )
            out[name]["text_baseline"] = summary(text_s) | {
                "what": "pandas read_csv(dtype=str, keep_default_na=False), to_parquet",
                "speedup": ratio(text_s, ours_s),
            }
    return out


# ---- evaluation and prediction on the embedded model ----------------------------------------------------


def _geo_dev(store: str) -> tuple[Any, list, list[str], list[str], list[str]]:
    """(model ref, dev prompts, gold labels, labels, answers) of the geo example."""
    from loraflow.loading import load_config
    from loraflow.tasks.generative.prepare import PROMPT, prepare_inputs, read_answers, read_prompts
    from loraflow.tasks.ingest import LABEL, ingest_table
    from loraflow.tasks.models import default_cache_dir, resolve_model

    config = load_config(GEO)
    splits = ingest_table.fn(config.data, config.input_columns, store)
    prompts = prepare_inputs.fn(splits, config.prompt, config.data.answers, store)
    dev = read_prompts(prompts, "dev")
    labels, answers = read_answers(prompts)
    model = resolve_model.fn(config.model, default_cache_dir())
    return model, dev[PROMPT].tolist(), dev[LABEL].tolist(), labels, answers


def _generate_and_parse(
    model: Any, tokenizer: Any, prompts: list, answers: list[str]
) -> tuple[list[int], int]:
    """The seed's evaluation: generate a few tokens per row and parse the answer.

    Returns (label index per row, -1 when unparseable; the number of unparseable answers)."""
    predicted, unparseable = [], 0
    for messages in prompts:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            output = model.generate(
                **ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        reply = (
            tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip().lower()
        )
        match = [i for i, a in enumerate(answers) if re.match(rf"\W*{re.escape(a.lower())}\b", reply)]
        predicted.append(match[0] if match else -1)
        unparseable += not match
    return predicted, unparseable


def _prompt_tokens_run(tokenizer: Any, prompts: list, answers: list[str], batch_size: int) -> dict[str, int]:
    """Prompt positions the model runs: one row at a time (every prompt whole) vs score_labels' batches
    (the shared opening once, then each length-sorted batch padded to its longest remainder)."""
    from loraflow.tasks.generative.scoring import MIN_SHARED_PREFIX, _shared_prefix, answer_spans

    heads = []
    for messages in prompts:
        sequences, starts, _ = answer_spans(tokenizer, messages, answers)
        heads.append(sequences[0][: min(starts)])
    shared = len(_shared_prefix(heads))
    shared = shared if shared >= MIN_SHARED_PREFIX else 0
    rest = sorted(len(h) - shared for h in heads)
    batched = shared + sum(
        len(rest[i : i + batch_size]) * max(rest[i : i + batch_size]) for i in range(0, len(rest), batch_size)
    )
    return {"one_row_at_a_time": sum(len(h) for h in heads), "batched": batched, "shared_opening": shared}


def bench_eval_and_predict(folder: Path) -> dict[str, Any]:
    from loraflow.tasks.generative.scoring import score_labels
    from loraflow.tasks.models import load_causal_lm, load_tokenizer

    model_ref, prompts, gold, labels, answers = _geo_dev(str(folder / "store"))
    tokenizer, model = load_tokenizer(model_ref.path), load_causal_lm(model_ref.path, "float32")
    gold_index = [labels.index(g) for g in gold]

    def accuracy(predicted: list[int]) -> float:
        return float(np.mean([p == g for p, g in zip(predicted, gold_index, strict=True)]))

    scored_s, scores = timings(lambda: score_labels(model, tokenizer, prompts, answers, batch_size=16), 3)
    generated_s, (generated, unparseable) = timings(
        lambda: _generate_and_parse(model, tokenizer, prompts, answers), 3
    )
    one_s, one = timings(
        lambda: np.concatenate([score_labels(model, tokenizer, [p], answers, batch_size=1) for p in prompts]),
        3,
    )
    rows = len(prompts)
    tokens = _prompt_tokens_run(tokenizer, prompts, answers, 16)
    return {
        "eval": {
            "rows": rows,
            "baseline": summary(generated_s)
            | {
                "what": "generate 4 tokens per row + parse",
                "unparseable": unparseable,
                "accuracy": accuracy(generated),
            },
            "loraflow": summary(scored_s)
            | {"what": "label scoring, batch 16", "accuracy": accuracy(list(scores.argmax(1)))},
            "speedup": ratio(generated_s, scored_s),
            "rows_per_s": rows / statistics.median(scored_s),
        },
        "predict": {
            "rows": rows,
            "baseline": summary(one_s) | {"what": "one row at a time"},
            "loraflow": summary(scored_s) | {"what": "length-sorted batches of 16"},
            "speedup": ratio(one_s, scored_s),
            "same_predictions": bool((one.argmax(1) == scores.argmax(1)).all()),
            "rows_per_s": rows / statistics.median(scored_s),
            "prompt_tokens_run": tokens,
            "note": "on a CPU both ways are bound by matrix-multiply FLOPs: batching wins by running fewer "
            "tokens (the shared opening once) and by larger, more efficient multiplies; "
            "speedup = token ratio x per-token efficiency ratio",
        },
    }


# ---- training throughput ---------------------------------------------------------------------------------


def _padded_baseline(
    model_path: str, frame: pd.DataFrame, lora: Any, train: Any, folder: Path
) -> tuple[float, int, float]:
    """The seed's notebook: every row padded to max_length, loss on every token, plain Trainer + peft."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    from loraflow.tasks.generative.prepare import COMPLETION, PROMPT
    from loraflow.tasks.lora import build_lora_config
    from loraflow.tasks.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_path)
    texts = [
        tokenizer.apply_chat_template([*p, *c], tokenize=False)
        for p, c in zip(frame[PROMPT], frame[COMPLETION], strict=True)
    ]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=train.max_length)
    labels = [
        [t if m else -100 for t, m in zip(ids, mask, strict=True)]
        for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]
    dataset = Dataset.from_dict({**encoded, "labels": labels})
    set_seed(train.seed)
    network = get_peft_model(load_causal_lm(model_path, "float32").train(), build_lora_config(lora))
    args = TrainingArguments(
        output_dir=str(folder),
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        learning_rate=train.lr,
        lr_scheduler_type=train.scheduler,
        warmup_steps=train.warmup_ratio,
        max_grad_norm=train.max_grad_norm,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=train.seed,
        disable_tqdm=True,
    )
    trainer = Trainer(model=network, args=args, train_dataset=dataset)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    real_tokens = sum(sum(mask) for mask in encoded["attention_mask"][: train.max_steps * train.batch_size])
    loss = [e["loss"] for e in trainer.state.log_history if "loss" in e][-1]
    return seconds, real_tokens, loss


def bench_training(folder: Path, steps: int) -> dict[str, Any]:
    from datasets import Dataset

    from loraflow.loading import load_config
    from loraflow.tasks.generative.prepare import COMPLETION, PROMPT, prepare_inputs, read_prompts
    from loraflow.tasks.generative.train import fit_adapter
    from loraflow.tasks.ingest import ingest_table
    from loraflow.tasks.models import default_cache_dir, resolve_model

    config = load_config(GEO, [f"train.max_steps={steps}", "train.logging_steps=1"])
    store = str(folder / "store")
    splits = ingest_table.fn(config.data, config.input_columns, store)
    prompts = prepare_inputs.fn(splits, config.prompt, config.data.answers, store)
    frame = read_prompts(prompts, "train")
    model = resolve_model.fn(config.model, default_cache_dir())

    dataset = Dataset.from_pandas(frame[[PROMPT, COMPLETION]], preserve_index=False)
    started = time.perf_counter()
    trainer, _ = fit_adapter(dataset, model.path, config.lora, config.train, "float32", folder / "ours")
    ours_s = time.perf_counter() - started
    ours_tokens = int(trainer.state.num_input_tokens_seen)
    ours_loss = [e["loss"] for e in trainer.state.log_history if "loss" in e][-1]
    base_s, base_tokens, base_loss = _padded_baseline(
        model.path, frame, config.lora, config.train, folder / "base"
    )
    return {
        "steps": steps,
        "batch_size": config.train.batch_size,
        "max_length": config.train.max_length,
        "baseline": {
            "what": "Trainer + peft, rows padded to max_length, loss on all tokens",
            "seconds": base_s,
            "real_tokens": base_tokens,
            "real_tokens_per_s": base_tokens / base_s,
            "final_loss": base_loss,
        },
        "loraflow": {
            "what": "SFTTrainer, dynamic padding, loss on the answer",
            "seconds": ours_s,
            "real_tokens": ours_tokens,
            "real_tokens_per_s": ours_tokens / ours_s,
            "final_loss": ours_loss,
        },
        "speedup": (ours_tokens / ours_s) / (base_tokens / base_s),
        "note": "one timing each (a training run is the repeat unit); losses differ in definition: the "
        "baseline averages over prompt and answer tokens, loraflow over the answer only",
    }


# ---- cached re-run and orchestration overhead -----------------------------------------------------


def bench_rerun(folder: Path, steps: int) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from loraflow.flows.generative import train_generative
    from loraflow.loading import load_config

    config = load_config(GEO, [f"train.max_steps={steps}", f"output_dir={folder / 'runs'}"])
    walls, overheads = [], []
    for _ in range(2):
        started = time.perf_counter()
        state = train_generative(config, return_state=True)
        walls.append(time.perf_counter() - started)
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(state.state_details.flow_run_id)
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
            )
        compute = sum(t.total_run_time.total_seconds() for t in tasks)
        overheads.append({"flow_s": flow_run.total_run_time.total_seconds(), "tasks_s": compute})
    first, again = overheads
    return {
        "first_wall_s": walls[0],
        "rerun_wall_s": walls[1],
        "rerun_share": walls[1] / walls[0],
        "orchestration": first | {"overhead_share": (first["flow_s"] - first["tasks_s"]) / first["flow_s"]},
        "note": "wall times are in one process whose temporary Prefect server was already up",
    }


# ---- report ----------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    lines = ["| benchmark | loraflow | baseline | ratio | target |", "|---|---|---|---|---|"]
    ingest = results.get("ingest", {})
    for name, target in (("xlsx_100k", "≥ 3×"), ("tsv_1m", "none set")):
        if name in ingest:
            r = ingest[name]
            lines.append(
                f"| ingest {name} to parquet | {r['loraflow']['median_s']:.2f} s "
                f"({r['rows_per_s']:,.0f} rows/s) | "
                f"{r['baseline']['median_s']:.2f} s | {r['speedup']:.2f}× | {target} |"
            )
            if "text_baseline" in r:
                lines.append(
                    f"| ingest {name}, cells kept as text | {r['loraflow']['median_s']:.2f} s | "
                    f"{r['text_baseline']['median_s']:.2f} s (dtype=str) | "
                    f"{r['text_baseline']['speedup']:.2f}× | none set |"
                )
    if "eval" in results:
        e = results["eval"]
        ours, base = e["loraflow"], e["baseline"]
        lines.append(
            f"| evaluation, {e['rows']} rows | {ours['median_s']:.1f} s, acc {ours['accuracy']:.3f} | "
            f"{base['median_s']:.1f} s, acc {base['accuracy']:.3f}, {base['unparseable']} unparseable | "
            f"{e['speedup']:.1f}× | ≥ 5× |"
        )
        p = results["predict"]
        lines.append(
            f"| prediction, {p['rows']} rows | {p['loraflow']['median_s']:.1f} s | "
            f"{p['baseline']['median_s']:.1f} s | {p['speedup']:.1f}× | ≥ 5× |"
        )
    if "training" in results:
        t = results["training"]
        lines.append(
            f"| training, {t['steps']} steps | {t['loraflow']['real_tokens_per_s']:.0f} real tokens/s | "
            f"{t['baseline']['real_tokens_per_s']:.0f} real tokens/s | {t['speedup']:.2f}× | ≥ 1.5× |"
        )
    if "rerun" in results:
        r = results["rerun"]
        lines.append(
            f"| cached re-run | {r['rerun_wall_s']:.1f} s | first run {r['first_wall_s']:.1f} s | "
            f"{100 * r['rerun_share']:.1f}% | ≤ 10% |"
        )
        o = r["orchestration"]
        lines.append(
            f"| orchestration overhead | {o['flow_s'] - o['tasks_s']:.1f} s | flow {o['flow_s']:.1f} s | "
            f"{100 * o['overhead_share']:.1f}% | ≤ 5% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--only", default="ingest,eval,training,rerun")
    parser.add_argument("--train-steps", type=int, default=8)
    args = parser.parse_args()
    chosen = set(args.only.split(","))
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    with tempfile.TemporaryDirectory(prefix="loraflow-bench-") as tmp:
        folder = Path(tmp)
        for name, run in (
            ("ingest", lambda: bench_ingest(folder)),
            ("eval", lambda: bench_eval_and_predict(folder)),
            ("training", lambda: bench_training(folder, args.train_steps)),
            ("rerun", lambda: bench_rerun(folder, args.train_steps)),
        ):
            if name in chosen:
                started = time.perf_counter()
                result = run()
                results |= result if name == "eval" else {name: result}
                print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / datetime.now(UTC).strftime("%Y-%m-%d")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1, default=float))
    text = table(results)
    stem.with_suffix(".md").write_text(
        f"Measured {results['date']} on {results['machine']['cpus']} CPU cores "
        f"({results['machine']['platform']}).\n\n" + text + "\n"
    )
    print(text)


if __name__ == "__main__":
    main()
