"""The run folder: every output of a run gathered under runs/<name>/<UTC timestamp>/, written atomically.

Files are hard links into the work store (no copy of model weights). The folder is assembled under a
hidden temporary name and renamed when complete, so an interrupted run never looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from loraflow.config import LoraflowConfig
from loraflow.loading import dump_config
from loraflow.tasks.card import base_model_origin, render_model_card
from loraflow.tasks.ingest import read_meta
from loraflow.tasks.lora import read_train_stats
from loraflow.tasks.manifest import ModelManifest
from loraflow.tasks.metrics import read_evaluation
from loraflow.tasks.models import default_cache_dir
from loraflow.tasks.plots import dev_losses, draw_plots
from loraflow.tasks.store import Ref, artifact_key, link_tree, write_manifest


def build_metrics(
    config: LoraflowConfig,
    splits: Ref,
    baseline: dict[str, Any] | None,
    finetuned: dict[str, Any],
    train: dict[str, Any],
) -> dict[str, Any]:
    """metrics.json: config, data sizes, labels, baseline and fine-tuned metrics, train and eval figures."""
    meta = read_meta(splits)

    def _model_metrics(m: dict[str, Any] | None) -> dict[str, Any] | None:
        return (
            None
            if m is None
            else {k: m[k] for k in ("kind", "accuracy", "macro_f1", "per_class", "confusion")}
            | ({"answer_loss": m["eval"]["answer_loss"]} if "answer_loss" in m.get("eval", {}) else {})
        )

    return {
        "config": config.name,
        "approach": config.approach,
        "model": config.model.name,
        "n_train": meta["rows"]["train"],
        "n_dev": meta["rows"]["dev"],
        "labels": meta["labels"],
        "baseline": _model_metrics(baseline),
        "finetuned": _model_metrics(finetuned),
        "train": {k: train[k] for k in ("seconds", "steps", "tokens_per_second", "final_loss", "peak_rss_mb")}
        | {"truncated_rows": train["truncated_rows"]},
        "eval": finetuned["eval"],
        "data": {"sources": meta["sources"]},
    }


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown table: baseline vs fine-tuned accuracy and macro-F1."""
    lines = ["| model | kind | accuracy | macro-F1 |", "|---|---|---|---|"]
    for name in ("baseline", "finetuned"):
        m = metrics[name]
        if m is not None:
            lines.append(f"| {name} | {m['kind']} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} |")
    return "\n".join(lines)


def render_report(metrics: dict[str, Any], run_dir: Path, plots: list[str] | None = None) -> str:
    """report.md: summary, per-class table, confusion matrix, training figures and the plots."""
    labels = metrics["labels"]
    ft = metrics["finetuned"]
    base = metrics["baseline"]
    lines = [
        f"# {metrics['config']}: {metrics['approach']} fine-tune of {metrics['model']}",
        "",
        f"Train rows: {metrics['n_train']}, dev rows: {metrics['n_dev']}, labels: {', '.join(labels)}.",
        "",
        metrics_table(metrics),
        "",
        "## Per class (dev)",
        "",
        "| label | support | baseline F1 | fine-tuned precision | recall | F1 |",
        "|---|---|---|---|---|---|",
    ]
    for label in labels:
        c = ft["per_class"][label]
        b = f"{base['per_class'][label]['f1']:.3f}" if base else "-"
        lines.append(
            f"| {label} | {c['support']} | {b} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} |"
        )
    lines += [
        "",
        "## Confusion matrix, fine-tuned (rows = gold, columns = predicted)",
        "",
        "| gold \\ predicted | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    for label, row in zip(labels, ft["confusion"], strict=True):
        lines.append(f"| {label} | " + " | ".join(str(v) for v in row) + " |")
    t = metrics["train"]
    lines += [
        "",
        "## Training",
        "",
        f"{t['steps']} steps in {t['seconds']:.1f} s ({t['tokens_per_second']:.0f} tokens/s), final loss "
        f"{t['final_loss']:.4f}, peak RSS {t['peak_rss_mb']:.0f} MB, {t['truncated_rows']} truncated row(s).",
        f"Evaluation: {metrics['eval']['rows_per_second']:.1f} dev rows/s.",
        "",
    ]
    losses = [f"{name} {value:.4f}" for name, value in dev_losses(metrics).items()]
    if losses:
        lines[-1:-1] = [f"Dev answer loss (−log p(gold answer), mean per row): {', '.join(losses)}."]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem.replace('_', ' ')}]({p})" for p in plots] + [""]
    lines += [f"Run folder: `{run_dir}`", ""]
    return "\n".join(lines)


def _predictions(finetuned: Ref, baseline: Ref | None) -> Any:
    _, frame = read_evaluation(finetuned)
    if baseline is not None:
        _, base = read_evaluation(baseline)
        frame["baseline_predicted"] = base["predicted"].to_numpy()
    return frame


def _claim_run_dir(parent: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for attempt in range(1000):
        candidate = parent / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        if not candidate.exists():
            return candidate
    raise RuntimeError(f"cannot find a free run folder name under {parent}")


@task(name="write-run-folder")
def write_run_folder(
    config: LoraflowConfig,
    splits: Ref,
    contract: Ref,
    adapter: Ref,
    merged: Ref,
    baseline: Ref | None,
    finetuned: Ref,
) -> str:
    """Assemble runs/<name>/<UTC timestamp>/ and publish the report as Prefect artifacts."""
    parent = Path(config.output_dir) / config.name
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".run-{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir()
    try:
        base_metrics = read_evaluation(baseline)[0] if baseline else None
        metrics = build_metrics(
            config, splits, base_metrics, read_evaluation(finetuned)[0], read_train_stats(adapter)
        )
        (tmp / "config.yaml").write_text(dump_config(config), encoding="utf-8")
        for split in ("train", "dev"):
            link_tree(Path(splits.path) / f"{split}.parquet", tmp / "data" / f"{split}.parquet")
        link_tree(Path(contract.path) / "contract.json", tmp / "contract.json")
        link_tree(Path(adapter.path) / "adapter", tmp / "adapter")
        link_tree(Path(adapter.path) / "log_history.json", tmp / "adapter" / "log_history.json")
        if (Path(adapter.path) / "tensorboard").is_dir():
            link_tree(Path(adapter.path) / "tensorboard", tmp / "tensorboard")
        link_tree(Path(merged.path), tmp / "merged")
        base_model, license_ = base_model_origin(config.model.name, Path(default_cache_dir()))
        card = render_model_card(config, metrics, base_model, license_, ModelManifest.read(merged.path).card)
        (tmp / "merged" / "README.md").write_text(card, encoding="utf-8")
        _predictions(finetuned, baseline).to_parquet(tmp / "predictions.parquet", index=False)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        log_history = json.loads((Path(adapter.path) / "log_history.json").read_text())
        plots = draw_plots(tmp, metrics, log_history)
        while True:  # two runs in the same second get separate folders
            final = _claim_run_dir(parent)
            report = render_report(metrics, final, plots)
            (tmp / "report.md").write_text(report, encoding="utf-8")
            write_manifest(tmp)
            try:
                os.rename(tmp, final)
                break
            except OSError:
                if not final.exists():
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    create_markdown_artifact(
        key=f"{artifact_key(config.name)}-report",
        markdown=report,
        description=f"Evaluation of {config.name}",
    )
    create_link_artifact(
        key=f"{artifact_key(config.name)}-run-folder",
        link=final.as_uri(),
        link_text=str(final),
        description=f"Run folder of {config.name}: model, metrics, predictions, report and plots",
    )
    create_table_artifact(
        key=f"{artifact_key(config.name)}-metrics",
        table=[
            {
                "model": name,
                "kind": m["kind"],
                "accuracy": round(m["accuracy"], 4),
                "macro_f1": round(m["macro_f1"], 4),
            }
            for name, m in (("baseline", metrics["baseline"]), ("finetuned", metrics["finetuned"]))
            if m
        ],
        description=f"Baseline vs fine-tuned on {metrics['n_dev']} dev rows",
    )
    return str(final)
