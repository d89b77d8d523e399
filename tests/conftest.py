"""Shared fixtures: offline settings, one Prefect test server per session, tiny models and example data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Tests never download and never phone home; a stray hub call fails loudly. Set before Prefect is imported.
_HOME = tempfile.mkdtemp(prefix="loraflow-tests-")
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "GX_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": _HOME,
        "LORAFLOW_CACHE_DIR": str(Path(_HOME) / "cache"),
        "TOKENIZERS_PARALLELISM": "false",
        # INFO lines logged at interpreter exit would hit pytest's already-closed capture streams.
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
)

import pytest  # noqa: E402
import yaml  # noqa: E402

from tests.tiny import build_tiny_llama, geo_rows  # noqa: E402

# The longest tests first: pytest-xdist hands tests out in collection order, and a five-minute test that
# starts last is a five-minute tail with the other worker idle.
LONGEST_FIRST = ("test_server.py", "test_sweep.py", "test_retrain.py", "test_wheel.py", "test_terminal.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise kept


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for the whole session (starting one takes ~20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with a ChatML byte-level tokenizer, saved as an HF folder."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model_64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same with hidden size 64: bitsandbytes quantises weights in blocks of 64 inputs."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-64"), hidden=64)


def write_config(folder: Path, model: Path, **sections: dict) -> Path:
    """A geo-shaped config in `folder` with train/dev .xlsx written by openpyxl; sections override."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "train.xlsx").exists():
        geo_rows(48).to_excel(folder / "train.xlsx", index=False, sheet_name="data", engine="openpyxl")
        geo_rows(16, seed=1).to_excel(folder / "dev.xlsx", index=False, sheet_name="data", engine="openpyxl")
    config = {
        "name": "tiny-geo",
        "data": {
            "train": "train.xlsx",
            "dev": "dev.xlsx",
            "sheet": "data",
            "label_column": "score",
            "answers": {1: "Yes", 0: "No"},
        },
        "prompt": {
            "system": "Judge the places.",
            "template": "Is the condition met?\nRequirement: {requirement}\nSample data: {sample_data}",
        },
        "model": {"name": str(model)},
        "lora": {"r": 4},
        "train": {
            "max_steps": 4,
            "batch_size": 8,
            "lr": 0.01,
            "save_steps": 2,
            "logging_steps": 2,
            "max_length": 128,
        },
        "contract": {"min_rows_per_class": 2},
        "output_dir": "runs",
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
