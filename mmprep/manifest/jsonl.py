"""JSONL manifests (files, `.gz`, stdin): one JSON value a line, streamed into `Record`s.

Accepted line forms (docs/manifests.md#manifest-format):
  {"url": "...", "id": "..."}            the plain form; `id` is the caller's own key
  {"image_url": "..."} / {"image_url": {"url": "..."}}
  {"custom_id": ..., "method": ..., "url": ..., "body": {...}}
                                         an OpenAI Batch API line (`url` is the endpoint); its body, or
  {"messages": [...]} / {"input": [...]} a bare Chat Completions / Responses request: one record per
                                         image part, id = "<custom_id>:<part index>" (mmprep.manifest.openai)
  "https://..."                          a bare JSON string
A line that fits none of them becomes a `BadLine`; reading goes on. Lines end at LF only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from mmprep.manifest.openai import image_url_value, is_request, request_images
from mmprep.manifest.records import BadLine, Malformed, Record, clean_id, clean_url
from mmprep.manifest.source import numbered_lines, open_text

# The plain form with JSON strings that need no unescaping: {"url": "..."} or {"url": "...", "id": "..."}.
# Such a line means exactly what json.loads would make of it, so it skips the JSON parser (a cached
# rerun of millions of rows spends most of its time here); anything else takes the full path.
_STRING = r'"([^"\\\x00-\x1f]*)"'
_WS = r"[ \t\n\r]*"
_PLAIN_LINE = re.compile(rf'\{{{_WS}"url"{_WS}:{_WS}{_STRING}{_WS}(?:,{_WS}"id"{_WS}:{_WS}{_STRING}{_WS})?\}}')


def read_jsonl(path: str) -> Iterator[Record | BadLine]:
    """Every record of one JSONL manifest (`-`: stdin), streamed line by line."""
    plain = _PLAIN_LINE.fullmatch
    with open_text(path) as stream:
        for item in numbered_lines(stream, path):
            if isinstance(item, BadLine):
                yield item
                continue
            number, text = item
            match = plain(text)
            if match is not None and (url := match[1].strip()):
                yield Record(url, match[2], path, number)
            else:
                yield from parse_line(text, path, number)


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
    except Malformed as exc:
        return [BadLine(source, line, str(exc))]
    if not found and not is_request(obj):  # a text-only request simply has no images
        return [BadLine(source, line, "no image URL found (expected url, image_url, messages, input or a string)")]
    return [Record(url=url, id=rid, source=source, line=line) for url, rid in found]


def _records_of(obj: Any) -> Iterator[tuple[str, str | None]]:
    if isinstance(obj, str):
        yield clean_url(obj, "line"), None
        return
    if not isinstance(obj, dict):
        raise Malformed(f"expected a JSON object or string, got {type(obj).__name__}")
    rid = clean_id(obj.get("id"), "id")
    if "body" in obj:  # a Batch API envelope: its `url` is the endpoint, the images are in `body`
        yield from request_images(obj, rid)
    elif "url" in obj:
        yield clean_url(obj["url"], "url"), rid
    elif "image_url" in obj:
        yield image_url_value(obj["image_url"], "image_url"), rid
    elif is_request(obj):
        yield from request_images(obj, rid)
