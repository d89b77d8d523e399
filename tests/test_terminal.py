"""What a user sees in a terminal: `loraflow` in its own process (its own temporary Prefect server and console
handlers) on a real pseudo-terminal, its output played into a terminal emulator (pyte) and read off the
screen as the user would read it."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pyte
import pytest

from loraflow.console import QUIET_LIBRARIES, VERBOSE
from tests.conftest import write_config

pytestmark = pytest.mark.flow
REPO = Path(__file__).resolve().parent.parent
COLUMNS, ROWS = 160, 48
# What the libraries print when left alone: transformers' loading and saving bars, TRL's dataset passes,
# datasets' map bars, tqdm's rate, transformers' own log handler.
LIBRARY_NOISE = (
    "Loading weights",
    "Writing model shards",
    "Tokenizing train dataset",
    "Building labels",
    "Truncating train dataset",
    "Dropping fully masked",
    "it/s]",
    "examples/s]",
    "[transformers]",
)


def _in_a_terminal(args: list[str], home: Path, timeout: float = 300) -> tuple[int, str, list[str]]:
    """Run `loraflow ARGS` with a pseudo-terminal of COLUMNS × ROWS as its stdin, stdout and stderr; returns
    its exit status, everything it wrote, and the lines a user sees at the end (scrollback and screen)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "INFO", "TERM": "xterm-256color"}
    # Not the test harness's server, its sizes, nor what an in-process `main()` of another test left set.
    for key in ("PREFECT_API_URL", "COLUMNS", "LINES", "CI", VERBOSE, *QUIET_LIBRARIES):
        env.pop(key, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "loraflow.cli", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    os.close(slave)
    written, deadline = bytearray(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            written += chunk
        elif process.poll() is not None:
            break
    else:
        process.kill()
    os.close(master)
    code = process.wait(timeout=30)
    text = written.decode("utf-8", errors="replace")
    screen = pyte.HistoryScreen(COLUMNS, ROWS, history=10_000)
    pyte.Stream(screen).feed(text.replace("\n", "\r\n") if "\r\n" not in text else text)
    seen = ["".join(c.data for c in line.values()).rstrip() for line in screen.history.top]
    seen += [line.rstrip() for line in screen.display]
    return code, text, [line for line in seen if line]


def test_a_run_in_a_terminal_shows_one_progress_display_per_long_step_and_no_library_bars(
    tmp_path: Path, tiny_model: Path
) -> None:
    config = write_config(tmp_path / "task", tiny_model, train={"max_steps": 12, "logging_steps": 3})
    code, written, seen = _in_a_terminal(["run", str(config)], tmp_path / "home")
    assert code == 0, "\n".join(seen[-40:])
    shown = "\n".join(seen)
    assert not [noise for noise in LIBRARY_NOISE if noise in written], shown
    # One training display, as it ended: steps done of the total, the loss, the rate, the time it took.
    [training] = [line for line in seen if line.startswith("training ")]
    assert re.fullmatch(
        r"training \S+ 12/12 steps loss \d+\.\d{4} · [\d,]+ tokens/s took \d:\d\d:\d\d", training
    )
    assert len(set(re.findall(r"\b(\d+)/12\b", written))) > 2  # redrawn as it went, not once at the end
    # One display for each model scored on dev; the steps' finish lines and the log lines above them.
    assert len([line for line in seen if line.startswith("scoring dev rows, zero-shot ")]) == 1
    assert len([line for line in seen if line.startswith("scoring dev rows, fine-tuned ")]) == 1
    for step in (
        "ingest-tiny-geo",
        "train-adapter-tiny-geo",
        "evaluate-finetuned",
        "write-run-folder-tiny-geo",
    ):
        assert f"Task run '{step}' - Finished in state Completed()" in shown, step
    assert "Task run 'train-adapter-tiny-geo' - training 12 steps" in shown
    assert "step 12/12: loss=" in shown or "step 12/12 dev:" in shown
    assert "| fine-tuned tiny-llama0 (LoRA r=4) |" in shown and "Traceback" not in written
    assert "anonymous usage data" not in written  # Prefect's telemetry notice: DO_NOT_TRACK by default

    # Labelling a table with the model just trained: one display; -v brings the libraries' bars back.
    [run] = (tmp_path / "task" / "runs" / "tiny-geo").glob("2*")
    labelled = tmp_path / "labelled.csv"
    predict = ["predict", "--model", str(run), "--input", str(tmp_path / "task" / "dev.xlsx")]
    code, written, seen = _in_a_terminal([*predict, "--output", str(labelled), "-v"], tmp_path / "home")
    assert code == 0, "\n".join(seen[-40:])
    assert "Loading weights" in written  # transformers' own bar, back with -v
    assert len([line for line in seen if line.startswith("labelling rows ")]) == 1
    assert f"predictions: {labelled}" in seen and labelled.is_file()

    # A user error: one line naming the fix, exit 2, no traceback
    code, written, seen = _in_a_terminal(
        ["validate", str(config), "--set", "data.label_column=scor"], tmp_path / "home"
    )
    assert code == 2
    assert "loraflow: error:" in written and "(did you mean 'score'?)" in written
    assert "Traceback" not in written
