"""CSV and TSV manifests (`.gz` ok): a header row naming the columns, then one row an image, streamed.

Parsed by the csv module (quoted fields may hold commas, tabs and newlines). Each physical line is read
with a bound (`MAX_LINE_CHARS`), and so is each field, so a file without line breaks or with an
unterminated quote costs bounded memory: such a row becomes a `BadLine` and reading goes on.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import IO

from mmprep.errors import UsageError
from mmprep.manifest.records import BadLine, Record
from mmprep.manifest.source import MAX_LINE_CHARS, READ_ERRORS, open_text, skip_rest_of_line, unreadable_rest
from mmprep.manifest.tabular import Columns, pick_columns, row_record
from mmprep.settings import ManifestSettings

DELIMITERS = {"csv": ",", "tsv": "\t"}


class _OverlongLine(ValueError):
    pass


class _BoundedLines:
    """The lines of a text stream for csv.reader, each read with a bound, counted as they are read.

    A class, not a generator: when it raises `_OverlongLine` (after reading past that line), reading
    can go on from the next line."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.count = 0  # physical lines handed out so far

    def __iter__(self) -> _BoundedLines:
        return self

    def __next__(self) -> str:
        limit = MAX_LINE_CHARS
        line = self.stream.readline(limit)
        if not line:
            raise StopIteration
        self.count += 1
        if len(line) == limit and line[-1] not in "\r\n":
            skip_rest_of_line(self.stream)
            raise _OverlongLine(f"line longer than {limit} characters (skipped unread)")
        return line


def header_of(path: str, kind: str) -> list[str]:
    """The column names of a CSV/TSV manifest (empty for an empty file)."""
    with open_text(path, newline="") as stream:
        lines = _BoundedLines(stream)
        return _header(csv.reader(lines, delimiter=DELIMITERS[kind]), path)


def _header(reader: Iterator[list[str]], path: str) -> list[str]:
    csv.field_size_limit(MAX_LINE_CHARS)  # the default (128 Ki) would refuse a data URL cell
    try:
        for row in reader:
            if row:
                return [name.lstrip("\ufeff").strip() for name in row]
    except (_OverlongLine, csv.Error) as exc:
        raise UsageError(f"manifest {path}: unreadable header row: {exc}") from None
    except READ_ERRORS as exc:
        raise UsageError(f"cannot read manifest {path}: {type(exc).__name__}: {exc}") from None
    return []


def read_delimited(path: str, kind: str, settings: ManifestSettings) -> Iterator[Record | BadLine]:
    """Every data row of a CSV (`kind="csv"`) or TSV (`"tsv"`) manifest as a record, streamed."""
    with open_text(path, newline="") as stream:
        lines = _BoundedLines(stream)
        reader = csv.reader(lines, delimiter=DELIMITERS[kind])
        columns = pick_columns(_header(reader, path), settings, path)
        yield from _rows(reader, lines, columns, path)


def _rows(reader: Iterator[list[str]], lines: _BoundedLines, columns: Columns, path: str) -> Iterator[Record | BadLine]:
    start = lines.count + 1  # the line the next row starts on
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except (_OverlongLine, csv.Error) as exc:  # the reader starts afresh at the next line
            yield BadLine(path, start, str(exc) if isinstance(exc, _OverlongLine) else f"unreadable row: {exc}")
            start = lines.count + 1
            continue
        except READ_ERRORS as exc:
            yield unreadable_rest(path, lines.count + 1, exc)
            return
        line, start = start, lines.count + 1
        if not row:
            continue  # a blank line
        yield _row_record(row, columns, path, line)


def _row_record(row: list[str], columns: Columns, path: str, line: int) -> Record | BadLine:
    if columns.url >= len(row):
        fields = f"{len(row)} field" + "s" * (len(row) != 1)
        return BadLine(path, line, f"row has {fields}; column {columns.url_name!r} is field {columns.url + 1}")
    rid = row[columns.id] if columns.id is not None and columns.id < len(row) else None
    return row_record(row[columns.url], rid or None, columns, path, line)  # an empty id cell: no id
