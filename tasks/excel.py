"""What pandas does not say about a workbook: password protection, a text file with an .xlsx name,
merged cells and formulas without a saved value, read from the file's own XML (no second full load).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path, PurePosixPath

OLE_MAGIC = bytes.fromhex("D0CF11E0A1B11AE1")  # compound file: encrypted .xlsx, or an old .xls
_CELL = re.compile(r"([A-Z]+)(\d+)")


def sniff_not_a_workbook(path: Path) -> str | None:
    """Why `path` (not a zip archive) is no .xlsx, with the fix; None when nothing better is known."""
    head = path.read_bytes()[:4096]
    if head.startswith(OLE_MAGIC):
        return (
            f"{path} is password-protected (encrypted) or an old .xls workbook; remove the password "
            "(Excel: File → Info → Protect Workbook → Encrypt with Password, clear it) and save it as .xlsx"
        )
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        try:
            text = head.decode("cp1252")
        except UnicodeDecodeError:
            return None
    if "\t" in text or "," in text:
        kind = ".tsv" if text.count("\t") > text.count(",") else ".csv"
        return (
            f"{path} is not a valid .xlsx workbook: it looks like a text table ({kind}) with an .xlsx name; "
            f"rename it to {path.stem}{kind}"
        )
    return None


def column_index(letters: str) -> int:
    """0-based index of a column name such as 'C' or 'AB'."""
    index = 0
    for letter in letters:
        index = index * 26 + ord(letter) - ord("A") + 1
    return index - 1


def _sheet_xml(book: zipfile.ZipFile, sheet: str | int) -> str:
    workbook = book.read("xl/workbook.xml").decode()
    sheets = re.findall(r'<sheet\b[^>]*\bname="([^"]*)"[^>]*\br:id="([^"]*)"', workbook)
    names = [name for name, _ in sheets]
    rel_id = sheets[sheet][1] if isinstance(sheet, int) else sheets[names.index(sheet)][1]
    rels = book.read("xl/_rels/workbook.xml.rels").decode()
    target = re.search(rf'<Relationship\b[^>]*\bId="{rel_id}"[^>]*\bTarget="([^"]*)"', rels)
    if target is None:
        target = re.search(rf'<Relationship\b[^>]*\bTarget="([^"]*)"[^>]*\bId="{rel_id}"', rels)
    path = target.group(1)
    member = path.lstrip("/") if path.startswith("/") else str(PurePosixPath("xl") / path)
    return book.read(member).decode()


def sheet_layout(path: Path, sheet: str | int) -> tuple[list[tuple[int, int, int, int]], list[str]]:
    """(merged ranges as (first row, first col, last row, last col), 1-based rows / 0-based columns;
    cells holding a formula with no saved value) of one sheet."""
    with zipfile.ZipFile(path) as book:
        xml = _sheet_xml(book, sheet)
    merged = []
    for ref in re.findall(r'<mergeCell\b[^>]*\bref="([A-Z]+\d+):([A-Z]+\d+)"', xml):
        (c1, r1), (c2, r2) = (_CELL.fullmatch(cell).groups() for cell in ref)
        merged.append((int(r1), column_index(c1), int(r2), column_index(c2)))
    unsaved = []
    cells = re.findall(r'<c\b[^>]*\br="([A-Z]+\d+)"[^>]*>(.*?)</c>', xml, re.S) if "<f" in xml else []
    for cell, body in cells:
        if "<f" in body and not re.search(r"<v>[^<]+</v>", body):
            unsaved.append(cell)
    return merged, unsaved
