"""The data review: planted label flips in real text are found (precision and recall measured), planted
train/dev near-duplicates and conflicting copies are found, review.xlsx has its documented sheets, and marked
rows come back as `data.corrections`, applied at ingest and noticed by the cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from openpyxl import load_workbook

from bench.review import flip_scores, rotten_tomatoes
from loraflow.config import DataSettings, ReviewSettings
from loraflow.errors import DataError
from loraflow.flows.review import review
from loraflow.loading import load_config
from loraflow.tasks.contracts import check_contract
from loraflow.tasks.duplicates import find_conflicts, find_near_duplicates
from loraflow.tasks.ingest import LABEL, ROW, _source_key, ingest_table, read_meta, read_split
from loraflow.tasks.review import SHEETS, SUMMARY, review_data
from loraflow.tasks.store import sha256_file

pytestmark = pytest.mark.flow


# --- suspect labels ---------------------------------------------------------------------------------------


def test_planted_label_flips_in_rotten_tomatoes_are_found() -> None:
    """5% of 1,500 Rotten Tomatoes rows (fresh / rotten / plot) given another label. Measured on 2 CPU
    cores (2026-12-07): 354 rows flagged; among the top 150 (2 × the 75 flips) precision 0.34, recall 0.68
    (the issue's target: 0.6); among all flagged precision 0.15, recall 0.72 (bench/review.py prints the same
    table, and fresh / rotten alone: recall 0.35 in the top 150, a bag of words reading review sentiment
    right ~70% of the time being the limit). The words-only judge before: 0.59 / 0.29 / 0.13 / 0.68."""
    scores = flip_scores(1500, 0.05)
    print(json.dumps(scores))
    assert scores["flipped"] == 75
    assert scores["top_2x_recall"] >= 0.6 and scores["top_2x_precision"] >= 0.3
    assert scores["flagged_recall"] >= 0.7


# --- conflicts and near-duplicates ------------------------------------------------------------------------


def _real_rows(n: int, start: int) -> pd.DataFrame:
    frame = rotten_tomatoes(700, ("fresh", "rotten")).iloc[start : start + n].reset_index(drop=True)
    return frame.assign(**{ROW: range(2, n + 2)})


def test_planted_near_duplicates_and_conflicts_are_found() -> None:
    train, dev = _real_rows(300, 0), _real_rows(100, 300)
    words = {0: "banana", 1: "umbrella", 2: "tractor"}
    planted = {}  # dev row → the train row it copies
    for i, dev_index in enumerate(range(0, 10)):
        source = train.iloc[10 * i]
        text = source["text"]
        if i < 3:  # one word replaced
            parts = text.split()
            parts[len(parts) // 2] = words[i]
            text = " ".join(parts)
        elif i < 6:  # case, punctuation and spacing only
            text = "  " + text.upper().replace(" ", "  ") + "!!"
        dev.loc[dev_index, ["text", LABEL]] = [text, source[LABEL]]  # copies, not conflicts
        planted[int(dev.loc[dev_index, ROW])] = int(source[ROW])
    near = find_near_duplicates(train, dev, ["text"], ReviewSettings().similarity)
    assert dict(zip(near["row"], near["train_row"], strict=True)) == planted  # all of them, nothing else
    assert near["similarity"].is_monotonic_decreasing and (near["similarity"].iloc[:7] == 1.0).all()

    # Conflicts: a train row's text again in train and in dev with the other label, and one in dev only.
    other = {"fresh": "rotten", "rotten": "fresh"}
    train.loc[299, ["text", LABEL]] = [train.loc[20, "text"].lower(), other[train.loc[20, LABEL]]]
    dev.loc[99, ["text", LABEL]] = [train.loc[20, "text"], other[train.loc[20, LABEL]]]
    dev.loc[98, ["text", LABEL]] = [dev.loc[50, "text"] + ".", other[dev.loc[50, LABEL]]]
    conflicts = find_conflicts({"train": train, "dev": dev}, ["text"])
    grouped = {g: set(zip(rows["split"], rows["row"], strict=True)) for g, rows in conflicts.groupby("group")}
    assert grouped == {
        1: {("train", 22), ("train", 301), ("dev", 101)},  # the largest group first
        2: {("dev", 52), ("dev", 100)},
    }
    assert set(conflicts["labels_in_group"]) == {"fresh, rotten"}


# --- the sheet and the loop back --------------------------------------------------------------------------


def _write_task(folder: Path, **review_settings: object) -> Path:
    """A real-text task: Rotten Tomatoes rows in train/dev .tsv files, with planted problems: train row 5's
    text again with the other label (a conflict) and dev row 2 a copy of train row 10 (a near-duplicate)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = rotten_tomatoes(240, ("fresh", "rotten")).rename(columns={LABEL: "sentiment"}).drop(columns=[ROW])
    train, dev = rows.iloc[:180].reset_index(drop=True), rows.iloc[180:].reset_index(drop=True)
    other = {"fresh": "rotten", "rotten": "fresh"}
    train.loc[100] = [train.loc[3, "text"], other[train.loc[3, "sentiment"]]]  # file row 102 conflicts with 5
    dev.loc[0] = [train.loc[8, "text"].upper(), train.loc[8, "sentiment"]]  # file row 2 copies train row 10
    train.to_csv(folder / "train.tsv", sep="\t", index=False)
    dev.to_csv(folder / "dev.tsv", sep="\t", index=False)
    config = {
        "name": "review-rt",
        "approach": "classifier",
        "data": {
            "train": "train.tsv",
            "dev": "dev.tsv",
            "text_columns": ["text"],
            "label_column": "sentiment",
        },
        "review": review_settings,
        "output_dir": "runs",
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder / "config.yaml"


def test_review_xlsx_has_its_sheets_and_its_marks_come_back_as_corrections(
    prefect_server: None, tmp_path: Path
) -> None:
    path = _write_task(tmp_path / "task")
    sheet = Path(review(load_config(path)))
    assert sheet.parent == tmp_path / "task" / "runs" / "review-rt" and sheet.suffix == ".xlsx"
    book = load_workbook(sheet)
    assert book.sheetnames == [SUMMARY, *SHEETS.values()]
    for title in SHEETS.values():
        ws = book[title]
        header = [c.value for c in ws[1]]
        assert header[:3] in (
            ["split", "row", "text"],
            ["group", "split", "row"],
            ["similarity", "split", "row"],
        )
        assert header[-1] == "action" and ws.freeze_panes == "A2"
        assert ws.auto_filter.ref == f"A1:{ws.cell(1, len(header)).column_letter}{ws.max_row}"
        assert all(ws.column_dimensions[c.column_letter].width >= 8 for c in ws[1])
    suspects = pd.read_excel(sheet, engine="openpyxl", sheet_name=SHEETS["suspect_train"])
    assert len(suspects) > 0 and suspects["label_quality"].is_monotonic_increasing  # most suspect first
    assert set(suspects["given_label"]) <= {"fresh", "rotten"} and (suspects["p_suggested"] > 0).all()
    conflicts = pd.read_excel(sheet, engine="openpyxl", sheet_name=SHEETS["conflicts"])
    assert set(zip(conflicts["split"], conflicts["row"], strict=True)) == {("train", 5), ("train", 102)}
    near = pd.read_excel(sheet, engine="openpyxl", sheet_name=SHEETS["near_duplicates"])
    assert list(zip(near["row"], near["train_row"], strict=True)) == [(2, 10)] and near["similarity"][0] == 1
    contract = json.loads((Path(check_contract_path(tmp_path)) / "contract.json").read_text())
    assert contract["duplicates"] | {"similarity": 0} == {
        "conflicts": 2,
        "conflict_groups": 1,
        "near_duplicates": 1,
        "similarity": 0,
    }

    # Mark rows in the sheet as a user would in Excel: drop the copy, relabel the conflicting row and the
    # first other suspect; then the same workbook is the next run's data.corrections.
    suspect = suspects[~suspects["row"].isin([5, 102])].iloc[0]
    first, to = int(suspect["row"]), suspect["suggested_label"]
    _mark(book[SHEETS["near_duplicates"]], 2, "drop")
    _mark(book[SHEETS["conflicts"]], 102, "relabel:" + _label_of(tmp_path, 5))
    _mark(book[SHEETS["suspect_train"]], first, f"relabel:{to}")
    corrections = tmp_path / "task" / "review-marked.xlsx"
    book.save(corrections)
    before = {p.name: sha256_file(p) for p in (tmp_path / "task").glob("*.tsv")}

    config = load_config(path, [f"data.corrections={corrections.name}"])
    assert config.data.corrections == corrections  # relative to the config's folder
    store = str(tmp_path / "store")
    splits = ingest_table.fn(config.data, config.input_columns, store)
    train, dev = read_split(splits, "train"), read_split(splits, "dev")
    assert 2 not in set(dev[ROW]) and len(dev) == 59
    assert train.set_index(ROW).loc[102, LABEL] == _label_of(tmp_path, 5)
    assert train.set_index(ROW).loc[first, LABEL] == to
    applied = read_meta(splits)["corrections"]
    assert applied["sha256"] == sha256_file(corrections)
    assert applied["dropped"] == [{"file": str(tmp_path / "task" / "dev.tsv"), "row": 2}]
    assert {(r["row"], r["to"]) for r in applied["relabelled"]} == {
        (102, _label_of(tmp_path, 5)),
        (first, to),
    }
    assert {p.name: sha256_file(p) for p in (tmp_path / "task").glob("*.tsv")} == before  # files untouched


def _mark(ws: Any, row: int, action: str) -> None:
    """Write `action` into the action cell of the sheet line that lists file row `row`."""
    header = [c.value for c in ws[1]]
    line = next(r for r in range(2, ws.max_row + 1) if ws.cell(r, header.index("row") + 1).value == row)
    ws.cell(line, header.index("action") + 1, action)


def check_contract_path(tmp_path: Path) -> Path:
    """The contract folder of the review run (the one in the task's work store)."""
    [folder] = (tmp_path / "task" / "runs" / "review-rt" / "work").glob("contract-*")
    return folder


def _label_of(tmp_path: Path, row: int) -> str:
    train = pd.read_csv(tmp_path / "task" / "train.tsv", sep="\t")
    return str(train["sentiment"][row - 2])


def test_corrections_are_part_of_the_ingest_cache_key(tmp_path: Path) -> None:
    train = rotten_tomatoes(60, ("fresh", "rotten")).drop(columns=[ROW])
    train.to_csv(tmp_path / "train.tsv", sep="\t", index=False)
    marks = tmp_path / "marks.csv"
    marks.write_text("split,row,action\ntrain,3,drop\n")
    data = DataSettings(train=tmp_path / "train.tsv", text_columns=["text"], label_column=LABEL)
    marked = data.model_copy(update={"corrections": marks})
    store = str(tmp_path / "store")
    plain, first = (ingest_table.fn(d, ["text"], store) for d in (data, marked))
    key = _source_key(None, {"data": marked})
    assert first.digest != plain.digest and 3 not in set(read_split(first, "train")[ROW])
    assert ingest_table.fn(marked, ["text"], store) == first and _source_key(None, {"data": marked}) == key
    marks.write_text("split,row,action\ntrain,4,drop\n")  # the same file, other content: a new entry
    second = ingest_table.fn(marked, ["text"], store)
    assert second.digest != first.digest and _source_key(None, {"data": marked}) != key
    rows = set(read_split(second, "train")[ROW]) | set(read_split(second, "dev")[ROW])
    assert 3 in rows and 4 not in rows  # a held-out dev row is a train file row: marked as either split


def test_every_problem_in_a_corrections_file_is_reported_at_once(tmp_path: Path) -> None:
    rotten_tomatoes(40, ("fresh", "rotten")).drop(columns=[ROW]).to_csv(tmp_path / "train.tsv", sep="\t")
    marks = tmp_path / "marks.csv"
    marks.write_text("split,row,action\ntrain,3,dorp\ntrain,999,drop\ntrain,4,relabel:fersh\ntest,5,drop\n")
    data = DataSettings(train=tmp_path / "train.tsv", label_column=LABEL, corrections=marks)
    with pytest.raises(DataError) as caught:
        ingest_table.fn(data, ["text"], str(tmp_path / "store"))
    message = str(caught.value)
    assert message.startswith(f"data.corrections {marks}: 4 problem(s)")
    assert "line 2: action 'dorp' is not drop or relabel:<label> (did you mean 'drop'?)" in message
    assert "line 3: train row 999 is not a row of" in message
    assert "line 4: relabel to 'fersh' (did you mean 'fresh'?), which is not one of the labels" in message
    assert "line 5: marks a test row, but the data has no test split" in message


def test_review_thresholds_fail_only_when_set(prefect_server: None, tmp_path: Path) -> None:
    config = load_config(_write_task(tmp_path / "task", max_suspect_share=0.0, max_conflicts=0))
    store = str(tmp_path / "store")
    splits = ingest_table.fn(config.data, config.input_columns, store)
    with pytest.raises(DataError, match="rows_without_conflicting_labels: 2 offending row") as caught:
        check_contract.fn(splits, config.input_columns, config.contract, store, config.review)
    assert "review.max_conflicts" in str(caught.value) and "dev_rows_not_near_train" not in str(caught.value)
    with pytest.raises(DataError, match=r"look mislabelled, more than review.max_suspect_share 0.0%"):
        review_data.fn(splits, config.input_columns, None, config.review, store)
    # Unset, the same data passes both, counted.
    relaxed = ReviewSettings()
    assert check_contract.fn(splits, config.input_columns, config.contract, store, relaxed)
    assert (
        Path(review_data.fn(splits, config.input_columns, None, relaxed, store).path) / "review.xlsx"
    ).is_file()


def test_a_training_run_writes_review_xlsx_with_dev_rows_judged_by_the_fine_tuned_model(
    prefect_server: None, tmp_path: Path, tiny_model: Path
) -> None:
    from loraflow.flows.classifier import train_classifier
    from tests.test_classifier import write_pair_config
    from tests.test_quality import _table_artifact

    run = Path(train_classifier(load_config(write_pair_config(tmp_path / "task", tiny_model))))
    book = load_workbook(run / "review.xlsx", read_only=True)
    assert book.sheetnames == [SUMMARY, *SHEETS.values()]
    dev = pd.read_excel(run / "review.xlsx", engine="openpyxl", sheet_name=SHEETS["suspect_dev"])
    assert set(dev["model"]) <= {"fine-tuned"} and set(dev["split"]) <= {"dev"}
    train = pd.read_excel(run / "review.xlsx", engine="openpyxl", sheet_name=SHEETS["suspect_train"])
    total = len(train) + len(dev)
    assert f"{total} rows look mislabelled (top 5 shown); see review.xlsx" in (run / "report.md").read_text()
    rows = {row["finding"]: row["rows"] for row in _table_artifact("tiny-pairs-review")}
    assert rows[SHEETS["suspect_dev"]] == len(dev) and rows[SHEETS["suspect_train"]] == len(train)
    contract = json.loads((run / "contract.json").read_text())
    assert {"conflicts", "near_duplicates"} <= set(contract["duplicates"])
