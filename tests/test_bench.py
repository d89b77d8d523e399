"""The GPU benchmark script runs where there is no GPU (--tiny): the same code path, a 2-layer model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_runs_every_variant_on_a_tiny_model(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "bench/gpu.py", "--tiny", "--steps", "1", "--batch", "2", "--predict-rows", "64"]
        + ["--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "gpu.json").read_text())
    variants = [r["variant"] for r in record["results"]]
    assert variants == ["padded", "dynamic", "dynamic+ckpt", "packed", "packed+ckpt"]
    assert all(r["real_tokens_per_s"] > 0 and r["final_loss"] > 0 for r in record["results"])
    assert record["packed_attention"] == "sdpa" and "| padded |" in done.stdout
    prediction = record["prediction"]  # label scoring, batched vs one row at a time, on the same model
    assert prediction["rows"] == 64 and prediction["one_row_at_a_time_rows"] == 16
    assert prediction["batched_rows_per_s"] > 0 and prediction["one_row_at_a_time_rows_per_s"] > 0
    assert "prediction (64 rows, label scoring)" in done.stdout


def test_the_gpu_scripts_scoring_needs_no_orchestration_packages() -> None:
    """The GPU machine has torch and transformers but not prefect or pydantic: scoring must not need them."""
    blocker = (
        "import builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *args, **kwargs):\n"
        "    if name.split('.')[0] in ('prefect', 'pydantic', 'great_expectations'):\n"
        "        raise ImportError('not on the GPU machine: ' + name)\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = guard\n"
        "import loraflow.tasks.generative.scoring, tests.tiny\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocker], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
