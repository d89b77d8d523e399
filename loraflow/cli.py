"""The `loraflow` command: `loraflow run CONFIG.yaml`, `loraflow validate CONFIG.yaml`, `loraflow demo`.

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
    flow = _flow_for(config)
    if refresh:  # a new work store has a new identity, which every task's cache key includes
        shutil.rmtree(Path(config.output_dir) / config.name / "work", ignore_errors=True)
    run_dir = flow(config)
    _print_metrics(run_dir)
    return 0


def _validate(config: LoraflowConfig) -> int:
    from flows.validate import validate_data

    folder = validate_data(config)
    print(f"data contract passed: {Path(folder) / 'contract.json'}")
    return 0


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
    demo = commands.add_parser("demo", help="run examples/geo/config.yaml on the embedded model")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    started = time.perf_counter()
    try:
        config = load_config(DEMO_CONFIG if args.command == "demo" else args.config, args.overrides)
        _quiet_user_error_tracebacks()
        if args.command == "validate":
            code = _validate(config)
        else:
            code = _run(config, refresh=getattr(args, "refresh", False))
    except UserError as e:
        print(f"loraflow: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(
            "loraflow: interrupted; re-run the same command to resume from the last checkpoint",
            file=sys.stderr,
        )
        return 130
    print(f"finished in {time.perf_counter() - started:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
