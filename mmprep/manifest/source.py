"""Opening a manifest as text (a file, `.gz`, or stdin) and splitting it into numbered lines in bounded memory."""

from __future__ import annotations

import gzip
import io
import sys
import zlib
from collections.abc import Iterator
from typing import IO

from mmprep.errors import UsageError
from mmprep.manifest.records import BadLine, valid_utf8

# A longer line (a binary file given as a manifest, say) is refused without ever being held whole in
# memory. 64 Mi characters fit a data URL at the default --max-bytes (20 MiB is ~27 Mi of base64) twice.
MAX_LINE_CHARS = 64 * 1024 * 1024

# What a read can raise part-way through a file: a truncated or corrupt .gz, an I/O error.
READ_ERRORS = (OSError, EOFError, zlib.error)

GZIP_MAGIC = b"\x1f\x8b"


def open_text(path: str, newline: str = "\n") -> IO[str]:
    """Open a manifest for text reading; `-` is stdin, gzip is detected by its magic bytes.

    `newline="\\n"`: lines end at LF only, so a raw CR inside a JSONL line (JSON whitespace) never splits
    it; a CRLF line keeps its CR, which the readers strip. The CSV reader passes "" as the csv module asks.
    """
    if path == "-":
        raw: IO[bytes] = sys.stdin.buffer
        buffered = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)  # type: ignore[type-var]  # stdin's buffer is a raw stream in practice; typeshed wants RawIOBase
        source: IO[bytes] = gzip.GzipFile(fileobj=buffered) if buffered.peek(2)[:2] == GZIP_MAGIC else buffered
        return io.TextIOWrapper(source, encoding="utf-8", errors="surrogateescape", newline=newline)
    try:
        with open(path, "rb") as probe:
            magic = probe.read(2)
        if magic == GZIP_MAGIC:
            return gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape", newline=newline)
        return open(path, encoding="utf-8", errors="surrogateescape", newline=newline)
    except OSError as exc:
        raise UsageError(f"cannot read manifest {path}: {exc.strerror or exc}") from exc


def numbered_lines(stream: IO[str], path: str) -> Iterator[tuple[int, str] | BadLine]:
    """Every non-blank line of `stream`, stripped, with its 1-based number; a line that is too long or not
    UTF-8 comes as a `BadLine`, and an unreadable rest of the file as a last `BadLine`."""
    readline, limit, number = stream.readline, MAX_LINE_CHARS, 0
    try:
        while raw := readline(limit):
            number += 1
            if len(raw) == limit and not raw.endswith("\n"):
                skip_rest_of_line(stream)
                yield BadLine(path, number, f"line longer than {limit} characters (skipped unread)")
                continue
            text = raw.strip()
            if number == 1 and text.startswith("\ufeff"):  # a byte-order mark (Windows tools write one)
                text = text[1:].strip()
            if not text:
                continue
            if not text.isascii() and not valid_utf8(text):
                yield BadLine(path, number, "line is not valid UTF-8")
                continue
            yield number, text
    except READ_ERRORS as exc:
        yield unreadable_rest(path, number + 1, exc)


def skip_rest_of_line(stream: IO[str]) -> None:
    """Read past the end of an overlong line in bounded pieces."""
    while (rest := stream.readline(MAX_LINE_CHARS)) and not rest.endswith("\n"):
        pass


def unreadable_rest(path: str, line: int, exc: BaseException) -> BadLine:
    """The last record of a manifest that cannot be read on from `line`."""
    return BadLine(path, line, f"the rest of the manifest is unreadable: {type(exc).__name__}: {exc}")
