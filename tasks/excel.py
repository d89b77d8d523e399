"""What pandas does not say about a workbook, read from the file's own XML with a real XML parser
before the cells are loaded: which member holds a sheet, how far its values reach (a stray cell at
XFD1048576 would make the reader allocate 17 billion cells), merged ranges, formulas without a saved
value, and cells holding Excel errors such as #N/A.

One pass over the sheet's XML, linear in its size: a regular expression that visits only the cells with
content (a formatted blank area of self-closing cells is skipped at C speed), falling back to expat
(streamed, slower) for the rare writer that leaves out cell references. Ill-formed XML is left to the
reader, whose error becomes a DataError.
"""

from __future__ import annotations

import posixpath
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree
from xml.parsers import expat

from loraflow.errors import DataError
from loraflow.tasks.sniff import mismatch, sniff, text_table_kind

_CELL = re.compile(r"\$?([A-Za-z]+)\$?(\d+)")
REPAIR = "open it in Excel or LibreOffice and save it again as .xlsx"


def not_a_workbook(path: Path) -> str:
    """Why `path` (not a zip archive, or a zip without a workbook) is no .xlsx, with the fix."""
    kind = sniff(path)
    if kind == "text":
        table = text_table_kind(path)
        return (
            f"{path} is not a valid .xlsx workbook: it looks like a text table ({table}) with an "
            f"{path.suffix} name; rename it to {path.stem}{table}"
        )
    if kind in (None, "xlsx", "damaged-zip"):
        return (
            f"{path} is not a valid .xlsx workbook (a damaged or incomplete zip archive); re-save it from "
            "Excel as .xlsx, or give it the extension that matches its content (.csv, .tsv)"
        )
    return mismatch(path, kind)


def column_index(letters: str) -> int:
    """0-based index of a column name such as 'C' or 'AB'."""
    index = 0
    for letter in letters.upper():
        index = index * 26 + ord(letter) - ord("A") + 1
    return index - 1


def column_letters(index: int) -> str:
    """'A' for 0, 'AB' for 27: the spreadsheet name of a 0-based column index."""
    letters, n = "", index + 1
    while n:
        n, rest = divmod(n - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return letters


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _parse_member(book: zipfile.ZipFile, path: Path, member: str) -> ElementTree.Element:
    try:
        return ElementTree.fromstring(book.read(member))
    except KeyError as e:
        raise DataError(f"{path}: the workbook has no {member}; the file is damaged: {REPAIR}") from e
    except ElementTree.ParseError as e:
        raise DataError(
            f"{path}: {member} is not well-formed XML ({e}); the file is damaged: {REPAIR}"
        ) from e


def sheet_members(book: zipfile.ZipFile, path: Path) -> list[tuple[str, str]]:
    """(sheet name, zip member of its XML) in workbook order, whatever the attribute order or prefix."""
    rels = {}
    for element in _parse_member(book, path, "xl/_rels/workbook.xml.rels").iter():
        if _local(element.tag) == "Relationship" and element.get("TargetMode") != "External":
            rels[element.get("Id")] = element.get("Target", "")
    sheets = []
    for element in _parse_member(book, path, "xl/workbook.xml").iter():
        if _local(element.tag) != "sheet":
            continue
        rel_id = next((v for k, v in element.attrib.items() if _local(k) == "id"), None)
        target = rels.get(rel_id)
        if target is None:
            continue  # a sheet without its part: the reader will not list it either
        member = target.lstrip("/") if target.startswith("/") else posixpath.normpath(f"xl/{target}")
        sheets.append((element.get("name", ""), member))
    return sheets


@dataclass
class SheetScan:
    """What one pass over a sheet's XML found. Rows are 1-based, columns 0-based."""

    merged: list[tuple[int, int, int, int]] = field(default_factory=list)  # first row, col, last row, col
    unsaved: list[str] = field(default_factory=list)  # cells holding a formula with no saved value
    errors: dict[tuple[int, int], str] = field(default_factory=dict)  # (row, col) → '#N/A', '#DIV/0!', ...
    values: int = 0  # cells holding a value
    last_row: int = 0  # the farthest row and column holding a value (or a bound), and a cell that holds each
    last_col: int = -1
    farthest: dict[str, str] = field(default_factory=dict)

    def cells(self) -> int:
        """How many cells a dense reader allocates for the sheet: from A1 to the farthest values."""
        return self.last_row * (self.last_col + 1)


class _Scanner:
    """expat callbacks over <row>, <c>, <v>, <f>, <is> and <mergeCell>, with or without a prefix."""

    def __init__(self) -> None:
        self.scan = SheetScan()
        self.row = 0
        self.col = -1
        self.ref = ""
        self.kind = "n"
        self.in_cell = self.has_value = self.has_formula = self.reading = False
        self.text: list[str] = []

    def start(self, name: str, attrs: dict[str, str]) -> None:
        tag = name.rpartition("}")[2]
        if tag == "c":
            ref = attrs.get("r")
            found = _CELL.fullmatch(ref) if ref else None
            if found:
                self.col, self.row = column_index(found.group(1)), int(found.group(2))
            else:  # the reference is optional: the cell after the previous one
                self.col += 1
            self.ref = ref or f"{column_letters(self.col)}{self.row}"
            self.kind = attrs.get("t", "n")
            self.in_cell, self.has_value, self.has_formula = True, False, False
            self.text = []
        elif not self.in_cell:
            if tag == "row":
                number = attrs.get("r")
                self.row = int(number) if number and number.isdigit() else self.row + 1
                self.col = -1
            elif tag == "mergeCell":
                _merge_range(self.scan, attrs.get("ref", ""))
        elif tag == "v":
            self.has_value = self.reading = True
        elif tag == "is":
            self.has_value = True
        elif tag == "f":
            self.has_formula = True

    def end(self, name: str) -> None:
        tag = name.rpartition("}")[2]
        if tag == "v":
            self.reading = False
        elif tag == "c":
            self.in_cell = False
            value = "".join(self.text)
            if self.has_formula and not value and self.kind != "str":
                self.scan.unsaved.append(self.ref)
            if not self.has_value:
                return
            scan = self.scan
            scan.values += 1
            if self.kind == "e":
                scan.errors[(self.row, self.col)] = value or "#error"
            if self.row > scan.last_row:
                scan.last_row, scan.farthest["row"] = self.row, self.ref
            if self.col > scan.last_col:
                scan.last_col, scan.farthest["column"] = self.col, self.ref

    def chars(self, data: str) -> None:
        if self.reading:
            self.text.append(data)


# The cells with content (a <v> or <is>, after an optional <f>): their reference, or b"" when they leave it
# out. A self-closing `<c .../>` (a formatted blank) never matches. Visiting the cells is left to the regular
# expression engine (C speed): Python sees one tuple per cell and no per-cell code runs.
_P = rb"(?:\w+:)?"  # any namespace prefix
_FORMULA = rb"<" + _P + rb"f\b[^>]*(?:/>|>[^<]*</" + _P + rb"f>)\s*"
_CONTENT = re.compile(
    rb"<" + _P + rb"""c\b(?:[^>]*?\sr\s*=\s*["']\$?([A-Za-z]+)\$?(\d+)["'])?[^>]*(?<!/)>"""
    rb"(?=\s*(?:" + _FORMULA + rb")?<" + _P + rb"(?:v|is)\b)"
)
_FORMULA_CELL = re.compile(
    rb"<" + _P + rb"c\b([^>]*)(?<!/)>\s*" + _FORMULA + rb"(?:<" + _P + rb"v>([^<]*)</" + _P + rb"v>)?"
)
_ERROR_CELL = re.compile(
    rb"<"
    + _P
    + rb"""c\b([^>]*\st\s*=\s*["']e["'][^>]*)(?<!/)>\s*(?:"""
    + _FORMULA
    + rb")?<"
    + _P
    + rb"v>([^<]*)</"
    + _P
    + rb"v>"
)
_REF = re.compile(rb"""(?:^|\s)r\s*=\s*["']\$?([A-Za-z]+)\$?(\d+)["']""")
_TYPE = re.compile(rb"""(?:^|\s)t\s*=\s*["']([^"']*)["']""")
_MERGE = re.compile(rb"<" + _P + rb"""mergeCell\b[^>]*?\sref\s*=\s*["']([^"']*)["']""")
MAX_SHEET_XML = 2 << 30  # bytes of one sheet's XML, uncompressed


def _column_key(letters: bytes) -> tuple[int, bytes]:
    return len(letters), letters.upper()


def _prefix(xml: bytes) -> bytes:
    """The namespace prefix of the sheet's elements (b"x:" from the OpenXML SDK), usually b""."""
    found = re.search(rb"<(\w+:)?(?:worksheet|sheetData)\b", xml[:65536])
    return found.group(1) or b"" if found else b""


def _quick_bound(xml: bytes, p: bytes, max_cells: int) -> int | None:
    """An upper bound of the cells a dense reader allocates (rows × columns as far as any cell reference
    reaches, formatted blanks included), made exact only as far as `max_cells` needs it: a few C-speed
    searches for most sheets. None when some cell does not start with its reference."""
    cells = xml.count(b"<" + p + b"c ") + xml.count(b"<" + p + b"c>")
    if not cells or cells != xml.count(b"<" + p + b'c r="'):
        return None
    start = re.escape(b"<" + p + b'c r="')
    digits = next((d for d in range(7, 0, -1) if re.search(start + rb"[A-Za-z]+\d{%d}\"" % d, xml)), 0)
    rows = 10**digits - 1  # no reference has more digits
    widths = {4: 1 << 40, 3: 16384, 2: 702, 1: 26}  # four letters or more: beyond Excel's XFD
    width = next((w for w in (4, 3, 2) if re.search(start + rb"[A-Za-z]{%d}" % w, xml)), 1)
    if rows * widths[width] <= max_cells:
        return rows * widths[width]
    columns = column_index(max(set(re.findall(start + rb"([A-Za-z]+)", xml)), key=_column_key).decode()) + 1
    if rows * columns <= max_cells:
        return rows * columns
    return max(map(int, re.findall(start + rb"[A-Za-z]+(\d{%d})\"" % digits, xml))) * columns


def _fast_scan(xml: bytes, max_cells: int) -> SheetScan | None:
    """The scan by regular expressions and byte counts; None when a cell with content has no reference
    (use expat). The extent is exact only when the quick bound exceeds `max_cells`."""
    scan = SheetScan()
    p = _prefix(xml)
    bound = _quick_bound(xml, p, max_cells)
    if bound is not None and bound <= max_cells:
        scan.values = 1 if _CONTENT.search(xml) else 0
        scan.last_row, scan.last_col = (bound, 0) if scan.values else (0, -1)
    else:
        refs = _CONTENT.findall(xml)
        if any(not letters for letters, _ in refs):
            return None
        scan.values = len(refs)
        if refs:
            scan.last_row = max(map(int, (digits for _, digits in refs)))
            widest = max({letters for letters, _ in refs}, key=_column_key)
            scan.last_col = column_index(widest.decode())
            lowest = next(letters for letters, digits in reversed(refs) if int(digits) == scan.last_row)
            rightmost = next(digits for letters, digits in refs if letters == widest)
            scan.farthest = {
                "row": f"{lowest.decode().upper()}{scan.last_row}",
                "column": f"{widest.decode().upper()}{int(rightmost)}",
            }
    if any(b"<" + p + token in xml for token in (b"f>", b"f ", b"f/")):
        for attrs, saved in _FORMULA_CELL.findall(xml):
            kind = _TYPE.search(attrs)
            if not saved and not (kind and kind.group(1) == b"str"):
                ref = _REF.search(attrs)
                scan.unsaved.append(f"{ref.group(1).decode().upper()}{int(ref.group(2))}" if ref else "?")
    if b'"e"' in xml or b"'e'" in xml:
        for attrs, value in _ERROR_CELL.findall(xml):
            ref = _REF.search(attrs)
            if ref:
                row, col = int(ref.group(2)), column_index(ref.group(1).decode())
                scan.errors[(row, col)] = value.decode(errors="replace") or "#error"
    if b"mergeCell" in xml:
        for ref in _MERGE.finditer(xml):
            _merge_range(scan, ref.group(1).decode(errors="replace"))
    return scan


def _merge_range(scan: SheetScan, ref: str) -> None:
    corners = [_CELL.fullmatch(part) for part in ref.split(":")]
    if len(corners) != 2 or not all(corners):
        return  # one cell, or not a range: nothing to fill
    (c1, r1), (c2, r2) = (corner.groups() for corner in corners)
    scan.merged.append((int(r1), column_index(c1), int(r2), column_index(c2)))


def scan_sheet(path: Path, member: str, name: str, max_cells: int) -> SheetScan:
    """Scan one sheet's XML (see the module's docstring); a damaged member is a DataError."""
    with zipfile.ZipFile(path) as book:
        try:
            size = book.getinfo(member).file_size
            if size > MAX_SHEET_XML:
                raise DataError(
                    f"{path}: sheet '{name}' is {size / 2**30:.1f} GiB of XML uncompressed, more than "
                    "loraflow reads from one sheet; delete the formatting or cells far from the table, or "
                    "export the sheet as .csv"
                )
            xml = book.read(member)
        except KeyError as e:
            raise DataError(f"{path}: sheet '{name}' has no {member}; the file is damaged: {REPAIR}") from e
        except (
            zipfile.BadZipFile,
            zlib.error,
            OSError,
            EOFError,
        ) as e:  # a member cut short or failing its CRC
            raise DataError(
                f"{path}: sheet '{name}' cannot be read ({e}); the file is damaged: {REPAIR}"
            ) from e
    return _fast_scan(xml, max_cells) or _expat_scan(path, xml, member, name)


def _expat_scan(path: Path, xml: bytes, member: str, name: str) -> SheetScan:
    """The scan by expat callbacks, for sheets whose cells leave out their reference."""
    scanner = _Scanner()
    parser = expat.ParserCreate(namespace_separator="}")
    parser.buffer_text = True
    parser.StartElementHandler = scanner.start
    parser.EndElementHandler = scanner.end
    parser.CharacterDataHandler = scanner.chars
    try:
        parser.Parse(xml, True)
    except expat.ExpatError as e:
        raise DataError(
            f"{path}: sheet '{name}' is not well-formed XML ({expat.ErrorString(e.code)} at line "
            f"{e.lineno}, column {e.offset} of {member}); the file is damaged or was written by a "
            f"faulty program: {REPAIR}"
        ) from e
    return scanner.scan
