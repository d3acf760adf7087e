"""Resize then crop, as one step: Pillow's pixels, computed only for the window a processor keeps.

`resized_window(image, size, resample, window)` is `np.asarray(image.resize(size, resample,
reducing_gap=None))` cropped to `window`. When the C extension `mmprep.imaging._resample` is built it
computes that window directly: the same integer coefficients, passes and rounding as Pillow's
Resample.c (13.0.0), vectorized, reading the image's pixels in place through Pillow's Arrow export,
and skipping the rows and columns a center crop throws away. It is used for a filter only after it
reproduced Pillow bit for bit on probe images in this process (a guard against another Pillow
release or platform computing differently); otherwise, without the extension, for NEAREST, for other
modes, or with `MMPREP_NATIVE_RESAMPLE=0`, the result comes from Pillow itself. Either way the pixels
are the same, which is why the choice is not part of any fingerprint.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import numpy as np
from PIL import Image

try:
    from mmprep.imaging import _resample  # type: ignore[attr-defined]  # a C extension, built optionally: no stub
except ImportError:  # built without a compiler (the extension is optional): Pillow does the work
    _resample = None

NATIVE_SWITCH = "MMPREP_NATIVE_RESAMPLE"  # "0": always Pillow
MIRRORED_FILTERS = frozenset(
    int(f)
    for f in (
        Image.Resampling.BOX,
        Image.Resampling.BILINEAR,
        Image.Resampling.HAMMING,
        Image.Resampling.BICUBIC,
        Image.Resampling.LANCZOS,
    )
)
Window = tuple[int, int, int, int]  # (left, top, right, bottom), as Image.crop takes it

_verified: dict[int, bool] = {}
_verify_lock = threading.Lock()


def resized_window(
    image: Image.Image, size: tuple[int, int], resample: int, window: Window | None = None
) -> np.ndarray:
    """`np.asarray(image.resize(size, resample, reducing_gap=None))[top:bottom, left:right]`, bit for bit."""
    if image.mode == "RGB" and native_enabled(resample) and max(*image.size, *size) <= _resample.MAX_SIDE:
        return _native(image, size, int(resample), window)
    return _pillow(image, size, resample, window)


def resize_to(size: tuple[int, int]) -> Callable[[Image.Image], np.ndarray]:
    """`check --size`'s step: Pillow's `image.resize(size)` (bicubic), as pixels, by the native resampler where exact."""

    def resize(image: Image.Image) -> np.ndarray:
        return resized_window(image, size, Image.Resampling.BICUBIC)

    return resize


def native_enabled(resample: int) -> bool:
    """True when the native resampler computes `resample` here: built, not switched off, equal to Pillow on probes."""
    if _resample is None or os.environ.get(NATIVE_SWITCH, "1").strip() == "0":
        return False
    resample = int(resample)
    if resample not in MIRRORED_FILTERS:
        return False
    verified = _verified.get(resample)
    if verified is None:
        with _verify_lock:
            verified = _verified.get(resample)
            if verified is None:
                verified = _verified[resample] = agrees_with_pillow(resample)
    return verified


def value_planes(pixels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """`out[c] = table[c][pixels[..., c]]`: HWC uint8 through a (3, 256) float32 table into CHW float32.

    In C without the GIL when the extension is built (a copy of table entries: the same floats);
    else numpy's indexing, on contiguous planes (~3x faster than on the interleaved channels)."""
    if _resample is not None and os.environ.get(NATIVE_SWITCH, "1").strip() != "0":
        return _resample.planes(np.ascontiguousarray(pixels), table)
    planes = np.ascontiguousarray(pixels.transpose(2, 0, 1))
    out = np.empty(planes.shape, dtype=np.float32)
    for channel in range(3):
        out[channel] = table[channel][planes[channel]]
    return out


def native_built() -> bool:
    """True when the C extension was built and imports."""
    return _resample is not None


def _pillow(image: Image.Image, size: tuple[int, int], resample: int, window: Window | None) -> np.ndarray:
    pixels = np.asarray(image.resize(tuple(size), resample=resample, reducing_gap=None))
    if window is None:
        return pixels
    left, top, right, bottom = window
    return pixels[top:bottom, left:right]


def _native(image: Image.Image, size: tuple[int, int], resample: int, window: Window | None) -> np.ndarray:
    """The window from the C extension, reading Pillow's own pixel memory when it can be exported in one block."""
    try:
        schema, array = image.__arrow_c_array__()
    except (AttributeError, NotImplementedError, ValueError):  # an older Pillow, or an image in several blocks
        return _resample.resize(np.asarray(image), size, resample, window)
    return _resample.resize_arrow(schema, array, image.size, size, resample, window)


# (source width, height), (resized width, height), window: a downscale with a crop (horizontal pass
# first), an upscale, 1-pixel sides, a height shrinking more than twice the width (vertical first), one
# side unchanged (one pass), and a strip taller than 100x its width.
_PROBES: tuple[tuple[tuple[int, int], tuple[int, int], Window | None], ...] = (
    ((67, 45), (32, 21), (5, 2, 27, 19)),
    ((13, 9), (40, 31), None),
    ((1, 7), (5, 3), None),
    ((31, 1), (4, 6), (1, 1, 4, 5)),
    ((20, 90), (18, 30), (2, 3, 16, 30)),
    ((45, 67), (45, 20), None),
    ((45, 67), (20, 67), (3, 10, 20, 60)),
    ((3, 400), (2, 50), None),
)


def agrees_with_pillow(
    resample: int, native: Callable[[Image.Image, tuple[int, int], int, Window | None], np.ndarray] | None = None
) -> bool:
    """The self-check: the native window equals Pillow's resize + crop on every probe, through both entry points."""
    native = native or _native
    rng = np.random.default_rng(resample)
    try:
        for source, size, window in _PROBES:
            pixels = rng.integers(0, 256, (source[1], source[0], 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            expected = _pillow(image, size, resample, window)
            got_arrow = native(image, size, resample, window)
            got_buffer = _resample.resize(pixels, size, resample, window)
            if not (np.array_equal(got_arrow, expected) and np.array_equal(got_buffer, expected)):
                return False
    except Exception:  # noqa: BLE001 (any failure means: keep Pillow)
        return False
    return True
