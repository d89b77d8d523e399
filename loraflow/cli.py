"""The `loraflow` command: `run | validate | retrain | notify | runs CONFIG`, `predict`, `compare`, `demo`.

Flows run locally on Prefect's ephemeral server (no server to start). User errors print a short message
and exit non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from loraflow.config import LoraflowConfig, load_config
from loraflow.errors import UserError
from loraflow.runs import compare_runs, runs_table

if TYPE_CHECKING:  # prefect is imported after ENV_DEFAULTS are applied
    from prefect import Flow

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "geo" / "config.yaml"
# Quiet, offline-friendly defaults; the user's environment wins.
ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "transformers,peft,trl,datasets",
    "TOKENIZERS_PARALLELISM": "false",
}


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
    from tasks.report import metrics_table

    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    print()
    print(metrics_table(metrics))
    print(f"\nrun folder: {run_dir}")


def _flow_for(config: LoraflowConfig) -> Flow:
    if config.approach == "classifier":
        from flows.classifier import train_classifier

        return train_classifier
    from flows.generative import train_generative

    return train_generative


def _run(config: LoraflowConfig, refresh: bool) -> int:
    from tasks.paths import work_store

    flow = _flow_for(config)
    if refresh:  # a new work store has a new identity, which every task's cache key includes
        shutil.rmtree(work_store(config), ignore_errors=True)
    run_dir = flow(config)
    _print_metrics(run_dir)
    return 0


def _retrain(config: LoraflowConfig) -> int:
    from flows.retrain import retrain

    record = retrain(config)
    print(f"{record['decision']}; production: {record['production']}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from flows.predict import predict

    sheet = int(args.sheet) if args.sheet.isdigit() else args.sheet
    written = predict(
        model=args.model,
        input=args.input,
        output=args.output,
        sheet=sheet,
        header_row=args.header_row,
        encoding=args.encoding,
        batch_size=args.batch_size,
    )
    print(f"predictions: {written}")
    return 0


def _validate(config: LoraflowConfig) -> int:
    from flows.validate import validate_data

    folder = validate_data(config)
    print(f"data contract passed: {Path(folder) / 'contract.json'}")
    return 0


def _notify(config: LoraflowConfig) -> int:
    """Emit `loraflow.dataset.updated` for the config to the Prefect server: its retrain deployment starts."""
    import asyncio

    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.settings import PREFECT_API_URL

    from flows.retrain import DATASET_EVENT, dataset_resource
    from tasks.ingest import source_digests

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
    config = load_config(DEMO_CONFIG if args.command == "demo" else args.config, args.overrides)
    _quiet_user_error_tracebacks()
    if args.command == "runs":
        print(runs_table(config))
        return 0
    if args.command == "validate":
        return _validate(config)
    if args.command == "notify":
        return _notify(config)
    if args.command == "retrain":
        return _retrain(config)
    return _run(config, refresh=getattr(args, "refresh", False))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraflow", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train, merge and evaluate the config's flow locally")
    run.add_argument("config", help="path to the task's config.yaml")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.max_steps=20 (repeatable)",
    )
    run.add_argument(
        "--refresh", action="store_true", help="recompute every step (clears <output_dir>/<name>/work first)"
    )
    validate = commands.add_parser("validate", help="ingest and check the data contract only")
    validate.add_argument("config")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    retrain = commands.add_parser(
        "retrain", help="train a challenger on changed data; promote it if it beats the production model"
    )
    retrain.add_argument("config")
    retrain.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    notify = commands.add_parser(
        "notify", help="tell the Prefect server the config's data changed (starts its retrain deployment)"
    )
    notify.add_argument("config")
    notify.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    predict = commands.add_parser("predict", help="label a table's rows with a trained model")
    predict.add_argument("--model", required=True, help="run folder, its merged/ or models/<name>/production")
    predict.add_argument("--input", required=True, help="table to label (.xlsx .csv .tsv .parquet .jsonl)")
    predict.add_argument(
        "--output", required=True, help="where to write rows + predictions (.xlsx .csv .tsv .parquet)"
    )
    predict.add_argument("--sheet", default="0", help="Excel sheet name or 0-based index (default 0)")
    predict.add_argument("--header-row", type=int, default=1, help="1-based row of the column names")
    predict.add_argument("--encoding", default="utf-8", help="text encoding of .csv/.tsv input")
    predict.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    runs = commands.add_parser("runs", help="list a config's finished runs with their key metrics")
    runs.add_argument("config")
    runs.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    compare = commands.add_parser("compare", help="two runs' config differences and metrics side by side")
    compare.add_argument("runs", nargs=2, metavar="RUN_FOLDER")
    demo = commands.add_parser("demo", help="run examples/geo/config.yaml on the embedded model")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    started = time.perf_counter()
    try:
        if args.command == "predict":
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
    except KeyboardInterrupt:
        print(
            "loraflow: interrupted; re-run the same command to resume from the last checkpoint",
            file=sys.stderr,
        )
        return 130
    if args.command != "runs":
        print(f"finished in {time.perf_counter() - started:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
