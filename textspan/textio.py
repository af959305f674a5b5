"""Text files as people save them: one reader for every text input (image lists, dataset metadata, text banks,
class names, prompt templates).

Encodings, in this order:

- UTF-8, with or without a byte-order mark (spreadsheets and Windows editors write one);
- UTF-16 with its byte-order mark (a spreadsheet's "Unicode text");
- otherwise, bytes that are not UTF-8 are read as Windows-1252 (the superset of Latin-1 that spreadsheets on Windows
  save "CSV" in), with a warning naming the file and the first such line, and a note for the caller's records;
- anything else (a byte Windows-1252 leaves undefined, a NUL byte in a file without a UTF-16 mark) is refused with
  a `BadInputError` naming the file, the line and the byte.

Line ends: LF, CRLF and CR alike. CSV files are parsed as CSV records (a quoted field may hold a newline), and every
record keeps the line number it starts on, so errors can name it.
"""
from __future__ import annotations

import codecs
import csv
import io
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .errors import BadInputError, InputNotFoundError

log = logging.getLogger(__name__)

FALLBACK_ENCODING = "cp1252"


def decode_text(data: bytes, source: str = "text", notes: Optional[List[str]] = None) -> str:
    """`data` decoded by the rules of the module doc; `source` names it in messages."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise BadInputError(f"{source}: starts with a UTF-16 byte-order mark but is not UTF-16 "
                                f"(at byte {exc.start})") from None
    if b"\x00" in data:
        pos = data.index(b"\x00")
        raise BadInputError(f"{source}, line {_line_of(data, pos)}: a NUL byte; this is not a text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        first = exc.start
    try:
        text = data.decode(FALLBACK_ENCODING)
    except UnicodeDecodeError as exc:
        raise BadInputError(
            f"{source}, line {_line_of(data, first)}: byte 0x{data[first]:02x} is not UTF-8, and the file is not "
            f"Windows-1252/Latin-1 either (byte 0x{data[exc.start]:02x} on line {_line_of(data, exc.start)}); "
            f"save it as UTF-8") from None
    message = (f"{source} is not UTF-8 (byte 0x{data[first]:02x} on line {_line_of(data, first)}): read as "
               f"Windows-1252 (Latin-1), as spreadsheets save it; save it as UTF-8 to silence this")
    log.warning("%s", message)
    if notes is not None:
        notes.append(message)
    return text


def _line_of(data: bytes, pos: int) -> int:
    return data[:pos].count(b"\n") + 1


def read_text(path, what: str = "file", notes: Optional[List[str]] = None) -> str:
    """The text of the file `path` (`what` names it in messages: "text bank", "classes", ...)."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"{what} file not found: {path}")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise BadInputError(f"{what} file {path}: cannot be read ({exc.strerror or exc})") from exc
    return decode_text(data, str(path), notes)


def read_lines(path, what: str = "file", notes: Optional[List[str]] = None) -> List[Tuple[int, str]]:
    """(line number, stripped text) of every line that is not blank (any line end)."""
    lines = read_text(path, what, notes).splitlines()
    return [(k + 1, t.strip()) for k, t in enumerate(lines) if t.strip()]


def read_csv(path, what: str = "CSV file", notes: Optional[List[str]] = None
             ) -> Tuple[List[str], List[Tuple[int, Dict[str, str]]]]:
    """(column names, [(line number where the record starts, {column: value})]) of a CSV file with a header row.
    Column names are stripped of surrounding spaces; a record with more fields than the header is refused."""
    text = read_text(path, what, notes)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise BadInputError(f"{path}: empty {what} (no header row)")
        header = [h.strip() for h in header]
        rows: List[Tuple[int, Dict[str, str]]] = []
        start = reader.line_num + 1
        for record in reader:
            if any(v.strip() for v in record):
                if len(record) > len(header):
                    raise BadInputError(f"{path}, line {start}: {len(record)} fields, but the header has "
                                        f"{len(header)} ({', '.join(header)})")
                rows.append((start, {h: (record[i] if i < len(record) else "") for i, h in enumerate(header)}))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise BadInputError(f"{path}, line {reader.line_num}: not valid CSV ({exc})") from None
    return header, rows


def read_header(path, what: str = "CSV file") -> List[str]:
    """The stripped column names of a CSV file's header row ([] for an empty file)."""
    text = read_text(path, what)
    try:
        header = next(csv.reader(io.StringIO(text, newline="")), [])
    except csv.Error as exc:
        raise BadInputError(f"{path}, line 1: not valid CSV ({exc})") from None
    return [h.strip() for h in header]
