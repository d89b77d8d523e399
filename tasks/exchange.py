"""The exchange: where prepared data goes to a GPU run and its results come back, as finished folders.

A folder of the work store (`<step>-<digest>`) is published to `<storage>/<step>-<digest>/` and fetched
back into another host's work store under the same name (a ref to a file or folder inside it travels
with its whole folder), so caching works the same on both sides.
`storage` is a local folder or any fsspec URL (`s3://bucket/loraflow`, `gs://…`, `memory://…`): one
code path. The manifest is written last and checked on arrival: a folder without it is unfinished, and
a file whose hash differs from the manifest fails the fetch instead of training on damaged data.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from prefect import task

from loraflow.tasks.store import (
    MANIFEST,
    Ref,
    building,
    is_complete,
    link_tree,
    named_for_config,
    retry_unless_user_error,
    write_manifest,
)


def _filesystem(storage: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = url_to_fs(storage)
    return fs, root.rstrip("/")


def _url(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def publish(ref: Ref, storage: str, store: str) -> Ref:
    """Copy the work-store folder that holds `ref` to `storage` (once: a published folder is reused).

    Returns the ref with its path under `storage` (`<storage>/<step>-<digest>/<inner path>`).
    """
    relative = Path(ref.path).relative_to(store)  # both absolute, from the same store (tasks/paths.py)
    folder = Path(store) / relative.parts[0]  # the finished unit, with its manifest
    fs, root = _filesystem(storage)
    remote = f"{root}/{folder.name}"
    if not fs.exists(f"{remote}/{MANIFEST}"):
        local = isinstance(fs, LocalFileSystem)
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.name != MANIFEST:
                target = f"{remote}/{PurePosixPath(*path.relative_to(folder).parts)}"
                if local:  # a shared local disk: hard links, no second copy of the weights
                    link_tree(path, Path(target))
                else:
                    fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                    fs.put_file(str(path), target)
        fs.pipe_file(f"{remote}/{MANIFEST}", (folder / MANIFEST).read_bytes())  # last: marks it complete
    return Ref(path=_url(storage, str(PurePosixPath(*relative.parts))), digest=ref.digest)


def fetch(ref: Ref, storage: str, store: str) -> Ref:
    """Copy a published folder (`ref.path` under `storage`) into the local work store; checks its hashes."""
    prefix = storage.rstrip("/") + "/"
    if not ref.path.startswith(prefix):
        raise ValueError(f"{ref.path} is not under the exchange storage {storage}")
    relative = PurePosixPath(ref.path.removeprefix(prefix))
    name = relative.parts[0]
    local = Path(store) / name
    fetched = Ref(path=str(Path(store, *relative.parts)), digest=ref.digest)
    if is_complete(local):
        return fetched
    fs, root = _filesystem(storage)
    remote = f"{root}/{name}"
    if not fs.exists(f"{remote}/{MANIFEST}"):
        raise FileNotFoundError(f"{ref.path} is not a finished folder (no {MANIFEST}); was it published?")
    expected = json.loads(fs.cat_file(f"{remote}/{MANIFEST}"))
    with building(local) as tmp:
        for relative_file in expected:
            target = tmp / relative_file
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{remote}/{relative_file}", str(target))
        if write_manifest(tmp) != expected:
            raise OSError(f"{ref.path}: the fetched files do not match its {MANIFEST}; publish it again")
    return fetched


# The same steps as Prefect tasks, for the flows: multi-GB copies that a flaky network may break are retried.
_COPY = {"retries": 2, "retry_delay_seconds": 10, "retry_condition_fn": retry_unless_user_error}


@task(name="publish-to-exchange", task_run_name=named_for_config("publish-to-exchange"), **_COPY)
def publish_to_exchange(ref: Ref, storage: str, store: str) -> Ref:
    """`publish` as a task: the work-store folder holding `ref`, copied to the exchange storage."""
    return publish(ref, storage, store)


@task(name="publish-outputs", task_run_name=named_for_config("publish-outputs"), **_COPY)
def publish_outputs(outputs: dict[str, Ref | None], storage: str, store: str, outbox: str) -> dict[str, Any]:
    """On the GPU worker: publish every output folder and write their refs to `outbox` (a JSON file)."""
    published = {
        name: publish(ref, storage, store).model_dump() if ref else None for name, ref in outputs.items()
    }
    with fsspec.open(outbox, "w") as f:
        json.dump(published, f)
    return published


@task(name="fetch-outputs", task_run_name=named_for_config("fetch-outputs"), **_COPY)
def fetch_outputs(outbox: str, storage: str, store: str) -> dict[str, Ref | None]:
    """Back where the flow started: the GPU run's outputs, listed in `outbox`, fetched into the work store."""
    with fsspec.open(outbox, "r") as f:
        published = json.load(f)
    return {name: fetch(Ref(**ref), storage, store) if ref else None for name, ref in published.items()}


@task(name="fetch-from-exchange", task_run_name=named_for_config("fetch-from-exchange"), **_COPY)
def fetch_from_exchange(ref: Ref, storage: str, store: str) -> Ref:
    """`fetch` as a task: a published folder copied into this host's work store, its hashes checked."""
    return fetch(ref, storage, store)
