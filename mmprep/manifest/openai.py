"""The images of OpenAI requests: Chat Completions (`messages`), Responses (`input`), and Batch API lines.

A Batch API input line is an envelope `{"custom_id", "method", "url", "body"}`: `body` is the request,
and the top-level `url` is the endpoint it is sent to (`/v1/chat/completions`, `/v1/responses`), never an
image. Image content parts are `{"type": "image_url", "image_url": {"url": ...}}` (Chat Completions; a
bare string is accepted too) and `{"type": "input_image", "image_url": "..."}` (Responses); both are
taken wherever they appear in a message's content list, numbered across the request from 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mmprep.manifest.records import Malformed, clean_id, clean_url

IMAGE_PART_TYPES = ("image_url", "input_image")


def is_request(obj: Any) -> bool:
    """Whether a manifest line is an OpenAI request: a batch envelope (`body`) or a bare chat/Responses body."""
    return isinstance(obj, dict) and ("body" in obj or "messages" in obj or "input" in obj)


def request_images(obj: dict[str, Any], default_id: str | None = None) -> Iterator[tuple[str, str | None]]:
    """(url, id) for every image part of a request line; ids are `<custom_id>:<part index>` (or `<id>:<index>`)."""
    base = clean_id(obj.get("custom_id"), "custom_id") or default_id
    for index, (_, url) in enumerate(request_image_parts(obj)):
        yield url, (f"{base}:{index}" if base is not None else None)


def request_image_parts(obj: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str]]:
    """(part, url) for every image content part of a request line, in order; `part` is the request's own
    dict, so a caller can change it in place (`mmprep rewrite`)."""
    body = request_body(obj)
    if "messages" in body:
        items, field = body["messages"], "messages"
    elif "input" in body:
        items, field = body["input"], "input"
        if isinstance(items, str):  # a text-only Responses request
            return
    else:
        raise Malformed("request body has neither messages (Chat Completions) nor input (Responses)")
    if not isinstance(items, list):
        raise Malformed(f"{field} must be a list")
    for item in items:
        if not isinstance(item, dict):
            if field == "input" and isinstance(item, str):  # Responses also takes plain strings
                continue
            raise Malformed(f"each item of {field} must be an object")
        content = item.get("content")
        if not isinstance(content, list):
            continue  # plain-text content has no images
        for part in content:
            if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES:
                yield part, _part_url(part)


def request_body(obj: dict[str, Any]) -> dict[str, Any]:
    """The request of a line: a Batch API line's `body`, or the line itself when it is a bare request."""
    body = obj.get("body", obj)
    if not isinstance(body, dict):
        raise Malformed("body must be an object")
    return body


def _part_url(part: dict[str, Any]) -> str:
    """The URL of one image content part."""
    kind, value = part["type"], part.get("image_url")
    if kind == "input_image" and value is None:
        if "file_id" in part:
            raise Malformed("an input_image given by file_id cannot be fetched: give image_url instead")
        raise Malformed("input_image has no image_url")
    return image_url_value(value, "image_url")


def image_url_value(value: Any, field: str) -> str:
    """An `image_url` value: a URL string, or an object `{"url": ...}`."""
    if isinstance(value, dict):
        return clean_url(value.get("url"), f"{field}.url")
    return clean_url(value, field)
