"""Decode untrusted image bytes into fully loaded RGB images, or a `RowError` with a specific kind.

- The format is sniffed from the bytes, and only the plugins in `LoadSettings.formats` ever parse them;
  never the extension or Content-Type. Other known formats are named from a small magic table.
- Size limits (`max_pixels`, `max_side`, Pillow's decompression-bomb guard) are checked from the
  header, before any pixel is decoded.
- Colour: `convert("RGB")` exactly as the online serving path does, except 16-bit greyscale
  ("I;16*" and "I"), which is scaled to 8 bit by `value >> 8` (clipped to 0..65535 first) instead
  of being clipped at 255. With `alpha_background`, images with alpha are composited onto it.
- EXIF orientation is NOT applied by default (like vLLM / HF processors: plain open + convert);
  `exif_transpose=True` applies `ImageOps.exif_transpose`.
- Animated images (GIF, WEBP, APNG, MPO): the first frame.
- `fast_decode` (opt-in): a JPEG well over the model's input size is decoded at 1/2, 1/4 or 1/8 scale
  in the DCT domain (libjpeg's scaled IDCT, Pillow's draft mode), never below DRAFT_MARGIN x
  `draft_size` per side, so the image processor's own resize still does the last step. Limits are
  checked against the full size from the header first. Off by default: the pixels then differ from
  a full decode (BENCHMARKS.md measures by how much in the embeddings).
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ErrorKind, RowError
from .settings import LoadSettings

__all__ = ["DRAFT_MARGIN", "decode_image", "pixel_options"]

DRAFT_MARGIN = 2  # fast decode never scales a side below this multiple of the model's input size

# Register every plugin once, at import, so worker threads never mutate Pillow's registry.
Image.init()

# Signatures of formats we can name without letting Pillow parse them: (prefix, offset, format).
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"8BPS", 0, "PSD"),
    (b"%!PS", 0, "EPS"),
    (b"\xc5\xd0\xd3\xc6", 0, "EPS"),
    (b"%PDF", 0, "PDF"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"\x00\x00\x02\x00", 0, "CUR"),
    (b"icns", 0, "ICNS"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", 0, "JPEG2000"),
    (b"\xffO\xffQ", 0, "JPEG2000"),
    (b"\xff\x0a", 0, "JXL"),
    (b"\x00\x00\x00\x0cJXL ", 0, "JXL"),
    (b"ftypavif", 4, "AVIF"),
    (b"ftypheic", 4, "HEIF"),
    (b"ftypmif1", 4, "HEIF"),
    (b"qoif", 0, "QOI"),
    (b"DDS ", 0, "DDS"),
)


def pixel_options(settings: LoadSettings) -> dict[str, object]:
    """The decode options that change pixels, where they differ from the default (a full decode, plain
    `convert("RGB")`, no EXIF orientation). They are part of the model fingerprint, so a cache never
    mixes entries decoded two ways under one model."""
    options: dict[str, object] = {}
    if settings.fast_decode:
        options["fast_decode"] = True
    if settings.exif_transpose:
        options["exif_transpose"] = True
    if settings.alpha_background is not None:
        options["alpha_background"] = list(settings.alpha_background)
    return options


def decode_image(data: bytes, settings: LoadSettings) -> Image.Image:
    """Decode untrusted bytes into a fully loaded RGB image, or raise RowError with a specific kind."""
    if not data:
        raise RowError(ErrorKind.DECODE_ERROR, "empty body (0 bytes)")
    formats = [f.upper() for f in settings.formats]
    try:
        with Image.open(io.BytesIO(data), formats=formats) as im:
            _check_size(im.size, settings)
            if settings.fast_decode and settings.draft_size is not None:
                _draft(im, settings.draft_size)
            im.load()
            if settings.exif_transpose:
                im = ImageOps.exif_transpose(im)
            return _to_rgb(im, settings.alpha_background)
    except RowError:
        raise
    except UnidentifiedImageError:
        raise _unidentified(data, formats) from None
    except Image.DecompressionBombError as exc:
        raise RowError(ErrorKind.IMAGE_TOO_LARGE, str(exc)) from None
    except Exception as exc:  # truncated data, corrupt chunks, decoder errors, anything else
        raise RowError(ErrorKind.DECODE_ERROR, f"{type(exc).__name__}: {exc}") from None


def _check_size(size: tuple[int, int], settings: LoadSettings) -> None:
    """Refuse zero-sized images and images over the pixel/side limits, from the header alone."""
    width, height = size
    if width <= 0 or height <= 0:
        raise RowError(ErrorKind.DECODE_ERROR, f"image has no pixels ({width}x{height})")
    pixels = width * height
    if pixels > settings.max_pixels:
        raise RowError(
            ErrorKind.IMAGE_TOO_LARGE,
            f"{width}x{height} is {pixels} pixels, over max_pixels={settings.max_pixels}",
        )
    if settings.max_side is not None and max(width, height) > settings.max_side:
        raise RowError(
            ErrorKind.IMAGE_TOO_LARGE, f"{width}x{height} has a side over max_side={settings.max_side}"
        )
    # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; treat it as a bomb here.
    bomb_limit = Image.MAX_IMAGE_PIXELS
    if bomb_limit is not None and pixels > bomb_limit:
        raise RowError(
            ErrorKind.IMAGE_TOO_LARGE,
            f"{width}x{height} is {pixels} pixels, over Pillow's decompression-bomb limit {bomb_limit}",
        )


def _draft(im: Image.Image, target: tuple[int, int]) -> None:
    """Ask the JPEG decoder for the smallest DCT scale that keeps both sides >= DRAFT_MARGIN x target."""
    if im.format != "JPEG":
        return
    bound = (DRAFT_MARGIN * target[0], DRAFT_MARGIN * target[1])
    if im.width >= 2 * bound[0] and im.height >= 2 * bound[1]:  # at least one halving fits
        im.draft("RGB", bound)


def _to_rgb(im: Image.Image, background: tuple[int, int, int] | None) -> Image.Image:
    """Convert any decoded mode to RGB: convert("RGB"), 16-bit scaled, alpha composited if asked."""
    if im.mode == "I" or im.mode.startswith("I;16"):
        im = _sixteen_bit_to_l(im)
    elif im.mode == "P" and isinstance(im.info.get("transparency"), bytes):
        im = im.convert("RGBA")  # same RGB as P -> RGB, without Pillow's "convert to RGBA" warning
    if background is not None and _has_alpha(im):
        canvas = Image.new("RGBA", im.size, (*background, 255))
        return Image.alpha_composite(canvas, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def _sixteen_bit_to_l(im: Image.Image) -> Image.Image:
    """Scale 16-bit greyscale to 8 bit by `v >> 8` (convert("RGB") would clip everything over 255)."""
    if im.mode != "I":
        im = im.convert("I")
    # Truncating v/256 equals v >> 8 for v >= 0; the I -> L conversion clips to 0..255.
    return im.point(lambda v: v / 256).convert("L")


def _has_alpha(im: Image.Image) -> bool:
    """Whether the image carries transparency: an alpha band or a tRNS/palette transparency entry."""
    return "A" in im.getbands() or im.info.get("transparency") is not None


def _unidentified(data: bytes, formats: list[str]) -> RowError:
    """Explain bytes no allowed plugin accepted: a corrupt allowed format, another format, or text."""
    allowed = "/".join(formats)
    detected = _sniff_format(data)
    if detected in formats:
        return RowError(ErrorKind.DECODE_ERROR, f"corrupt or truncated {detected} header")
    if detected is not None:
        return RowError(ErrorKind.UNSUPPORTED_FORMAT, f"{detected} image; allowed formats: {allowed}")
    text = _sniff_text(data)
    if text is not None:
        return RowError(ErrorKind.NOT_AN_IMAGE, f"body looks like {text}, not an image")
    return RowError(
        ErrorKind.UNSUPPORTED_FORMAT, f"not a {allowed} image (starts with {data[:8].hex(' ')})"
    )


def _sniff_format(data: bytes) -> str | None:
    """Name the format from its magic bytes, without running any Pillow parser."""
    if data.startswith(b"RIFF") and data.startswith(b"WEBP", 8):
        return "WEBP"
    for magic, offset, name in _MAGIC:
        if data.startswith(magic, offset):
            return name
    head = _text_head(data)
    if head.startswith(b"<svg") or (
        head.startswith((b"<?xml", b"<!doctype svg")) and b"<svg" in head and b"<html" not in head
    ):
        return "SVG"
    return None


def _sniff_text(data: bytes) -> str | None:
    """Name what a non-image body looks like (HTML/XML, JSON, text), or None for binary data."""
    head = _text_head(data)
    if head.startswith(b"<"):
        return "HTML/XML"
    if head.startswith((b"{", b"[")):
        return "JSON"
    if head and not any(b < 0x20 and b not in b"\t\n\r\f" for b in head):
        try:
            head.decode("utf-8")
            return "text"
        except UnicodeDecodeError as exc:
            if exc.start >= len(head) - 3 and exc.reason == "unexpected end of data":
                return "text"
    return None


def _text_head(data: bytes) -> bytes:
    """The first 1 KiB, without a UTF-8 BOM or leading whitespace, lower-cased."""
    return data[:1024].removeprefix(b"\xef\xbb\xbf").lstrip().lower()
