"""`loraflow`: `run | validate | review | plan | sweep | retrain | notify | runs CONFIG`, `predict`, `serve`,
`compare`, `demo`.

Flows run locally on a temporary Prefect server (no server to start; loraflow/server.py). User errors print
a short message and exit non-zero, without a traceback. Ctrl-C (SIGINT) and SIGTERM stop a run within
seconds: the task and flow runs are marked Crashed, the temporary server and any DDP processes are stopped,
and one line says where training got to (exit status 130 and 143).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from types import FrameType

from loraflow.config import LoraflowConfig
from loraflow.console import QUIET_LIBRARIES, VERBOSE, quiet_library_logs
from loraflow.errors import UserError
from loraflow.loading import load_config
from loraflow.runs import compare_runs, runs_table, sweep_leaderboard

# The embedded example ships as package data (examples/ in a checkout, loraflow/examples in a wheel).
DEMO_CONFIG = Path(str(files("loraflow.examples") / "geo" / "config.yaml"))
# Quiet, offline-friendly defaults; the user's environment wins.
ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",  # Prefect's client telemetry, and its first-run notice in a terminal
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "transformers,peft,trl,datasets,accelerate,bitsandbytes",
    "TOKENIZERS_PARALLELISM": "false",
}
PLAN_DOES_NOT_FIT = 3  # `loraflow plan`'s exit status when the estimate exceeds --gpu-memory


class _NoUserErrorTraceback(logging.Filter):
    """Keep the message of a user error in console logs but drop its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info = None
            record.exc_text = None
        message = record.getMessage()
        marker = "\nTraceback (most recent call last)"
        # Prefect's flow engine writes the formatted traceback into the message text itself.
        if marker in message and any(f"{cls.__name__}(" in message for cls in _user_error_types()):
            record.msg, record.args = message.split(marker, 1)[0], ()
        return True


def _user_error_types() -> list[type[UserError]]:
    found, pending = [], [UserError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def _quiet_user_error_tracebacks() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    # Run loggers get their handlers when a run starts, so the filter sits on the loggers themselves:
    # a user error's message is the whole story, in the terminal and in the Prefect UI alike.
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_NoUserErrorTraceback())
    for logger in [logging.getLogger(), *[logging.getLogger(n) for n in logging.root.manager.loggerDict]]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler | logging.StreamHandler):
                handler.addFilter(_NoUserErrorTraceback())


def _print_metrics(run_dir: str) -> None:
    from loraflow.tasks.report import metrics_table

    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    print()
    print(metrics_table(metrics))
    print(f"\nrun folder: {run_dir}")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread as Python raises KeyboardInterrupt for SIGINT: the run
    stops where it is, Prefect marks its task and flow runs Crashed, and `main` says where training got to."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    training = sys.modules.get("loraflow.tasks.lora")
    if training:  # a sweep's trials train in threads: they stop at their next step too
        training.stop_training_threads()
    raise Interrupted(signum)


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM (and SIGINT, unless the shell started this process with it ignored) raise `Interrupted` in
    the body. While a flow runs, Prefect's flow engine has its own SIGTERM handler: it marks the runs Crashed,
    then hands the signal on to this one."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _raise_interrupted)
    if previous[signal.SIGINT] is signal.default_int_handler:
        signal.signal(signal.SIGINT, _raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupted_message(signum: int) -> str:
    """Where an interrupted run stopped and what the next run of the same command does."""
    what = f"interrupted by {signal.Signals(signum).name}"
    training = sys.modules.get("loraflow.tasks.lora")  # not imported yet: no training has started
    progress = training.training_under_way() if training else None
    if progress is None:
        return f"{what}, not while training; run the same command to continue (finished steps are reused)"
    if progress.step is not None:
        what += f" at step {progress.step} of {progress.max_steps}"
    else:
        what += " during training"
    checkpoint = progress.last_checkpoint()
    if checkpoint is None:
        return f"{what}; no checkpoint yet; run the same command to start training again"
    return f"{what}; the last checkpoint is step {checkpoint}; run the same command to resume from it"


def _run(config: LoraflowConfig, refresh: bool) -> int:
    from loraflow.flows import training_flow
    from loraflow.tasks.paths import work_store

    flow = training_flow(config.approach)
    quiet_library_logs()  # once the libraries are imported: their loggers exist
    if refresh:  # a new work store has a new identity, which every task's cache key includes
        shutil.rmtree(work_store(config), ignore_errors=True)
    run_dir = flow(config)
    _print_metrics(run_dir)
    return 0


def _sweep(config: LoraflowConfig) -> int:
    from loraflow.flows.sweep import sweep

    quiet_library_logs()
    result = sweep(config)
    folder = Path(result["sweep"])
    print()
    print((folder / "leaderboard.md").read_text(encoding="utf-8").strip())
    best = result["best"]
    print(f"\nbest: trial {best['number']}, run folder {best['run']}; registry: {result['decision']}")
    print(f"sweep folder: {folder}")
    return 0


def _retrain(config: LoraflowConfig) -> int:
    from loraflow.flows.retrain import retrain

    quiet_library_logs()
    record = retrain(config)
    print(f"{record['decision']}; production: {record['production']}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from loraflow.server import temporary_server

    sheet = int(args.sheet) if args.sheet.isdigit() else args.sheet
    with temporary_server():  # it boots while the flow's modules import
        from loraflow.flows.predict import predict

        quiet_library_logs()
        written = predict(
            model=args.model,
            input=args.input,
            output=args.output,
            sheet=sheet,
            header_row=args.header_row,
            encoding=args.encoding,
            separator=args.separator,
            batch_size=args.batch_size,
        )
    print(f"predictions: {written}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Serve a model over HTTP until SIGINT/SIGTERM (loraflow/serve.py); no Prefect server."""
    os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")  # no flow runs here: nothing to send
    from loraflow.serve import TOKEN_ENV, ServeSettings, serve

    settings = ServeSettings(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_rows=args.max_rows,
        max_chars=args.max_chars,
        max_body_bytes=args.max_body_bytes,
        poll_seconds=args.poll_seconds,
        token=os.environ.get(TOKEN_ENV) or None,
    )
    serve(args.model, args.host, args.port, settings)
    return 0


def _validate(config: LoraflowConfig) -> int:
    from loraflow.flows.validate import validate_data

    quiet_library_logs()
    folder = validate_data(config)
    print(f"data contract passed: {Path(folder) / 'contract.json'}")
    return 0


def _review(config: LoraflowConfig) -> int:
    from loraflow.flows.review import review

    quiet_library_logs()
    sheet = review(config)
    print(f"data review: {sheet} (mark rows drop or relabel:<label> in its action column; data.corrections)")
    return 0


def _plan(config: LoraflowConfig, gpu_memory: str | None) -> int:
    """Estimate the run's peak GPU memory from the model's config.json and the data's token lengths; exit 3
    when it does not fit in `gpu_memory`. No Prefect server: the steps run as plain functions."""
    import tempfile

    from loraflow.tasks.approaches import approach
    from loraflow.tasks.ingest import ingest_table
    from loraflow.tasks.models import default_cache_dir, resolve_model
    from loraflow.tasks.plan import parse_memory, plan_of, plan_table

    available = parse_memory(gpu_memory) if gpu_memory else None
    quiet_library_logs()
    with tempfile.TemporaryDirectory(prefix="loraflow-plan-") as store:
        splits = ingest_table.fn(config.data, config.input_columns, store)
        steps = approach(config.approach)  # its own preparation and length measure, as training has them
        prepared = steps.prepare(config, splits, store, plain=True)  # no Prefect server: plain functions
        model = resolve_model.fn(config.model, default_cache_dir())
        plan = plan_of(config, *steps.lengths(prepared, model.path), model.path, available)
    print(plan_table(plan, config.model, config.train))
    return 0 if plan.fits else PLAN_DOES_NOT_FIT


def _notify(config: LoraflowConfig) -> int:
    """Emit `loraflow.dataset.updated` for the config to the Prefect server: its retrain deployment starts."""
    import asyncio

    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.settings import PREFECT_API_URL

    from loraflow.flows.retrain import DATASET_EVENT, dataset_resource
    from loraflow.tasks.ingest import source_digests

    if not PREFECT_API_URL.value():
        raise UserError(
            "loraflow notify needs a Prefect server: set PREFECT_API_URL (e.g. "
            "prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api)"
        )
    event = Event(
        event=DATASET_EVENT,
        resource={"prefect.resource.id": dataset_resource(config.name), "prefect.resource.name": config.name},
        payload={"data": source_digests(config.data)},
    )

    async def send() -> None:
        async with get_events_client() as client:
            await client.emit(event)

    asyncio.run(send())
    print(f"emitted {DATASET_EVENT} for {config.name} (event {event.id}) to {PREFECT_API_URL.value()}")
    return 0


def _run_config_command(args: argparse.Namespace) -> int:
    if args.command == "demo":  # runs/ and models/ in the folder it is started from (the repository root)
        here = [f"output_dir={Path.cwd() / 'runs'}", f"registry={Path.cwd() / 'models'}"]
        config = load_config(DEMO_CONFIG, here + args.overrides)
    else:
        config = load_config(args.config, args.overrides)
    _quiet_user_error_tracebacks()
    if args.command == "runs":
        print(sweep_leaderboard(config, args.sweep) if args.sweep is not None else runs_table(config))
        return 0
    if args.command == "notify":
        return _notify(config)
    if args.command == "plan":
        return _plan(config, args.gpu_memory)
    if args.command == "sweep":
        from loraflow.tasks.sweep import check_trials

        check_trials(config)  # every trial's settings, before a server starts or anything trains
    from loraflow.server import temporary_server

    with temporary_server():
        if args.command == "sweep":
            return _sweep(config)
        if args.command == "validate":
            return _validate(config)
        if args.command == "review":
            return _review(config)
        if args.command == "retrain":
            return _retrain(config)
        return _run(config, refresh=getattr(args, "refresh", False))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraflow", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    verbosity = argparse.ArgumentParser(add_help=False)  # -v, shared by every command that runs a flow
    verbosity.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show the libraries' own progress bars and log lines (transformers, datasets, ...)",
    )
    overrides = argparse.ArgumentParser(add_help=False, parents=[verbosity])  # --set, and -v
    overrides.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.max_steps=20 (repeatable)",
    )
    run = commands.add_parser(
        "run", parents=[overrides], help="train, merge and evaluate the config's flow locally"
    )
    run.add_argument("config", help="path to the task's config.yaml")
    run.add_argument(
        "--refresh", action="store_true", help="recompute every step (clears <output_dir>/<name>/work first)"
    )
    for name, text in (
        ("validate", "ingest and check the data contract only"),
        ("review", "list suspect labels, conflicts and train/dev near-duplicates in review.xlsx (no model)"),
        ("retrain", "train a challenger on changed data; promote it if it beats the production model"),
        ("notify", "tell the Prefect server the config's data changed (starts its retrain deployment)"),
        ("sweep", "train one run per trial of the config's sweep section; rank them; register the best"),
    ):
        commands.add_parser(name, parents=[overrides], help=text).add_argument("config")
    runs = commands.add_parser(
        "runs", parents=[overrides], help="list a config's finished runs with their key metrics"
    )
    runs.add_argument("config")
    runs.add_argument(
        "--sweep",
        nargs="?",
        const="latest",
        metavar="ID",
        help="show a sweep's leaderboard instead (the latest one when no ID is given)",
    )
    plan = commands.add_parser(
        "plan",
        parents=[overrides],
        help="estimate the run's peak GPU memory (no weights loaded); exit 3 when it does not fit",
        description="Estimate peak GPU memory (weights, LoRA + AdamW states, gradients, activations, logits) "
        "from the model's config.json and the data's token lengths, and rank the changes that would fit. "
        f"Exit status: 0 when it fits, {PLAN_DOES_NOT_FIT} when it does not, 2 on a user error.",
    )
    plan.add_argument("config", help="path to the task's config.yaml")
    plan.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help="the GPU's memory, e.g. 8GiB, 24GB or 8000MiB (default: no check)",
    )
    predict = commands.add_parser(
        "predict", parents=[verbosity], help="label a table's rows with a trained model"
    )
    predict.add_argument("--model", required=True, help="run folder, its merged/ or models/<name>/production")
    predict.add_argument("--input", required=True, help="table to label (.xlsx .csv .tsv .parquet .jsonl)")
    predict.add_argument(
        "--output", required=True, help="where to write rows + predictions (.xlsx .csv .tsv .parquet)"
    )
    predict.add_argument("--sheet", default="0", help="Excel sheet name or 0-based index (default 0)")
    predict.add_argument("--header-row", type=int, default=1, help="1-based row of the column names")
    predict.add_argument("--encoding", default="utf-8", help="text encoding of .csv/.tsv input")
    predict.add_argument(
        "--separator", default=None, help="column separator of .csv/.tsv input (default: ',' or a tab)"
    )
    predict.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    serve = commands.add_parser(
        "serve",
        help="serve a trained model over HTTP (POST /predict, GET /health, GET /info); batches requests",
        description="Serve MODEL over HTTP; a models/<name>/production link is followed and a newly "
        "promoted champion swapped in without dropping a request. With LORAFLOW_SERVE_TOKEN set, every "
        "endpoint but /health requires 'Authorization: Bearer <token>'.",
    )
    serve.add_argument("model", help="run folder, its merged/ or models/<name>/production")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    serve.add_argument("--max-batch", type=int, default=32, help="rows scored together (default 32)")
    serve.add_argument(
        "--max-wait-ms", type=float, default=10.0, help="how long a batch waits for requests (default 10)"
    )
    serve.add_argument("--max-rows", type=int, default=256, help="rows per request at most (default 256)")
    serve.add_argument("--max-chars", type=int, default=4000, help="characters per cell at most (4000)")
    serve.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="request body size at most (default 1 MiB)"
    )
    serve.add_argument(
        "--poll-seconds", type=float, default=5.0, help="how often to check the registry link (default 5)"
    )
    compare = commands.add_parser("compare", help="two runs' config differences and metrics side by side")
    compare.add_argument("runs", nargs=2, metavar="RUN_FOLDER")
    commands.add_parser(
        "demo", parents=[overrides], help="run examples/geo/config.yaml on the embedded model"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):  # asked for on the command line: it beats the environment
        os.environ.update({VERBOSE: "1", **{key: "0" for key in QUIET_LIBRARIES}})
    for key, value in {**ENV_DEFAULTS, **QUIET_LIBRARIES}.items():  # before the libraries are imported
        os.environ.setdefault(key, value)
    started = time.perf_counter()
    try:
        with _signals_interrupt():
            if args.command == "serve":
                code = _serve(args)
            elif args.command == "predict":
                _quiet_user_error_tracebacks()
                code = _predict(args)
            elif args.command == "compare":
                print(compare_runs(*args.runs))
                return 0
            else:
                code = _run_config_command(args)
    except UserError as e:
        print(f"loraflow: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # Interrupted, or a plain one from before the handlers were set
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"loraflow: error: {_interrupted_message(signum)}", file=sys.stderr)
        return 128 + signum
    if args.command != "runs":
        print(f"finished in {time.perf_counter() - started:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
