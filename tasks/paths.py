"""Where a run reads and writes: every path of a flow's parameters made absolute once, at flow start.

A deployment's parameters hold paths as the user wrote them (prefect.yaml says `output_dir: runs`): they
mean "relative to the flow run's working directory", which prefect.yaml's pull step sets to the folder
`prefect deploy` ran in. `loraflow run` resolves them against the config file's folder when it loads the
YAML, so they arrive here already absolute. Each flow's first task settles them here, and checks that
the folders the run will write to can be written, so a typo in `output_dir` fails in seconds, before
any model is loaded, instead of after an hour of training. Every task after it sees absolute paths only.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from fsspec.core import url_to_fs
from prefect import task

from loraflow.config import LoraflowConfig
from loraflow.errors import ConfigError
from loraflow.loading import absolute_paths
from loraflow.tasks.predict import model_folder
from loraflow.tasks.store import named_for_config


def work_store(config: LoraflowConfig) -> str:
    """This host's work store: $LORAFLOW_WORK_DIR on a GPU worker if set, else <output_dir>/<name>/work."""
    root = os.environ.get("LORAFLOW_WORK_DIR")
    return str(Path(root).absolute() / config.name if root else config.output_dir / config.name / "work")


def exchange_storage(config: LoraflowConfig) -> str:
    """compute.storage, or <output_dir>/<name>/exchange (a local folder: a worker on the same host)."""
    return config.compute.storage or str(config.output_dir / config.name / "exchange")


def check_writable(folder: Path, setting: str, keep: bool = True) -> None:
    """Create `folder` if needed and write (then remove) a probe file in it; a ConfigError says why not.

    With `keep=False` the folders this check created are removed again (a folder that is only written to
    later, such as the exchange, does not appear before the run gets that far)."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    probe = folder / f".loraflow-write-check-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(
            f"{setting}: cannot write to {folder} ({reason}); set {setting} to a folder this machine can "
            "create and write (a relative path resolves against the flow's working directory)"
        ) from e
    finally:
        for path in [] if keep else created:  # innermost first; one another process wrote into stays
            with contextlib.suppress(OSError):
                path.rmdir()


def check_storage(storage: str) -> None:
    """Write and remove a probe file in the exchange storage (a folder or an fsspec URL)."""
    if "://" not in storage:  # a local folder: leave nothing behind before the run publishes to it
        check_writable(Path(storage), "compute.storage", keep=False)
        return
    try:
        fs, root = url_to_fs(storage)
        fs.makedirs(root, exist_ok=True)
        probe = f"{root.rstrip('/')}/.loraflow-write-check-{uuid.uuid4().hex[:8]}"
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    # Any failure (no credentials, no such bucket, no fsspec driver installed) means the GPU run could not
    # hand back its results; it is reported as the user's to fix, with the library's own words.
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            f"compute.storage: cannot write to {storage} ({type(e).__name__}: {e}); the GPU run's data and "
            "results travel through it, so set compute.storage to a folder or fsspec URL both hosts can write"
        ) from e


@task(name="settle-paths", task_run_name=named_for_config("settle-paths"))
def settle_paths(config: LoraflowConfig, registry: bool = False) -> LoraflowConfig:
    """The config with absolute paths (relative ones against the working directory), after checking that
    output_dir (and the registry, for `registry=True`) can be written and the exchange storage reached."""
    config = absolute_paths(config, Path.cwd())
    check_writable(config.output_dir, "output_dir")
    if registry:
        check_writable(config.registry, "registry")
    if config.compute.gpu_deployment:
        check_storage(exchange_storage(config))
    return config


@task(name="settle-predict-paths")
def settle_predict_paths(model: str, input: str, output: str) -> tuple[str, str, str]:
    """(model folder, input file, output file) as absolute paths against the working directory.

    The model is pinned here: models/<name>/production becomes the version it points at now, so a
    promotion during the run cannot give one part of the table one model and the rest another.
    """
    base = Path.cwd()
    model_path, input_path, output_path = ((base / Path(p).expanduser()) for p in (model, input, output))
    check_writable(output_path.parent, "output")
    return str(model_folder(model_path.resolve())), str(input_path), str(output_path)
