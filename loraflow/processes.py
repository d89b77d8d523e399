"""Child processes that end with this one, in order: the temporary Prefect server the CLI runs flows on, and
the DDP launcher of tasks/launch.py.

Each starts in a process group of its own, so that a signal sent to this process's whole group (Ctrl-C in a
terminal, `kill -- -PGID`, a service manager stopping a unit) reaches this process alone: it then stops its
children itself, after it no longer needs them (the Prefect server has to outlive the last state and log
line it records). On Linux a child is also told to stop when this process dies, even by SIGKILL, so none is
left behind as an orphan.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _parent_death_signal() -> Callable[[], None] | None:
    """The `preexec_fn` that makes a child get SIGTERM when this process dies (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it

    def set_parent_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return set_parent_death_signal


def start_in_own_group(args: Sequence[str], **popen: Any) -> subprocess.Popen:
    """`subprocess.Popen(args)` in a new session (its own process group), ended with this process."""
    return subprocess.Popen(args, start_new_session=True, preexec_fn=_parent_death_signal(), **popen)


def stop_group(process: subprocess.Popen, grace_seconds: float = 5.0) -> None:
    """End the process group `process` leads: SIGTERM, then SIGKILL to whatever is left of it after
    `grace_seconds` (or once the leader has ended); reap `process`. The group holds the children it started
    (DDP workers) as well."""
    if process.poll() is not None:  # reaped: its process group id may be another's by now
        return
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(process, signal.SIGKILL)
    process.wait()


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):  # the group has ended (macOS says EPERM for some)
        pass
