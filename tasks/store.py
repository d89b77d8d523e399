"""The work store: where tasks write their outputs, addressed by the content of their inputs.

A task's output folder is named by a digest of everything it reads (input digests + its settings), so
the same inputs always land in the same place: an unchanged re-run finds finished work, and a crashed
training run finds its checkpoints. Folders are built under a temporary name and renamed when complete,
with a manifest of file hashes, so nothing half-written ever looks finished.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy
from prefect.exceptions import MissingContextError
from pydantic import BaseModel, ConfigDict

from loraflow.errors import UserError

# Bump when a task's behaviour changes through code that TASK_SOURCE does not see (helpers, libraries).
CODE_VERSION = "2"
MANIFEST = "MANIFEST.json"


class Ref(BaseModel):
    """A file or folder produced by a task, with a digest of its content (what cache keys hash)."""

    model_config = ConfigDict(frozen=True)

    path: str
    digest: str


STORE_ID = ".store-id"


def store_identity(folder: str | Path) -> str:
    """A random id written once per store folder: a deleted and recreated store gets a new one."""
    path = Path(folder) / STORE_ID
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{STORE_ID}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(uuid.uuid4().hex)
        os.replace(tmp, path)
    return path.read_text()


def _code_and_store(_context: Any, inputs: dict[str, Any]) -> str:
    # Cached results are paths into the store; when the store is deleted, its new id invalidates them.
    stores = [store_identity(inputs[name]) for name in ("store", "cache_dir") if name in inputs]
    return f"loraflow-code-{CODE_VERSION}-" + "-".join(stores)


# Inputs carry content digests (Ref), so INPUTS + the task's source + a code version is a content key.
CONTENT_CACHE = INPUTS + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_code_and_store)


def retry_unless_user_error(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry transient faults (a flaky read, a hub timeout); a user's mistake fails the same way twice."""
    return not isinstance(state.result(raise_on_failure=False), UserError)


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a run; a plain logger when a task function is called directly."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("loraflow")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def digest_of(*parts: Any) -> str:
    """A short stable digest of JSON-able parts (pydantic models are dumped first)."""

    def _plain(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        if isinstance(value, Path):
            return str(value)
        return value

    text = json.dumps([_plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def work_dir(store: str | Path, step: str, key: str) -> Path:
    """The deterministic output folder of `step` for inputs with digest `key`."""
    return Path(store) / f"{step}-{key}"


def step_output(store: str | Path, step: str, key: str, inner: str = "") -> tuple[Path, Ref]:
    """The folder a step writes (`<store>/<step>-<key>`) and the ref it returns: to the folder, or to
    `inner` inside it. A task returns the ref at once when `is_complete(folder)` (a finished earlier run)."""
    folder = work_dir(store, step, key)
    return folder, Ref(path=str(folder / inner if inner else folder), digest=key)


def is_complete(folder: str | Path) -> bool:
    """True when `folder` was finished by `finish_folder` (it holds a manifest)."""
    return (Path(folder) / MANIFEST).is_file()


def write_manifest(folder: Path) -> dict[str, str]:
    """Hash every file under `folder` into MANIFEST.json; returns {relative path: sha256}."""
    files = {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps(files, indent=1, sort_keys=True))
    return files


@contextmanager
def building(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success add a manifest and rename it to `final` atomically."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        write_manifest(tmp)
        if is_complete(final):  # a concurrent run finished the same result first: keep that one
            return
        if final.exists():  # an unfinished leftover (no manifest): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold a lock named after `folder` (an flock on a sibling .lock file) for the duration.

    Two runs of the same config on one host compute the same folders; for long steps (training) the
    second waits here and then finds the first one's finished result instead of training into the same
    checkpoints. The lock is released by the OS if the holder dies.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(f"{folder.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file under a temporary name and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def link_tree(src: Path, dst: Path) -> None:
    """Mirror `src` into `dst` with hard links (no copy of model weights); copy across file systems."""
    if src.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        return
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            link_tree(path, target)


def artifact_key(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "run"


# Task run names, for the Prefect UI and the terminal: what each task run works on, where Prefect's default
# (`evaluate-051`) says nothing. Each is a `task_run_name` callable: Prefect gives it the call's parameters.


def config_name_of(store: str) -> str:
    """The name of the config whose work store `store` is (tasks/paths.py `work_store`:
    <output_dir>/<name>/work, or $LORAFLOW_WORK_DIR/<name> on a GPU worker)."""
    path = Path(store)
    return path.parent.name if path.name == "work" and not os.environ.get("LORAFLOW_WORK_DIR") else path.name


def named_for_config(step: str) -> Callable[..., str]:
    """`<step>-<config name>`, from the task's `config` or its work store (`store`)."""

    def name(parameters: dict[str, Any]) -> str:
        config = parameters.get("config")
        if config is not None:
            return f"{step}-{config['name'] if isinstance(config, dict) else config.name}"
        return f"{step}-{config_name_of(parameters['store'])}" if parameters.get("store") else step

    return name


def named_for_evaluation(kind: str | None = None) -> Callable[..., str]:
    """`evaluate-<model>` (zero-shot, finetuned, classical, majority, champion: `kind`, else the task's own
    `kind`), with `-test` on the test split."""

    def name(parameters: dict[str, Any]) -> str:
        split = parameters.get("split") or "dev"
        model = kind or parameters.get("kind") or "finetuned"
        return f"evaluate-{model}" + ("" if split == "dev" else f"-{split}")

    return name


def named_for_file(step: str, parameter: str) -> Callable[..., str]:
    """`<step>-<file name>`, the file being the task's `parameter` (a path)."""

    def name(parameters: dict[str, Any]) -> str:
        return f"{step}-{Path(str(parameters[parameter])).name}"

    return name
