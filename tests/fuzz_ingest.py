"""Fuzzing ingest: `python -m tests.fuzz_ingest --seconds 600` (`make fuzz`); tests/test_fuzz.py runs 40 s.

The property (issue #16): reading any table, however damaged, ends in a table or in a UserError whose message
names the file; never another exception, a crash, more than 30 s or more than 2 GB. The inputs come from
tests/fuzz_inputs.py: the examples' first 30 rows, mutated by bytes and by structure, drawn by hypothesis.

Reading runs in worker processes forked from a zygote that has imported pandas, pyarrow and Prefect once
(~4 s), so a worker killed for a hang or for memory, or dead by a signal, is replaced in milliseconds and even
those findings can shrink. The parent enforces both limits: wall time, and the worker's resident memory read
from /proc/<pid>/status every 10 ms plus its peak (VmHWM, reset before each input); not RLIMIT_AS, under which
pyarrow's allocator fails. Before a kill the worker's Python stack is dumped (faulthandler) to say where it
was. Linux only: fork, /proc, SOCK_SEQPACKET, prctl.

    python -m tests.fuzz_ingest --seconds 600        # explore, shrink, save under --out/<UTC time>/
    python -m tests.fuzz_ingest --replay /tmp/loraflow-fuzz-findings/<run>/<finding>   # run saved ones again
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime as dt
import faulthandler
import functools
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from hypothesis import HealthCheck, Phase, Verbosity, given, settings, target
from hypothesis import seed as hypothesis_seed

from loraflow.config import DataSettings, validate_config
from loraflow.errors import UserError
from loraflow.tasks import ingest
from tests.fuzz_inputs import EXAMPLES, FuzzInput, Seed, fuzz_inputs

ROOT = Path(__file__).parents[1]  # not resolved: a checkout reached through a symlink imports its own code
CONFIGS = {"geo": EXAMPLES / "geo" / "config.yaml", "pairs": EXAMPLES / "pairs" / "config.yaml"}
TIMEOUT_S = 30.0
MEMORY_LIMIT = 2 * 1024**3
FINDINGS = Path("/tmp/loraflow-fuzz-findings")
POLL_S = 0.01  # how often the parent reads the worker's memory while it waits
BUFSIZE = 1 << 20  # one request or reply (SOCK_SEQPACKET keeps each whole)
RECYCLE_AFTER = 200  # inputs per worker: a leak (open files, caches) cannot build up into a false finding

# Outcomes. A finding breaks the property; a cut-short input was stopped by the run's own time budget.
TABLE, USER_ERROR, CUT_SHORT = "table", "user error", "cut short"
EXCEPTION, UNNAMED, BAD_TABLE = "exception", "user error without the file name", "bad table"
CRASH, TIMEOUT, MEMORY = "crash", "timeout", "memory"
FINDING_KINDS = (EXCEPTION, UNNAMED, BAD_TABLE, CRASH, TIMEOUT, MEMORY)


# ------------------------------------------------------------------------------------------------ worker


def read_input(data: DataSettings, columns: list[str]) -> pd.DataFrame:
    """The code under test, the one place to adapt when ingest's signatures change: read data.train as
    ingest_table does, then select the input columns and the label."""
    frame = ingest._read_file(data.train, data)
    return ingest._select(frame, data.train, columns, data.label_column)


@functools.cache
def _example_config(family: str) -> dict[str, Any]:
    return yaml.safe_load(CONFIGS[family].read_text())


def data_settings(family: str, path: Path, overrides: dict[str, Any]) -> tuple[DataSettings, list[str]]:
    """The example's config, validated, with data.train = `path` (and no dev file: only train is read)."""
    raw = copy.deepcopy(_example_config(family))
    raw["data"] = {**raw["data"], **overrides, "train": str(path)}
    raw["data"].pop("dev", None)
    config = validate_config(raw)
    return config.data, config.input_columns


def _table_problem(table: Any, columns: list[str]) -> str | None:
    if not isinstance(table, pd.DataFrame):
        return f"_select returned a {type(table).__name__}, not a DataFrame"
    missing = [c for c in [*columns, ingest.LABEL] if c not in table.columns]
    return f"the table lacks column(s) {missing}" if missing else None


def _error_reply(kind: str, error: BaseException) -> dict[str, Any]:
    module = type(error).__module__
    name = type(error).__qualname__ if module == "builtins" else f"{module}.{type(error).__qualname__}"
    frames = [[f.filename, f.lineno, f.name] for f in traceback.extract_tb(error.__traceback__)][-40:]
    return {
        "kind": kind,
        "type": name,
        "message": str(error)[:2000],
        "frames": frames,
        "detail": "".join(traceback.format_exception(error))[-8000:],
    }


def _probe(what: str, amount: int) -> dict[str, Any]:
    """What the harness tests make a worker do: hang, abort, or grow (in 64 MiB steps) and hold."""
    if what == "sleep":
        time.sleep(amount)
    elif what == "abort":
        os.abort()
    elif what == "allocate":
        held = [b"x" * (64 << 20) for _ in range(amount // (64 << 20))]
        time.sleep(10)
        del held
    return {"kind": TABLE, "rows": 0}


def _answer(request: dict[str, Any]) -> dict[str, Any]:
    if "probe" in request:
        return _probe(request["probe"], request["amount"])
    path = Path(request["path"])
    try:
        data, columns = data_settings(request["family"], path, request["overrides"])
    except Exception as e:
        return {"kind": "harness error", "message": f"cannot build the data settings: {e!r}"}
    try:
        table = read_input(data, columns)
    except UserError as e:
        return _error_reply(USER_ERROR if path.name in str(e) else UNNAMED, e)
    except BaseException as e:  # everything else is a finding; a Rust panic (pyo3) is a BaseException
        return _error_reply(EXCEPTION, e)
    problem = _table_problem(table, columns)
    if problem:
        return {"kind": BAD_TABLE, "message": problem}
    return {"kind": TABLE, "rows": len(table)}


def _die_with_parent() -> None:
    """Linux prctl(PR_SET_PDEATHSIG, SIGKILL): an orphaned (maybe hung) process must not outlive the run."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _serve(channel: socket.socket, log: Path) -> None:
    """A worker: answer requests until the parent closes the channel."""
    _die_with_parent()
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # the parent truncates it per input
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the stack, to say where a killed input hung
    while request := channel.recv(BUFSIZE):
        channel.send(json.dumps(_answer(json.loads(request))).encode())


def _zygote(fd: int) -> None:
    """Import once (done: this module imports ingest), then fork a worker per request; reap on request."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in `make fuzz` is the parent's to handle
    control = socket.socket(fileno=fd)
    control.send(b"ready")
    while message := control.recv(4096):
        command, _, argument = message.decode().partition(" ")
        if command == "fork":
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pid = os.fork()
            if pid == 0:
                control.close()
                ours.close()
                code = 0
                try:
                    _serve(theirs, Path(argument))
                except BaseException:
                    traceback.print_exc()
                    code = 70
                os._exit(code)
            theirs.close()
            socket.send_fds(control, [str(pid).encode()], [ours.fileno()])
            ours.close()
        elif command == "reap":
            _, status = os.waitpid(int(argument), 0)
            control.send(str(os.waitstatus_to_exitcode(status)).encode())


# ------------------------------------------------------------------------------------------------ parent


@dataclass
class Outcome:
    kind: str
    seconds: float = 0.0
    peak: int = 0  # resident memory, bytes
    rows: int = 0
    type: str = ""
    message: str = ""
    frames: list[list[Any]] = field(default_factory=list)  # outermost first: [file, line, function]
    detail: str = ""  # the traceback, or the end of the worker's stderr

    @property
    def finding(self) -> bool:
        return self.kind in FINDING_KINDS

    @property
    def category(self) -> str:
        return "finding" if self.finding else self.kind

    @property
    def where(self) -> str:
        """The innermost frame in the project's code, and the innermost of all when that is elsewhere."""
        project = [f for f in self.frames if _is_project(f[0])]
        shown = [f"{_short(f[0])}:{f[1]} {f[2]}" for f in (project[-1:] + self.frames[-1:]) if f]
        return " → ".join(dict.fromkeys(shown))

    @property
    def signature(self) -> str:
        """What makes two findings one: kind, type, crash line, the innermost project function and the
        innermost file (no line numbers, which move with every edit)."""
        project = [f for f in self.frames if _is_project(f[0])]
        if self.kind in (TIMEOUT, MEMORY):  # a stack sampled at the kill: only the project's frame is stable
            return " ".join([self.kind, *(f"{_short(f[0])}:{f[2]}" for f in project[-1:])])
        places = [f"{_short(f[0])}:{f[2]}" for f in project[-1:]]
        places += [_short(f[0]) for f in self.frames[-1:] if f[0] not in (p[0] for p in project[-1:])]
        crash = re.sub(r"\d+", "N", self.message) if self.kind == CRASH else ""
        return " ".join(p for p in (self.kind, self.type, crash, " → ".join(places)) if p)

    @property
    def headline(self) -> str:
        first = self.message.strip().split("\n", 1)[0][:300] if self.message else ""
        return f"{self.kind}: {self.type}{': ' if self.type and first else ''}{first}" + (
            f" [at {self.where}]" if self.frames else ""
        )


def _is_project(filename: str) -> bool:
    path = Path(filename)
    inside = path.is_relative_to(ROOT) and len(path.parts) > len(ROOT.parts)
    return inside and "site-packages" not in path.parts and path.parts[len(ROOT.parts)] != "tests"


def _short(filename: str) -> str:
    path = Path(filename)
    if "site-packages" in path.parts:
        return "/".join(path.parts[path.parts.index("site-packages") + 1 :])
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else filename


def _memory(pid: int, field_name: str) -> int:
    """VmRSS or VmHWM of `pid` in bytes; 0 once it is gone (a zombie has none)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(rf"^{field_name}:\s+(\d+) kB", status, re.M)
    return int(found[1]) * 1024 if found else 0


def _reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _dumped_frames(log: str) -> list[list[Any]]:
    """The main thread's frames (outermost first) from a faulthandler dump."""
    blocks = re.split(
        r"^(?:Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):\n", log, flags=re.M
    )
    for block in blocks[1:]:
        frames = re.findall(r'^  File "([^"]+)", line (\d+) in (\S+)', block, re.M)
        if frames:
            return [[f, int(n), name] for f, n, name in reversed(frames)]
    return []


def _crash_line(log: str) -> str:
    """The line of a worker's stderr that says why it died (Rust panic, failed allocation, fatal error)."""
    for pattern in (r"panicked at.*", r"memory allocation of .*", r"Fatal Python error.*", r"Segmentation.*"):
        found = re.search(pattern, log)
        if found:
            return found[0].strip()
    lines = [line for line in log.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


class Fuzzer:
    """Runs inputs in workers forked from a zygote and enforces the limits; use it as a context manager."""

    def __init__(
        self,
        workdir: Path,
        *,
        timeout_s: float = TIMEOUT_S,
        memory_limit: int = MEMORY_LIMIT,
        recycle_after: int = RECYCLE_AFTER,
    ) -> None:
        self.workdir = workdir
        self.timeout_s, self.memory_limit, self.recycle_after = timeout_s, memory_limit, recycle_after
        workdir.mkdir(parents=True, exist_ok=True)
        self._log = workdir / "worker.log"
        self._zygote: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._worker: tuple[int, socket.socket] | None = None
        self._served = 0

    def __enter__(self) -> Fuzzer:
        self._ensure_zygote()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def run(self, item: FuzzInput, *, cut_at: float | None = None) -> Outcome:
        """Read one input in a worker. `cut_at` (time.monotonic()) stops it early: CUT_SHORT, no finding."""
        path = self.workdir / f"fuzzed-input{item.suffix}"
        path.write_bytes(item.data)
        request = {"path": str(path), "family": item.seed.family, "overrides": item.overrides}
        return self._request(request, self.timeout_s, self.memory_limit, cut_at)

    def probe(
        self, what: str, amount: int = 0, *, timeout_s: float | None = None, memory_limit: int | None = None
    ) -> Outcome:
        """Make a worker sleep, abort or allocate: the harness's own tests."""
        return self._request(
            {"probe": what, "amount": amount}, timeout_s or self.timeout_s, memory_limit or self.memory_limit
        )

    def _request(
        self, request: dict[str, Any], limit_s: float, memory_limit: int, cut_at: float | None = None
    ) -> Outcome:
        pid, channel = self._ensure_worker()
        peak_known = _reset_peak(pid)
        os.truncate(self._log, 0)
        start = time.monotonic()
        channel.send(json.dumps(request).encode())
        while not select.select([channel], [], [], POLL_S)[0]:
            now, rss = time.monotonic(), _memory(pid, "VmRSS")
            if rss > memory_limit:
                message = f"resident memory {rss >> 20} MiB > limit {memory_limit >> 20} MiB"
                return self._kill(MEMORY, message, now - start, rss, memory_limit)
            if now - start > limit_s:
                return self._kill(TIMEOUT, f"no answer after {limit_s:.0f} s", now - start, rss, memory_limit)
            if cut_at is not None and now > cut_at:
                return self._kill(
                    CUT_SHORT, "stopped by the run's time budget", now - start, rss, memory_limit
                )
        seconds = time.monotonic() - start
        reply = channel.recv(BUFSIZE)
        if not reply:  # the worker died without answering
            code = self._stop_worker(kill=False)
            log = self._log_text()
            name = signal.Signals(-code).name if code < 0 else f"exit status {code}"
            return Outcome(CRASH, seconds, type=name, message=_crash_line(log), detail=log[-4000:])
        answer = json.loads(reply)
        peak = _memory(pid, "VmHWM") if peak_known else 0
        self._served += 1
        if self._served >= self.recycle_after:
            self._stop_worker()
        if answer["kind"] == "harness error":
            raise RuntimeError(answer["message"])
        outcome = Outcome(
            answer["kind"],
            seconds,
            peak,
            answer.get("rows", 0),
            answer.get("type", ""),
            answer.get("message", ""),
            answer.get("frames", []),
            answer.get("detail", ""),
        )
        if peak > memory_limit:  # it finished, but passed the limit between two polls
            return Outcome(
                MEMORY, seconds, peak, type=f"peak {peak >> 20} MiB", message=f"then: {outcome.headline}"
            )
        return outcome

    def _kill(self, kind: str, message: str, seconds: float, rss: int, memory_limit: int) -> Outcome:
        """Dump the worker's Python stack (to say where), then kill it; the next input gets a new one."""
        pid, _ = self._worker
        os.kill(pid, signal.SIGUSR1)
        for _ in range(30):  # 0.3 s for the dump; sooner if memory keeps climbing
            time.sleep(POLL_S)
            rss = max(rss, _memory(pid, "VmRSS"))
            if rss > 1.5 * memory_limit:
                break
        self._stop_worker()
        log = self._log_text()
        return Outcome(kind, seconds, rss, message=message, frames=_dumped_frames(log), detail=log[-4000:])

    def _log_text(self) -> str:
        return self._log.read_bytes()[-200_000:].decode("utf-8", "replace")

    def _ensure_zygote(self) -> socket.socket:
        if self._zygote is not None and self._zygote.poll() is None:
            return self._control
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        log_path = self.workdir / "zygote.log"
        with log_path.open("wb") as log:
            self._zygote = subprocess.Popen(
                [sys.executable, "-m", "tests.fuzz_ingest", "--zygote", str(theirs.fileno())],
                cwd=ROOT,
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the parent only, which then closes the workers
            )
        theirs.close()
        ready = select.select([ours], [], [], 300)[0] and ours.recv(64)
        if ready != b"ready":
            self._zygote.kill()
            raise RuntimeError(f"the fuzz worker did not start:\n{log_path.read_text()[-4000:]}")
        self._control = ours
        return ours

    def _ensure_worker(self) -> tuple[int, socket.socket]:
        if self._worker is None:
            control = self._ensure_zygote()
            self._log.touch()
            control.send(f"fork {self._log}".encode())
            message, fds, _, _ = socket.recv_fds(control, 64, 1)
            if not message or not fds:
                raise RuntimeError(
                    f"the fuzz zygote died:\n{(self.workdir / 'zygote.log').read_text()[-4000:]}"
                )
            self._worker, self._served = (int(message), socket.socket(fileno=fds[0])), 0
        return self._worker

    def _stop_worker(self, *, kill: bool = True) -> int:
        """End the worker (SIGKILL unless it is already dead) and return its exit code from the zygote."""
        pid, channel = self._worker
        self._worker = None
        channel.close()
        if kill:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._control.send(f"reap {pid}".encode())
        return int(self._control.recv(64))

    def close(self) -> None:
        if self._worker is not None and self._zygote.poll() is None:
            self._stop_worker()
        if self._zygote is not None:
            self._control.close()  # the zygote exits on EOF
            try:
                self._zygote.wait(10)
            except subprocess.TimeoutExpired:
                self._zygote.kill()
                self._zygote.wait()
            self._zygote = None


# -------------------------------------------------------------------------------------------- fuzz runs


@dataclass
class Finding:
    outcome: Outcome
    item: FuzzInput  # the simplest input seen with this signature: fewest steps, then fewest bytes
    hits: int = 1
    shrunk: bool = False


@dataclass
class Report:
    tried: int = 0
    categories: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    by_seed: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    findings: dict[str, Finding] = field(default_factory=dict)
    slowest: list[tuple[float, str, str]] = field(default_factory=list)  # seconds, outcome kind, input
    started: float = field(default_factory=time.monotonic)

    def add(self, item: FuzzInput, outcome: Outcome) -> None:
        self.tried += 1
        self.categories[outcome.category] += 1
        self.kinds[outcome.kind] += 1
        self.by_seed[item.seed.name][outcome.category] += 1
        if outcome.kind != TIMEOUT:  # slow but under the limit: where a hang may be growing
            self.slowest = sorted([*self.slowest, (outcome.seconds, outcome.kind, repr(item))], reverse=True)[
                :3
            ]
        if not outcome.finding:
            return
        known = self.findings.get(outcome.signature)
        if known is None:
            self.findings[outcome.signature] = Finding(outcome, item)
            return
        known.hits += 1
        # The fewest steps, then the fewest bytes; on a tie the later, which hypothesis shrank further.
        if (len(item.steps), len(item.data)) <= (len(known.item.steps), len(known.item.data)):
            known.outcome, known.item = outcome, item

    def summary(self) -> str:
        seconds = time.monotonic() - self.started
        counts = ", ".join(f"{n} {c}" for c, n in self.categories.most_common())
        lines = [
            f"{self.tried} inputs in {seconds:.0f} s ({self.tried / max(seconds, 1e-9):.1f}/s): {counts}; "
            f"{len(self.findings)} distinct finding(s)",
            "by seed: "
            + "; ".join(
                f"{name} " + " / ".join(f"{c} {n}" for c, n in sorted(counts.items()))
                for name, counts in sorted(self.by_seed.items())
            ),
            "slowest: "
            + "; ".join(f"{seconds:.1f} s ({kind}) {item}" for seconds, kind, item in self.slowest),
        ]
        return "\n".join(lines)

    def describe(self, saved: dict[str, Path] | None = None) -> str:
        lines = []
        for number, (signature, f) in enumerate(self.findings.items(), start=1):
            lines.append(f"{number}. {f.outcome.headline}")
            lines.append(f"   {f.hits} input(s); smallest: {f.item!r}")
            if saved and signature in saved:
                lines.append(f"   saved: {saved[signature]}")
        return "\n".join(lines)


class _TimeUp(Exception):
    """Raised into hypothesis to end a run at its deadline (or a round's shrinking at its budget)."""


class _FindingError(Exception):
    """Base of one class per finding signature: hypothesis tells bugs apart by exception type and place."""


@functools.cache
def _finding_error(signature: str) -> type[_FindingError]:
    return type(f"Finding{len(signature)}_{abs(hash(signature)) % 10**8}", (_FindingError,), {})


def _only_ours(error: BaseException) -> bool:
    """Whether hypothesis raised only what the run raised into it (several bugs, or a flaky one: a group)."""
    if isinstance(error, BaseExceptionGroup):
        return all(_only_ours(e) for e in error.exceptions)
    return isinstance(error, _TimeUp | _FindingError)


def fuzz(
    fuzzer: Fuzzer,
    seconds: float,
    *,
    explore: bool,
    seed: int = 0,
    round_examples: int = 400,
    shrink_seconds: float = 120.0,
    grace_s: float = 10.0,
    on_round: Callable[[Report], None] | None = None,
    report: Report | None = None,
) -> Report:
    """Fuzz for `seconds`; an input still running `grace_s` past the deadline is cut short.

    explore=False (the test): one derandomized pass that records every finding, the same inputs in the same
    order on every run (as many as the time allows). explore=True (make fuzz): rounds of `round_examples`
    seeded inputs, every second round steered toward slow and memory-hungry ones (hypothesis.target: it
    finds hangs that grow with the input, at the price of re-running slow inputs); a finding new to the run
    is raised into hypothesis, which shrinks it (up to `shrink_seconds`, or a quarter of the run, a round),
    and only counted after that round.
    Hangs are recorded but not shrunk: each try would take the full timeout."""
    report = report if report is not None else Report()
    deadline = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < deadline:
        raised: set[str] = set()
        steer = explore and rounds % 2 == 1
        shrinking = min(shrink_seconds, seconds / 4)  # a short run must not spend itself on one round
        check = _property(fuzzer, report, raised, explore, steer, deadline, shrinking, deadline + grace_s)
        run = given(fuzz_inputs())(check)
        run = settings(
            max_examples=round_examples if explore else 1_000_000,
            derandomize=not explore,
            database=None,
            deadline=None,
            phases=(Phase.generate, *([Phase.target] if steer else []), *([Phase.shrink] if explore else [])),
            report_multiple_bugs=explore,
            suppress_health_check=list(HealthCheck),
            verbosity=Verbosity.quiet,
            print_blob=False,
        )(run)
        if explore:
            run = hypothesis_seed(seed + rounds)(run)
        try:
            run()
        except Exception as e:
            if not _only_ours(e):
                raise
        for signature in raised:
            report.findings[signature].shrunk = True
        rounds += 1
        if on_round is not None:
            on_round(report)
        if not explore:
            break  # a second derandomized pass would repeat the first
    return report


def _property(
    fuzzer: Fuzzer,
    report: Report,
    raised: set[str],
    explore: bool,
    steer: bool,
    deadline: float,
    shrink_seconds: float,
    cut_at: float,
) -> Callable[[FuzzInput], None]:
    """One round's test function: run the input, count it, and (exploring) steer and raise new findings."""
    first_raise: list[float] = []

    def check(item: FuzzInput) -> None:
        now = time.monotonic()
        if now > deadline or (first_raise and now - first_raise[0] > shrink_seconds):
            raise _TimeUp
        outcome = fuzzer.run(item, cut_at=cut_at)
        report.add(item, outcome)
        if not explore:
            return
        if steer and not outcome.finding:  # a hang is found already: climb among inputs that finish, and
            target(min(outcome.seconds, 5.0), label="seconds")  # not past 5 s, where each try costs more
            target(outcome.peak / 2**20, label="peak MiB")
        known = outcome.signature in report.findings and report.findings[outcome.signature].shrunk
        if outcome.finding and outcome.kind != TIMEOUT and not known:
            raised.add(outcome.signature)
            first_raise[:] = first_raise or [now]
            raise _finding_error(outcome.signature)(outcome.headline)

    return check


def _slug(number: int, outcome: Outcome) -> str:
    functions = [f[2] for f in outcome.frames if _is_project(f[0])][-1:]
    words = [outcome.kind, outcome.type.rsplit(".", 1)[-1], *functions]
    return f"{number:02d}-" + re.sub(r"[^A-Za-z0-9]+", "-", "-".join(w for w in words if w)).strip("-")[:80]


def save_findings(report: Report, folder: Path) -> dict[str, Path]:
    """Each finding's smallest input and what happened, in folder/<NN-kind-type-function>/."""
    saved = {}
    for number, (signature, f) in enumerate(report.findings.items(), start=1):
        place = folder / _slug(number, f.outcome)
        place.mkdir(parents=True, exist_ok=True)
        name = f"input{f.item.suffix}"
        (place / name).write_bytes(f.item.data)
        record = {
            "signature": signature,
            "headline": f.outcome.headline,
            "outcome": asdict(f.outcome),
            "input": name,
            "seed": f.item.seed.name,
            "family": f.item.seed.family,
            "seed_suffix": f.item.seed.suffix,
            "suffix": f.item.suffix,
            "steps": list(f.item.steps),
            "overrides": f.item.overrides,
            "hits": f.hits,
            "shrunk": f.shrunk,
            "replay": f"python -m tests.fuzz_ingest --replay {place}",
        }
        (place / "finding.json").write_text(json.dumps(record, indent=1, ensure_ascii=False))
        saved[signature] = place
    return saved


def saved_input(place: Path) -> FuzzInput:
    record = json.loads((place / "finding.json").read_text())
    seed = Seed(record["seed"], record["family"], record["seed_suffix"], b"")
    data = (place / record["input"]).read_bytes()
    return FuzzInput(seed, record["suffix"], data, tuple(record["steps"]), record["overrides"])


def replay(places: list[Path], workdir: Path) -> int:
    """Run saved findings again, each in a fresh worker; 1 if any still breaks the property."""
    still = 0
    with Fuzzer(workdir, recycle_after=1) as fuzzer:
        for place in places:
            outcome = fuzzer.run(saved_input(place))
            still += outcome.finding
            print(
                f"{place}: {outcome.headline}\n{outcome.detail}"
                if outcome.finding
                else f"{place}: {outcome.kind}"
            )
    return 1 if still else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", 600)))
    parser.add_argument("--out", type=Path, default=FINDINGS, help="findings go to OUT/<UTC time>/")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed of the first round")
    parser.add_argument("--replay", type=Path, nargs="+", help="finding folders to run again instead")
    parser.add_argument("--zygote", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.zygote is not None:
        _zygote(args.zygote)
        return 0
    if args.replay:
        return replay(args.replay, args.out / "replay")
    first_seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    folder = args.out / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    print(f"fuzzing ingest for {args.seconds:.0f} s (seed {first_seed}); findings go to {folder}", flush=True)

    def progress(report: Report) -> None:
        save_findings(report, folder)
        print(report.summary().split("\n")[0], flush=True)

    with Fuzzer(folder / "work") as fuzzer:
        report = Report()  # filled as it goes: an interrupted run still saves and prints what it found
        try:
            fuzz(fuzzer, args.seconds, explore=True, seed=first_seed, on_round=progress, report=report)
        finally:
            saved = save_findings(report, folder)
            print(f"\n{report.summary()}\n\n{report.describe(saved)}")
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
