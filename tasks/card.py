"""The merged model's README.md in the Hugging Face model-card format: YAML front matter (base model,
library, pipeline tag, the base model's license, metrics as a model-index) and a body with the labels,
how to load the model, the training config, the data hashes and the dev metrics."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from loraflow.config import LoraflowConfig
from loraflow.loading import dump_config
from loraflow.tasks.manifest import CardUsage

# Where the embedded models come from, for the card's base_model and license.
EMBEDDED_ORIGIN = {"smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}


def short_model_name(model_name: str) -> str:
    """A base model as people call it: `SmolLM2-135M-Instruct` for the embedded one, the last part of a hub
    id (`Qwen2.5-0.5B`) or of a local folder's path."""
    if model_name.startswith("embedded:"):
        embedded = model_name.removeprefix("embedded:")
        model_name = EMBEDDED_ORIGIN.get(embedded, (embedded, ""))[0]
    return Path(model_name.rstrip("/")).name or model_name


def model_names(metrics: dict[str, Any]) -> dict[str, str]:
    """Each scored model of a run's metrics.json named for a reader: "zero-shot SmolLM2-135M-Instruct" or
    "majority class", "classical (TF-IDF + logistic regression)", "fine-tuned SmolLM2-135M-Instruct
    (LoRA r=16)"."""
    base = short_model_name(metrics["model"])
    lora = metrics.get("lora")  # not in the metrics.json of runs from before it was recorded
    names = {
        "classical": "classical (TF-IDF + logistic regression)",
        "finetuned": f"fine-tuned {base} (LoRA r={lora['r']})" if lora else f"fine-tuned {base} (LoRA)",
    }
    baseline = metrics.get("baseline")
    if baseline:
        kind = baseline["kind"]
        names["baseline"] = {"zero-shot": f"zero-shot {base}", "majority": "majority class"}.get(kind, kind)
    return names


def front_matter(text: str) -> dict[str, Any]:
    """The YAML block between the leading `---` lines of a model card ({} when there is none)."""
    found = re.match(r"\A---\n(.*?)\n---\n", text, re.S)
    return (yaml.safe_load(found.group(1)) or {}) if found else {}


def base_model_origin(model_name: str, cache_dir: Path) -> tuple[str, str]:
    """(base_model, license) for the card: the embedded model's origin, else the name and the license
    in the base model's own card (a local folder's README.md, or the hub snapshot's); "other" if none."""
    if model_name.startswith("embedded:"):
        return EMBEDDED_ORIGIN.get(model_name.removeprefix("embedded:"), (model_name, "other"))
    local = Path(model_name)
    cards = [local / "README.md"] if local.is_dir() else []
    cards += sorted(
        (cache_dir / "hub" / f"models--{model_name.replace('/', '--')}").glob("snapshots/*/README.md")
    )
    for card in cards:
        if card.is_file():
            license_ = front_matter(card.read_text(encoding="utf-8")).get("license")
            if license_:
                return model_name, str(license_)
    return model_name, "other"


def render_model_card(
    config: LoraflowConfig, metrics: dict[str, Any], base_model: str, license_: str, usage: CardUsage
) -> str:
    """README.md of the merged model; `usage` (from its loraflow.json) says how such a model is used."""
    finetuned = metrics["finetuned"]
    head = {
        "base_model": base_model,
        "library_name": "transformers",
        "pipeline_tag": usage.pipeline_tag,
        "license": license_,
        "tags": ["loraflow", "lora", "peft", "text-classification"],
        "metrics": ["accuracy", "f1"],
        "model-index": [
            {
                "name": config.name,
                "results": [
                    {
                        "task": {"type": "text-classification", "name": "Text classification"},
                        "dataset": {"name": f"{config.name} (dev split)", "type": config.name},
                        "metrics": [
                            {"type": "accuracy", "value": round(finetuned["accuracy"], 4)},
                            {"type": "f1", "value": round(finetuned["macro_f1"], 4), "name": "macro-F1"},
                        ],
                    }
                ],
            }
        ],
    }
    test = metrics.get("test") or {}
    names = model_names(metrics)
    rows = [
        (names[key], m, test.get(key))
        for key in ("finetuned", "classical", "baseline")
        if (m := metrics.get(key))
    ]
    columns = "| model | accuracy | macro-F1 |" + (" test accuracy | test macro-F1 |" if test else "")

    def row(name: str, m: dict[str, Any], t: dict[str, Any] | None) -> str:
        scores = f"| {name} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} |"
        return scores + (
            (f" {t['accuracy']:.4f} | {t['macro_f1']:.4f} |" if t else " - | - |") if test else ""
        )

    sources = "\n".join(
        f"- `{Path(path).name}`: sha256 `{digest}`" for path, digest in metrics["data"]["sources"].items()
    )
    body = [
        f"# {config.name}",
        "",
        f"A {config.approach} text classifier fine-tuned with LoRA from `{base_model}` by loraflow, with "
        "the adapter merged into the base weights.",
        "",
        f"Labels: {', '.join(f'`{label}`' for label in metrics['labels'])}.",
        "",
        "## How to use",
        "",
        usage.usage,
        "",
        f"## Evaluation ({metrics['n_dev']} dev rows"
        + (f", {metrics['n_test']} test rows" if test else "")
        + f"; {metrics['n_train']} train rows)",
        "",
        "The classical baseline is TF-IDF + logistic regression fitted on the same train rows."
        + (" The test split was never used to select anything." if test else ""),
        "",
        columns,
        "|---" * (5 if test else 3) + "|",
        *(row(name, m, t) for name, m, t in rows),
        "",
        "## Training data",
        "",
        sources,
        "",
        "## Training config",
        "",
        "```yaml",
        dump_config(config).rstrip(),
        "```",
        "",
    ]
    return "---\n" + yaml.safe_dump(head, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(body)
