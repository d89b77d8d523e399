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

from loraflow.config import CONFIGS, LoraflowConfig
from loraflow.loading import dump_config
from loraflow.tasks.card import base_model_origin, model_names, render_model_card, short_model_name
from loraflow.tasks.ingest import read_meta, split_names
from loraflow.tasks.manifest import ModelManifest
from loraflow.tasks.metrics import read_evaluation, read_train_stats
from loraflow.tasks.models import default_cache_dir
from loraflow.tasks.plots import dev_losses, draw_plots
from loraflow.tasks.review import (
    finetuned_suspects,
    publish_review,
    ranked_suspects,
    review_lines,
    write_review_book,
)
from loraflow.tasks.store import Ref, artifact_key, link_tree, named_for_config, write_manifest

MODELS = ("baseline", "classical", "finetuned")  # metrics.json's keys, in the order reports list them
Evaluations = dict[str, dict[str, Any] | None]  # a model's key → its metrics.json from `save_evaluation`


def _model_metrics(m: dict[str, Any] | None) -> dict[str, Any] | None:
    if m is None:
        return None
    return {k: m[k] for k in ("kind", "accuracy", "macro_f1", "per_class", "confusion")} | (
        {"answer_loss": m["eval"]["answer_loss"]} if "answer_loss" in m.get("eval", {}) else {}
    )


def build_metrics(
    config: LoraflowConfig, splits: Ref, dev: Evaluations, test: Evaluations, train: dict[str, Any]
) -> dict[str, Any]:
    """metrics.json: config, data sizes, labels, each model's dev metrics (baseline, classical, finetuned),
    the same on the test split when there is one, how the checkpoint was selected, train and eval figures."""
    meta = read_meta(splits)
    return {
        "config": config.name,
        "approach": config.approach,
        "model": config.model.name,
        "n_train": meta["rows"]["train"],
        "n_dev": meta["rows"]["dev"],
        "n_test": meta["rows"].get("test", 0),
        "labels": meta["labels"],
        "lora": {"r": config.lora.r, "alpha": config.lora.alpha or 2 * config.lora.r},
        **{name: _model_metrics(dev.get(name)) for name in MODELS},
        "test": {name: _model_metrics(test.get(name)) for name in MODELS} if test.get("finetuned") else None,
        "train": {k: train[k] for k in ("seconds", "steps", "tokens_per_second", "final_loss", "peak_rss_mb")}
        | {"truncated_rows": train["truncated_rows"], "selection": train.get("selection")},
        "eval": dev["finetuned"]["eval"],
        "data": {"sources": meta["sources"]},
    }


def _scored(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """(name, dev metrics, test metrics or None) of each model the run scored, in report order."""
    test = metrics.get("test") or {}
    return [(name, metrics[name], test.get(name)) for name in MODELS if metrics.get(name)]


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown table: each model, named (`model_names`), with its accuracy and macro-F1 on dev (and test,
    when there is one)."""
    with_test = bool(metrics.get("test"))
    header = "| model | accuracy | macro-F1 |" + (" test accuracy | test macro-F1 |" if with_test else "")
    lines = [header, "|---" * (5 if with_test else 3) + "|"]
    names = model_names(metrics)
    for name, m, t in _scored(metrics):
        row = f"| {names[name]} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} |"
        if with_test:
            row += f" {t['accuracy']:.3f} | {t['macro_f1']:.3f} |" if t else " - | - |"
        lines.append(row)
    return "\n".join(lines)


def verdict(metrics: dict[str, Any]) -> list[str]:
    """Plain sentences on what the scores mean: whether the fine-tune beats the classical baseline (on test
    when there is one, as dev picked the checkpoint), and whether the dev score is optimistic."""
    test = metrics.get("test") or {}
    scored = test if test.get("classical") else metrics
    where = "test" if scored is test else "dev"
    said = []
    classical, finetuned = scored.get("classical"), scored.get("finetuned")
    if classical and finetuned and finetuned["macro_f1"] <= classical["macro_f1"]:
        other = next(name for name in CONFIGS if name != metrics["approach"])
        said.append(
            f"The fine-tuned model does not beat the classical baseline (TF-IDF + logistic regression) on "
            f"{where} macro-F1 ({finetuned['macro_f1']:.3f} vs {classical['macro_f1']:.3f}): try more "
            f"epochs (train.epochs), the other approach (approach: {other}), or a larger model on a GPU "
            "(model.name, compute.gpu_deployment)."
        )
    selection = (metrics["train"].get("selection") or {}).get("kept") == "best"
    if selection and not metrics.get("test"):
        said.append(
            "The dev split also picked the checkpoint (train.select_best), so its score is optimistic: set "
            "data.test or data.test_fraction for a split that nothing is selected on."
        )
    return said


def render_report(
    metrics: dict[str, Any],
    run_dir: Path,
    plots: dict[str, str] | None = None,
    inline: bool = False,
    review: list[str] | None = None,
) -> str:
    """report.md: summary, the verdict, the data review (`review`: its lines), per-class table, confusion
    matrix, training figures and the plots (`plots`: each file's path in the run folder → its compact copy as
    a data URI). On disk the images are the files next to report.md; `inline` puts the data URIs in instead,
    for the Prefect UI, which cannot fetch files from the run folder."""
    labels = metrics["labels"]
    ft = metrics["finetuned"]
    test_rows = f", test rows: {metrics['n_test']}" if metrics.get("test") else ""
    others = [(name, metrics[name]) for name in ("baseline", "classical") if metrics.get(name)]
    lines = [
        f"# {metrics['config']}: {metrics['approach']} fine-tune of {short_model_name(metrics['model'])}",
        "",
        f"Train rows: {metrics['n_train']}, dev rows: {metrics['n_dev']}{test_rows}, labels: "
        f"{', '.join(labels)}.",
        "",
        metrics_table(metrics),
        "",
        *(sentence for said in verdict(metrics) for sentence in (said, "")),
        *(review or []),
        "## Per class (dev)",
        "",
        "| label | support | "
        + "".join(f"{m['kind']} F1 | " for _, m in others)
        + "fine-tuned precision | recall | F1 |",
        "|---" * (5 + len(others)) + "|",
    ]
    for label in labels:
        c = ft["per_class"][label]
        rest = "".join(f"{m['per_class'][label]['f1']:.3f} | " for _, m in others)
        lines.append(
            f"| {label} | {c['support']} | {rest}{c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} |"
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
    selection = t.get("selection")
    if selection:
        curve = ", ".join(f"{p['macro_f1']:.3f} (step {p['step']})" for p in selection["curve"])
        kept = (
            f"the best, step {selection['kept_step']}, was kept"
            if selection["kept"] == "best"
            else f"the last step, {selection['kept_step']}, was kept (train.select_best: false)"
        )
        stopped = (
            " Training stopped early: dev macro-F1 had stopped improving."
            if selection["stopped_early"]
            else ""
        )
        lines[-1:-1] = [f"Dev macro-F1 during training: {curve}; {kept}.{stopped}"]
    losses = [f"{name} {value:.4f}" for name, value in dev_losses(metrics).items()]
    if losses:
        lines[-1:-1] = [f"Dev answer loss (−log p(gold answer), mean per row): {', '.join(losses)}."]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{Path(p).stem.replace('_', ' ')}]({uri if inline else p})" for p, uri in plots.items()]
        lines += [""]
    lines += [f"Run folder: `{run_dir}`", ""]
    return "\n".join(lines)


def _predictions(finetuned: Ref, others: dict[str, Ref | None]) -> Any:
    """The fine-tuned model's predictions with each other model's predicted label beside them."""
    _, frame = read_evaluation(finetuned)
    for name, ref in others.items():
        if ref is not None:
            frame[f"{name}_predicted"] = read_evaluation(ref)[1]["predicted"].to_numpy()
    return frame


def _claim_run_dir(parent: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for attempt in range(1000):
        candidate = parent / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        if not candidate.exists():
            return candidate
    raise RuntimeError(f"cannot find a free run folder name under {parent}")


@task(name="write-run-folder", task_run_name=named_for_config("write-run-folder"))
def write_run_folder(
    config: LoraflowConfig,
    splits: Ref,
    contract: Ref,
    adapter: Ref,
    merged: Ref,
    baseline: Ref | None,
    finetuned: Ref,
    classical: Ref | None = None,
    baseline_test: Ref | None = None,
    finetuned_test: Ref | None = None,
    classical_test: Ref | None = None,
    review: Ref | None = None,
) -> str:
    """Assemble runs/<name>/<UTC timestamp>/ and publish the report as Prefect artifacts; with the data
    review's findings (`review`), review.xlsx too, its dev rows judged by the fine-tuned model."""
    parent = Path(config.output_dir) / config.name
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".run-{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir()
    try:
        dev = {"baseline": baseline, "classical": classical, "finetuned": finetuned}
        test = {"baseline": baseline_test, "classical": classical_test, "finetuned": finetuned_test}
        metrics = build_metrics(
            config,
            splits,
            *({name: read_evaluation(ref)[0] for name, ref in refs.items() if ref} for refs in (dev, test)),
            read_train_stats(adapter),
        )
        (tmp / "config.yaml").write_text(dump_config(config), encoding="utf-8")
        for split in split_names(splits):
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
        _predictions(finetuned, {"baseline": baseline, "classical": classical}).to_parquet(
            tmp / "predictions.parquet", index=False
        )
        if finetuned_test is not None:
            others = {"baseline": baseline_test, "classical": classical_test}
            _predictions(finetuned_test, others).to_parquet(tmp / "test_predictions.parquet", index=False)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        log_history = json.loads((Path(adapter.path) / "log_history.json").read_text())
        plots = draw_plots(tmp, metrics, log_history)
        said, suspect_dev = None, None
        if review is not None:
            dev_rows = read_evaluation(finetuned)[1]
            suspect_dev = finetuned_suspects(dev_rows, metrics["labels"], read_meta(splits)["columns"])
            counts = write_review_book(review, tmp / "review.xlsx", suspect_dev)
            said = review_lines(counts, ranked_suspects(review, suspect_dev))
        while True:  # two runs in the same second get separate folders
            final = _claim_run_dir(parent)
            report = render_report(metrics, final, plots, review=said)
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
        markdown=render_report(metrics, final, plots, inline=True, review=said),
        description=f"Evaluation of {config.name}",
    )
    create_link_artifact(
        key=f"{artifact_key(config.name)}-run-folder",
        link=final.as_uri(),
        link_text=str(final),
        description=f"Run folder of {config.name}: model, metrics, predictions, report and plots",
    )
    if review is not None:
        publish_review(review, config.name, suspect_dev)
    create_table_artifact(
        key=f"{artifact_key(config.name)}-metrics",
        table=[
            {
                "model": model_names(metrics)[name],
                "kind": m["kind"],
                "accuracy": round(m["accuracy"], 4),
                "macro_f1": round(m["macro_f1"], 4),
            }
            | (
                {"test_accuracy": round(t["accuracy"], 4), "test_macro_f1": round(t["macro_f1"], 4)}
                if t
                else {}
            )
            for name, m, t in _scored(metrics)
        ],
        description=f"Baselines vs fine-tuned on {metrics['n_dev']} dev rows"
        + (f" and {metrics['n_test']} test rows" if metrics.get("test") else ""),
    )
    return str(final)
