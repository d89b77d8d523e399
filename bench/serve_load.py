"""python bench/serve_load.py [--model RUN_OR_MERGED] [--requests 160] [--concurrency 16] [--rounds 1]

A bounded load test of `loraflow serve` on loopback: this process is the client; the server is a second
process (`python -m loraflow.cli serve`). A fixed number of requests (one geo dev row each, by default) is
sent at a fixed concurrency, then the client stops. Twice, on the same model and the same HTTP stack:

  batched          --max-batch 16 --max-wait-ms 10: concurrent requests are scored together
  one at a time    --max-batch 1 --max-wait-ms 0: each request is scored alone, one after another

With --litserve (LitServe importable: `pip install --target DIR litserve pyzmq`, PYTHONPATH=DIR), a third
run serves the same model and scorer through LitServe (bench/serve_litserve.py: max_batch_size 16,
batch_timeout 10 ms, one CPU worker process): the comparison behind choosing FastAPI + uvicorn
(loraflow/serve.py's docstring).

For each: rows/s over the whole run and per-request latency p50/p99 (the client's clock: send → answer).
Without --model the served model is the embedded base (embedded:smollm2-135m-instruct, converted once into
the loraflow cache) with the geo example's prompt and answers written as its loraflow.json: a merged
model's folder, scored zero-shot. Writes serve.json into --out (default $OUT, else bench/results) and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd

from loraflow.processes import start_in_own_group, stop_group

REPO = Path(__file__).resolve().parent.parent
GEO = REPO / "examples" / "geo"
MODES = {
    "batched": ["--max-batch", "16", "--max-wait-ms", "10"],
    "one at a time": ["--max-batch", "1", "--max-wait-ms", "0"],
}


def embedded_model(folder: Path) -> Path:
    """The embedded base model as a loraflow model folder (hard links into the cache) with the geo prompt."""
    from loraflow.loading import load_config
    from loraflow.tasks.manifest import ModelManifest
    from loraflow.tasks.models import default_cache_dir, resolve_model
    from loraflow.tasks.store import link_tree

    config = load_config(GEO / "config.yaml")
    base = Path(resolve_model.fn(config.model, default_cache_dir()).path)
    link_tree(base, folder)
    labels = ["0", "1"]
    answers = {str(k): v for k, v in config.data.answers.items()}
    ModelManifest(
        approach="generative",
        labels=labels,
        columns=config.input_columns,
        prompt=config.prompt,
        answers=[answers[label] for label in labels],
    ).write(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: bytes) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def _start(model: Path, port: int, flags: list[str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "loraflow.cli", "serve", str(model), "--port", str(port), *flags]
    if flags == ["--litserve"]:
        command = [sys.executable, str(Path(__file__).with_name("serve_litserve.py")), str(model), str(port)]
    with open(log, "wb") as out:  # its own process group: LitServe's workers are its children
        process = start_in_own_group(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            time.sleep(0.5)
        if time.monotonic() > deadline:
            stop_group(process, grace_seconds=30)
            raise RuntimeError(f"the server did not answer in 300 s:\n{log.read_text()[-3000:]}")


def load(port: int, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    """Send every body once, `concurrency` at a time; rows/s and latency percentiles."""
    latencies: list[float] = []
    failed, next_index, lock = [0], [0], threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if next_index[0] >= len(bodies):
                    return
                body = bodies[next_index[0]]
                next_index[0] += 1
            sent = time.perf_counter()
            status = _post(port, body)
            with lock:
                latencies.append(time.perf_counter() - sent)
                failed[0] += status != 200

    health: list[float] = []
    done = threading.Event()

    def probe() -> None:  # GET /health every 50 ms meanwhile: scoring must not block the event loop
        while not done.wait(0.05):
            sent = time.perf_counter()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            connection.request("GET", "/health")
            connection.getresponse().read()
            connection.close()
            health.append(time.perf_counter() - sent)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    prober = threading.Thread(target=probe)
    for thread in [*threads, prober]:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    done.set()
    prober.join()
    rows = sum(len(json.loads(b)["rows"]) for b in bodies)
    return {
        "requests": len(bodies),
        "rows": rows,
        "failed": failed[0],
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds, 2),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * _percentile(latencies, 0.99), 1),
        "health_p99_ms": round(1000 * _percentile(health, 0.99), 1) if health else None,
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="run folder or merged folder (default: the embedded base, zero-shot)")
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rows-per-request", type=int, default=1)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results"))
    parser.add_argument("--litserve", action="store_true", help="also measure LitServe (must be importable)")
    parser.add_argument("--rounds", type=int, default=1, help="measure every mode this many times, in turn")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loraflow-serve-bench-"))
    model = Path(args.model) if args.model else embedded_model(work / "embedded-geo")
    dev = pd.read_excel(GEO / "dev.xlsx", sheet_name="data", engine="calamine")
    records = dev[["requirement", "sample_data"]].astype(str).to_dict("records")
    step = args.rows_per_request
    bodies = [
        json.dumps({"rows": [records[(i * step + j) % len(records)] for j in range(step)]}).encode()
        for i in range(args.requests)
    ]
    modes = MODES | ({"litserve batched": ["--litserve"]} if args.litserve else {})
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):  # the modes alternate: a shared machine's load changes under a long run
        for mode, flags in modes.items():
            port = _free_port()
            server = _start(model, port, flags, work / f"{mode.replace(' ', '-')}.log")
            try:
                load(port, bodies[: args.concurrency], args.concurrency)  # warm-up, not measured
                results[mode].append(load(port, bodies, args.concurrency))
            finally:
                stop_group(server, grace_seconds=30)
            print(f"{mode}: {results[mode][-1]}", file=sys.stderr)
    speedups = [
        round(b["rows_per_s"] / o["rows_per_s"], 2)
        for b, o in zip(results["batched"], results["one at a time"], strict=True)
    ]
    record = {
        "model": str(args.model or "embedded:smollm2-135m-instruct (base, geo prompt, zero-shot)"),
        "concurrency": args.concurrency,
        "rows_per_request": step,
        "cpus": os.cpu_count(),
        "results": results,
        "speedup_per_round": speedups,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "serve.json").write_text(json.dumps(record, indent=1))
    print("| round | mode | requests | rows/s | p50 ms | p99 ms | failed | /health p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    keys = ("requests", "rows_per_s", "p50_ms", "p99_ms", "failed", "health_p99_ms")
    for i in range(args.rounds):
        for mode, runs in results.items():
            print("| " + " | ".join(map(str, [i + 1, mode, *(runs[i][k] for k in keys)])) + " |")
    print(f"\nbatched / one at a time, per round: {speedups} (rows/s at concurrency {args.concurrency})")


if __name__ == "__main__":
    main()
