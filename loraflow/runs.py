"""Past runs: `loraflow runs CONFIG` lists a config's finished runs, newest first, with their key
metrics; `loraflow compare RUN RUN` prints two runs' config differences and metrics side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from loraflow.config import LoraflowConfig
from loraflow.errors import UserError

MANIFEST = "MANIFEST.json"  # a run folder without it is unfinished


def finished_runs(config: LoraflowConfig) -> list[Path]:
    """The config's finished run folders, newest first."""
    parent = Path(config.output_dir) / config.name
    runs = [p for p in parent.glob("2*") if (p / MANIFEST).is_file()] if parent.is_dir() else []
    return sorted(runs, key=lambda p: p.name, reverse=True)


def _metrics(run: Path) -> dict[str, Any]:
    return json.loads((run / "metrics.json").read_text())


def _f1(m: dict[str, Any] | None) -> str:
    return f"{m['macro_f1']:.3f}" if m else "-"


def runs_table(config: LoraflowConfig) -> str:
    """A markdown table of the config's runs: when, steps, training time, baseline and fine-tuned scores."""
    runs, sweeps = finished_runs(config), _sweeps(config)
    if not runs:
        return f"no finished runs of {config.name} under {Path(config.output_dir) / config.name}"
    lines = [
        "| run | approach | steps | train s | final loss | baseline F1 | classical F1 | accuracy | macro-F1 "
        "|",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        m = _metrics(run)
        t = m["train"]
        lines.append(
            f"| {run.name} | {m['approach']} | {t['steps']} | {t['seconds']:.0f} | {t['final_loss']:.4f} | "
            f"{_f1(m['baseline'])} | {_f1(m.get('classical'))} | {m['finetuned']['accuracy']:.3f} | "
            f"{m['finetuned']['macro_f1']:.3f} |"
        )
    if sweeps:
        lines += [
            "",
            f"sweeps: {', '.join(p.name for p in sweeps)} (their trials: loraflow runs CONFIG --sweep ID)",
        ]
    return "\n".join(lines)


def _sweeps(config: LoraflowConfig) -> list[Path]:
    """The config's sweep folders (each with its sweep.json), the last updated first."""
    parent = Path(config.output_dir) / config.name / "sweeps"
    found = [p for p in parent.glob("*") if (p / "sweep.json").is_file()] if parent.is_dir() else []
    return sorted(
        found, key=lambda p: json.loads((p / "sweep.json").read_text()).get("updated", ""), reverse=True
    )


def sweep_leaderboard(config: LoraflowConfig, which: str = "latest") -> str:
    """A sweep's leaderboard.md (`which`: its id, or latest), with the other sweeps of the config named."""
    sweeps = _sweeps(config)
    if not sweeps:
        return f"no sweeps of {config.name} under {Path(config.output_dir) / config.name / 'sweeps'}"
    chosen = sweeps[0] if which == "latest" else next((p for p in sweeps if p.name == which), None)
    if chosen is None:
        raise UserError(
            f"no sweep {which!r} of {config.name}; its sweeps: {', '.join(p.name for p in sweeps)}"
        )
    board = chosen / "leaderboard.md"
    text = board.read_text(encoding="utf-8") if board.is_file() else _trials_so_far(chosen)
    others = [p.name for p in sweeps if p != chosen]
    return text.rstrip() + (f"\n\nother sweeps: {', '.join(others)}" if others else "")


def _trials_so_far(folder: Path) -> str:
    """A sweep still running (no leaderboard.md yet): its trials' states from sweep.json."""
    record = json.loads((folder / "sweep.json").read_text())
    lines = [
        f"sweep {folder.name} of {record['config']} (running)",
        "",
        f"| trial | settings | state | dev {record['metric']} |",
        "|---|---|---|---|",
    ]
    for t in record["trials"]:
        settings = ", ".join(f"{k}={v}" for k, v in t["params"].items())
        score = f"{t[record['metric']]:.4f}" if record["metric"] in t else "-"
        lines.append(f"| {t['number']} | {settings} | {t['state']} | {score} |")
    return "\n".join(lines)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat |= _flatten(inner, f"{prefix}{key}.")
        return flat
    return {prefix.rstrip("."): value}


def _run_folder(path: str) -> Path:
    run = Path(path).expanduser().resolve()
    if not (run / "metrics.json").is_file() or not (run / "config.yaml").is_file():
        raise UserError(
            f"{path} is not a loraflow run folder (runs/<name>/<UTC timestamp> with metrics.json)"
        )
    return run


def compare_runs(first: str, second: str) -> str:
    """Config differences and metrics of two runs, side by side (markdown)."""
    a, b = _run_folder(first), _run_folder(second)
    configs = [_flatten(yaml.safe_load((run / "config.yaml").read_text())) for run in (a, b)]
    differing = sorted(
        k for k in configs[0].keys() | configs[1].keys() if configs[0].get(k) != configs[1].get(k)
    )
    lines = [f"| config | {a.name} | {b.name} |", "|---|---|---|"]
    lines += [f"| {k} | {configs[0].get(k, '-')} | {configs[1].get(k, '-')} |" for k in differing]
    if not differing:
        lines.append("| (identical) | | |")
    ma, mb = _metrics(a), _metrics(b)
    rows = [
        ("fine-tuned accuracy", f"{ma['finetuned']['accuracy']:.4f}", f"{mb['finetuned']['accuracy']:.4f}"),
        ("fine-tuned macro-F1", f"{ma['finetuned']['macro_f1']:.4f}", f"{mb['finetuned']['macro_f1']:.4f}"),
        ("baseline macro-F1", _f1(ma["baseline"]), _f1(mb["baseline"])),
        ("classical macro-F1", _f1(ma.get("classical")), _f1(mb.get("classical"))),
        ("test fine-tuned macro-F1", *(_f1((m.get("test") or {}).get("finetuned")) for m in (ma, mb))),
        ("test classical macro-F1", *(_f1((m.get("test") or {}).get("classical")) for m in (ma, mb))),
        ("train steps", ma["train"]["steps"], mb["train"]["steps"]),
        ("train seconds", f"{ma['train']['seconds']:.1f}", f"{mb['train']['seconds']:.1f}"),
        ("final loss", f"{ma['train']['final_loss']:.4f}", f"{mb['train']['final_loss']:.4f}"),
    ]
    for label in sorted(set(ma["labels"]) | set(mb["labels"])):
        scores = [m["finetuned"]["per_class"].get(label, {}).get("f1") for m in (ma, mb)]
        rows.append((f"F1 {label}", *(f"{s:.4f}" if s is not None else "-" for s in scores)))
    lines += ["", f"| metric | {a.name} | {b.name} |", "|---|---|---|"]
    lines += [f"| {name} | {x} | {y} |" for name, x, y in rows]
    return "\n".join(lines)
