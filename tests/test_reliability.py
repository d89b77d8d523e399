"""Faults and secrets: kill and resume, Ctrl-C and SIGTERM, torn checkpoints, interrupted writes, concurrent
runs, retries, out-of-memory advice, unsafe model files, and the HF token nowhere in what a run leaves
behind."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from transformers import LlamaForCausalLM, Trainer

import loraflow.tasks.ingest
import loraflow.tasks.launch
import loraflow.tasks.lora
import loraflow.tasks.report
from loraflow.cli import _interrupted_message
from loraflow.config import LoraSettings, ModelSettings, TrainSettings
from loraflow.errors import DataError, ModelError, ResourceError
from loraflow.flows.generative import train_generative
from loraflow.flows.validate import validate_data
from loraflow.loading import load_config
from loraflow.tasks.generative.prepare import COMPLETION, PROMPT, prepare_inputs, read_prompts
from loraflow.tasks.generative.train import GenerativeTrainJob, fit_adapter, train_adapter
from loraflow.tasks.ingest import ingest_table
from loraflow.tasks.launch import train_once
from loraflow.tasks.lora import checkpoint_problems, checkpoints_of, torn_checkpoints_of, training_under_way
from loraflow.tasks.models import load_causal_lm, resolve_model
from loraflow.tasks.store import Ref, building, is_complete
from tests.conftest import write_config

pytestmark = pytest.mark.flow  # the tests that send a signal at a training step are `serial`
REPO = Path(__file__).resolve().parent.parent
FAKE_TOKEN = "hf_loraflowTestTokenDoNotLeak0123456789"


def _cli_env(home: Path) -> dict[str, str]:
    """The environment of a user's `loraflow` process: its own Prefect home and temporary server."""
    env = {**os.environ, "PREFECT_HOME": str(home), "HF_TOKEN": FAKE_TOKEN, "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("PREFECT_API_URL", None)  # not the test harness's server
    return env


def _start_run(config: Path, home: Path, log: Path, errors: Path | None = None) -> subprocess.Popen:
    """`loraflow run CONFIG` as a user starts it, in a process group of its own; stderr to `errors`, else
    to `log`."""
    return subprocess.Popen(
        [sys.executable, "-m", "loraflow.cli", "run", str(config)],
        cwd=REPO,
        env=_cli_env(home),
        stdout=open(log, "w"),  # noqa: SIM115 (the child owns it)
        stderr=open(errors, "w") if errors else subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True,
    )


def _descendants(pid: int) -> dict[int, str]:
    """Every process under `pid` (its children, theirs, ...) with its command line, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, pending = {}, [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            try:
                found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:  # ended meanwhile
                continue
            pending.append(child)
    return found


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (exited, waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _checkpoint_steps(work: Path) -> list[int]:
    """The steps of the finished checkpoints (trainer_state.json is the Trainer's last file) in `work`."""
    return sorted(
        int(p.parent.name.split("-")[1]) for p in work.glob("train-*.checkpoints/*/trainer_state.json")
    )


def _interrupt(
    run: subprocess.Popen, sig: signal.Signals, whole_group: bool
) -> tuple[int, float, dict[int, str]]:
    """Send `sig` to the run (to its whole process group, as Ctrl-C in a terminal does, or to it alone, as
    `kill` does); returns its exit status, the seconds it took to exit, and the processes it had started."""
    started = _descendants(run.pid)
    sent = time.monotonic()
    (os.killpg if whole_group else os.kill)(run.pid, sig)
    try:
        code = run.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        raise
    return code, time.monotonic() - sent, started


STEPS = 120  # the runs stop at their first checkpoint; the rest (seconds) is the margin for a slow test
INTERRUPTED = re.compile(
    rf"loraflow: error: interrupted by (SIGINT|SIGTERM) at step (\d+) of {STEPS}; "
    r"the last checkpoint is step (\d+); run the same command to resume from it"
)
STOPS = [  # how a run gets stopped: a kill, Ctrl-C in its terminal (the whole group), `kill PID`
    (signal.SIGKILL, True),
    (signal.SIGINT, True),
    (signal.SIGTERM, False),
]


@pytest.mark.serial
def test_a_training_run_stopped_by_a_kill_ctrl_c_or_sigterm_resumes_from_its_last_checkpoint(
    tmp_path: Path, tiny_model: Path
) -> None:
    train = {"max_steps": STEPS, "save_steps": 5, "logging_steps": 50, "batch_size": 8, "select_best": False}
    config = write_config(tmp_path / "task", tiny_model, train=train, eval={"baseline": False})
    parent, home = tmp_path / "task" / "runs" / "tiny-geo", tmp_path / "home"
    work, resumed_from = parent / "work", 0
    for n, (sig, whole_group) in enumerate(STOPS):
        log, errors = tmp_path / f"run-{n}.log", tmp_path / f"run-{n}.err"
        run = _start_run(config, home, log, errors)
        deadline = time.monotonic() + 300
        while not [s for s in _checkpoint_steps(work) if s > resumed_from]:  # mid-training, a checkpoint on
            assert run.poll() is None, errors.read_text()[-3000:]
            assert time.monotonic() < deadline, "no new checkpoint within 300 s"
            time.sleep(0.02)
        code, seconds, children = _interrupt(run, sig, whole_group)
        stderr = errors.read_text()
        assert [c for c in children.values() if "uvicorn" in c]  # the temporary Prefect server
        deadline = time.monotonic() + 10
        while [p for p in children if _running(p)] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in children if _running(p)]
        assert not list(parent.glob("2*")), (n, code, seconds, stderr[-3000:])  # nothing looks finished
        if resumed_from:  # this run resumed from where the last one stopped
            [checkpoints] = work.glob("train-*.checkpoints")
            assert f"resuming from {checkpoints}/checkpoint-{resumed_from} " in stderr
        if sig == signal.SIGKILL:  # no handler, no cleanup
            assert code == -signal.SIGKILL
            resumed_from = max(_checkpoint_steps(work))
            continue
        assert code == 128 + sig and seconds < 20, (code, seconds, stderr[-3000:])
        assert "Traceback" not in stderr and "Error logging to API" not in stderr, stderr[-3000:]
        [line] = [line for line in stderr.splitlines() if line.startswith("loraflow: error:")]
        match = INTERRUPTED.fullmatch(line)
        assert match and match[1] == sig.name, line
        step, checkpoint = int(match[2]), int(match[3])
        assert resumed_from < checkpoint <= step < STEPS and checkpoint == max(_checkpoint_steps(work)), line
        resumed_from = checkpoint

    # The runs stopped by a signal were recorded as crashed and their last log lines were sent: the server
    # outlived them (the killed one stays Running: nothing could record its end).
    with sqlite3.connect(home / "prefect.db") as db:
        ends = db.execute("SELECT s.message FROM flow_run f JOIN flow_run_state s ON s.id = f.state_id")
        crashed = sorted(message for (message,) in ends if message)
        finished = db.execute("SELECT count(*) FROM log WHERE message LIKE 'Finished in state Crashed%'")
        assert finished.fetchone()[0] == 4  # the training task and the flow, twice
    assert crashed == [
        "Execution was aborted by a termination signal.",
        "Execution was aborted by an interrupt signal.",
    ]

    last = _start_run(config, home, tmp_path / "last.log")
    assert last.wait(timeout=600) == 0, (tmp_path / "last.log").read_text()[-3000:]
    [adapter] = [p for p in work.glob("train-*") if p.is_dir() and is_complete(p)]
    stats = json.loads((adapter / "train.json").read_text())
    assert stats["resumed_from_step"] == resumed_from and stats["steps"] == STEPS  # continued, not restarted
    history = json.loads((adapter / "log_history.json").read_text())
    assert min(e["step"] for e in history if "loss" in e) > stats["resumed_from_step"]
    assert not list(work.glob("train-*.checkpoints"))  # the finished adapter replaced them


@pytest.mark.serial
def test_ctrl_c_stops_a_sweep_whose_trial_trains_in_a_thread_within_seconds(
    tmp_path: Path, tiny_model: Path
) -> None:
    """A sweep trains its trial in a task runner's thread; Python runs signal handlers in the main thread
    only, which would otherwise wait (at the flow's end) for the trial to train to its last step."""
    train = {"max_steps": 2000, "save_steps": 5, "logging_steps": 500, "batch_size": 8, "eval_steps": 0}
    config = write_config(
        tmp_path / "task",
        tiny_model,
        train=train | {"select_best": False},
        eval={"baseline": False},
        sweep={"space": {"lora.r": [2, 4]}},
    )
    log = tmp_path / "sweep.log"
    run = subprocess.Popen(
        [sys.executable, "-m", "loraflow.cli", "sweep", str(config)],
        cwd=REPO,
        env=_cli_env(tmp_path / "home"),
        stdout=open(log, "w"),  # noqa: SIM115 (the child owns it)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    work, deadline = tmp_path / "task" / "runs" / "tiny-geo" / "work", time.monotonic() + 300
    while not _checkpoint_steps(work):
        assert run.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint of the first trial within 300 s"
        time.sleep(0.05)
    code, seconds, _ = _interrupt(run, signal.SIGINT, whole_group=True)
    said = log.read_text()
    assert code == 128 + signal.SIGINT and seconds < 20, (code, seconds, said[-3000:])
    assert max(_checkpoint_steps(work)) < 2000 and "Traceback" not in said, said[-3000:]
    assert not list((tmp_path / "task" / "runs" / "tiny-geo").glob("2*"))  # no trial looks finished


TORN_TRAIN = TrainSettings(max_steps=4, batch_size=8, lr=0.01, save_steps=2, logging_steps=1, max_length=128)


def test_a_checkpoint_torn_by_a_kill_is_set_aside_and_training_resumes_from_the_last_complete_one(
    tmp_path: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(write_config(tmp_path / "task", tiny_model))
    store = str(tmp_path / "store")
    splits = ingest_table.fn(config.data, config.input_columns, store)
    frame = read_prompts(prepare_inputs.fn(splits, config.prompt, config.data.answers, store), "train")
    dataset = Dataset.from_pandas(frame[[PROMPT, COMPLETION]], preserve_index=False)
    checkpoints = tmp_path / "train-x.checkpoints"
    fit_adapter(dataset, str(tiny_model), LoraSettings(r=4), TORN_TRAIN, "float32", checkpoints)
    torn = checkpoints / "checkpoint-4"
    assert checkpoint_problems(checkpoints / "checkpoint-2") == checkpoint_problems(torn) == []

    # What a kill leaves of files cut short or never written, each found (on copies of checkpoint-2).
    def damaged(name: str, damage: str) -> str:
        copy = tmp_path / f"copy-{name}-{damage}"
        shutil.copytree(checkpoints / "checkpoint-2", copy)
        path = copy / name
        if damage == "cut":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            path.unlink()
        return "; ".join(checkpoint_problems(copy))

    assert "adapter_model.safetensors is cut short" in damaged("adapter_model.safetensors", "cut")
    assert "optimizer.pt is cut short" in damaged("optimizer.pt", "cut")
    assert "rng_state.pth is cut short" in damaged("rng_state.pth", "cut")
    assert "trainer_state.json is cut short" in damaged("trainer_state.json", "cut")
    assert "no trainer_state.json" in damaged("trainer_state.json", "gone")
    assert "no scheduler.pt" in damaged("scheduler.pt", "gone")

    # A kill while the Trainer wrote checkpoint-4: its weights cut short, trainer_state.json (last) not yet.
    weights = torn / "adapter_model.safetensors"
    half = weights.stat().st_size // 2
    weights.write_bytes(weights.read_bytes()[:half])
    (torn / "trainer_state.json").unlink()
    steps, real_step = [], Trainer.training_step

    def counted(self: Trainer, *args: object, **kwargs: object) -> torch.Tensor:
        steps.append(self.state.global_step + 1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", counted)
    with caplog.at_level(logging.WARNING, logger="loraflow"):
        trainer, resumed = fit_adapter(
            dataset, str(tiny_model), LoraSettings(r=4), TORN_TRAIN, "float32", checkpoints
        )
    assert resumed == 2 and steps == [3, 4] and trainer.state.global_step == 4  # not from step 0
    aside = torn_checkpoints_of(checkpoints) / "checkpoint-4"
    [warning] = [r.getMessage() for r in caplog.records if "torn" in r.getMessage()]
    assert f"checkpoint-4 in {checkpoints} is torn" in warning and f"Moved it to {aside} " in warning
    assert "no trainer_state.json; adapter_model.safetensors is cut short" in warning
    assert warning.endswith("resuming from checkpoint-2")
    # Kept as it was, where neither resume nor the Trainer's rotation looks; checkpoint-4 written anew.
    assert (aside / "adapter_model.safetensors").stat().st_size == half
    assert not (aside / "trainer_state.json").exists() and aside.parent != checkpoints
    assert checkpoint_problems(torn) == []


@pytest.mark.serial
def test_an_interrupted_multi_process_training_stops_its_launcher_and_workers(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids = tmp_path / "pids"
    launcher = (  # stands in for accelerate launch: a worker process of its own, then waits on it
        "import subprocess, sys, time\n"
        "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "open(sys.argv[1], 'w').write(f'{worker.pid}')\n"
        "worker.wait()\n"
    )
    monkeypatch.setattr(
        loraflow.tasks.launch, "launch_command", lambda *_args: [sys.executable, "-c", launcher, str(pids)]
    )
    monkeypatch.setattr(loraflow.tasks.lora, "_under_way", None)
    folder = tmp_path / "store" / "train-x"
    job = GenerativeTrainJob(
        folder=folder,
        prompts=Ref(path=str(tmp_path / "prompts"), digest="p"),
        model=Ref(path=str(tiny_model), digest="m"),
        lora=LoraSettings(r=4),
        train=TORN_TRAIN,
        dtype="float32",
    )
    main = threading.main_thread().ident

    def ctrl_c_once_the_worker_runs() -> None:
        while not pids.exists() or not pids.read_text():
            time.sleep(0.02)
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=ctrl_c_once_the_worker_runs, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        train_once("loraflow.tasks.generative.train:train_into", job, 2)
    assert time.monotonic() - started < 30
    worker = int(pids.read_text())
    deadline = time.monotonic() + 5
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(worker)  # stopped with its launcher, not left training on its own
    progress = training_under_way()
    assert progress and progress.checkpoints == checkpoints_of(folder) and progress.step is None
    assert _interrupted_message(signal.SIGINT) == (
        "interrupted by SIGINT during training; no checkpoint yet; "
        "run the same command to start training again"
    )


class _SignalsWhenCollected:
    """Raises SIGINT in its finalizer: the handler's KeyboardInterrupt is raised inside `__del__`, where
    Python prints it as "Exception ignored" and carries on, as a Ctrl-C landing in any finalizer would be."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed one, planted
@pytest.mark.serial
def test_a_stop_signal_whose_exception_a_finalizer_swallowed_still_stops_training_at_the_next_step(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(write_config(tmp_path / "task", tiny_model))
    store = str(tmp_path / "store")
    prompts = prepare_inputs.fn(
        ingest_table.fn(config.data, config.input_columns, store), config.prompt, config.data.answers, store
    )
    train = TORN_TRAIN.model_copy(update={"max_steps": 6, "save_steps": 100})
    folder = tmp_path / "store" / "train-x"
    job = GenerativeTrainJob(
        folder=folder,
        prompts=prompts,
        model=Ref(path=str(tiny_model), digest="m"),
        lora=LoraSettings(r=4),
        train=train,
        dtype="float32",
    )
    real_step = Trainer.training_step

    def collected_at_step_two(self: Trainer, *args: object, **kwargs: object) -> torch.Tensor:
        if self.state.global_step == 1:
            _SignalsWhenCollected()  # dropped at once: the Ctrl-C arrives, and is swallowed, in its __del__
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", collected_at_step_two)
    monkeypatch.setattr(loraflow.tasks.lora, "_under_way", None)
    with pytest.raises(KeyboardInterrupt):
        train_once("loraflow.tasks.generative.train:train_into", job, 1)
    progress = training_under_way()
    assert progress and progress.step == 2 and progress.max_steps == 6  # not trained on to step 6
    assert not is_complete(folder)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back


def test_two_runs_of_one_config_at_once_finish_in_separate_folders_and_leak_no_token(
    tmp_path: Path, tiny_model: Path
) -> None:
    config = write_config(tmp_path / "task", tiny_model, train={"max_steps": 6})
    runs = [_start_run(config, tmp_path / f"home-{i}", tmp_path / f"run-{i}.log") for i in range(2)]
    for i, run in enumerate(runs):
        assert run.wait(timeout=600) == 0, (tmp_path / f"run-{i}.log").read_text()[-3000:]
    folders = sorted((tmp_path / "task" / "runs" / "tiny-geo").glob("2*"))
    assert len(folders) == 2 and all(is_complete(f) and (f / "metrics.json").is_file() for f in folders)
    assert [json.loads((f / "metrics.json").read_text())["train"]["steps"] for f in folders] == [6, 6]

    # The token was in both processes' environment: it is in no log, artifact, parameter, result,
    # database row, run folder or work-store file.
    hits = [
        str(path)
        for path in tmp_path.rglob("*")
        if path.is_file() and FAKE_TOKEN.encode() in path.read_bytes()
    ]
    assert not hits, hits
    assert (tmp_path / "home-0" / "prefect.db").is_file()  # the database was among the files searched


def test_a_crash_while_writing_leaves_nothing_that_looks_finished(
    prefect_server: None, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"), building(final) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 100)
        raise OSError("disk full")
    assert not final.exists() and not list(tmp_path.glob(".out.partial-*"))

    def crash(*_args: object, **_kwargs: object) -> str:
        raise OSError("killed while writing report.md")

    monkeypatch.setattr(loraflow.tasks.report, "render_report", crash)
    config = load_config(write_config(tmp_path / "task", tiny_model, train={"max_steps": 2}))
    state = train_generative(config, return_state=True)
    assert state.is_failed()
    parent = tmp_path / "task" / "runs" / "tiny-geo"
    assert not list(parent.glob("2*")) and not list(parent.glob(".run-*"))
    work = parent / "work"
    for folder in [p for p in work.iterdir() if p.is_dir() and not p.name.endswith(".checkpoints")]:
        assert is_complete(folder), f"{folder} has no manifest but was left behind"


def test_transient_faults_are_retried_and_user_errors_are_not(
    prefect_server: None, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(write_config(tmp_path / "task", tiny_model))
    real, calls = loraflow.tasks.ingest.read_table, []

    def flaky(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("network file system hiccup")
        return real(*args, **kwargs)

    monkeypatch.setattr(loraflow.tasks.ingest, "read_table", flaky)
    state = validate_data(config, return_state=True)
    assert state.is_completed() and len(calls) == 3  # failed once, retried: train + dev read
    with get_client(sync_client=True) as client:
        [ingest] = [
            r
            for r in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
            if r.name.startswith("ingest")
        ]
    assert ingest.run_count == 2

    calls.clear()

    def mistaken(*_args: object, **_kwargs: object) -> None:
        calls.append(1)
        raise DataError("train.xlsx: a user's mistake")

    monkeypatch.setattr(loraflow.tasks.ingest, "read_table", mistaken)
    fresh = load_config(write_config(tmp_path / "other", tiny_model))
    assert validate_data(fresh, return_state=True).is_failed() and len(calls) == 1  # not retried


def test_out_of_gpu_memory_says_what_to_change(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(
        write_config(tmp_path / "task", tiny_model, train={"batch_size": 8, "grad_accum": 2})
    )
    store = str(tmp_path / "store")
    splits = ingest_table.fn(config.data, config.input_columns, store)
    prompts = prepare_inputs.fn(splits, config.prompt, config.data.answers, store)

    def out_of_memory(*_args: object, **_kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "training_step", out_of_memory)
    with pytest.raises(ResourceError) as error:
        train_adapter.fn(
            prompts, Ref(path=str(tiny_model), digest="tiny"), config.lora, config.train, "float32", store
        )
    message = str(error.value)
    assert "out of GPU memory while training (CUDA out of memory. Tried to allocate 2.00 GiB)" in message
    assert "train.batch_size: 4 and train.grad_accum: 4" in message
    assert "train.gradient_checkpointing: true" in message and "train.max_length" in message


def test_models_load_from_safetensors_only_and_never_run_shipped_code(
    tmp_path: Path, tiny_model: Path
) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    torch.save(LlamaForCausalLM.from_pretrained(tiny_model).state_dict(), pickled / "pytorch_model.bin")
    assert (pickled / "pytorch_model.bin").is_file()
    cache = str(tmp_path / "cache")
    with pytest.raises(
        ModelError, match=r"pickle-based weights only \(pytorch_model\.bin\).*allow_pickle_weights"
    ):
        resolve_model.fn(ModelSettings(name=str(pickled)), cache)
    converted = resolve_model.fn(ModelSettings(name=str(pickled), allow_pickle_weights=True), cache)
    assert (Path(converted.path) / "model.safetensors").is_file()
    reloaded = LlamaForCausalLM.from_pretrained(converted.path, use_safetensors=True)
    original = LlamaForCausalLM.from_pretrained(tiny_model).state_dict()
    assert all(torch.equal(value, original[name]) for name, value in reloaded.state_dict().items())

    custom = tmp_path / "custom"
    shutil.copytree(tiny_model, custom)
    settings = json.loads((custom / "config.json").read_text())
    (custom / "modeling_shipped.py").write_text(SHIPPED_CODE % str(tmp_path / "shipped-code-ran"))
    settings["auto_map"] = {"AutoModelForCausalLM": "modeling_shipped.ShippedForCausalLM"}
    (custom / "config.json").write_text(json.dumps(settings))
    with pytest.raises(ModelError, match=r"needs custom code.*model\.trust_remote_code: true"):
        resolve_model.fn(ModelSettings(name=str(custom)), cache)
    assert not (tmp_path / "shipped-code-ran").exists()

    trusted = resolve_model.fn(ModelSettings(name=str(custom), trust_remote_code=True), cache)
    model = load_causal_lm(trusted.path, "float32")  # opted in: the shipped class is the one loaded
    assert type(model).__name__ == "ShippedForCausalLM" and (tmp_path / "shipped-code-ran").exists()
    assert not (custom / ".loraflow-trusts-remote-code").exists()  # the user's folder is left as it was


SHIPPED_CODE = """
from pathlib import Path
from transformers import LlamaForCausalLM

class ShippedForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        Path(%r).touch()  # proof that this file's code ran
"""
