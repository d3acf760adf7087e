"""Manifest reading: JSONL files (or stdin, or .gz) streamed into `Record`s, one line at a time.

Accepted line forms (README: "Manifest format"):
  {"url": "...", "id": "..."}            the plain form; `id` is the caller's own key
  {"image_url": "..."} / {"image_url": {"url": "..."}}
  {"custom_id": ..., "body": {"messages": [...]}} or {"messages": [...]}
                                         an OpenAI chat / batch-API request: one record per
                                         `image_url` content part, id = "<custom_id>:<part index>"
  "https://..."                          a bare JSON string
A line that fits none of them becomes a `BadLine`; reading goes on.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

from mmprep.errors import UsageError


class Record(NamedTuple):
    """One image to encode, with where it came from (a tuple: a cached rerun builds millions of them)."""

    url: str
    id: str | None
    source: str  # manifest path, or "-" for stdin
    line: int  # 1-based line number in `source`


@dataclass(frozen=True)
class BadLine:
    """A manifest line that could not be understood."""

    source: str
    line: int
    message: str


# The plain form with JSON strings that need no unescaping: {"url": "..."} or {"url": "...", "id": "..."}.
# Such a line means exactly what json.loads would make of it, so it skips the JSON parser (a cached
# rerun of millions of rows spends most of its time here); anything else takes the full path.
_STRING = r'"([^"\\\x00-\x1f]*)"'
_WS = r"[ \t\n\r]*"
_PLAIN_LINE = re.compile(
    rf'\{{{_WS}"url"{_WS}:{_WS}{_STRING}{_WS}(?:,{_WS}"id"{_WS}:{_WS}{_STRING}{_WS})?\}}'
)


# A longer line (a binary file given as a manifest, say) is refused without ever being held whole in
# memory. 64 Mi characters fit a data URL at the default --max-bytes (20 MiB is ~27 Mi of base64) twice.
MAX_LINE_CHARS = 64 * 1024 * 1024


def read_manifests(paths: Iterable[str]) -> Iterator[Record | BadLine]:
    """Yield every record of every manifest in order, streaming (never the whole file in memory)."""
    plain = _PLAIN_LINE.fullmatch
    for path in paths:
        with _open(path) as stream:
            readline, limit, number = stream.readline, MAX_LINE_CHARS, 0
            try:
                while raw := readline(limit):
                    number += 1
                    if len(raw) == limit and not raw.endswith("\n"):
                        _skip_rest_of_line(stream)
                        yield BadLine(path, number, f"line longer than {limit} characters (skipped unread)")
                        continue
                    text = raw.strip()
                    if number == 1 and text.startswith("\ufeff"):  # a byte-order mark (Windows tools write one)
                        text = text[1:].strip()
                    if not text:
                        continue
                    if not text.isascii() and not _valid_utf8(text):
                        yield BadLine(path, number, "line is not valid UTF-8")
                        continue
                    match = plain(text)
                    if match is not None and match[1].strip():
                        yield Record(match[1], match[2], path, number)
                    else:
                        yield from parse_line(text, path, number)
            except (OSError, EOFError, zlib.error) as exc:  # a truncated or corrupt .gz, an I/O error
                yield BadLine(path, number + 1, f"the rest of the manifest is unreadable: {type(exc).__name__}: {exc}")


def _skip_rest_of_line(stream: IO[str]) -> None:
    """Read past the end of an overlong line in bounded pieces."""
    while (rest := stream.readline(MAX_LINE_CHARS)) and not rest.endswith("\n"):
        pass


def _valid_utf8(text: str) -> bool:
    """False when decoding met bytes that are not UTF-8 (kept as lone surrogates by "surrogateescape")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_readable(paths: Iterable[str]) -> None:
    """Fail early (UsageError, exit 2) when a manifest cannot be opened."""
    for path in paths:
        if path == "-":
            continue
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"manifest not found or not a file: {path}")
        try:
            with p.open("rb"):
                pass
        except OSError as exc:
            raise UsageError(f"cannot read manifest {path}: {exc.strerror or exc}") from exc


def parse_line(text: str, source: str, line: int) -> list[Record | BadLine]:
    """Parse one non-blank manifest line into its records (or one `BadLine`)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return [BadLine(source, line, f"invalid JSON: {exc.msg} at column {exc.colno}")]
    except (ValueError, RecursionError) as exc:  # an integer of over 4300 digits, nesting too deep
        return [BadLine(source, line, f"unreadable JSON: {type(exc).__name__}: {str(exc)[:200]}")]
    try:
        found = list(_records_of(obj))
    except _Malformed as exc:
        return [BadLine(source, line, str(exc))]
    if not found and not _is_chat(obj):  # a text-only chat request simply has no images
        return [BadLine(source, line, "no image URL found (expected url, image_url, messages or a string)")]
    return [Record(url=url, id=rid, source=source, line=line) for url, rid in found]


class _Malformed(ValueError):
    pass


def _records_of(obj: Any) -> Iterator[tuple[str, str | None]]:
    if isinstance(obj, str):
        yield _url(obj, "line"), None
        return
    if not isinstance(obj, dict):
        raise _Malformed(f"expected a JSON object or string, got {type(obj).__name__}")
    rid = _id(obj.get("id"), "id")
    if "url" in obj:
        yield _url(obj["url"], "url"), rid
    elif "image_url" in obj:
        yield _image_url(obj["image_url"]), rid
    elif _is_chat(obj):
        body = obj.get("body", obj)
        if not isinstance(body, dict):
            raise _Malformed("body must be an object")
        base = _id(obj.get("custom_id"), "custom_id") or rid
        yield from _chat_images(body.get("messages"), base)


def _is_chat(obj: Any) -> bool:
    return isinstance(obj, dict) and ("body" in obj or "messages" in obj)


def _chat_images(messages: Any, base_id: str | None) -> Iterator[tuple[str, str | None]]:
    """Every `image_url` content part of an OpenAI chat request, numbered across the request."""
    if not isinstance(messages, list):
        raise _Malformed("messages must be a list")
    index = 0
    for message in messages:
        if not isinstance(message, dict):
            raise _Malformed("each message must be an object")
        content = message.get("content")
        if not isinstance(content, list):
            continue  # plain-text content has no images
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = _image_url(part.get("image_url"))
                yield url, (f"{base_id}:{index}" if base_id is not None else None)
                index += 1


def _image_url(value: Any) -> str:
    if isinstance(value, dict):
        return _url(value.get("url"), "image_url.url")
    return _url(value, "image_url")


def _url(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _Malformed(f"{field} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _Malformed(f"{field} is empty")
    return _unicode(value, field)


def _unicode(value: str, field: str) -> str:
    """Refuse a string with an unpaired surrogate (a JSON escape like \\udcff): it is not text and
    cannot be stored or keyed."""
    if not value.isascii() and not _valid_utf8(value):
        raise _Malformed(f"{field} holds an unpaired surrogate escape (not valid Unicode)")
    return value


def _id(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Malformed(f"{field} must be a string or integer, got {type(value).__name__}")
    return _unicode(str(value), field)


def _open(path: str) -> IO[str]:
    """Open a manifest for text reading; `-` is stdin, gzip is detected by its magic bytes."""
    if path == "-":
        raw: IO[bytes] = sys.stdin.buffer
        buffered = io.BufferedReader(raw) if not isinstance(raw, io.BufferedReader) else raw  # type: ignore[arg-type]
        if buffered.peek(2)[:2] == b"\x1f\x8b":
            return io.TextIOWrapper(gzip.GzipFile(fileobj=buffered), encoding="utf-8", errors="surrogateescape")
        return io.TextIOWrapper(buffered, encoding="utf-8", errors="surrogateescape")
    try:
        with open(path, "rb") as probe:
            magic = probe.read(2)
        if magic == b"\x1f\x8b":
            return gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape")
        return open(path, encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise UsageError(f"cannot read manifest {path}: {exc.strerror or exc}") from exc
