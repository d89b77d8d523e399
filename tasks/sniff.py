"""What a data file really is, from its first bytes: for the message when its name says otherwise.

Files arrive renamed (an .xlsx saved as .csv), compressed (a .csv.gz that lost its .gz), exported by
Excel as "Unicode Text" (UTF-16) or "Web Page" (HTML), or password-protected. Each reader asks `sniff`
before (text tables) or after (workbooks, parquet) it fails, and `mismatch` words the fix.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

OLE_MAGIC = bytes.fromhex("D0CF11E0A1B11AE1")  # compound file: encrypted .xlsx, or an old .xls
HEAD = 4096
TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl")
# Never a text table, whatever the encoding.
BINARY = ("gzip", "ole", "parquet", "xlsx", "ods", "zip", "damaged-zip")


def sniff(path: Path) -> str | None:
    """The kind of file the bytes show: gzip, ole, parquet, xlsx, ods, zip, damaged-zip, utf-16, html,
    spreadsheetml or text; None for bytes that are none of these."""
    with open(path, "rb") as file:
        head = file.read(HEAD)
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(OLE_MAGIC):
        return "ole"
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _zip_kind(path)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or _utf16_without_bom(head):
        return "utf-16"
    text = _decoded(head)
    if text is None:
        return None
    start = text.lstrip("\ufeff \t\r\n").lower()
    if start.startswith(("<!doctype html", "<html", "<table", "<head", "<body", "<meta")):
        return "html"
    if start.startswith("<?xml") and "urn:schemas-microsoft-com:office:spreadsheet" in text:
        return "spreadsheetml"
    return "text"


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "mimetype" in names and b"opendocument.spreadsheet" in archive.read("mimetype"):
                return "ods"
    except (zipfile.BadZipFile, OSError, KeyError, EOFError):
        return "damaged-zip"
    return "xlsx" if "xl/workbook.xml" in names else "zip"


def _utf16_without_bom(head: bytes) -> bool:
    """Mostly-ASCII UTF-16 without a byte-order mark: every other byte is NUL."""
    if len(head) < 8:
        return False
    half = len(head) // 2
    odd, even = head[1::2].count(0), head[0::2].count(0)
    return (odd > 0.8 * half and even < 0.2 * half) or (even > 0.8 * half and odd < 0.2 * half)


def _decoded(head: bytes) -> str | None:
    for encoding in ("utf-8", "cp1252"):
        try:
            return head.decode(encoding)
        except UnicodeDecodeError as e:
            if encoding == "utf-8" and e.start > len(head) - 4:  # a character cut by the 4 KB window
                return head[: e.start].decode(encoding)
    return None


def mismatch(path: Path, kind: str) -> str:
    """The message for a file of `kind` (from `sniff`) whose name says something else, with the fix."""
    stem, suffix = path.stem, path.suffix.lower()
    if kind == "gzip":
        return (
            f"{path} is gzip-compressed, not a plain {suffix} file; decompress it first (gunzip, or 7-Zip "
            "on Windows) and point the config at the decompressed file"
        )
    if kind == "ole":
        return (
            f"{path} is password-protected (encrypted) or an old .xls workbook; remove the password "
            "(Excel: File → Info → Protect Workbook → Encrypt with Password, clear it) and save it as .xlsx"
        )
    if kind == "parquet":
        return f"{path} is a parquet file with a {suffix} name; rename it to {stem}.parquet"
    if kind == "xlsx":
        return f"{path} is an Excel workbook (.xlsx) with a {suffix} name; rename it to {stem}.xlsx"
    if kind == "ods":
        return (
            f"{path} is an OpenDocument spreadsheet (.ods); save it as .xlsx (LibreOffice: File → Save As "
            "→ Excel 2007-365) or as .csv"
        )
    if kind == "zip":
        return f"{path} is a zip archive, not a {suffix} file; extract the table from it first"
    if kind == "damaged-zip":
        return (
            f"{path} is a damaged zip archive (an .xlsx workbook cut short, perhaps), not a {suffix} file; "
            "copy or download it again"
        )
    if kind == "utf-16":
        if suffix in TEXT_SUFFIXES:
            return (
                f"{path} is UTF-16 text (Excel's 'Unicode Text' export writes it); set data.encoding: utf-16"
            )
        return (
            f"{path} is UTF-16 text with an {suffix} name (Excel's 'Unicode Text' export, tab-separated); "
            f"rename it to {stem}.tsv and set data.encoding: utf-16"
        )
    if kind == "html":
        return (
            f"{path} is an HTML page (a table saved as a web page, or a download that returned a web "
            f"page), not a {suffix} file; open it in Excel and save it as .xlsx (Excel Workbook) or .csv"
        )
    if kind == "spreadsheetml":
        return (
            f"{path} is an Excel 2003 XML spreadsheet; open it in Excel and save it as .xlsx (Excel Workbook)"
        )
    raise ValueError(kind)


def text_table_kind(path: Path) -> str:
    """For a text table (.csv .tsv) with an .xlsx name: which one, by its separators."""
    with open(path, "rb") as file:
        text = _decoded(file.read(HEAD)) or ""
    return ".tsv" if text.count("\t") > text.count(",") else ".csv"
