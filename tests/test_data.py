"""Ingest, the data contract and prompt formatting, on real files written by openpyxl and pandas."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from openpyxl import Workbook

from loraflow.config import ContractSettings, DataSettings, PromptSettings
from loraflow.errors import DataError
from loraflow.tasks.contracts import check_contract
from loraflow.tasks.generative.prepare import PROMPT, prepare_inputs, read_prompts, render
from loraflow.tasks.generative.scoring import encode_choices
from loraflow.tasks.ingest import LABEL, ROW, ingest_table, read_meta, read_split, split_stratified
from loraflow.tasks.models import load_tokenizer
from tests.tiny import geo_rows

pytestmark = pytest.mark.unit
COLUMNS = ["requirement", "sample_data"]


def _settings(train: Path, dev: Path | None = None, **extra: object) -> DataSettings:
    return DataSettings(train=train, dev=dev, label_column="score", **extra)


def test_xlsx_sheet_by_name_with_header_below_blank_rows(tmp_path: Path) -> None:
    book = Workbook()
    book.active.title = "notes"
    sheet = book.create_sheet("data")
    sheet.append([])
    sheet.append(["exported by hand"])
    sheet.append(["requirement", "sample_data", "score"])
    for row in geo_rows(20).itertuples(index=False):
        sheet.append(list(row))
    book.save(tmp_path / "train.xlsx")
    data = _settings(tmp_path / "train.xlsx", sheet="data", header_row=3)
    ref = ingest_table.fn(data, COLUMNS, str(tmp_path / "store"))
    train, dev = read_split(ref, "train"), read_split(ref, "dev")
    assert len(train) + len(dev) == 20 and len(dev) == 4
    assert sorted(pd.concat([train, dev])[ROW].tolist()) == list(range(4, 24))  # spreadsheet row numbers
    meta = read_meta(ref)
    assert meta["labels"] == ["0", "1"]
    assert (
        list(meta["sources"].values())[0]
        == __import__("hashlib").sha256((tmp_path / "train.xlsx").read_bytes()).hexdigest()
    )


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl", ".parquet"])
def test_text_and_columnar_formats_ingest_the_same_rows(tmp_path: Path, suffix: str) -> None:
    frame = geo_rows(12)
    frame.loc[0, "sample_data"] = 'Lima, "Zurich"\twith a tab\nand a newline {braces} 🌍'
    path = tmp_path / f"train{suffix}"
    if suffix == ".tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_parquet(path)
    ref = ingest_table.fn(_settings(path, path), COLUMNS, str(tmp_path / "store"))
    train = read_split(ref, "train")
    assert train["sample_data"].tolist() == frame["sample_data"].tolist()
    assert train[LABEL].tolist() == [str(v) for v in frame["score"]]


def test_missing_column_names_the_file_and_suggests_the_nearest(tmp_path: Path) -> None:
    geo_rows(10).rename(columns={"requirement": "requirment"}).to_csv(
        tmp_path / "t.tsv", sep="\t", index=False
    )
    with pytest.raises(DataError, match=r"t\.tsv: column\(s\) 'requirement' \(did you mean 'requirment'\?\)"):
        ingest_table.fn(_settings(tmp_path / "t.tsv"), COLUMNS, str(tmp_path / "store"))


def test_stratified_split_is_seeded_and_keeps_class_shares() -> None:
    frame = pd.DataFrame({LABEL: ["a"] * 80 + ["b"] * 20, "x": range(100)})
    train, dev = split_stratified(frame, 0.2, seed=3)
    again, _ = split_stratified(frame, 0.2, seed=3)
    assert dev[LABEL].value_counts().to_dict() == {"a": 16, "b": 4}
    assert train["x"].tolist() == again["x"].tolist()
    assert set(train["x"]).isdisjoint(dev["x"])


def test_contract_reports_every_violation_at_once_with_rows(tmp_path: Path, prefect_server: None) -> None:
    frame = geo_rows(20)
    frame.loc[2, "requirement"] = "   "
    frame.loc[5, "sample_data"] = None
    frame.loc[7, "score"] = 7
    frame = frame.astype({"score": object})
    frame.loc[9, "score"] = None
    frame.to_csv(tmp_path / "train.csv", index=False)
    geo_rows(10, seed=1).to_csv(tmp_path / "dev.csv", index=False)
    data = _settings(tmp_path / "train.csv", tmp_path / "dev.csv", labels=[0, 1])
    ref = ingest_table.fn(data, COLUMNS, str(tmp_path / "store"))
    with pytest.raises(DataError) as error:
        check_contract.fn(ref, COLUMNS, ContractSettings(min_rows_per_class=10), str(tmp_path / "store"))
    message = str(error.value)
    assert "train.csv" in message
    assert (
        "expect_column_values_to_not_match_regex on column 'requirement': 1 offending row(s): e.g. row=4"
        in message
    )
    assert (
        "expect_column_values_to_not_be_null on column 'sample_data': 1 offending row(s): e.g. row=7"
        in message
    )
    assert (
        "expect_column_values_to_be_in_set on column 'label': 1 offending row(s): e.g. row=9, label='7'"
        in message
    )
    assert "expect_column_values_to_not_be_null on column 'label': 1 offending row(s): e.g. row=11" in message
    assert "rows_per_class_at_least" in message
    saved = json.loads(Path(message.split("full report: ")[1].split(")")[0]).read_text())
    assert saved["success"] is False


def test_contract_passes_applies_extra_suite_and_reports_overlap(
    tmp_path: Path, prefect_server: None
) -> None:
    frame = geo_rows(20)
    frame.to_csv(tmp_path / "train.csv", index=False)
    frame.head(6).to_csv(tmp_path / "dev.csv", index=False)  # dev rows identical to train rows
    suite = tmp_path / "extra.json"
    suite.write_text(
        json.dumps(
            {
                "expectations": [
                    {
                        "type": "expect_column_values_to_match_regex",
                        "kwargs": {"column": "sample_data", "regex": "^Z"},
                        "severity": "warning",
                    }
                ]
            }
        )
    )
    data = _settings(tmp_path / "train.csv", tmp_path / "dev.csv")
    ref = ingest_table.fn(data, COLUMNS, str(tmp_path / "store"))
    result = check_contract.fn(
        ref,
        COLUMNS,
        ContractSettings(min_rows_per_class=2, min_rows=5, max_dev_in_train=1, extra_suite=suite),
        str(tmp_path / "store"),
    )
    report = json.loads((Path(result.path) / "contract.json").read_text())
    assert report["success"] is True
    assert report["train_dev_overlap"]["rows"] == 6
    [overlap] = [c for c in report["checks"] if c["expectation"] == "dev_rows_not_in_train"]
    assert overlap["success"] and overlap["observed"] == "6 of 6 dev rows (100%) are also train rows"
    warning = [c for c in report["checks"] if c["severity"] == "warning"]
    assert warning and not warning[0]["success"]


def test_cells_are_inserted_literally() -> None:
    row = {"a": 'He said "{x}"\nthen 🤖 {{y}}', "b": "٢ مرحبا 中文"}
    assert (
        render("A: {a} | B: {b} | {{literal}}", row)
        == 'A: He said "{x}"\nthen 🤖 {{y}} | B: ٢ مرحبا 中文 | {literal}'
    )


def test_prompts_apply_the_chat_template_and_answer_map(tmp_path: Path, tiny_model: Path) -> None:
    frame = geo_rows(10)
    frame.loc[0, "sample_data"] = 'Lima {0} }{ "quoted"\nnew line 🌍'
    frame.to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    data = _settings(tmp_path / "t.tsv", tmp_path / "t.tsv")
    splits = ingest_table.fn(data, COLUMNS, str(tmp_path / "store"))
    prompt = PromptSettings(system="Judge.", template="R: {requirement}\nS: {sample_data}")
    ref = prepare_inputs.fn(splits, prompt, {1: "Yes", 0: "No"}, str(tmp_path / "store"))
    dev = read_prompts(ref, "dev")
    first = dev[PROMPT][0]
    assert first[0] == {"role": "system", "content": "Judge."}
    assert first[1]["content"] == 'R: on the seashore\nS: Lima {0} }{ "quoted"\nnew line 🌍'
    assert dev["completion"][0] == [{"role": "assistant", "content": "No"}]
    tokenizer = load_tokenizer(tiny_model)
    sequences, starts = encode_choices(tokenizer, first, ["Yes", "No"])
    text = tokenizer.decode(sequences[0])
    assert "new line 🌍" in text and text.endswith("<|im_start|>assistant\nYes<|im_end|>\n")
    assert tokenizer.decode(sequences[1][starts[1] :]) == "No<|im_end|>\n"
