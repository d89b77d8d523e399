"""The model side of `loraflow serve` (loraflow/serve.py): a merged model loaded once, scored through its
approach's own scorer (the one `loraflow predict` uses), what it says about itself for /info, and which
version a registry link points at.

No Prefect task here: a server calls these as plain functions, with no Prefect server behind it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loraflow.errors import ModelError
from loraflow.tasks.approaches import approach
from loraflow.tasks.card import front_matter
from loraflow.tasks.manifest import ModelManifest
from loraflow.tasks.predict import model_folder
from loraflow.tasks.registry import HISTORY

WARM_UP = "warm-up"  # the text of the one row a model scores before it serves (and before a swap)


@dataclass(frozen=True)
class ServedModel:
    """One loaded model: its folder (a version's, resolved), manifest, version name, /info and scorer."""

    folder: Path
    manifest: ModelManifest
    version: str
    info: dict[str, Any]
    score: Callable[[pd.DataFrame, int, str | None], np.ndarray] = field(repr=False)

    def probabilities(self, frame: pd.DataFrame, batch_size: int) -> np.ndarray:
        """(rows × labels) probabilities of `frame`'s rows, as `loraflow predict` computes them."""
        return self.score(frame, batch_size, None)


def watched_link(model: str | Path) -> Path | None:
    """The link to follow when MODEL is a symlink (a registry's models/<name>/production), else None."""
    path = Path(model).absolute()
    return path if path.is_symlink() else None


def link_target(model: str | Path) -> Path:
    """The folder MODEL points at now (the version a registry link names at this moment)."""
    path = Path(model).absolute()
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # a dangling link, a loop
        raise ModelError(
            f"{model}: cannot be read ({e}); point --model at a run folder, its merged/ folder or "
            "models/<name>/production"
        ) from e


def load_served(model: str | Path) -> ServedModel:
    """Load the model MODEL points at now (a run folder, its merged/ or a registry link's target) and score
    one row with it, so that a model that cannot score fails here and not on a request."""
    folder = model_folder(link_target(model))
    manifest = ModelManifest.read(folder)
    scorer = approach(manifest.approach).scorer(folder, manifest)
    scorer(pd.DataFrame([dict.fromkeys(manifest.columns, WARM_UP)]), 1, None)
    version = _version_name(folder)
    return ServedModel(folder, manifest, version, _describe(folder, manifest, version), scorer)


def _version_name(folder: Path) -> str:
    """A registry version's name (its run's timestamp), the run folder's name for its merged/, else the
    folder's own."""
    return folder.parent.name if folder.name == "merged" else folder.name


def _describe(folder: Path, manifest: ModelManifest, version: str) -> dict[str, Any]:
    """/info's model part: approach, labels, columns, base model, the run it came from and its metrics."""
    card = folder / "README.md"
    head = front_matter(card.read_text(encoding="utf-8")) if card.is_file() else {}
    run = _run_folder(folder, version)
    recorded = (
        json.loads((run / "metrics.json").read_text()) if run and (run / "metrics.json").is_file() else {}
    )
    scored = {"dev": recorded.get("finetuned"), "test": (recorded.get("test") or {}).get("finetuned")}
    metrics = {
        split: {k: values[k] for k in ("accuracy", "macro_f1") if k in values}
        for split, values in scored.items()
        if isinstance(values, dict)
    }
    return {
        "approach": manifest.approach,
        "labels": manifest.labels,
        "columns": manifest.columns,
        "base_model": head.get("base_model") or recorded.get("model"),
        "run": str(run) if run is not None else None,
        "metrics": metrics or None,
        "version": version,
        "folder": str(folder),
    }


def _run_folder(folder: Path, version: str) -> Path | None:
    """The run a model comes from: the folder above merged/, or the one the registry's history records for
    the version."""
    if folder.name == "merged":
        return folder.parent
    history = folder.parent.parent / HISTORY  # <registry>/<name>/versions/<version> → <registry>/<name>
    if not history.is_file():
        return None
    for line in reversed(history.read_text(encoding="utf-8").splitlines()):
        record = json.loads(line) if line.strip() else {}
        if record.get("version") == version and record.get("challenger", {}).get("run"):
            return Path(record["challenger"]["run"])
    return None


def link_changed(link: Path, serving: Path) -> Path | None:
    """The folder `link` points at when it is no longer `serving`, else None (also while it is missing)."""
    try:
        target = Path(os.path.realpath(link, strict=True))
    except OSError:  # the link is being replaced or is gone: keep serving what we have
        return None
    return None if target == serving or model_folder_of(target) == serving else target


def model_folder_of(target: Path) -> Path | None:
    """`model_folder(target)`, or None when `target` is not (yet) a loraflow model."""
    try:
        return model_folder(target)
    except ModelError:
        return None
