"""Corrections: the rows a user marked in review.xlsx (or any table with split, row and action columns),
applied at ingest as `data.corrections`.

An `action` cell says `drop` (leave the row out) or `relabel:<label>` (give it that label); an empty cell
leaves the row alone. Rows are named by their split and their row number in the user's file, as every
sheet of review.xlsx lists them; a held-out dev or test row is a row of the train file. The data files are
never rewritten: ingest applies the marks to what it read and records them in ingest.json. Every problem
in the file (an unknown action, a row not in the file, a label not allowed) is reported at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from openpyxl import load_workbook

from loraflow.config import normalize_label
from loraflow.errors import DataError, did_you_mean, shown
from loraflow.tasks.tables import ROW, blank_cells, read_table

SPLIT, ROW_NUMBER, ACTION = "split", "row", "action"  # the columns a corrections table needs
DROP, RELABEL = "drop", "relabel:"


def _sheets(path: Path) -> list[str | int]:
    if path.suffix.lower() not in (".xlsx", ".xlsm"):
        return [0]
    workbook = load_workbook(path, read_only=True)
    try:
        return list(workbook.sheetnames)
    finally:
        workbook.close()


class Corrections:
    """The marked rows of a corrections file, applied split by split; problems are collected, then raised
    together by `check`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []
        self.dropped: list[dict[str, Any]] = []
        self.relabelled: list[dict[str, Any]] = []
        self.splits_seen: set[str] = set()
        marks = []
        for sheet in _sheets(path):
            frame = read_table(path, sheet=sheet)
            if ACTION not in frame.columns:  # a summary or notes sheet
                continue
            where = f"sheet {sheet!r} " if isinstance(sheet, str) else ""
            missing = [c for c in (SPLIT, ROW_NUMBER) if c not in frame.columns]
            if missing:
                self.problems.append(f"{where}has an action column but no {' or '.join(missing)} column")
                continue
            marked = frame[~blank_cells(frame[[ACTION]])[:, 0]]
            for _, mark in marked.iterrows():
                marks.append(self._mark(mark, f"{where}line {mark[ROW]}"))
        self.marks = [m for m in marks if m is not None]

    def _mark(self, mark: pd.Series, where: str) -> dict[str, Any] | None:
        action = str(mark[ACTION]).strip()
        split = str(mark[SPLIT]).strip().lower()
        if split not in ("train", "dev", "test"):
            self.problems.append(f"{where}: split {shown(mark[SPLIT])} is not train, dev or test")
            return None
        try:
            row = int(float(str(mark[ROW_NUMBER])))
        except ValueError:
            self.problems.append(f"{where}: row {shown(mark[ROW_NUMBER])} is not a row number")
            return None
        if action.lower() == DROP:
            return {"split": split, "row": row, "action": DROP, "where": where}
        if action.lower().startswith(RELABEL) and action[len(RELABEL) :].strip():
            label = normalize_label(action[len(RELABEL) :].strip())
            return {"split": split, "row": row, "action": RELABEL, "label": label, "where": where}
        hint = did_you_mean(action.lower(), [DROP])
        self.problems.append(f"{where}: action {shown(action)} is not drop or relabel:<label>{hint}")
        return None

    def apply(
        self,
        frame: pd.DataFrame,
        file: Path,
        splits: tuple[str, ...],
        labels: list[str],
        label_columns: tuple[str, str],
    ) -> pd.DataFrame:
        """`frame` (one file's rows, as ingest read them) with the marks of `splits` applied: marked rows
        dropped or relabelled to one of `labels` (written to both `label_columns`, ingest's label and its
        spelling)."""
        self.splits_seen.update(splits)
        marks = [m for m in self.marks if m["split"] in splits]
        rows = set(frame[ROW].tolist())
        by_row: dict[int, dict[str, Any]] = {}
        for mark in marks:
            if mark["row"] not in rows:
                self.problems.append(
                    f"{mark['where']}: {mark['split']} row {mark['row']} is not a row of {file} (its rows "
                    f"are {min(rows, default=0)}-{max(rows, default=0)}, blank rows left out)"
                )
            elif mark["action"] == RELABEL and mark["label"] not in labels:
                hint = did_you_mean(mark["label"], labels)
                self.problems.append(
                    f"{mark['where']}: relabel to {shown(mark['label'])}{hint}, which is not one of the "
                    f"labels {labels}; add it to data.labels or correct the action"
                )
            elif mark["row"] in by_row and _differs(by_row[mark["row"]], mark):
                self.problems.append(
                    f"{mark['where']}: {mark['split']} row {mark['row']} is also marked differently at "
                    f"{by_row[mark['row']]['where']}; keep one action"
                )
            else:
                by_row[mark["row"]] = mark
        frame = frame.copy()
        for row, mark in by_row.items():
            at = frame[ROW] == row
            record = {"file": str(file), "row": row}
            if mark["action"] == DROP:
                self.dropped.append(record)
            else:
                given = frame.loc[at, label_columns[0]].iloc[0]
                self.relabelled.append(record | {"from": given, "to": mark["label"]})
                frame.loc[at, list(label_columns)] = mark["label"]
        dropped = frame[ROW].isin([row for row, mark in by_row.items() if mark["action"] == DROP])
        return frame[~dropped].reset_index(drop=True)

    def check(self) -> None:
        """Raise one DataError listing every problem found reading and applying the file."""
        for mark in self.marks:
            if mark["split"] not in self.splits_seen:
                split = mark["split"]
                self.problems.append(
                    f"{mark['where']}: marks a {split} row, but the data has no {split} split"
                )
        if self.problems:
            raise DataError(
                f"data.corrections {self.path}: {len(self.problems)} problem(s) (lines are the sheet's rows; "
                "actions are drop or relabel:<label>):\n" + "\n".join(f"  - {p}" for p in self.problems)
            )

    def record(self, sha256: str) -> dict[str, Any]:
        """What was applied, for ingest.json."""
        return {
            "file": str(self.path),
            "sha256": sha256,
            "dropped": self.dropped,
            "relabelled": self.relabelled,
        }


def _differs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["action"], a.get("label")) != (b["action"], b.get("label"))
