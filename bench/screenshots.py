"""python bench/screenshots.py [--out bench/results/screenshots] [--steps 8]

What a user watching a run in the Prefect UI sees, as PNG screenshots from a real browser: a real
`prefect server start` (UI on) on a free port with its own PREFECT_HOME, one `loraflow run` of the embedded
geo example against it (a few training steps: the point is the pages, not the model), then headless
Chromium on the flow run's page (the task graph, named task runs, the log) and on its report artifact.
Writes flow-run.png, report-artifact.png and pages.json (the URLs and the task run names) to --out. A few
minutes on 2 CPU cores; outside CI.

Chromium: `apt-get install -y chromium` (Debian), or set CHROMIUM to a Chrome/Chromium binary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium() -> str:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    sys.exit("bench/screenshots.py: no Chromium found: apt-get install -y chromium (or set CHROMIUM)")


def _screenshot(browser: str, url: str, path: Path, height: int) -> None:
    """Load `url` (the UI is a single-page app: give its scripts time to fetch and draw) and save a PNG."""
    subprocess.run(
        [
            browser,
            *BROWSER_FLAGS,
            "--hide-scrollbars",
            f"--window-size=1440,{height}",
            "--virtual-time-budget=20000",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    print(f"{path} ({path.stat().st_size // 1024} KB): {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "screenshots")
    parser.add_argument("--steps", type=int, default=8, help="training steps of the example run")
    args = parser.parse_args()
    browser = _chromium()
    args.out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="loraflow-screens-"))
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
    }
    prefect = str(Path(sys.executable).parent / "prefect")
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=open(home / "server.log", "w"),  # noqa: SIM115 (the server owns it)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    sys.exit(f"the Prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        overrides = [f"output_dir={home / 'runs'}", f"train.max_steps={args.steps}", "train.logging_steps=2"]
        command = [
            sys.executable,
            "-m",
            "loraflow.cli",
            "demo",
            *(a for o in overrides for a in ("--set", o)),
        ]
        subprocess.run(command, env=env, cwd=REPO, check=True, timeout=1800)
        pages = _pages(env)
        base = f"http://127.0.0.1:{port}"
        _screenshot(browser, f"{base}/runs/flow-run/{pages['flow_run']}", args.out / "flow-run.png", 1400)
        _screenshot(
            browser, f"{base}/artifacts/artifact/{pages['report']}", args.out / "report-artifact.png", 3200
        )
        (args.out / "pages.json").write_text(json.dumps(pages, indent=1))
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)


def _pages(env: dict[str, str]) -> dict[str, object]:
    """The flow run of the example, its task run names and its report artifact, read from the server."""
    os.environ.update({k: env[k] for k in ("PREFECT_API_URL", "PREFECT_HOME")})
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs()
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        [report] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["geo-report"]))
        )
    return {
        "flow_run": str(run.id),
        "flow_run_name": run.name,
        "task_runs": sorted(t.name for t in tasks),
        "report": str(report.id),
        "report_characters": len(report.data or ""),
    }


if __name__ == "__main__":
    main()
