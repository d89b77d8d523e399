"""The data contract: Great Expectations suites generated from the config, checked before any model loads.

Great Expectations stays behind this thin adapter (imported only when a contract runs, it takes seconds).
Expectations are generated from the config (columns exist; text cells non-null and non-empty; labels in
the allowed set; row count bounds), extended by an optional suite JSON, and complemented by the checks GE
has no expectation for (rows per class, train/dev overlap). Every violation is reported at once.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import CacheKeyFnPolicy

from loraflow.config import ContractSettings, ReviewSettings
from loraflow.errors import DataError, shown
from loraflow.tasks.duplicates import find_conflicts, find_near_duplicates
from loraflow.tasks.ingest import LABEL, ROW, read_meta, read_split, split_names
from loraflow.tasks.store import (
    CONTENT_CACHE,
    Ref,
    building,
    digest_of,
    is_complete,
    named_for_config,
    sha256_file,
    step_output,
    work_dir,
)
from loraflow.tasks.tables import BLANK_CHARS

SAMPLES = 5  # offending rows shown per violation


def _suite_key(_context: Any, inputs: dict[str, Any]) -> str:
    suite = inputs["contract"].extra_suite
    return sha256_file(suite) if suite and Path(suite).is_file() else "no-extra-suite"


def _extra_expectations(path: Path | None) -> list[dict[str, Any]]:
    if path is None:
        return []
    if not path.is_file():
        raise DataError(f"contract.extra_suite {path} not found")
    try:
        suite = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    items = suite.get("expectations") if isinstance(suite, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, dict) and "type" in i for i in items):
        raise DataError(f'{path}: expected {{"expectations": [{{"type": ..., "kwargs": {{...}}}}]}}')
    return items


def text_expectations(columns: list[str]) -> list[dict[str, Any]]:
    """The input columns exist, and their cells are neither null nor blank (critical)."""
    found: list[dict[str, Any]] = []
    for column in columns:
        found.append({"type": "expect_column_to_exist", "kwargs": {"column": column}})
        found.append({"type": "expect_column_values_to_not_be_null", "kwargs": {"column": column}})
        found.append(
            {
                "type": "expect_column_values_to_not_match_regex",
                "kwargs": {"column": column, "regex": f"^[{BLANK_CHARS}]*$"},
            }
        )
    return [{**e, "severity": "critical"} for e in found]


def build_expectations(
    columns: list[str], labels: list[str], contract: ContractSettings
) -> list[dict[str, Any]]:
    """Expectation configs (type + kwargs + severity) that the config implies for one split."""
    found = text_expectations(columns)
    found.append({"type": "expect_column_to_exist", "kwargs": {"column": LABEL}})
    found.append({"type": "expect_column_values_to_not_be_null", "kwargs": {"column": LABEL}})
    found.append(
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": LABEL, "value_set": labels}}
    )
    found.append(
        {
            "type": "expect_table_row_count_to_be_between",
            "kwargs": {"min_value": contract.min_rows, "max_value": contract.max_rows},
        }
    )
    return [{**e, "severity": "critical"} for e in found]


def run_suites(
    frames: dict[str, pd.DataFrame], suites: dict[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Validate each split's frame against its expectation configs with Great Expectations."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig
        from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("loraflow")
    checks = []
    for split, frame in frames.items():
        batch = source.add_dataframe_asset(split).add_batch_definition_whole_dataframe("all")
        expectations = []
        for item in suites[split]:
            config = ExpectationConfiguration(type=item["type"], kwargs=item.get("kwargs", {}))
            expectation = config.to_domain_obj()
            expectation.severity = item.get("severity", "critical")
            expectations.append(expectation)
        suite = context.suites.add(gx.ExpectationSuite(name=f"loraflow-{split}", expectations=expectations))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(data=batch, suite=suite, name=f"loraflow-{split}")
        )
        result = definition.run(
            batch_parameters={"dataframe": frame},
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW]},
        )
        for outcome in result.results:  # GE orders results its own way: read everything off each one
            info = outcome.result or {}
            severity = getattr(outcome.expectation_config.severity, "value", "critical")
            error = (outcome.exception_info or {}).get("exception_message")
            samples = [
                {"row": int(r[ROW]), **{k: _plain(v) for k, v in r.items() if k != ROW}}
                for r in (info.get("unexpected_index_list") or [])[:SAMPLES]
            ]
            checks.append(
                {
                    "split": split,
                    "expectation": outcome.expectation_config.type,
                    "column": outcome.expectation_config.kwargs.get("column"),
                    "success": bool(outcome.success),
                    "severity": str(severity),
                    "unexpected_count": info.get("unexpected_count"),
                    "observed": _plain(info.get("observed_value")),
                    "samples": samples,
                    "error": error,
                }
            )
    return checks


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, str | bool | int | float):
        return None if isinstance(value, float) and value != value else value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _class_checks(train: pd.DataFrame, labels: list[str], contract: ContractSettings) -> list[dict[str, Any]]:
    counts = train[LABEL].value_counts()
    checks = []
    too_few = {
        label: int(counts.get(label, 0))
        for label in labels
        if counts.get(label, 0) < contract.min_rows_per_class
    }
    checks.append(
        {
            "split": "train",
            "expectation": "rows_per_class_at_least",
            "column": LABEL,
            "success": not too_few,
            "severity": "critical",
            "unexpected_count": len(too_few),
            "observed": {label: int(counts.get(label, 0)) for label in labels},
            "samples": [
                {"label": k, "rows": v, "needed": contract.min_rows_per_class} for k, v in too_few.items()
            ],
            "error": None,
        }
    )
    present = [label for label in labels if counts.get(label, 0) > 0]
    checks.append(
        {
            "split": "train",
            "expectation": "at_least_two_classes",
            "column": LABEL,
            "success": len(present) >= 2,
            "severity": "critical",
            "unexpected_count": None,
            "observed": present,
            "samples": [],
            "error": None,
        }
    )
    return checks


def _overlap(train: pd.DataFrame, dev: pd.DataFrame, columns: list[str]) -> dict[str, Any]:
    keys = [*columns, LABEL]
    shared = dev.merge(train[keys].drop_duplicates(), on=keys, how="inner")
    return {
        "rows": int(len(shared)),
        "samples": [
            {"row": int(r[ROW]), **{k: r[k] for k in keys}} for _, r in shared.head(SAMPLES).iterrows()
        ],
    }


def _overlap_check(overlap: dict[str, Any], dev_rows: int, contract: ContractSettings) -> dict[str, Any]:
    """Dev rows that are copies of train rows (the same file twice, or dev cut from train) measure
    memory, not skill: critical beyond contract.max_dev_in_train."""
    share = overlap["rows"] / dev_rows if dev_rows else 0.0
    return {
        "split": "dev",
        "expectation": "dev_rows_not_in_train",
        "column": None,
        "success": share <= contract.max_dev_in_train,
        "severity": "critical",
        "unexpected_count": overlap["rows"],
        "observed": f"{overlap['rows']} of {dev_rows} dev rows ({share:.0%}) are also train rows",
        "samples": overlap["samples"],
        "error": None,
    }


def _count_check(
    split: str, expectation: str, count: int, most: int | None, observed: str, samples: list[dict[str, Any]]
) -> dict[str, Any]:
    """A count the review measures: informative unless the user set `most` (review.max_*), then critical."""
    return {
        "split": split,
        "expectation": expectation,
        "column": None,
        "success": count <= (most if most is not None else 0),
        "severity": "critical" if most is not None else "info",
        "unexpected_count": count,
        "observed": observed,
        "samples": samples[:SAMPLES],
        "error": None,
    }


def _duplicate_checks(
    frames: dict[str, pd.DataFrame], columns: list[str], review: ReviewSettings
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows sharing their text with a row of another label, and dev rows near train rows
    (tasks/duplicates.py): the checks and their counts for contract.json."""
    conflicts = find_conflicts(frames, columns)
    near = find_near_duplicates(frames["train"], frames["dev"], columns, review.similarity)
    groups = int(conflicts["group"].nunique()) if len(conflicts) else 0
    counts = {
        "conflicts": len(conflicts),
        "conflict_groups": groups,
        "near_duplicates": len(near),
        "similarity": review.similarity,
    }
    checks = [
        _count_check(
            "all",
            "rows_without_conflicting_labels",
            len(conflicts),
            review.max_conflicts,
            f"{len(conflicts)} row(s) in {groups} group(s) share their text with a row of another label",
            [{"split": r.split, "row": int(r.row), "label": r.label} for r in conflicts.itertuples()],
        ),
        _count_check(
            "dev",
            "dev_rows_not_near_train",
            len(near),
            review.max_near_duplicates,
            f"{len(near)} of {len(frames['dev'])} dev rows have a train row of similarity "
            f">= {review.similarity}",
            [
                {"row": int(r.row), "train_row": int(r.train_row), "similarity": float(r.similarity)}
                for r in near.itertuples()
            ],
        ),
    ]
    return checks, counts


FIXES = {  # what to do about each kind of violation, shown after it
    "expect_column_to_exist": "check the column name in the config against the file's header",
    "expect_column_values_to_not_be_null": "fill the empty cells or delete those rows",
    "expect_column_values_to_not_match_regex": "fill the blank (whitespace-only) cells or delete those rows",
    "expect_column_values_to_be_in_set": "fix those labels or add them to data.labels; dev labels must "
    "also appear in train",
    "expect_table_row_count_to_be_between": "add rows, or change contract.min_rows / contract.max_rows",
    "rows_per_class_at_least": "add rows of those labels, or lower contract.min_rows_per_class",
    "at_least_two_classes": "train needs at least two labels to learn from; check data.label_column",
    "dev_rows_not_in_train": "give data.dev a file of other rows (data.train and data.dev may name the same "
    "file), leave data.dev empty to hold out part of train, or set contract.max_dev_in_train: 1 to accept",
    "rows_without_conflicting_labels": "give each text one label (`loraflow review` lists them; mark the "
    "rows in its conflicts sheet and pass it as data.corrections), or raise review.max_conflicts",
    "dev_rows_not_near_train": "drop those dev rows or their train copies (`loraflow review`, "
    "near-duplicates sheet, data.corrections), or raise review.max_near_duplicates",
}


def _capped(value: Any) -> str:
    """An observed value for a message: at most 10 items, each cut (a label can be 263 KB of NULs)."""
    if isinstance(value, list):
        more = f", … {len(value) - 10} more" if len(value) > 10 else ""
        return "[" + ", ".join(shown(v) for v in value[:10]) + more + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{shown(k)}: {shown(v)}" for k, v in list(value.items())[:10]) + "}"
    return shown(value) if isinstance(value, str) else str(value)


def describe_violation(check: dict[str, Any]) -> str:
    """One line per failed check: split, expectation, column, how many, and sample rows."""
    where = f"{check['split']}: {check['expectation']}" + (
        f" on column '{check['column']}'" if check["column"] else ""
    )
    if check["error"]:
        return f"{where}: could not be evaluated ({check['error']})"
    parts = [where]
    if check["unexpected_count"]:
        parts.append(f"{check['unexpected_count']} offending row(s)")
    observed = check["observed"]
    if isinstance(observed, str) and check["expectation"] == "dev_rows_not_in_train":
        parts.append(observed)
    elif observed is not None and not check["samples"]:
        parts.append(f"observed {_capped(observed)}")
    if check["samples"]:
        parts.append(
            "e.g. " + "; ".join(", ".join(f"{k}={shown(v)}" for k, v in s.items()) for s in check["samples"])
        )
    fix = FIXES.get(check["expectation"])
    return ": ".join(parts) + (f" → {fix}" if fix else "")


@task(
    name="check-contract",
    task_run_name=named_for_config("check-contract"),
    cache_policy=CONTENT_CACHE + CacheKeyFnPolicy(cache_key_fn=_suite_key),
)
def check_contract(
    splits: Ref,
    columns: list[str],
    contract: ContractSettings,
    store: str,
    review: ReviewSettings = ReviewSettings(),  # noqa: B008 - frozen settings, never mutated
) -> Ref:
    """Validate train, dev (and test); save contract.json; fail listing every critical violation at once.
    Conflicting labels and train/dev near-duplicates are counted, and critical only past review.max_*."""
    duplicates = (review.similarity, review.max_conflicts, review.max_near_duplicates)
    suite = _suite_key(None, {"contract": contract})
    key = digest_of("contract", splits.digest, columns, contract, suite, *duplicates)
    folder, result = step_output(store, "contract", key)
    if is_complete(folder):
        return result
    meta = read_meta(splits)
    labels = meta["labels"]
    frames = {split: read_split(splits, split) for split in split_names(splits)}
    generated = build_expectations(columns, labels, contract)
    extra = _extra_expectations(contract.extra_suite)
    checks = run_suites(frames, {split: generated + extra for split in frames})
    checks += _class_checks(frames["train"], labels, contract)
    overlap = _overlap(frames["train"], frames["dev"], columns)
    checks.append(_overlap_check(overlap, len(frames["dev"]), contract))
    duplicate_checks, duplicate_counts = _duplicate_checks(frames, columns, review)
    checks += duplicate_checks
    report = {
        "success": all(c["success"] for c in checks if c["severity"] == "critical"),
        "labels": labels,
        "rows": {split: len(frame) for split, frame in frames.items()},
        "checks": checks,
        "train_dev_overlap": overlap,
        "duplicates": duplicate_counts,
    }
    create_table_artifact(
        key="data-contract",
        table=[
            {
                "split": c["split"],
                "expectation": c["expectation"],
                "column": c["column"] or "",
                "severity": c["severity"],
                "success": c["success"],
                "unexpected": c["unexpected_count"] or 0,
            }
            for c in checks
        ],
        description=f"Data contract: {'passed' if report['success'] else 'FAILED'}; "
        f"{report['train_dev_overlap']['rows']} dev row(s) identical to train rows",
    )
    text = json.dumps(report, indent=1, default=str)
    if not report["success"]:
        failed = work_dir(store, "contract-failed", key)
        failed.mkdir(parents=True, exist_ok=True)
        (failed / "contract.json").write_text(text)
        violations = [
            describe_violation(c) for c in checks if not c["success"] and c["severity"] == "critical"
        ]
        files = ", ".join(f"{split} = {path}" for split, path in meta["files"].items())
        raise DataError(
            f"data contract failed with {len(violations)} violation(s) ({files}; rows are the files' row "
            f"numbers; full report: {failed / 'contract.json'}):\n"
            + "\n".join(f"  - {v}" for v in violations)
        )
    with building(folder) as tmp:
        (tmp / "contract.json").write_text(text)
    return result
