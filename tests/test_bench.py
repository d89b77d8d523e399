"""The GPU benchmark script runs where there is no GPU (--tiny): the same code path, a 2-layer model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_runs_every_variant_on_a_tiny_model(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "bench/gpu.py", "--tiny", "--steps", "1", "--batch", "2", "--out", str(tmp_path)],
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
