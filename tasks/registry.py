"""The model registry: one champion per config that only ever gets better, and the record of every decision.

```
<registry>/<config name>/
  versions/<run timestamp>/   promoted merged models (hard links into their run folders) + MANIFEST.json
  production -> versions/…    a symlink, switched atomically (a new link renamed over the old one)
  history.jsonl               one record per retraining run that trained: time, data hashes, metrics, decision
```

A version folder is complete before `production` points at it, and `production` only ever moves by one
rename, so a reader (a predict job, a server) sees the old champion or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from loraflow.config import LoraflowConfig
from loraflow.errors import DataError
from loraflow.tasks.ingest import source_digests
from loraflow.tasks.store import (
    MANIFEST,
    artifact_key,
    building,
    digest_of,
    link_tree,
    named_for_config,
    retry_unless_user_error,
    run_logger,
)

PRODUCTION = "production"
HISTORY = "history.jsonl"


def model_home(config: LoraflowConfig) -> Path:
    """<registry>/<config name>/."""
    return Path(config.registry) / config.name


def production_model(config: LoraflowConfig) -> Path | None:
    """The current champion's folder (a merged model), or None before the first promotion."""
    link = model_home(config) / PRODUCTION
    return link.resolve() if link.exists() else None


def version_digest(folder: Path) -> str:
    """A content digest of a promoted version (its manifest of file hashes)."""
    return digest_of((folder / MANIFEST).read_text())


def read_history(config: LoraflowConfig) -> list[dict[str, Any]]:
    """Every record of history.jsonl, oldest first."""
    path = model_home(config) / HISTORY
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def append_history(config: LoraflowConfig, record: dict[str, Any]) -> None:
    """Append one record as a JSON line, flushed to disk before returning."""
    path = model_home(config) / HISTORY
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def promote(config: LoraflowConfig, run_dir: Path) -> Path:
    """Make the run's merged model the champion: copy it in as a version, then switch `production`."""
    home = model_home(config)
    version = home / "versions" / run_dir.name
    if not (version / MANIFEST).is_file():
        with building(version) as tmp:
            link_tree(run_dir / "merged", tmp)
    link = home / PRODUCTION
    tmp_link = home / f".{PRODUCTION}.{uuid.uuid4().hex[:8]}"
    os.symlink(Path("versions") / run_dir.name, tmp_link)
    os.replace(tmp_link, link)  # atomic on POSIX: readers see the old champion or the new one
    return version


@task(name="settle-challenger", task_run_name=named_for_config("settle-challenger"))
def settle_challenger(
    config: LoraflowConfig, record: dict[str, Any], run_dir: str, champion: dict[str, Any] | None
) -> dict[str, Any]:
    """Promote the challenger (the run's merged model) when it scores at least the champion's macro-F1, and
    record the decision in history.jsonl; `champion` is None when there is none yet."""
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    challenger = {"run": run_dir, "macro_f1": metrics["finetuned"]["macro_f1"]}
    record = {k: record[k] for k in ("at", "data", "config", "source") if k in record} | {
        "challenger": challenger
    }
    record |= {"champion": champion} if champion else {}
    promoted = champion is None or challenger["macro_f1"] >= champion["macro_f1"]
    record |= {"promoted": promoted, "decision": "promoted" if promoted else "kept champion"}
    if promoted:
        record["version"] = promote(config, Path(run_dir)).name
    record["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    append_history(config, record)
    return record


@task(
    name="check-for-new-data",
    task_run_name=named_for_config("check-for-new-data"),
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_user_error,
)
def open_attempt(config: LoraflowConfig) -> dict[str, Any]:
    """A retraining attempt's opening record: when, the data files' sha256, the settings' digest, the current
    champion, and `unchanged_since` (the time of the last attempt on the same data and settings, when there
    is a champion: nothing to train) or None."""
    sources, settings = source_digests(config.data), config_digest(config)
    champion = production_model(config)
    last = next((r for r in reversed(read_history(config)) if r["decision"] != "failed"), None)
    unchanged = champion is not None and last and last["data"] == sources and last["config"] == settings
    if unchanged:
        run_logger().info(
            "no new data: %s unchanged since %s; production stays %s", config.name, last["at"], champion
        )
    return {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": sources,
        "config": settings,
        "champion": str(champion) if champion else None,
        "unchanged_since": last["at"] if unchanged else None,
    }


@task(name="announce-decision", task_run_name=named_for_config("announce-decision"))
def announce_decision(config: LoraflowConfig, record: dict[str, Any]) -> dict[str, Any]:
    """Log the promotion decision and publish it as the `<name>-promotion` markdown artifact; returns the
    record with the production model now in place."""
    production = production_model(config)
    champion = record.get("champion")
    summary = (
        f"**{record['decision']}**: challenger macro-F1 {record['challenger']['macro_f1']:.4f}"
        + (f" vs champion {champion['macro_f1']:.4f}" if champion else " (no champion)")
        + f"; production: `{production}`; history: `{model_home(config) / HISTORY}`"
    )
    run_logger().info(summary)
    create_markdown_artifact(key=f"{artifact_key(config.name)}-promotion", markdown=summary)
    return record | {"production": str(production)}


def failed_attempt(config: LoraflowConfig, started: datetime | None, error: str) -> dict[str, Any]:
    """The history record of a retraining run that failed: the champion stays as it was."""
    try:
        data = source_digests(config.data)
    except DataError:  # a data file that is gone: the error says so
        data = {}
    return {
        "at": (started or datetime.now(UTC)).isoformat(timespec="seconds"),
        "data": data,
        "config": config_digest(config),
        "promoted": False,
        "decision": "failed",
        "error": error[:2000],
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def config_digest(config: LoraflowConfig) -> str:
    """What, besides the data, makes a challenger worth training: every setting but where things run or go."""
    return digest_of(config.model_dump(mode="json", exclude={"output_dir", "registry", "compute", "sweep"}))
