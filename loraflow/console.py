"""What a terminal shows of a run: the steps' start and finish lines (Prefect's console log), one progress
display for each long step, and nothing of the libraries' own output unless `loraflow -v`.

A long step (training, scoring a split, labelling a table) draws one rich progress bar, on the console that
Prefect's log handler writes to, so that log lines scroll above the bar instead of through it. Where that
console is no terminal (a pipe, a worker's log file) the bar is written once, as one line, when the step
ends. Library progress bars (transformers' "Loading weights" and "Writing model shards", TRL's passes
over the dataset, huggingface_hub's downloads) are turned off through the variables the libraries read
when they are imported, and library log lines below ERROR are kept off the console: the warnings of the
loggers named in PREFECT_LOGGING_EXTRA_LOGGERS (the CLI's default: transformers, peft, trl, datasets,
accelerate, bitsandbytes) still reach the Prefect run log, through the handler Prefect gives them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from rich.console import Console
from rich.default_styles import DEFAULT_STYLES
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text
from rich.theme import Theme

VERBOSE = "LORAFLOW_VERBOSE"  # set by `loraflow -v`: the libraries' own output is shown
QUIET_LIBRARIES = {  # read by huggingface_hub (and transformers, through it) and datasets at import
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}
LIBRARIES = (
    "transformers",
    "datasets",
    "peft",
    "trl",
    "accelerate",
    "great_expectations",
    "huggingface_hub",
    "bitsandbytes",
)


def verbose() -> bool:
    """Whether the libraries' own progress bars and log lines are wanted (`loraflow -v`)."""
    return os.environ.get(VERBOSE, "").lower() not in ("", "0", "false", "no")


class _NoLibraryLines(logging.Filter):
    """On a console handler: records below ERROR from the LIBRARIES are dropped (the run log keeps them);
    every other logger's warnings still show, as Python shows them by default."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.split(".")[0] not in LIBRARIES or verbose()


_quieted = False  # quiet_library_logs was called in this process (by the CLI)


def quiet_library_logs() -> None:
    """Library log lines go through Prefect's handlers: the stderr handlers the libraries install for
    themselves are removed, so their records go on to the Prefect run log and to Prefect's console handler,
    which (unless `-v`) drops library records below ERROR. Call it once the libraries are imported; the
    training stack, imported when a fit starts, is handled then (`quiet_libraries_imported_since`)."""
    global _quieted
    import transformers.utils.logging  # noqa: F401 (installs transformers' stderr handler now: no torch)
    from prefect.logging.handlers import PrefectConsoleHandler

    _quieted = True

    for name in LIBRARIES:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # the library's own, not Prefect's
                logger.removeHandler(handler)
        logger.propagate = True
    if verbose():
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler | logging.StreamHandler) and not any(
            isinstance(f, _NoLibraryLines) for f in handler.filters
        ):
            handler.addFilter(_NoLibraryLines())


def quiet_libraries_imported_since() -> None:
    """The same for the libraries imported since `quiet_library_logs` (datasets, peft and trl come with a
    fit); nothing in a process where it was not called (a flow run on a worker keeps the libraries' own
    output)."""
    if _quieted:
        quiet_library_logs()


class _NoKernelsAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


@contextmanager
def without_kernels_advice(quantization: str) -> Iterator[None]:
    """Imports under it (the training stack) leave out bitsandbytes' import-time warning that its optional CPU
    kernels for 4-bit layers are missing ("Failed to load CPU gemm_4bit_forward from kernels-community ...
    pip install kernels"), unless the run trains on a quantised base: peft imports bitsandbytes whenever it is
    installed, and the advice showed as a warning in every run's log, the Prefect UI's included."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")  # the module that warns (bitsandbytes 0.50)
    quiet = _NoKernelsAdvice() if quantization == "none" else None
    if quiet:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        if quiet:
            logger.removeFilter(quiet)


# rich's own styles for its progress columns: Prefect's console theme holds only its log styles.
PROGRESS_STYLES = Theme({k: v for k, v in DEFAULT_STYLES.items() if k.startswith(("bar.", "progress."))})


def _console() -> Console:
    """The console Prefect's log handler prints to (so that log lines and the bar share it), else stderr."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            if not getattr(handler.console, "_loraflow_styles", False):
                handler.console.push_theme(PROGRESS_STYLES)
                handler.console._loraflow_styles = True  # type: ignore[attr-defined]
            return handler.console
    return Console(stderr=True)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    minutes, second = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{second:02d}"


class _TimeColumn(ProgressColumn):
    """`ETA 0:01:10` while the step runs, `took 0:02:31` once it is done."""

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text(f"took {_clock(task.finished_time or task.elapsed)}", style="progress.elapsed")
        return Text(f"ETA {_clock(task.time_remaining)}", style="progress.remaining")


_shown: Progress | None = None  # the one live display of this process; a nested step adds a row to it
_rows = 0


class ProgressDisplay:
    """One long step's progress: `description`, a bar, done/total `unit`, `show`n figures and the time
    left. Use it as a context manager, or `close()` it. With `description` None it shows nothing (for
    callers whose progress is part of a larger step's)."""

    def __init__(self, description: str | None, total: int, unit: str, completed: int = 0) -> None:
        global _shown, _rows
        self.task: TaskID | None = None
        if description is None:
            return
        if _shown is None:
            _shown = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=30),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"),
                TextColumn("{task.fields[shown]}"),
                _TimeColumn(),
                console=_console(),
                refresh_per_second=4,
            )
            _shown.start()
        _rows += 1
        self.progress = _shown
        self.task = _shown.add_task(
            description, total=max(total, 1), completed=completed, unit=unit, shown=""
        )

    def update(self, completed: int, shown: str | None = None) -> None:
        """Move the display to `completed`; `shown` ("loss 0.41 · 6,925 tokens/s") replaces the figures
        shown before."""
        if self.task is None:
            return
        self.progress.update(
            self.task, completed=completed, **({"shown": shown} if shown is not None else {})
        )

    def close(self) -> None:
        """The step is done: its line stays as it ended; the live display stops with its last row."""
        global _shown, _rows
        if self.task is None:
            return
        self.task = None
        _rows -= 1
        if _rows == 0 and _shown is not None:
            _shown.stop()
            _shown = None

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
