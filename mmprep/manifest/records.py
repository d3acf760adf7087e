"""What every manifest reader yields (`Record`, `BadLine`) and the checks every URL and id cell passes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple


class Record(NamedTuple):
    """One image to encode, with where it came from (a tuple: a cached rerun builds millions of them)."""

    url: str
    id: str | None
    source: str  # manifest path, or "-" for stdin
    line: int  # 1-based: the line in a JSONL/txt/csv/tsv file where the row starts, the row number in a parquet file


@dataclass(frozen=True)
class BadLine:
    """A manifest line (or tabular row) that could not be understood."""

    source: str
    line: int
    message: str
    id: str | None = None  # the row's caller id, when a tabular row has a readable one


class Malformed(ValueError):
    """A value in a manifest row is unusable; its message becomes the `BadLine`'s."""


def clean_url(value: Any, field: str) -> str:
    """`value` as a URL: a non-empty string, surrounding whitespace removed (a pasted URL often carries some)."""
    if not isinstance(value, str):
        raise Malformed(f"{field} must be a string, got {type(value).__name__}")
    url = value.strip()
    if not url:
        raise Malformed(f"{field} is empty")
    return checked_text(url, field)


def clean_id(value: Any, field: str) -> str | None:
    """`value` as a caller id: a string or an integer (kept as its decimal text); None stays None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Malformed(f"{field} must be a string or integer, got {type(value).__name__}")
    return checked_text(str(value), field)


def checked_text(value: str, field: str) -> str:
    """Refuse a string with an unpaired surrogate (a JSON escape like \\udcff, or undecodable bytes): it is
    not text and cannot be stored or keyed."""
    if not value.isascii() and not valid_utf8(value):
        raise Malformed(f"{field} holds an unpaired surrogate (not valid UTF-8 / Unicode)")
    return value


def valid_utf8(text: str) -> bool:
    """False when decoding met bytes that are not UTF-8 (kept as lone surrogates by "surrogateescape")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
