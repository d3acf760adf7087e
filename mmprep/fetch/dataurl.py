"""Inline images: `data:image/<subtype>[;name=value]*;base64,<payload>`, decoded strictly."""

from __future__ import annotations

import binascii
from dataclasses import dataclass

from mmprep.errors import ErrorKind, RowError

MAX_HEADER_CHARS = 256  # `image/<subtype>[;name=value]*;base64` before the comma


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

    The header and payload lengths are checked before anything is split or decoded, so a huge URL
    costs one copy of its payload and the decoded bytes, nothing more.
    """
    start = len("data:")
    comma = url.find(",", start, start + MAX_HEADER_CHARS + 1)
    if comma < 0:
        if len(url) > start + MAX_HEADER_CHARS:
            raise _bad(f"header is longer than {MAX_HEADER_CHARS} characters (or there is no ',' before the payload)")
        raise _bad("no ',' between the header and the payload")
    header = url[start:comma]
    params = [p.strip().lower() for p in header.split(";")]
    media_type = params[0]
    if not media_type.startswith("image/") or media_type == "image/":
        shown = media_type or "text/plain (the default)"
        raise _bad(f"media type {shown!r} is not an image type (expected data:image/...;base64,...)")
    if len(params) < 2 or params[-1] != "base64":
        raise _bad("payload is not marked ;base64 (expected data:image/...;base64,...)")
    size = len(url) - comma - 1
    if size > encoded_limit(max_bytes):
        raise RowError(
            ErrorKind.TOO_LARGE,
            f"data URL payload is {size:,} base64 characters, more than max_bytes={max_bytes:,} allows",
        )
    try:  # a2b_base64 reads an ASCII str in place (b64decode would first copy it to bytes)
        data = binascii.a2b_base64(url[comma + 1 :], strict_mode=True)
    except ValueError:  # binascii.Error, or non-ASCII characters
        raise _bad("payload is not valid base64 (no whitespace or URL-escapes allowed)") from None
    if not data:
        raise _bad("payload is empty")
    if len(data) > max_bytes:  # padding slack: up to 2 bytes over the encoded estimate
        raise RowError(ErrorKind.TOO_LARGE, f"data URL payload is {len(data):,} bytes, over max_bytes={max_bytes:,}")
    return DataUrl(media_type=media_type, data=data)


def _bad(reason: str) -> RowError:
    return RowError(ErrorKind.BAD_DATA_URL, reason)
