"""The native resampler (mmprep.imaging._resample) gives Pillow's resize + crop bit for bit, or is not used."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from mmprep.imaging import resample
from mmprep.imaging.resample import MIRRORED_FILTERS, agrees_with_pillow, native_enabled, resized_window

pytestmark = pytest.mark.skipif(
    not resample.native_built(),
    reason="mmprep.imaging._resample is not built (`pip install -e .` with a C compiler builds it; CI does)",
)
_native = resample._resample
FILTERS = sorted(MIRRORED_FILTERS)
FILTER_NAMES = {int(f): f.name for f in Image.Resampling}


def pillow(pixels: np.ndarray, size: tuple[int, int], resample_filter: int, window=None) -> np.ndarray:
    out = np.asarray(Image.fromarray(pixels).resize(size, resample_filter, reducing_gap=None))
    if window is None:
        return out
    left, top, right, bottom = window
    return out[top:bottom, left:right]


def both_entry_points(pixels: np.ndarray, size, resample_filter: int, window=None) -> tuple[np.ndarray, np.ndarray]:
    """The buffer entry point and the in-place (Arrow) one, on the same pixels."""
    image = Image.fromarray(pixels)
    return (
        _native.resize(pixels, size, resample_filter, window),
        _native.resize_arrow(*image.__arrow_c_array__(), image.size, size, resample_filter, window),
    )


def assert_same(pixels: np.ndarray, size, resample_filter: int, window=None) -> None:
    expected = pillow(pixels, size, resample_filter, window)
    for got in both_entry_points(pixels, size, resample_filter, window):
        assert got.dtype == np.uint8 and got.shape == expected.shape, (got.shape, expected.shape)
        diff = np.argwhere(got != expected)
        assert diff.size == 0, (
            f"{pixels.shape[1]}x{pixels.shape[0]} -> {size} {FILTER_NAMES[resample_filter]} window {window}: "
            f"{len(diff)} values differ, first at {diff[0].tolist()}"
        )


def photo(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Gradients plus noise: flat areas and sharp edges, so negative filter lobes clip at 0 and 255."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width, 1), y * 255 / max(height, 1), ((x // 3 + y // 5) % 2) * 255], axis=-1)
    return np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("resample_filter", FILTERS, ids=lambda f: FILTER_NAMES[f])
def test_bit_identical_over_random_sizes_and_windows(resample_filter: int) -> None:
    """80 random sources, targets and windows per filter: up, down, one side kept, every aspect ratio."""
    rng = np.random.default_rng(resample_filter)
    for case in range(80):
        width, height = (int(v) for v in rng.integers(1, 130, 2))
        out_w, out_h = (int(v) for v in rng.integers(1, 160, 2))
        if case % 7 == 0:
            out_w = width  # horizontal pass skipped
        if case % 11 == 0:
            out_h = height  # vertical pass skipped
        if case % 4 == 0:
            window = None
        else:
            left, top = int(rng.integers(0, out_w)), int(rng.integers(0, out_h))
            window = (left, top, int(rng.integers(left + 1, out_w + 1)), int(rng.integers(top + 1, out_h + 1)))
        pixels = photo(width, height, rng) if case % 2 else rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        assert_same(pixels, (out_w, out_h), resample_filter, window)


SHAPES = [
    ((1, 1), (7, 5)),  # one pixel, upscaled
    ((1, 40), (3, 9)),  # one pixel wide
    ((40, 1), (9, 3)),  # one pixel tall
    ((1, 300), (1, 17)),  # a column, only vertical
    ((300, 1), (17, 1)),
    ((2000, 3), (1, 2)),  # huge horizontal support
    ((3, 2000), (2, 1)),
    ((5, 4), (600, 500)),  # large upscale
    ((3, 400), (2, 50)),  # taller than 100x its width
    ((40, 100), (38, 95)),  # height shrinks by 5 > 2 x 2: vertical pass first
    ((40, 100), (38, 96)),  # by exactly 2 x 2: horizontal first
    ((40, 100), (38, 97)),
    ((60, 50), (90, 20)),  # width grows, height shrinks: vertical first
    ((640, 480), (298, 224)),  # CLIP's shortest edge 224
    ((480, 640), (224, 298)),
]


@pytest.mark.parametrize(("source", "size"), SHAPES, ids=[f"{s[0]}x{s[1]}->{t[0]}x{t[1]}" for s, t in SHAPES])
def test_bit_identical_on_edge_shapes(source, size) -> None:
    """Thin strips, extreme scale factors and both pass orders, whole and with a center window, every filter."""
    rng = np.random.default_rng(sum(source) + sum(size))
    pixels = photo(*source, rng)
    out_w, out_h = size
    center = (out_w // 4, out_h // 4, out_w - out_w // 4, out_h - out_h // 4)
    for resample_filter in FILTERS:
        assert_same(pixels, size, resample_filter)
        if center[0] < center[2] and center[1] < center[3]:
            assert_same(pixels, size, resample_filter, center)


def test_the_comparison_can_fail() -> None:
    """A neighbouring filter, a window one pixel off, or one value off by one is caught."""
    rng = np.random.default_rng(5)
    pixels = photo(97, 61, rng)
    bicubic = _native.resize(pixels, (40, 30), Image.Resampling.BICUBIC, (4, 3, 36, 27))
    with pytest.raises(AssertionError):
        np.testing.assert_array_equal(bicubic, pillow(pixels, (40, 30), Image.Resampling.LANCZOS, (4, 3, 36, 27)))
    with pytest.raises(AssertionError):
        np.testing.assert_array_equal(bicubic, pillow(pixels, (40, 30), Image.Resampling.BICUBIC, (5, 3, 37, 27)))
    off_by_one = bicubic.copy()
    off_by_one[7, 9, 1] ^= 1
    with pytest.raises(AssertionError):
        np.testing.assert_array_equal(off_by_one, pillow(pixels, (40, 30), Image.Resampling.BICUBIC, (4, 3, 36, 27)))


def test_self_check_refuses_a_resampler_that_differs_by_one_value() -> None:
    """The run-time guard: a native result with a single value off by one (a coefficient rounded the other way)."""
    assert agrees_with_pillow(int(Image.Resampling.BICUBIC))

    def off_by_one(image, size, resample_filter, window):
        out = resample._native(image, size, resample_filter, window).copy()
        out[-1, -1, 0] = out[-1, -1, 0] ^ 1
        return out

    assert not agrees_with_pillow(int(Image.Resampling.BICUBIC), native=off_by_one)


def test_resized_window_uses_pillow_when_switched_off_or_not_mirrored(monkeypatch) -> None:
    """MMPREP_NATIVE_RESAMPLE=0, NEAREST and non-RGB modes take Pillow's resize; the pixels are the same."""
    rng = np.random.default_rng(2)
    image = Image.fromarray(photo(90, 70, rng))
    window = (3, 2, 40, 30)
    expected = pillow(np.asarray(image), (45, 33), Image.Resampling.BICUBIC, window)
    assert native_enabled(Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(resized_window(image, (45, 33), Image.Resampling.BICUBIC, window), expected)
    monkeypatch.setenv("MMPREP_NATIVE_RESAMPLE", "0")
    assert not native_enabled(Image.Resampling.BICUBIC)
    monkeypatch.setattr(
        resample, "_native", lambda *args: pytest.fail("the native resampler ran although switched off")
    )
    np.testing.assert_array_equal(resized_window(image, (45, 33), Image.Resampling.BICUBIC, window), expected)
    monkeypatch.delenv("MMPREP_NATIVE_RESAMPLE")
    assert not native_enabled(Image.Resampling.NEAREST)
    nearest = resized_window(image, (45, 33), Image.Resampling.NEAREST, window)
    np.testing.assert_array_equal(nearest, pillow(np.asarray(image), (45, 33), Image.Resampling.NEAREST, window))
    grey = image.convert("L")
    np.testing.assert_array_equal(
        resized_window(grey, (45, 33), Image.Resampling.BICUBIC, window),
        np.asarray(grey.resize((45, 33), Image.Resampling.BICUBIC, reducing_gap=None))[2:30, 3:40],
    )


def test_large_image_without_a_single_block_export() -> None:
    """An image Pillow stores in several blocks (no Arrow export) is read through np.asarray, same pixels."""
    image = Image.new("RGB", (3000, 3000), (10, 200, 30))
    image.paste((250, 5, 90), (1000, 1200, 2100, 2300))
    with pytest.raises(ValueError):
        image.__arrow_c_array__()
    got = resized_window(image, (224, 224), Image.Resampling.BICUBIC, (50, 60, 150, 170))
    expected = np.asarray(image.resize((224, 224), Image.Resampling.BICUBIC, reducing_gap=None))[60:170, 50:150]
    np.testing.assert_array_equal(got, expected)


def test_concurrent_calls_agree() -> None:
    """Calls from several threads at once (the GIL is released during the work) each give Pillow's pixels."""
    rng = np.random.default_rng(3)
    sources = [photo(int(w), int(h), rng) for w, h in rng.integers(50, 400, (8, 2))]
    expected = [pillow(p, (61, 47), Image.Resampling.LANCZOS, (5, 4, 56, 40)) for p in sources]
    failures: list[str] = []

    def work(index: int) -> None:
        for _ in range(20):
            got = _native.resize(sources[index], (61, 47), Image.Resampling.LANCZOS, (5, 4, 56, 40))
            if not np.array_equal(got, expected[index]):
                failures.append(f"source {index}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(sources))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


GOOD = np.zeros((4, 5, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((GOOD.astype(np.float32), (2, 2), 3), TypeError, "uint8"),
        (([[1, 2, 3]], (2, 2), 3), TypeError, "pixels must be a uint8 array"),
        ((np.zeros((4, 5), np.uint8), (2, 2), 3), ValueError, "shape (height, width, 3)"),
        ((np.zeros((4, 5, 4), np.uint8), (2, 2), 3), ValueError, "shape (height, width, 3)"),
        ((np.zeros((4, 10, 3), np.uint8)[:, ::2], (2, 2), 3), ValueError, "C-contiguous"),
        ((np.zeros((0, 5, 3), np.uint8), (2, 2), 3), ValueError, "image size"),
        ((GOOD, (0, 2), 3), ValueError, "size (0, 2)"),
        ((GOOD, (2, -1), 3), ValueError, "size (2, -1)"),
        ((GOOD, (2, 2, 2), 3), ValueError, "size must have 2 items"),
        ((GOOD, "22", 3), TypeError, "size must be a tuple"),
        ((GOOD, (2.5, 2), 3), TypeError, "size must be integers"),
        ((GOOD, (2, 2), 0), ValueError, "resample 0 is not mirrored"),
        ((GOOD, (2, 2), 6), ValueError, "resample 6 is not mirrored"),
        ((GOOD, (2, 2), "bicubic"), TypeError, "resample must be integers"),
        ((GOOD, (2, 2), 3, (0, 0, 3, 2)), ValueError, "window (0, 0, 3, 2)"),
        ((GOOD, (2, 2), 3, (1, 0, 1, 2)), ValueError, "non-empty"),
        ((GOOD, (2, 2), 3, (0, 0, 2)), ValueError, "window must have 4 items"),
        ((GOOD, (2, 2), 3, "all"), TypeError, "window must be a tuple"),
        ((GOOD, (2, 2**70), 3), ValueError, "size is out of range"),
        ((GOOD, (2, 2**40), 3), ValueError, "is outside 1..16777216"),
    ],
)
def test_bad_arguments_raise_specific_errors(args, error, message) -> None:
    """Every bad argument is a TypeError or ValueError naming what is wrong; nothing crashes."""
    with pytest.raises(error) as raised:
        _native.resize(*args)
    assert message in str(raised.value)


def test_bad_arrow_arguments_raise_specific_errors() -> None:
    """resize_arrow checks the capsules and that the export is one block of RGB pixels of the given size."""
    image = Image.new("RGB", (5, 4))
    with pytest.raises(TypeError, match="capsules"):
        _native.resize_arrow(object(), object(), (5, 4), (2, 2), 3)
    with pytest.raises(ValueError, match="not one contiguous block of 6x4 RGB pixels"):
        _native.resize_arrow(*image.__arrow_c_array__(), (6, 4), (2, 2), 3)
    grey = Image.new("RGBA", (5, 4))
    with pytest.raises(ValueError, match="RGB pixels"):
        _native.resize_arrow(*grey.__arrow_c_array__(), (5, 4), (2, 2), 3)
    with pytest.raises(ValueError, match="image_size"):
        _native.resize_arrow(*image.__arrow_c_array__(), (0, 4), (2, 2), 3)


def test_value_planes_copies_the_table_entries_native_and_numpy_alike(monkeypatch) -> None:
    """planes(): out[c, y, x] == table[c, pixels[y, x, c]] exactly, for views too; the numpy path agrees."""
    rng = np.random.default_rng(7)
    table = rng.standard_normal((3, 256)).astype(np.float32)
    for shape in [(224, 224, 3), (1, 1, 3), (0, 4, 3), (37, 5, 3)]:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        expected = (
            np.stack([table[c][pixels[..., c]] for c in range(3)]) if shape[0] else np.empty((3, 0, 4), np.float32)
        )
        got = _native.planes(pixels, table)
        assert got.dtype == np.float32 and got.shape == (3, shape[0], shape[1])
        assert np.array_equal(got, expected)
    view = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)[3:17, 5:25]  # a crop: not contiguous
    expected = np.stack([table[c][view[..., c]] for c in range(3)])
    assert np.array_equal(resample.value_planes(view, table), expected)
    assert not np.array_equal(resample.value_planes(view, table[::-1].copy()), expected)  # channels swapped: caught
    monkeypatch.setenv(resample.NATIVE_SWITCH, "0")
    assert np.array_equal(resample.value_planes(view, table), expected)


@pytest.mark.parametrize(
    ("pixels", "table", "error", "message"),
    [
        (GOOD.astype(np.int16), np.zeros((3, 256), np.float32), TypeError, "pixels must be uint8"),
        ("rgb", np.zeros((3, 256), np.float32), TypeError, "pixels must be a uint8 array"),
        (np.zeros((4, 5), np.uint8), np.zeros((3, 256), np.float32), ValueError, "shape (height, width, 3)"),
        (np.zeros((4, 10, 3), np.uint8)[:, ::2], np.zeros((3, 256), np.float32), ValueError, "C-contiguous"),
        (GOOD, np.zeros((3, 256), np.float64), TypeError, "table must be float32"),
        (GOOD, np.zeros((3, 255), np.float32), ValueError, "shape (3, 256)"),
        (GOOD, [[0.0] * 256] * 3, TypeError, "table must be a float32 array"),
    ],
)
def test_value_planes_bad_arguments(pixels, table, error, message) -> None:
    with pytest.raises(error) as raised:
        _native.planes(pixels, table)
    assert message in str(raised.value)


@pytest.mark.parametrize("source, size", [((640, 480), (224, 224)), ((97, 61), (224, 224)), ((300, 40), (32, 96))])
def test_check_size_step_is_pillows_default_resize(source: tuple[int, int], size: tuple[int, int]) -> None:
    """`check --size WxH` resizes with resize_to: `image.resize((W, H))` as Pillow computes it, natively."""
    image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (source[1], source[0], 3), dtype=np.uint8))
    assert native_enabled(Image.Resampling.BICUBIC)  # the native resampler is what runs here
    got = resample.resize_to(size)(image)
    assert got.shape == (size[1], size[0], 3)
    assert np.array_equal(got, np.asarray(image.resize(size)))
