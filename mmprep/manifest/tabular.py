"""What the tabular readers (parquet, csv, tsv) share: choosing the URL and id columns, turning cells into a record."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mmprep.errors import UsageError
from mmprep.manifest.records import BadLine, Malformed, Record, clean_id, clean_url
from mmprep.settings import ManifestSettings

DEFAULT_ID_COLUMN = "id"
_SHOWN_COLUMNS = 30  # a usage error lists at most this many of a file's columns


@dataclass(frozen=True)
class Columns:
    """The positions (and names) of the URL and id columns in one tabular manifest."""

    url_name: str
    url: int
    id_name: str | None
    id: int | None


def pick_columns(names: Sequence[str], settings: ManifestSettings, path: str) -> Columns:
    """Where --url-col and --id-col are in `names`; a missing one is a usage error naming the columns there are."""
    url = _position(names, settings.url_col, "--url-col", path)
    if settings.id_col is not None:
        return Columns(settings.url_col, url, settings.id_col, _position(names, settings.id_col, "--id-col", path))
    if DEFAULT_ID_COLUMN in names:
        return Columns(settings.url_col, url, DEFAULT_ID_COLUMN, list(names).index(DEFAULT_ID_COLUMN))
    return Columns(settings.url_col, url, None, None)


def _position(names: Sequence[str], name: str, option: str, path: str) -> int:
    try:
        return list(names).index(name)
    except ValueError:
        columns = column_list(names)
        raise UsageError(f"manifest {path} has no column {name!r} ({option}); its columns: {columns}") from None


def column_list(names: Sequence[str]) -> str:
    """A file's column names for an error message (quoted, the first few only when there are many)."""
    if not names:
        return "none (the file is empty)"
    shown = ", ".join(repr(n) for n in names[:_SHOWN_COLUMNS])
    return shown + (f" and {len(names) - _SHOWN_COLUMNS} more" if len(names) > _SHOWN_COLUMNS else "")


def row_record(url: Any, rid: Any, columns: Columns, path: str, line: int) -> Record | BadLine:
    """The record of one row from its URL and id cells (an empty, null or non-string URL is a `BadLine`)."""
    try:
        caller_id = clean_id(rid, f"column {columns.id_name!r}")
    except Malformed as exc:
        return BadLine(path, line, str(exc))
    field = f"column {columns.url_name!r}"
    if url is None:
        return BadLine(path, line, f"{field} is null", caller_id)
    try:
        return Record(clean_url(url, field), caller_id, path, line)
    except Malformed as exc:
        return BadLine(path, line, str(exc), caller_id)
