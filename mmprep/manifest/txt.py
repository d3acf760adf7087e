"""`.txt` manifests: one URL (or local path, or data URL) a line, no header, no ids."""

from __future__ import annotations

from collections.abc import Iterator

from mmprep.manifest.records import BadLine, Record
from mmprep.manifest.source import numbered_lines, open_text


def read_txt(path: str) -> Iterator[Record | BadLine]:
    """Every non-blank line of a URL list as a record, streamed."""
    with open_text(path) as stream:
        for item in numbered_lines(stream, path):
            if isinstance(item, BadLine):
                yield item
            elif item[1][0] in '{["':  # no URL starts like this; a JSONL manifest does
                yield BadLine(path, item[0], "line looks like JSON: a .txt manifest holds one URL a line "
                              "(name a JSONL manifest .jsonl)")  # fmt: skip
            else:
                yield Record(item[1], None, path, item[0])
