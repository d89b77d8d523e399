"""The run folder's plots (PNG, referenced from report.md): training loss and learning rate with dev macro-F1
during training below, the fine-tuned model's confusion matrix as a heat map, and per-class F1 of the
baselines next to the fine-tuned model.

Drawn with matplotlib's object API on an Agg canvas: no pyplot global state, no display needed. Each plot
also comes as a compact copy inside a `data:` URI for the report artifact in the Prefect UI, which has no
way to fetch a file from the run folder: 96 dpi (about 600 px wide, the width of the UI's artifact pane)
and a 64-colour palette without dithering (plots have a few flat colours; text stays sharp), about 17 KB
for all three, against 70 KB for the run folder's 110 dpi full-colour files. Prefect keeps every artifact
in its database and sends it whole each time the page is opened, so the copy is kept small.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

PLOTS = {
    "loss": "plots/training_loss.png",
    "confusion": "plots/confusion_matrix.png",
    "f1": "plots/per_class_f1.png",
}


FILE_DPI, INLINE_DPI, INLINE_COLOURS = 110, 96, 64


def _save(figure: Figure, path: Path) -> str:
    """Write the figure to `path`; return the compact copy as a `data:image/png;base64,...` URI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=FILE_DPI, bbox_inches="tight")
    drawn = io.BytesIO()
    figure.savefig(drawn, format="png", dpi=INLINE_DPI, bbox_inches="tight")
    image = Image.open(drawn).convert("RGB")
    palette = image.quantize(INLINE_COLOURS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    compact = io.BytesIO()
    palette.save(compact, format="png", optimize=True)
    return "data:image/png;base64," + base64.b64encode(compact.getvalue()).decode("ascii")


def plot_training(
    log_history: list[dict[str, Any]],
    path: Path,
    dev_losses: dict[str, float] | None = None,
    classical_f1: float | None = None,
) -> str | None:
    """Training loss (and learning rate, right axis) per logged step, with the dev answer loss of each
    evaluated model as a dashed line; below it, dev macro-F1 at each evaluation during training (the best
    marked, the classical baseline as a dashed line). Returns the compact copy; None when nothing was
    logged."""
    logged = [e for e in log_history if "loss" in e and "step" in e]
    if not logged:
        return None
    scored = [e for e in log_history if "eval_macro_f1" in e and "step" in e]
    figure = Figure(figsize=(6.4, 6.0 if scored else 3.6))
    axes, lower = figure.subplots(2, 1, sharex=True) if scored else (figure.add_subplot(), None)
    if lower is not None:
        _plot_dev_f1(lower, scored, classical_f1)
    steps = [e["step"] for e in logged]
    axes.plot(steps, [e["loss"] for e in logged], marker="o", markersize=3, color="tab:blue", label="loss")
    for (name, value), color in zip((dev_losses or {}).items(), ("tab:gray", "tab:green"), strict=False):
        axes.axhline(value, linestyle="--", linewidth=1, color=color, label=f"dev answer loss, {name}")
    if dev_losses:
        axes.legend(loc="upper right", fontsize="small")
    if lower is None:  # with the dev panel below, its axis names the steps of both
        axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss", color="tab:blue")
    rates = [e.get("learning_rate") for e in logged]
    if all(r is not None for r in rates):
        right = axes.twinx()
        right.plot(steps, rates, color="tab:orange", linewidth=1, label="learning rate")
        right.set_ylabel("learning rate", color="tab:orange")
        right.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    axes.set_title("Training loss")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def _plot_dev_f1(axes: Any, scored: list[dict[str, Any]], classical_f1: float | None) -> None:
    steps, f1 = [e["step"] for e in scored], [e["eval_macro_f1"] for e in scored]
    axes.plot(steps, f1, marker="o", markersize=4, color="tab:green", label="dev macro-F1")
    best = int(np.argmax(f1))
    axes.scatter([steps[best]], [f1[best]], s=90, facecolors="none", edgecolors="black", label="best")
    if classical_f1 is not None:
        axes.axhline(
            classical_f1, linestyle="--", linewidth=1, color="tab:orange", label="classical baseline"
        )
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("dev macro-F1")
    axes.legend(loc="lower right", fontsize="small")
    axes.grid(alpha=0.3)


def plot_confusion(confusion: list[list[int]], labels: list[str], path: Path) -> str:
    """Heat map of the confusion matrix (rows = gold, columns = predicted) with counts in the cells; returns
    the compact copy."""
    matrix = np.asarray(confusion)
    size = max(3.2, 0.6 * len(labels) + 2)
    figure = Figure(figsize=(size + 1, size))
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("gold")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        axes.text(j, i, str(value), ha="center", va="center", color="white" if value > threshold else "black")
    axes.set_title("Confusion matrix, fine-tuned (dev)")
    return _save(figure, path)


F1_COLOURS = {"baseline": "tab:gray", "classical": "tab:orange", "finetuned": "tab:blue"}


def plot_f1(labels: list[str], models: dict[str, dict[str, Any]], path: Path) -> str:
    """Per-class F1 bars of each scored model (baseline, classical, fine-tuned), side by side per label;
    returns the compact copy."""
    x = np.arange(len(labels))
    width = 0.8 / len(models)
    figure = Figure(figsize=(max(4.8, 0.8 * len(labels) * len(models) / 2 + 2), 3.6))
    axes = figure.add_subplot()
    for i, (name, m) in enumerate(models.items()):
        scores = [m["per_class"][label]["f1"] for label in labels]
        shown = {"finetuned": "fine-tuned", "classical": "classical"}.get(
            name, m["kind"]
        )  # or zero-shot, majority
        offset = (i - (len(models) - 1) / 2) * width
        axes.bar(x + offset, scores, width, label=shown, color=F1_COLOURS.get(name, "tab:green"))
    axes.set_xticks(x, labels, rotation=30 if len(labels) > 4 else 0)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("F1 (dev)")
    axes.set_title("Per-class F1")
    below = -0.12 if len(labels) <= 4 else -0.25
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, below), ncol=len(models))
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def dev_losses(metrics: dict[str, Any]) -> dict[str, float]:
    """The dev answer loss (-log p(gold answer), mean per row) of each evaluated generative model."""
    return {
        name: metrics[key]["answer_loss"]
        for key, name in (("baseline", "zero-shot"), ("finetuned", "fine-tuned"))
        if metrics.get(key) and "answer_loss" in metrics[key]
    }


def _classical_f1(metrics: dict[str, Any]) -> float | None:
    return metrics["classical"]["macro_f1"] if metrics.get("classical") else None


def draw_plots(folder: Path, metrics: dict[str, Any], log_history: list[dict[str, Any]]) -> dict[str, str]:
    """Every plot of a run into `folder`; returns each written file's relative path with its compact copy
    (a data URI), in report order."""
    drawn = {}
    training = plot_training(log_history, folder / PLOTS["loss"], dev_losses(metrics), _classical_f1(metrics))
    if training:
        drawn[PLOTS["loss"]] = training
    drawn[PLOTS["confusion"]] = plot_confusion(
        metrics["finetuned"]["confusion"], metrics["labels"], folder / PLOTS["confusion"]
    )
    scored = {name: metrics[name] for name in ("baseline", "classical", "finetuned") if metrics.get(name)}
    drawn[PLOTS["f1"]] = plot_f1(metrics["labels"], scored, folder / PLOTS["f1"])
    return drawn


def plot_sweep(trials: list[dict[str, Any]], keys: list[str], metric: str, path: Path) -> str | None:
    """A sweep's finished trials: the dev `metric` against each swept setting, one panel per setting (a
    number on its axis, log-scaled when the values span more than 20×; other values as categories), the
    best trial in orange. Returns the compact copy; None before any trial finished."""
    done = [t for t in trials if metric in t]
    if not done:
        return None
    best = max(done, key=lambda t: t[metric])
    figure = Figure(figsize=(3.2 * len(keys) + 0.6, 3.0))
    for i, key in enumerate(keys):
        axes = figure.add_subplot(1, len(keys), i + 1, sharey=figure.axes[0] if i else None)
        values = [t["params"][key] for t in done]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric:
            x = [float(v) for v in values]
            if min(x) > 0 and max(x) / min(x) > 20:
                axes.set_xscale("log")
            distinct = sorted(set(x))
            if len(distinct) <= 6:  # a grid's few values: ticks at them, short (0.0005, not 0.00050)
                axes.set_xticks(distinct, [f"{v:.4g}" for v in distinct])
                axes.minorticks_off()
        else:
            categories = list(dict.fromkeys(str(v) for v in values))
            x = [categories.index(str(v)) for v in values]
            axes.set_xticks(range(len(categories)), categories, rotation=30 if len(categories) > 3 else 0)
        colours = ["tab:orange" if t is best else "tab:blue" for t in done]
        axes.scatter(x, [t[metric] for t in done], c=colours, s=36, zorder=3)
        axes.set_xlabel(key)
        axes.grid(alpha=0.3)
        if i == 0:
            axes.set_ylabel(f"dev {metric.replace('_', '-').replace('macro-f1', 'macro-F1')}")
    figure.suptitle(f"{len(done)} trial(s); best: trial {best['number']}", fontsize=10)
    figure.tight_layout()
    return _save(figure, path)
