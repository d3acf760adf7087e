"""Builders for real encoded images and hand-crafted byte strings used by the decode tests."""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Sequence

from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    """`im` saved by Pillow as `fmt`."""
    buf = io.BytesIO()
    im.save(buf, format=fmt, **params)
    return buf.getvalue()


def from_values(mode: str, values: Sequence[object], size: tuple[int, int] | None = None) -> Image.Image:
    """An image of `mode` whose pixels, row by row, are `values` (one row unless `size` says)."""
    im = Image.new(mode, size or (len(values), 1))
    for i, value in enumerate(values):
        im.putpixel((i % im.width, i // im.width), value)  # type: ignore[arg-type]
    return im


def noise(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    """An RGB image of random pixels: compresses badly, so corruption reaches real pixel data."""
    rnd = random.Random(seed)
    return Image.frombytes("RGB", size, rnd.randbytes(size[0] * size[1] * 3))


def rgb_pixels(im: Image.Image) -> list[tuple[int, int, int]]:
    """All pixels of an RGB image, row by row."""
    assert im.mode == "RGB"
    raw = im.tobytes()
    return [(raw[i], raw[i + 1], raw[i + 2]) for i in range(0, len(raw), 3)]


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A valid-looking 8-bit RGB PNG that claims `width`x`height` but carries almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def exif_jpeg(im: Image.Image, orientation: int) -> bytes:
    """`im` as a JPEG whose EXIF orientation tag is `orientation`."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", quality=95, exif=exif.tobytes())


def animated(fmt: str, colours: Sequence[tuple[int, int, int]], size: tuple[int, int] = (8, 8)) -> bytes:
    """An animated `fmt` (GIF, WEBP, PNG) with one solid frame per colour."""
    frames = [Image.new("RGB", size, colour) for colour in colours]
    params: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {}
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **params)


# Headers of formats that must never reach a Pillow parser under the default whitelist.
FOREIGN_HEADERS: dict[str, bytes] = {
    "PSD": b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x03\x00\x00\x00\x10\x00\x00\x00\x10\x00\x08\x00\x03",
    "EPS": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n",
    "PDF": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
    "SVG": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
}
