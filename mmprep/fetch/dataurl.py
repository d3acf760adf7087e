"""Inline images: `data:image/<subtype>[;name=value]*;base64,<payload>`, decoded strictly."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from mmprep.errors import ErrorKind, RowError


@dataclass(frozen=True)
class DataUrl:
    """A decoded data URL."""

    media_type: str  # lowercased, e.g. "image/png"
    data: bytes


def encoded_limit(max_bytes: int) -> int:
    """The longest base64 payload that can decode to at most `max_bytes` bytes."""
    return 4 * -(-max_bytes // 3)


def parse_data_url(url: str, max_bytes: int) -> DataUrl:
    """Decode a `data:` URL; only image/* with base64 is accepted, and only canonical base64.

    The payload length is checked before decoding, so a huge URL is never decoded.
    """
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise _bad("no ',' between the header and the payload")
    params = [p.strip().lower() for p in header.split(";")]
    media_type = params[0]
    if not media_type.startswith("image/") or media_type == "image/":
        shown = media_type or "text/plain (the default)"
        raise _bad(f"media type {shown!r} is not an image type (expected data:image/...;base64,...)")
    if len(params) < 2 or params[-1] != "base64":
        raise _bad("payload is not marked ;base64 (expected data:image/...;base64,...)")
    if len(payload) > encoded_limit(max_bytes):
        raise RowError(
            ErrorKind.TOO_LARGE,
            f"data URL payload is {len(payload):,} base64 characters, more than max_bytes={max_bytes:,} allows",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII characters
        raise _bad("payload is not valid base64 (no whitespace or URL-escapes allowed)") from None
    if not data:
        raise _bad("payload is empty")
    if len(data) > max_bytes:  # padding slack: up to 2 bytes over the encoded estimate
        raise RowError(ErrorKind.TOO_LARGE, f"data URL payload is {len(data):,} bytes, over max_bytes={max_bytes:,}")
    return DataUrl(media_type=media_type, data=data)


def _bad(reason: str) -> RowError:
    return RowError(ErrorKind.BAD_DATA_URL, reason)
