"""Every bad input a hand-made spreadsheet or config can bring: one table, one expected message each.

Each case of ERRORS runs `loraflow validate` (or `run` where the model matters) in-process under the
test harness and checks: exit status 2, the message fragment (which names the file, row, column or
field and the fix), no traceback on stderr, the Prefect flow run marked Failed with the same message,
and no finished-looking output. READ_ERRORS (files that are not what they say, damaged workbooks, cells
that are no text) check the message where it arises: ingest and the contract as plain functions, as the
flow around them is the same for every DataError. Cases that must work (BOM, quoted tabs, formulas with
values, mixed 1/1.0/"1" labels, emoji/RTL/CJK, legal but unusual workbooks, ...) check what was ingested.
"""

from __future__ import annotations

import json
import re
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from openpyxl import Workbook, load_workbook
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.sorting import FlowRunSort

from loraflow.cli import main
from loraflow.errors import DataError
from loraflow.loading import load_config
from loraflow.tasks.contracts import check_contract
from loraflow.tasks.ingest import LABEL, ingest_table, read_split
from loraflow.tasks.store import Ref
from tests.tiny import geo_rows

pytestmark = pytest.mark.flow
TEMPLATE = "Requirement: {requirement}\nPlaces: {sample_data}"


def write_config(folder: Path, train: str, dev: str | None = None, /, **sections: object) -> Path:
    """A geo-shaped config over the given files; sections override (dicts merge one level)."""
    config: dict = {
        "name": "bad",
        "data": {"train": train, "label_column": "score", **({"dev": dev} if dev else {})},
        "prompt": {"template": TEMPLATE},
        "contract": {"min_rows_per_class": 2, "min_rows": 2},
    }
    for key, value in sections.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


def xlsx(path: Path, rows: list[list[object]], title: str = "Sheet1") -> Path:
    book = Workbook()
    book.active.title = title
    for row in rows:
        book.active.append(row)
    book.save(path)
    return path


def geo_table(n: int = 20, seed: int = 0) -> list[list[object]]:
    frame = geo_rows(n, seed)
    return [list(frame.columns), *(list(row) for row in frame.itertuples(index=False, name=None))]


def tsv(path: Path, frame: pd.DataFrame, **options: object) -> Path:
    frame.to_csv(path, sep="\t", index=False, **options)
    return path


@dataclass
class Case:
    id: str
    build: Callable[[Path], list[str]]  # writes the files into the folder; returns the CLI arguments
    expect: str  # a regex the error message must match
    command: str = "validate"


def _validate(build: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
    return lambda folder: ["validate", str(build(folder))]


def _with_train(make: Callable[[Path], Path], **sections: object) -> Callable[[Path], list[str]]:
    """A config whose train file is made by `make(folder)`; dev is split off it."""
    return _validate(lambda folder: write_config(folder, make(folder).name, **sections))


def _frame_case(frame: pd.DataFrame, **sections: object) -> Callable[[Path], list[str]]:
    return _with_train(lambda folder: tsv(folder / "train.tsv", frame), **sections)


def _geo(changes: dict[tuple[int, str], object]) -> pd.DataFrame:
    frame = geo_rows(20).astype(object)
    for (row, column), value in changes.items():
        frame.loc[row, column] = value
    return frame


def _truncated_xlsx(folder: Path) -> Path:
    whole = xlsx(folder / "whole.xlsx", geo_table()).read_bytes()
    (folder / "train.xlsx").write_bytes(whole[: len(whole) // 2])
    return folder / "train.xlsx"


def _csv_named_xlsx(folder: Path) -> Path:
    geo_rows(20).to_csv(folder / "train.xlsx", index=False)
    return folder / "train.xlsx"


def _encrypted_xlsx(folder: Path) -> Path:
    from msoffcrypto.format.ooxml import OOXMLFile

    plain = xlsx(folder / "plain.xlsx", geo_table())
    with open(plain, "rb") as source, open(folder / "train.xlsx", "wb") as target:
        OOXMLFile(source).encrypt("secret", target)
    return folder / "train.xlsx"


def _empty_sheet(folder: Path) -> Path:
    book = Workbook()
    book.active.title = "data"
    book.save(folder / "train.xlsx")
    return folder / "train.xlsx"


def _blank_rows_above(folder: Path) -> Path:
    return xlsx(folder / "train.xlsx", [[], [], *geo_table()])


def _duplicate_columns(folder: Path) -> Path:
    table = geo_table()
    table[0] = ["requirement", "sample_data", "requirement"]
    return xlsx(folder / "train.xlsx", [row[:3] for row in table])


def _unnamed_column(folder: Path) -> Path:
    table = geo_table()
    table[0] = ["requirement", None, "score"]
    return xlsx(folder / "train.xlsx", table)


def _ragged(folder: Path) -> Path:
    lines = ["requirement\tsample_data\tscore"] + [
        f"{r}\t{s}\t{y}" for r, s, y in geo_rows(20).itertuples(index=False, name=None)
    ]
    lines[6] += "\textra\tcells"
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    return folder / "train.tsv"


def _cp1252(folder: Path) -> Path:
    frame = _geo({(3, "sample_data"): "Besançon, Düsseldorf, Málaga"})
    frame.to_csv(folder / "train.tsv", sep="\t", index=False, encoding="cp1252")
    return folder / "train.tsv"


def _formula_without_value(folder: Path) -> Path:
    table = geo_table()
    table[5][2] = "=1-1"  # openpyxl stores the formula only: no computed value until Excel saves it
    return xlsx(folder / "train.xlsx", table)


def _bad_jsonl(folder: Path) -> Path:
    lines = [json.dumps(r) for r in geo_rows(20).to_dict("records")]
    lines[4] = lines[4][:-1] + ","  # a trailing comma where the object should close
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def _bad_parquet(folder: Path) -> Path:
    geo_rows(20).to_parquet(folder / "whole.parquet")
    (folder / "train.parquet").write_bytes((folder / "whole.parquet").read_bytes()[:300])
    return folder / "train.parquet"


def _header_only_dev(folder: Path) -> list[str]:
    tsv(folder / "train.tsv", geo_rows(20))
    (folder / "dev.tsv").write_text("requirement\tsample_data\tscore\n")
    return ["validate", str(write_config(folder, "train.tsv", "dev.tsv"))]


def _missing_file(folder: Path) -> list[str]:
    return ["validate", str(write_config(folder, "nowhere.xlsx"))]


SHEET = "xl/worksheets/sheet1.xml"


def patched(path: Path, member: str, change: Callable[[str], str]) -> Path:
    """Rewrite one member of a zip (an .xlsx part) in place, as another writer would have written it."""
    with zipfile.ZipFile(path) as source:
        members = {name: source.read(name) for name in source.namelist()}
    members[member] = change(members[member].decode()).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for name, data in members.items():
            target.writestr(name, data)
    return path


def _geo_xlsx(folder: Path, member: str, change: Callable[[str], str]) -> Path:
    return patched(xlsx(folder / "train.xlsx", geo_table()), member, change)


def _sheet_xml(change: Callable[[str], str]) -> Callable[[Path], Path]:
    return lambda folder: _geo_xlsx(folder, SHEET, change)


def _inline(ref: str, text: str) -> str:
    return f'<c r="{ref}" t="inlineStr"><is><t>{text}</t></is></c>'


def _replace_cell(xml: str, ref: str, cell: str) -> str:
    """Swap the cell `ref` of a sheet's XML for `cell` (openpyxl writes every cell as <c r=...>...</c>)."""
    new, count = re.subn(rf'<c r="{ref}"[^>]*?(/>|>.*?</c>)', cell.replace("\\", r"\\"), xml, count=1)
    assert count == 1, ref
    return new


def _with_rows_after(xml: str, rows: str) -> str:
    return xml.replace("</sheetData>", rows + "</sheetData>")


def _stray_cell(ref: str, row: int) -> Callable[[Path], Path]:
    return _sheet_xml(lambda x: _with_rows_after(x, f'<row r="{row}">{_inline(ref, "x")}</row>'))


def _non_scalar(suffix: str, column: str, value: object) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        frame = geo_rows(20).astype(object)
        frame.at[1, column] = value
        if suffix == ".parquet":
            frame[column] = frame[column].map(lambda v: v if isinstance(v, list | dict) else [str(v)])
            frame.at[0, column] = value
            frame.to_parquet(folder / "train.parquet")
        else:
            (folder / "train.jsonl").write_text(
                "\n".join(json.dumps(r) for r in frame.to_dict("records")) + "\n"
            )
        return folder / f"train{suffix}"

    return build


def _bytes_named(name: str, make: Callable[[Path], bytes]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        (folder / name).write_bytes(make(folder))
        return folder / name

    return build


def _gzip_csv(folder: Path) -> bytes:
    import gzip

    return gzip.compress(geo_rows(20).to_csv(index=False).encode())


def _utf16(folder: Path) -> bytes:
    return geo_rows(20).to_csv(sep="\t", index=False).encode("utf-16")


def _html_table(folder: Path) -> bytes:
    return ("<html><body>" + geo_rows(20).to_html(index=False) + "</body></html>").encode()


def _semicolon(folder: Path) -> bytes:
    frame = _geo({(2, "sample_data"): "Lima, Zurich"})  # commas inside cells, as European Excel writes
    return frame.to_csv(sep=";", index=False).encode()


def _symlink_loop(folder: Path) -> list[str]:
    (folder / "train.tsv").symlink_to(folder / "train.tsv")
    return ["validate", str(write_config(folder, "train.tsv"))]


def _folder_as_file(folder: Path) -> list[str]:
    (folder / "train.tsv").mkdir()
    tsv(folder / "train.tsv" / "part-0.tsv", geo_rows(20))
    return ["validate", str(write_config(folder, "train.tsv"))]


def _same_file_twice(folder: Path) -> list[str]:
    tsv(folder / "train.tsv", geo_rows(20))
    return ["validate", str(write_config(folder, "train.tsv", "train.tsv"))]


def _excel_errors(folder: Path) -> Path:
    path = xlsx(folder / "train.xlsx", geo_table())
    cell = '<c r="{}" t="e"><f>VLOOKUP(A1,Z:Z,2,0)</f><v>{}</v></c>'
    return patched(
        path,
        SHEET,
        lambda x: _replace_cell(
            _replace_cell(x, "C5", cell.format("C5", "#N/A")), "B9", cell.format("B9", "#REF!")
        ),
    )


ERRORS = [
    Case("missing-file", _missing_file, r"nowhere\.xlsx.*not found"),
    Case(
        "unsupported-extension",
        _with_train(lambda f: (f / "train.txt").write_text("a\tb\n") and f / "train.txt"),
        r"train\.txt: unsupported file type '\.txt'; use one of",
    ),
    Case(
        "zero-byte",
        _with_train(lambda f: (f / "train.tsv").write_bytes(b"") or f / "train.tsv"),
        r"train\.tsv is empty \(0 bytes\)",
    ),
    Case("corrupt-xlsx", _with_train(_truncated_xlsx), r"train\.xlsx is not a valid \.xlsx workbook"),
    Case("csv-renamed-xlsx", _with_train(_csv_named_xlsx), r"train\.xlsx .*looks like .*text.*\.csv"),
    Case("password-xlsx", _with_train(_encrypted_xlsx), r"train\.xlsx is password-protected.*remove"),
    Case(
        "sheet-not-found",
        _with_train(lambda f: xlsx(f / "train.xlsx", geo_table(), "data"), data={"sheet": "Data1"}),
        r"sheet 'Data1' not found.*sheets are \['data'\]",
    ),
    Case("empty-sheet", _with_train(_empty_sheet), r"train\.xlsx.*sheet .* is empty"),
    Case("header-not-first-row", _with_train(_blank_rows_above), r"header_row"),
    Case(
        "duplicate-columns",
        _with_train(_duplicate_columns),
        r"duplicate column name 'requirement' in column 1 \(A\) and column 3 \(C\); rename",
    ),
    Case("unnamed-column", _with_train(_unnamed_column), r"column 2 \(B\) has no name: give it one"),
    Case(
        "text-column-missing",
        _frame_case(geo_rows(20).rename(columns={"sample_data": "sampledata"})),
        r"'sample_data' \(did you mean 'sampledata'\?\) not found",
    ),
    Case(
        "label-column-missing",
        _frame_case(geo_rows(20).rename(columns={"score": "scores"})),
        r"'score' \(did you mean 'scores'\?\) not found",
    ),
    Case(
        "unknown-placeholder",
        _frame_case(geo_rows(20), prompt={"template": "{requirment}: {sample_data}"}),
        r"'requirment' \(did you mean 'requirement'\?\) not found",
    ),
    Case(
        "empty-text-cells",
        _frame_case(_geo({(2, "sample_data"): None})),
        r"not_be_null on column 'sample_data'.*row=4",
    ),
    Case(
        "whitespace-text-cells",
        _frame_case(_geo({(5, "requirement"): "   "})),
        r"not_match_regex on column 'requirement'.*row=7",
    ),
    Case("nan-labels", _frame_case(_geo({(4, "score"): None})), r"not_be_null on column 'label'.*row=6"),
    Case(
        "label-outside-set",
        _frame_case(_geo({(4, "score"): 7}), data={"labels": [0, 1]}),
        r"be_in_set on column 'label'.*label='7'",
    ),
    Case(
        "one-class",
        _frame_case(geo_rows(20).assign(score=1)),
        r"at_least_two_classes on column 'label': observed \['1'\].*at least two labels",
    ),
    Case(
        "too-few-rows-in-a-class",
        _frame_case(geo_rows(20), contract={"min_rows_per_class": 12}),
        r"rows_per_class_at_least.*label='0', rows=8, needed=12.*lower contract\.min_rows_per_class",
    ),
    Case(
        "dev-label-unseen",
        _validate(
            lambda f: write_config(
                f,
                tsv(f / "train.tsv", geo_rows(20)).name,
                tsv(f / "dev.tsv", _geo({(1, "score"): 2})).name,
            )
        ),
        r"dev: expect_column_values_to_be_in_set on column 'label'.*label='2'",
    ),
    Case("cp1252-tsv", _with_train(_cp1252), r"not valid utf-8.*set data\.encoding \(e\.g\. cp1252"),
    Case("ragged-rows", _with_train(_ragged), r"train\.tsv.*line 7.*5 fields.*expected 3"),
    Case(
        "formula-without-value",
        _with_train(_formula_without_value),
        r"train\.xlsx: sheet 'Sheet1': cell\(s\) C6 hold a formula with no saved value.*save it in Excel",
    ),
    Case(
        "dev-file-missing",
        _validate(lambda f: write_config(f, tsv(f / "train.tsv", geo_rows(20)).name, "dev.tsv")),
        r"dev\.tsv not found; check data\.dev in the config",
    ),
    Case(
        "sheet-index-out-of-range",
        _with_train(lambda f: xlsx(f / "train.xlsx", geo_table(), "data"), data={"sheet": 3}),
        r"sheet index 3 out of range; sheets are \['data'\]",
    ),
    Case(
        "header-only-dev",
        _header_only_dev,
        r"dev: expect_table_row_count_to_be_between.*observed 0.*contract\.min_rows",
    ),
    Case("corrupt-jsonl", _with_train(_bad_jsonl), r"train\.jsonl: line 5 is not valid JSON"),
    Case("corrupt-parquet", _with_train(_bad_parquet), r"train\.parquet is not a readable parquet file"),
    Case(
        "two-labels-one-answer",
        _frame_case(geo_rows(20), data={"answers": {1: "Yes", 0: "Yes "}}),
        r"data\.answers.*two labels share one answer",
    ),
    Case(
        "label-ids-not-contiguous",
        _frame_case(geo_rows(20), data={"labels": {0: 0, 1: 2}}),
        r"data\.labels.*label ids must be 0\.\.1, each used once",
    ),
    Case(
        "invalid-yaml",
        lambda f: [
            "validate",
            str((f / "c.yaml").write_text("data: {train: t.tsv\nprompt: x\n") and f / "c.yaml"),
        ],
        r"c\.yaml: invalid YAML at line \d+, column \d+",
    ),
    Case(
        "unknown-config-key",
        _frame_case(geo_rows(20), train={"learning_rate": 0.1}),
        r"config\.yaml: 1 problem\(s\):\n  - train\.learning_rate: unknown key \(did you mean 'lr'\?\)",
    ),
    Case("lora-r-zero", _frame_case(geo_rows(20), lora={"r": 0}), r"lora\.r.*greater than or equal to 1"),
    Case("negative-lr", _frame_case(geo_rows(20), train={"lr": -0.1}), r"train\.lr.*greater than 0"),
    Case(
        "model-offline",
        lambda f: [
            "run",
            str(write_config(f, tsv(f / "t.tsv", geo_rows(20)).name, model={"name": "acme/nope-1b"})),
        ],
        r"acme/nope-1b.*hub.*unreachable.*local folder.*HF_TOKEN",
        command="run",
    ),
    Case(
        "stray-cell-far-away",
        _with_train(_stray_cell("XFD1048576", 1048576)),
        r"sheet 'Sheet1' has values as far as row 1,048,576 and column XFD \(17,179,869,184 cells to read "
        r"for 64 values, more than data\.max_cells = 10,000,000\); the farthest value is in XFD1048576: "
        r"delete stray",
    ),
    Case(
        "list-label-in-parquet",
        _with_train(_non_scalar(".parquet", "score", ["0", "1"])),
        r"train\.parquet: column 'score' holds a list instead of one text or number at row\(s\) "
        r"1, 2, 3, 4, 5 and 15 more \(e\.g\. \['0', '1'\]\); make each cell one value",
    ),
    Case(
        "excel-error-values",
        _with_train(_excel_errors),
        r"train\.xlsx: sheet 'Sheet1': cell\(s\) B9 \(#REF!\), C5 \(#N/A\) in column\(s\) "
        r"'sample_data', 'score' hold Excel errors, not values",
    ),
    Case(
        "gzip-named-csv",
        _with_train(_bytes_named("train.csv", _gzip_csv)),
        r"train\.csv is gzip-compressed, not a plain \.csv file; decompress it first",
    ),
    Case(
        "nul-bytes-echoed-short",
        _frame_case(_geo({(4, "score"): "7" + "\x00" * 263_000}), data={"labels": [0, 1]}),
        r"be_in_set on column 'label'.*label='7\\x00\\x00[\\x0]*… \(263,001 characters\) → fix",
    ),
    Case("symlink-loop", _symlink_loop, r"train\.tsv is a symbolic link that loops"),
    Case(
        "train-and-dev-the-same-file",
        _same_file_twice,
        r"dev: dev_rows_not_in_train: 20 offending row\(s\): 20 of 20 dev rows \(100%\) are also train rows.*"
        r"set contract\.max_dev_in_train: 1 to accept",
    ),
]


# Caught when the config loads, before any flow run exists (so no Prefect run to mark Failed).
CONFIG_TIME = (
    "invalid-yaml",
    "unknown-config-key",
    "lora-r-zero",
    "negative-lr",
    "two-labels-one-answer",
    "label-ids-not-contiguous",
)


# The same kind of cases, checked where they arise (reading and the contract) without a flow around them:
# the flow and CLI plumbing of a DataError is the same for all of them and is checked by ERRORS above.
def _trailing_separator(folder: Path) -> bytes:
    """Every data row ends in a separator the header lacks (as some exports write): one field too many."""
    lines = geo_rows(20).to_csv(index=False).splitlines()
    return "\n".join([lines[0], *(line + "," for line in lines[1:])]).encode()


def _carriage_return_in_header(folder: Path) -> bytes:
    """A fuzz finding (4.7 MB, over 2 GB to read): a stray carriage return ends the header after one letter,
    and the first data row holds 20,000 fields; pandas made them a 20,000-level index."""
    return b"r\requirement,sample_data,score" + b",in a desert" * 20_000 + b"\n" + b"x,y,1\n" * 30


def _parquet_not_utf8(folder: Path) -> Path:
    """A string column with bytes that are not UTF-8 (pyarrow writes them unchecked; a fuzz finding)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = geo_rows(20)
    cells = [value.encode() for value in frame["sample_data"]]
    cells[3] = b"Lima, \xffCairo"
    table = pa.Table.from_pandas(frame.drop(columns="sample_data"), preserve_index=False)
    table = table.append_column("sample_data", pa.array(cells, pa.binary()).view(pa.string()))
    pq.write_table(table, folder / "train.parquet")
    return folder / "train.parquet"


READ_ERRORS = [
    Case(
        "parquet-text-not-utf8",
        _with_train(_parquet_not_utf8),
        r"train\.parquet: column 'sample_data' holds text that is not valid UTF-8 at row\(s\) 4; write the "
        r"file again with its text as UTF-8",
    ),
    Case(
        "data-rows-one-field-wider-than-the-header",  # was read with the columns shifted by one, silently
        _with_train(_bytes_named("train.csv", _trailing_separator)),
        r"train\.csv: line 2 has 4 fields, expected 3 like the header; quote cells that contain the "
        r"separator",
    ),
    Case(
        "carriage-return-in-header",
        _with_train(_bytes_named("train.csv", _carriage_return_in_header)),
        r"train\.csv: line 2 has 20,?003 fields, expected 1 like the header",
    ),
    Case(
        "65k-columns",  # a fuzz finding: 29 s to read before it was refused up front
        _with_train(
            _bytes_named("train.csv", lambda f: b"a," * 65_536 + geo_rows(20).to_csv(index=False).encode())
        ),
        r"train\.csv: the header row has 65,539 columns separated by ',', more than the 16,384 "
        r"loraflow reads",
    ),
    Case(
        "workbook-xml-ill-formed",
        _with_train(
            lambda f: _geo_xlsx(f, "xl/workbook.xml", lambda x: x.replace('name="Sheet1"', 'name="A&B"'))
        ),
        r"train\.xlsx: xl/workbook\.xml is not well-formed XML \(.*line 1.*\); the file is damaged: "
        r"open it in Excel or LibreOffice and save it again",
    ),
    Case(
        "sheet-xml-unescaped-ampersand",
        _with_train(_sheet_xml(lambda x: _replace_cell(x, "B4", _inline("B4", "Lima & Cairo")))),
        r"train\.xlsx: sheet 'Sheet1' cannot be read \(.*\); the file is damaged: open it in Excel",
    ),
    Case(
        "sheet-xml-broken-attribute",
        _with_train(_sheet_xml(lambda x: x.replace('<c r="A3" t="inlineStr">', '<c r="A3 t="inlineStr">'))),
        r"train\.xlsx: sheet 'Sheet1' (cannot be read|is not well-formed XML) \(.*\); the file is damaged",
    ),
    Case(
        "stray-cell-far-right",
        _with_train(_stray_cell("ZZZ30", 30), data={"max_cells": 100_000}),
        r"values as far as row 30 and column ZZZ \(.*\); the farthest value is in ZZZ30.*"
        r"raise data\.max_cells",
    ),
    Case(
        "text-table-over-max-cells",
        _frame_case(geo_rows(20), data={"max_cells": 30}),
        r"train\.tsv: about 66 cells \(3 columns\), more than data\.max_cells = 30",
    ),
    Case(
        "object-text-in-jsonl",
        _with_train(_non_scalar(".jsonl", "sample_data", {"city": "Lima"})),
        r"train\.jsonl: column 'sample_data' holds an object instead of one text or number at row\(s\) 2 "
        r"\(e\.g\. \{'city': 'Lima'\}\)",
    ),
    Case(
        "list-label-in-jsonl",
        _with_train(_non_scalar(".jsonl", "score", [1, 0])),
        r"train\.jsonl: column 'score' holds a list .* at row\(s\) 2 ",
    ),
    Case(
        "xlsx-named-csv",
        _with_train(_bytes_named("train.csv", lambda f: xlsx(f / "real.xlsx", geo_table()).read_bytes())),
        r"train\.csv is an Excel workbook \(\.xlsx\) with a \.csv name; rename it to train\.xlsx",
    ),
    Case(
        "utf16-tsv",
        _with_train(_bytes_named("train.tsv", _utf16)),
        r"train\.tsv is UTF-16 text .*; set data\.encoding: utf-16",
    ),
    Case(
        "utf16-named-xlsx",
        _with_train(_bytes_named("train.xlsx", _utf16)),
        r"train\.xlsx is UTF-16 text with an \.xlsx name .*rename it to train\.tsv and set "
        r"data\.encoding: utf-16",
    ),
    Case(
        "html-named-xlsx",
        _with_train(_bytes_named("train.xlsx", _html_table)),
        r"train\.xlsx is an HTML page .*save it as \.xlsx",
    ),
    Case(
        "semicolon-csv",
        _with_train(_bytes_named("train.csv", _semicolon)),
        r"train\.csv: the columns are separated by ';', not ','.*set data\.separator: \";\"",
    ),
    Case(
        "semicolon-csv-one-column",
        _with_train(_bytes_named("train.csv", lambda f: geo_rows(20).to_csv(sep=";", index=False).encode())),
        r"train\.csv: the columns are separated by ';', not ','",
    ),
    Case(
        "folder-as-data-file", _folder_as_file, r"train\.tsv is a folder, not a file \(it holds part-0\.tsv\)"
    ),
    Case(
        "zero-width-text-cells",
        _frame_case(_geo({(5, "requirement"): "\u200b\u2060\ufeff", (8, "sample_data"): "\u200b \u200d"})),
        r"(?=.*not_match_regex on column 'requirement'[^\n]*row=7)"
        r"(?=.*not_match_regex on column 'sample_data'[^\n]*row=10)",
    ),
]


def _latest_flow_run_message() -> tuple[str, str]:
    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
    return run.state.name, run.state.message or ""


@pytest.mark.parametrize("case", ERRORS, ids=[c.id for c in ERRORS])
def test_a_bad_input_fails_with_a_clear_message(
    case: Case, prefect_server: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = case.build(tmp_path)
    assert main(args) == 2
    error = capsys.readouterr().err
    assert re.search(case.expect, error, re.S), error
    assert "Traceback" not in error
    assert error.count("\n") < 40  # one message, not a log dump
    if case.id not in CONFIG_TIME:
        state, message = _latest_flow_run_message()
        assert state == "Failed" and re.search(case.expect, message, re.S), message
    runs = tmp_path / "runs" / "bad"
    finished = [p for p in runs.glob("2*")] if runs.is_dir() else []
    assert not finished  # nothing that looks like a finished run


def _check_without_a_flow(args: list[str], tmp_path: Path) -> Ref:
    """What `loraflow validate CONFIG` runs, called as plain functions: ingest, then the contract."""
    config = load_config(Path(args[-1]))
    store = str(tmp_path / "runs" / "bad" / "work")
    splits = ingest_table.fn(config.data, config.input_columns, store)
    check_contract.fn(splits, config.input_columns, config.contract, store)
    return splits


@pytest.mark.parametrize("case", READ_ERRORS, ids=[c.id for c in READ_ERRORS])
def test_a_bad_file_is_refused_with_a_clear_message(case: Case, prefect_server: None, tmp_path: Path) -> None:
    with pytest.raises(DataError) as refused:
        _check_without_a_flow(case.build(tmp_path), tmp_path)
    message = str(refused.value)
    assert re.search(case.expect, message, re.S), message
    assert len(message) < 2000 and message.count("\n") < 20, message


def _ingested(tmp_path: Path) -> pd.DataFrame:
    store = tmp_path / "runs" / "bad" / "work"
    [folder] = store.glob("ingest-*")
    return pd.concat([read_split(Ref(path=str(folder), digest="x"), s) for s in ("train", "dev")])


def _ok(args: list[str]) -> None:
    assert main(args) == 0


def test_utf8_bom_windows_line_endings_and_quoted_tabs_and_newlines(
    prefect_server: None, tmp_path: Path
) -> None:
    frame = _geo({(0, "sample_data"): 'Lima\t"Zurich"\nCairo', (1, "requirement"): "in the\r\nmountains"})
    frame.to_csv(tmp_path / "train.csv", index=False, encoding="utf-8-sig", lineterminator="\r\n")
    _ok(["validate", str(write_config(tmp_path, "train.csv"))])
    got = _ingested(tmp_path).sort_values("_row")
    assert got.columns[1] == "requirement"  # no BOM glued to the first header
    assert 'Lima\t"Zurich"\nCairo' in got["sample_data"].tolist()


def _prefixed(xml: str) -> str:
    """The OpenXML SDK's spelling: every element in an `x:` namespace prefix."""
    xml = re.sub(r"<(/?)(?!\?)(\w+)", r"<\1x:\2", xml)
    return xml.replace('xmlns="', 'xmlns:x="', 1)


def _reordered_sheet_attributes(xml: str) -> str:
    return re.sub(
        r'<sheet name="([^"]*)" sheetId="(\d+)"[^>]*?r:id="([^"]*)"\s*/>',
        r'<sheet r:id="\3" sheetId="\2" name="\1"/>',
        xml,
    )


def _merges(*refs: str) -> Callable[[str], str]:
    cells = "".join(f'<mergeCell ref="{ref}"/>' for ref in refs)
    return lambda x: x.replace(
        "</sheetData>", f'</sheetData><mergeCells count="{len(refs)}">{cells}</mergeCells>'
    )


def _formatted_blank_area(xml: str) -> str:
    """Formulas with saved values beside the data, then 10,000 rows × 10 columns of formatted blank cells
    (a scan for formula cells that reads each blank cell to the next </c> is quadratic here)."""
    xml = re.sub(
        r'<row r="(\d+)"([^>]*)>(.*?)</row>',
        lambda m: (
            f'<row r="{m[1]}"{m[2]}>{m[3]}'
            + (f'<c r="D{m[1]}"><f>1+1</f><v>2</v></c>' if m[1] != "1" else "")
            + "</row>"
        ),
        xml,
    )
    blank = "".join(
        f'<row r="{r}">' + "".join(f'<c r="{c}{r}" s="0"/>' for c in "DEFGHIJKLM") + "</row>"
        for r in range(22, 10_022)
    )
    return _with_rows_after(xml, blank)


def _mostly_empty_rows(xml: str) -> str:
    """100,000 rows below the table that hold an empty text in column E: a reader sees 100,000 rows."""
    return _with_rows_after(
        xml, "".join(f'<row r="{r}">{_inline(f"E{r}", "")}</row>' for r in range(30, 100_030))
    )


def _blank_rows_between(folder: Path) -> Path:
    lines = geo_rows(20).to_csv(sep="\t", index=False).splitlines()
    (folder / "train.tsv").write_text("\n".join([*lines[:6], "\t\t", "", " \t\u200b\t", *lines[6:]]) + "\n")
    return folder / "train.tsv"


@dataclass
class Works:
    id: str
    build: Callable[[Path], list[str]]
    check: Callable[[pd.DataFrame, dict], bool]


def _all_rows(frame: pd.DataFrame, meta: dict) -> bool:
    return len(frame) == 20 and set(frame["_row"]) == set(range(2, 22))


WORKS = [
    Works(
        "workbook-xml-with-x-prefix",
        _with_train(lambda f: patched(_geo_xlsx(f, "xl/workbook.xml", _prefixed), SHEET, _prefixed)),
        _all_rows,
    ),
    Works(
        "sheet-attributes-in-another-order",
        _with_train(lambda f: _geo_xlsx(f, "xl/workbook.xml", _reordered_sheet_attributes)),
        _all_rows,
    ),
    Works(
        "merged-cells-below-and-across-the-end",
        _with_train(_sheet_xml(_merges("A19:A25", "B40:C45", "A30:A1048576"))),
        lambda frame, meta: (
            _all_rows(frame, meta) and frame.set_index("_row").loc[19:21, "requirement"].nunique() == 1
        ),
    ),
    Works("formatted-blank-area-with-formulas", _with_train(_sheet_xml(_formatted_blank_area)), _all_rows),
    Works(
        "100k-mostly-empty-rows",
        _with_train(_sheet_xml(_mostly_empty_rows)),
        lambda frame, meta: _all_rows(frame, meta) and list(meta["blank_rows_skipped"].values()) == [100_008],
    ),
    Works(
        "blank-rows-between-data-rows",
        _with_train(_blank_rows_between),
        lambda frame, meta: (
            len(frame) == 20
            and set(frame["_row"]) == {*range(2, 7), *range(10, 25)}
            and list(meta["blank_rows_skipped"].values()) == [3]
        ),
    ),
    Works(
        "utf16-with-its-encoding",
        _with_train(_bytes_named("train.tsv", _utf16), data={"encoding": "utf-16"}),
        _all_rows,
    ),
    Works(
        "semicolons-with-data-separator",
        _with_train(_bytes_named("train.csv", _semicolon), data={"separator": ";"}),
        lambda frame, meta: _all_rows(frame, meta) and "Lima, Zurich" in set(frame["sample_data"]),
    ),
    Works(
        "the-same-file-twice-when-accepted",
        lambda f: [
            *_same_file_twice(f)[:1],
            str(
                write_config(
                    f,
                    "train.tsv",
                    "train.tsv",
                    contract={"min_rows_per_class": 2, "min_rows": 2, "max_dev_in_train": 1},
                )
            ),
        ],
        lambda frame, meta: len(frame) == 40,
    ),
]


@pytest.mark.parametrize("case", WORKS, ids=[c.id for c in WORKS])
def test_a_legal_but_unusual_file_is_read(case: Works, prefect_server: None, tmp_path: Path) -> None:
    _check_without_a_flow(case.build(tmp_path), tmp_path)  # the contract passes
    [folder] = (tmp_path / "runs" / "bad" / "work").glob("ingest-*")
    meta = json.loads((folder / "ingest.json").read_text())
    frame = _ingested(tmp_path)
    assert case.check(frame, meta), (frame.sort_values("_row").to_string(), meta)


def test_mixed_label_spellings_are_one_label_and_reported(prefect_server: None, tmp_path: Path) -> None:
    table = geo_table()
    for i, spelling in ((1, "1"), (3, 1.0), (5, " 1 "), (2, "0.0")):
        table[i][2] = spelling
    xlsx(tmp_path / "train.xlsx", table)
    _ok(["validate", str(write_config(tmp_path, "train.xlsx"))])
    assert set(_ingested(tmp_path)[LABEL]) == {"0", "1"}
    [folder] = (tmp_path / "runs" / "bad" / "work").glob("ingest-*")
    spellings = json.loads((folder / "ingest.json").read_text())["label_spellings"]
    assert spellings == {"0": ["0", "0.0"], "1": [" 1 ", "1"]}  # Excel stores the number 1.0 as 1


def test_excel_formulas_use_saved_values_and_merged_cells_take_the_top_left_value(
    prefect_server: None, tmp_path: Path
) -> None:
    path = xlsx(tmp_path / "train.xlsx", geo_table())
    book = load_workbook(path)
    sheet = book.active
    sheet["C3"] = "=2-1"
    sheet["A10"] = "in the mountains"
    sheet.merge_cells("A10:A12")  # one requirement shown across three rows
    book.save(path)
    _with_cached_value(path, "C3", "1")
    _ok(["validate", str(write_config(tmp_path, "train.xlsx"))])
    got = _ingested(tmp_path).set_index("_row").sort_index()
    assert got.loc[3, LABEL] == "1"  # the value, never "=2-1"
    assert got.loc[10:12, "requirement"].tolist() == ["in the mountains"] * 3


def _with_cached_value(path: Path, cell: str, value: str) -> None:
    """Add the computed value Excel stores beside a formula (openpyxl writes the formula only)."""
    with zipfile.ZipFile(path) as source:
        members = {name: source.read(name) for name in source.namelist()}
    sheet = "xl/worksheets/sheet1.xml"
    xml = members[sheet].decode()
    xml = re.sub(
        rf'(<c r="{cell}"[^>]*>)<f>([^<]*)</f>(<v\s*/>|<v></v>)?', rf"\1<f>\2</f><v>{value}</v>", xml
    )
    members[sheet] = xml.encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for name, data in members.items():
            target.writestr(name, data)


def test_emoji_rtl_and_cjk_round_trip(prefect_server: None, tmp_path: Path) -> None:
    texts = ["Lima 🌊, Zurich 🏔️", "القاهرة، الدوحة", "東京、大阪", "Zürich, Besançon"]
    frame = geo_rows(20)
    frame.loc[: len(texts) - 1, "sample_data"] = texts
    xlsx(tmp_path / "train.xlsx", [list(frame.columns), *frame.itertuples(index=False, name=None)])
    _ok(["validate", str(write_config(tmp_path, "train.xlsx"))])
    assert set(texts) <= set(_ingested(tmp_path)["sample_data"])


def test_a_100k_row_table_ingests(prefect_server: None, tmp_path: Path) -> None:
    frame = pd.concat([geo_rows(100)] * 1000, ignore_index=True)
    frame["sample_data"] += pd.Series(range(len(frame))).astype(str)  # distinct rows
    tsv(tmp_path / "train.tsv", frame)
    _ok(["validate", str(write_config(tmp_path, "train.tsv"))])
    assert len(_ingested(tmp_path)) == 100_000
    assert json.loads(
        (next((tmp_path / "runs" / "bad" / "work").glob("contract-*")) / "contract.json").read_text()
    )["success"]


def test_very_long_cells_are_truncated_counted_and_reported(
    prefect_server: None, tmp_path: Path, tiny_model: Path
) -> None:
    frame = geo_rows(20)
    frame.loc[[0, 3, 6], "sample_data"] = "Lima, Zurich, Cairo, Oslo, " * 40  # far beyond max_length
    tsv(tmp_path / "train.tsv", frame)
    config = write_config(
        tmp_path,
        "train.tsv",
        model={"name": str(tiny_model)},
        train={"max_steps": 2, "batch_size": 4, "max_length": 320},
        eval={"baseline": False},
    )
    _ok(["run", str(config)])
    [run] = (tmp_path / "runs" / "bad").glob("2*")
    metrics = json.loads((run / "metrics.json").read_text())
    [folder] = (tmp_path / "runs" / "bad" / "work").glob("ingest-*")
    train = read_split(Ref(path=str(folder), digest="x"), "train")
    long_in_train = int((train["sample_data"].str.len() > 500).sum())
    assert metrics["train"]["truncated_rows"] == long_in_train >= 1
    assert "truncated row(s)" in (run / "report.md").read_text()
    deadline = time.monotonic() + 30  # run logs reach the API in batches
    with get_client(sync_client=True) as client:
        [flow_run] = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
            warned = [log.message for log in logs if log.level == 30 and "truncated" in log.message]
            if warned or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert warned and "raise train.max_length" in warned[0], [log.message for log in logs]


def test_a_max_length_shorter_than_the_prompts_fixed_text_is_a_clear_error(
    prefect_server: None, tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture
) -> None:
    tsv(tmp_path / "train.tsv", geo_rows(20))
    config = write_config(
        tmp_path,
        "train.tsv",
        model={"name": str(tiny_model)},
        prompt={"system": "You judge places. " * 20},
        train={"max_steps": 2, "batch_size": 4, "max_length": 64},
        eval={"baseline": False},
    )
    assert main(["run", str(config)]) == 2
    error = capsys.readouterr().err
    expect = r"train\.max_length is 64 tokens but the prompt's fixed text and the answer alone take \d+"
    assert re.search(expect, error) and "Traceback" not in error, error
    state, message = _latest_flow_run_message()
    assert state == "Failed" and re.search(expect, message), message
    assert not list((tmp_path / "runs" / "bad").glob("2*"))
