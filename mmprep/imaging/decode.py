"""Decode untrusted image bytes into fully loaded RGB images, or a `RowError` with a specific kind.

- The format is sniffed from the bytes, and only the plugins in `LoadSettings.formats` ever parse them;
  never the extension or Content-Type. Other known formats are named from a small magic table.
- Size limits (`max_pixels`, `max_side`, Pillow's decompression-bomb guard) are checked from the
  header, before any pixel is decoded.
- Orientation and colour follow the decode profile (`LoadSettings.decode_as`,
  docs/serving.md#decode-profiles), each a step-by-step copy of the loader it is named after, so the
  pixels are the ones that loader gives:
  - `vllm` (default): vLLM's `ImageMediaIO.load_bytes` (vllm/multimodal/media/image.py): EXIF
    orientation applied (`normalize_image`: `ImageOps.exif_transpose`, a failure ignored), then an
    RGB image is kept as is, RGBA is pasted onto the background through its alpha (`rgba_to_rgb`),
    any other mode with transparency (LA, PA, or a `transparency` entry: P/L with tRNS) is converted
    to RGBA first (`convert_image_mode`), everything else gets `convert("RGB")`.
  - `hf`: transformers' `convert_to_rgb` (image_transforms.py): no EXIF; an image with an alpha band
    or a `transparency` entry (RGB with tRNS included) is alpha-composited onto the background,
    everything else gets `convert("RGB")`.
  - `pil`: the decode mmprep used before profiles, kept bit for bit (older caches stay valid):
    `convert("RGB")` (alpha dropped), except 16-bit greyscale ("I;16*" and "I"), scaled to 8 bit by
    `value >> 8` instead of clipped at 255; no EXIF.
  `exif_transpose` and `alpha_background` override a profile's orientation and background (vllm and
  hf: white). Only the options that change pixels enter the fingerprint (`pixel_options`).
- Animated images (GIF, WEBP, APNG, MPO): the first frame.
- `fast_decode` (opt-in): a JPEG well over the model's input size is decoded at 1/2, 1/4 or 1/8 scale
  in the DCT domain (libjpeg's scaled IDCT, Pillow's draft mode), never below DRAFT_MARGIN x
  `draft_size` per side, so the image processor's own resize still does the last step. Limits are
  checked against the full size from the header first. Off by default: the pixels then differ from
  a full decode (BENCHMARKS.md measures by how much in the embeddings).
"""

from __future__ import annotations

import contextlib
import io

from PIL import ExifTags, Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from mmprep.errors import ErrorKind, RowError
from mmprep.settings import DECODE_PROFILES, LoadSettings, MiB

__all__ = ["DRAFT_MARGIN", "decode_flags", "decode_image", "exif_transpose_of", "pixel_options", "to_rgb"]

DRAFT_MARGIN = 2  # fast decode never scales a side below this multiple of the model's input size
WHITE = (255, 255, 255)
# What each profile does without overrides: (EXIF orientation applied, background of transparent pixels).
PROFILE_DEFAULTS: dict[str, tuple[bool, tuple[int, int, int] | None]] = {
    "vllm": (True, WHITE),  # vLLM: normalize_image, rgba_background_color=(255, 255, 255)
    "hf": (False, WHITE),  # transformers' convert_to_rgb
    "pil": (False, None),  # convert("RGB"): alpha dropped
}
assert set(PROFILE_DEFAULTS) == set(DECODE_PROFILES)

# Register every plugin once, at import, so worker threads never mutate Pillow's registry.
Image.init()

# PNG text (tEXt/zTXt/iTXt) of one image, inflated, in all; Pillow's default is 64 MiB, which a 64 KiB
# file of zTXt chunks reaches. Each zTXt/iTXt/iCCP chunk stays capped at Pillow's MAX_TEXT_CHUNK (1 MiB).
PNG_TEXT_MEMORY = 4 * MiB
PngImagePlugin.MAX_TEXT_MEMORY = PNG_TEXT_MEMORY

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


def exif_transpose_of(settings: LoadSettings) -> bool:
    """Whether EXIF orientation is applied: the `exif_transpose` override, else the profile's choice."""
    if settings.exif_transpose is not None:
        return settings.exif_transpose
    return PROFILE_DEFAULTS[settings.decode_as][0]


def pixel_options(settings: LoadSettings) -> dict[str, object]:
    """The decode options that change pixels, as the model fingerprint records them. `pil` without
    overrides records nothing (so caches written before decode profiles existed keep their
    fingerprint); an override is recorded only where it differs from the profile's own choice. A
    cache thus never mixes entries decoded two ways under one model."""
    profile = settings.decode_as
    if profile not in PROFILE_DEFAULTS:
        raise ValueError(f"unknown decode profile {profile!r} (expected one of {', '.join(DECODE_PROFILES)})")
    exif, background = PROFILE_DEFAULTS[profile]
    options: dict[str, object] = {}
    if profile != "pil":
        options["decode_as"] = profile
    if settings.fast_decode:
        options["fast_decode"] = True
    if exif_transpose_of(settings) != exif:
        options["exif_transpose"] = not exif
    if settings.alpha_background is not None and tuple(settings.alpha_background) != background:
        options["alpha_background"] = list(settings.alpha_background)
    return options


def decode_flags(options: dict[str, object], *, profile: bool = False) -> list[str]:
    """Recorded decode options (`pixel_options`) as the flags that give them (`--decode-as vllm`,
    `--no-exif-transpose`, ...); `profile`: name the profile also when it is the unrecorded `pil`."""
    flags = ["--decode-as pil"] if profile and "decode_as" not in options else []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            flags.append(f"{flag} {','.join(map(str, value))}")
        else:
            flags.append(f"{flag} {value}")
    return flags


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
            return to_rgb(im, settings)
    except RowError:
        raise
    except UnidentifiedImageError:
        raise _unidentified(data, formats) from None
    except Image.DecompressionBombError as exc:
        raise RowError(ErrorKind.IMAGE_TOO_LARGE, str(exc)) from None
    except ValueError as exc:
        if "MAX_TEXT_" not in str(exc):  # Pillow's PNG text/ICC limits name themselves in the message
            raise RowError(ErrorKind.DECODE_ERROR, f"ValueError: {exc}") from None
        raise RowError(ErrorKind.IMAGE_TOO_LARGE, f"PNG text/ICC chunks inflate past the limit: {exc}") from None
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
        raise RowError(ErrorKind.IMAGE_TOO_LARGE, f"{width}x{height} has a side over max_side={settings.max_side}")
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


def to_rgb(im: Image.Image, settings: LoadSettings) -> Image.Image:
    """Orient and convert a loaded image to RGB as the decode profile's loader does (module docstring)."""
    profile = settings.decode_as
    exif = exif_transpose_of(settings)
    background = settings.alpha_background or PROFILE_DEFAULTS[profile][1]
    if profile == "pil":
        if exif:
            im = _exif_oriented(im)
        return _pil_rgb(im, settings.alpha_background)
    if exif:
        with contextlib.suppress(Exception):  # vllm.multimodal.image.normalize_image: a bad EXIF is ignored
            im = _exif_oriented(im)
    assert background is not None
    if profile == "vllm":
        return _vllm_rgb(im, background)
    return _hf_rgb(im, background)


_TURNED = frozenset(range(2, 9))  # EXIF orientations ImageOps.exif_transpose turns or flips


def _exif_oriented(im: Image.Image) -> Image.Image:
    """`ImageOps.exif_transpose(im)` (of a loaded image) without the copy it returns when nothing is to turn."""
    if im.getexif().get(ExifTags.Base.Orientation, 1) in _TURNED:
        return ImageOps.exif_transpose(im)
    return im


def _vllm_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """vLLM's `ImageMediaIO._convert_image_mode` to "RGB" (vllm/multimodal/media/image.py), with its
    `rgba_to_rgb` and `convert_image_mode` (vllm/multimodal/image.py), step by step."""
    if im.mode == "RGB":  # kept as is, a tRNS colour key included
        return im
    if im.mode != "RGBA" and not (im.mode in ("LA", "PA") or "transparency" in im.info):
        return im.convert("RGB")
    if im.mode != "RGBA":
        im = im.convert("RGBA")
    converted = Image.new("RGB", im.size, background)  # rgba_to_rgb
    converted.paste(im, mask=im.split()[3])
    return converted


def _hf_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """transformers' `convert_to_rgb` for a PIL image (transformers/image_transforms.py), step by step."""
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        im = im.convert("RGBA")
        canvas = Image.new("RGBA", im.size, (*background, 255))
        return Image.alpha_composite(canvas, im).convert("RGB")
    return im.convert("RGB")


def _pil_rgb(im: Image.Image, background: tuple[int, int, int] | None) -> Image.Image:
    """The `pil` profile: convert("RGB"), 16-bit scaled, alpha composited onto `background` if given."""
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
    return RowError(ErrorKind.UNSUPPORTED_FORMAT, f"not a {allowed} image (starts with {data[:8].hex(' ')})")


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
