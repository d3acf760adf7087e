"""DECODE stage: real Pillow-encoded images and hand-crafted bytes -> RGB pixels or a specific error kind."""

from __future__ import annotations

import io
import struct
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st
from PIL import Image

from mmprep.imaging.decode import decode_image
from mmprep.errors import ErrorKind, RowError
from mmprep.settings import LoadSettings

from _image_corpus import (
    FOREIGN_HEADERS,
    PNG_SIGNATURE,
    animated,
    encode,
    exif_jpeg,
    from_values,
    noise,
    png_chunk,
    png_header_only,
    rgb_pixels,
)

DEFAULT = LoadSettings(decode_as="pil")  # these tests pin the `pil` profile; test_decode_profiles.py the others
WHITE_BG = replace(DEFAULT, alpha_background=(255, 255, 255))


def decode_error(data: bytes, settings: LoadSettings = DEFAULT) -> RowError:
    with pytest.raises(RowError) as info:
        decode_image(data, settings)
    return info.value


# --- modes -> RGB --------------------------------------------------------------------------------

PALETTE = [255, 0, 0, 0, 0, 255, 0, 255, 0]


def palette_image() -> Image.Image:
    im = from_values("P", [0, 1, 2])
    im.putpalette(PALETTE)
    return im


MODE_CASES: dict[str, tuple[Callable[[], bytes], LoadSettings, list[tuple[int, int, int]]]] = {
    "RGB png": (
        lambda: encode(from_values("RGB", [(1, 2, 3), (250, 128, 0)]), "PNG"),
        DEFAULT,
        [(1, 2, 3), (250, 128, 0)],
    ),
    "L png": (
        lambda: encode(from_values("L", [0, 77, 255]), "PNG"),
        DEFAULT,
        [(0, 0, 0), (77, 77, 77), (255, 255, 255)],
    ),
    "LA png, alpha dropped": (
        lambda: encode(from_values("LA", [(10, 0), (200, 128)]), "PNG"),
        DEFAULT,
        [(10, 10, 10), (200, 200, 200)],
    ),
    "1 png": (
        lambda: encode(from_values("1", [0, 1, 0]), "PNG"),
        DEFAULT,
        [(0, 0, 0), (255, 255, 255), (0, 0, 0)],
    ),
    "P png": (lambda: encode(palette_image(), "PNG"), DEFAULT, [(255, 0, 0), (0, 0, 255), (0, 255, 0)]),
    "P png, transparent index, no background": (
        lambda: encode(palette_image(), "PNG", transparency=1),
        DEFAULT,
        [(255, 0, 0), (0, 0, 255), (0, 255, 0)],
    ),
    "P png, alpha palette, no background": (
        lambda: encode(palette_image(), "PNG", transparency=bytes([255, 0, 128])),
        DEFAULT,
        [(255, 0, 0), (0, 0, 255), (0, 255, 0)],
    ),
    "RGBA png, alpha dropped like convert('RGB')": (
        lambda: encode(from_values("RGBA", [(10, 20, 30, 0), (200, 100, 0, 128)]), "PNG"),
        DEFAULT,
        [(10, 20, 30), (200, 100, 0)],
    ),
    "I;16 png scaled by >> 8": (
        lambda: encode(from_values("I;16", [0, 0x00FF, 0x0100, 0x1234, 0x8000, 0xFFFF]), "PNG"),
        DEFAULT,
        [(0, 0, 0), (0, 0, 0), (1, 1, 1), (0x12, 0x12, 0x12), (0x80, 0x80, 0x80), (255, 255, 255)],
    ),
    "I tiff taken as 16-bit, clipped to 0..65535": (
        lambda: encode(from_values("I", [-5, 0x1234, 0xFFFF, 70000]), "TIFF"),
        replace(DEFAULT, formats=("TIFF",)),
        [(0, 0, 0), (0x12, 0x12, 0x12), (255, 255, 255), (255, 255, 255)],
    ),
    "F tiff as convert('RGB')": (
        lambda: encode(from_values("F", [-1.5, 100.0, 300.0]), "TIFF"),
        replace(DEFAULT, formats=("TIFF",)),
        [(0, 0, 0), (100, 100, 100), (255, 255, 255)],
    ),
    "RGB webp lossless": (
        lambda: encode(from_values("RGB", [(1, 2, 3), (250, 128, 0)]), "WEBP", lossless=True),
        DEFAULT,
        [(1, 2, 3), (250, 128, 0)],
    ),
    "RGBA webp lossless, alpha dropped": (
        lambda: encode(from_values("RGBA", [(10, 20, 30, 255), (200, 100, 0, 128)]), "WEBP", lossless=True, exact=True),
        DEFAULT,
        [(10, 20, 30), (200, 100, 0)],
    ),
}


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_every_mode_becomes_exact_rgb(case: str) -> None:
    build, settings, expected = MODE_CASES[case]
    data = build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow warning may leak into a batch run's output
        im = decode_image(data, settings)
    assert im.mode == "RGB"
    assert rgb_pixels(im) == expected


def test_sixteen_bit_png_is_really_sixteen_bit_before_decode() -> None:
    data = encode(from_values("I;16", [0x1234]), "PNG")
    assert data[24] == 16  # IHDR bit depth: the case above exercises real 16-bit data


def assert_close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> None:
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)), (actual, expected)


@pytest.mark.parametrize(
    ("colour", "expected"),
    [((0, 0, 0, 0), (255, 255, 255)), ((0, 255, 255, 0), (255, 0, 0)), ((0, 0, 0, 255), (0, 0, 0))],
)
def test_cmyk_jpeg_becomes_rgb(colour: tuple[int, int, int, int], expected: tuple[int, int, int]) -> None:
    data = encode(Image.new("CMYK", (16, 16), colour), "JPEG", quality=95)
    assert b"Adobe" in data[:32]  # Pillow writes Adobe (inverted) CMYK
    im = decode_image(data, DEFAULT)
    assert im.mode == "RGB"
    assert_close(im.getpixel((8, 8)), expected, tolerance=3)


def test_rgb_jpeg_within_tolerance() -> None:
    im = decode_image(encode(Image.new("RGB", (16, 16), (200, 40, 90)), "JPEG", quality=95), DEFAULT)
    assert_close(im.getpixel((8, 8)), (200, 40, 90), tolerance=3)


# --- alpha_background ----------------------------------------------------------------------------


def test_rgba_is_composited_onto_the_background() -> None:
    data = encode(from_values("RGBA", [(10, 20, 30, 0), (10, 20, 30, 255), (200, 100, 0, 128)]), "PNG")
    # round((fg * a + bg * (255 - a)) / 255) for a = 128 onto white: 227, 177, 127
    assert rgb_pixels(decode_image(data, WHITE_BG)) == [(255, 255, 255), (10, 20, 30), (227, 177, 127)]


def test_la_is_composited_onto_the_background() -> None:
    data = encode(from_values("LA", [(100, 128), (100, 0)]), "PNG")
    settings = replace(DEFAULT, alpha_background=(0, 0, 200))
    assert rgb_pixels(decode_image(data, settings)) == [(50, 50, 150), (0, 0, 200)]


def test_palette_transparency_is_composited_onto_the_background() -> None:
    settings = replace(DEFAULT, alpha_background=(9, 9, 9))
    by_index = decode_image(encode(palette_image(), "PNG", transparency=1), settings)
    assert rgb_pixels(by_index) == [(255, 0, 0), (9, 9, 9), (0, 255, 0)]
    by_alpha = decode_image(encode(palette_image(), "PNG", transparency=bytes([255, 0, 0])), settings)
    assert rgb_pixels(by_alpha) == [(255, 0, 0), (9, 9, 9), (9, 9, 9)]


def test_trns_colour_key_is_composited_onto_the_background() -> None:
    data = encode(from_values("RGB", [(1, 2, 3), (4, 5, 6)]), "PNG", transparency=(1, 2, 3))
    assert rgb_pixels(decode_image(data, WHITE_BG)) == [(255, 255, 255), (4, 5, 6)]
    assert rgb_pixels(decode_image(data, DEFAULT)) == [(1, 2, 3), (4, 5, 6)]


def test_background_leaves_opaque_images_alone() -> None:
    data = encode(from_values("RGB", [(1, 2, 3)]), "PNG")
    assert rgb_pixels(decode_image(data, WHITE_BG)) == [(1, 2, 3)]


# --- EXIF orientation ----------------------------------------------------------------------------


def left_red_right_blue() -> Image.Image:
    im = Image.new("RGB", (32, 16), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 16, 16))
    return im


def test_exif_orientation_is_ignored_by_the_pil_profile() -> None:
    im = decode_image(exif_jpeg(left_red_right_blue(), orientation=6), DEFAULT)
    assert im.size == (32, 16)
    assert_close(im.getpixel((4, 8)), (255, 0, 0), tolerance=8)


def test_exif_transpose_applies_orientation_6() -> None:
    settings = replace(DEFAULT, exif_transpose=True)
    im = decode_image(exif_jpeg(left_red_right_blue(), orientation=6), settings)
    assert im.size == (16, 32)  # rotated 90 degrees clockwise: the left half is now on top
    assert_close(im.getpixel((8, 4)), (255, 0, 0), tolerance=8)
    assert_close(im.getpixel((8, 28)), (0, 0, 255), tolerance=8)


# --- animation -----------------------------------------------------------------------------------

RED, GREEN = (255, 0, 0), (0, 255, 0)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_images_give_their_first_frame(fmt: str) -> None:
    settings = replace(DEFAULT, formats=(*DEFAULT.formats, "GIF"))
    im = decode_image(animated(fmt, [RED, GREEN]), settings)
    assert im.size == (8, 8)
    assert set(rgb_pixels(im)) == {RED}


def test_gif_is_unsupported_by_default() -> None:
    error = decode_error(animated("GIF", [RED, GREEN]))
    assert error.kind is ErrorKind.UNSUPPORTED_FORMAT
    assert "GIF" in error.message


def test_formats_are_case_insensitive_and_restrict() -> None:
    png = encode(from_values("RGB", [RED]), "PNG")
    assert rgb_pixels(decode_image(png, replace(DEFAULT, formats=("png",)))) == [RED]
    error = decode_error(encode(Image.new("RGB", (4, 4)), "JPEG"), replace(DEFAULT, formats=("PNG",)))
    assert (error.kind, error.message) == (ErrorKind.UNSUPPORTED_FORMAT, "JPEG image; allowed formats: PNG")


# --- broken data ---------------------------------------------------------------------------------


def test_empty_body_is_a_decode_error() -> None:
    error = decode_error(b"")
    assert (error.kind, error.message) == (ErrorKind.DECODE_ERROR, "empty body (0 bytes)")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_images_are_decode_errors(fmt: str, keep: float) -> None:
    data = encode(noise(), fmt)
    assert decode_error(data[: int(len(data) * keep)]).kind is ErrorKind.DECODE_ERROR


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_headers_are_decode_errors(fmt: str) -> None:
    error = decode_error(encode(noise(), fmt)[:20])
    assert error.kind is ErrorKind.DECODE_ERROR


def idat_offset(png: bytes) -> int:
    return png.index(b"IDAT") + 4


def test_flipped_byte_in_idat_is_a_decode_error() -> None:
    data = bytearray(encode(noise(), "PNG"))
    data[idat_offset(data) + 100] ^= 0xFF
    assert decode_error(bytes(data)).kind is ErrorKind.DECODE_ERROR


def test_bad_ihdr_crc_is_a_decode_error() -> None:
    data = bytearray(encode(noise(), "PNG"))
    data[16 + 4] ^= 0x01  # a width byte; IHDR's CRC no longer matches
    error = decode_error(bytes(data))
    assert (error.kind, error.message) == (ErrorKind.DECODE_ERROR, "corrupt or truncated PNG header")


def test_bad_idat_crc_with_intact_data_decodes_like_pillow() -> None:
    original = encode(noise(), "PNG")
    start = idat_offset(original)
    (length,) = struct.unpack(">I", original[start - 8 : start - 4])
    data = bytearray(original)
    data[start + length] ^= 0x01  # only the CRC; the deflate stream (with its own checksum) is intact
    assert rgb_pixels(decode_image(bytes(data), DEFAULT)) == rgb_pixels(noise())


def test_zero_width_png_is_a_decode_error() -> None:
    assert decode_error(png_header_only(0, 10)).kind is ErrorKind.DECODE_ERROR


def test_unexpected_pillow_errors_become_decode_errors_naming_the_exception() -> None:
    import zlib

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    short_actl = png_chunk(b"acTL", b"\x00\x00\x00\x01")  # an APNG header 4 bytes short: Pillow raises ValueError
    data = PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + short_actl + png_chunk(b"IDAT", zlib.compress(b"\0\0"))
    error = decode_error(data + png_chunk(b"IEND", b""))
    assert error.kind is ErrorKind.DECODE_ERROR
    assert error.message == "ValueError: APNG contains truncated acTL chunk"


def test_png_text_bomb_is_image_too_large() -> None:
    import zlib

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    text_bomb = png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"a" * 3_000_000))
    error = decode_error(PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + text_bomb + png_chunk(b"IEND", b""))
    assert error.kind is ErrorKind.IMAGE_TOO_LARGE
    assert error.message.startswith("PNG text/ICC chunks inflate past the limit: Decompressed data too large")


# --- format sniffing -----------------------------------------------------------------------------


def test_unknown_binary_is_unsupported_format() -> None:
    error = decode_error(b"\x00\x01\x02\x03garbage\xff\xfe")
    assert error.kind is ErrorKind.UNSUPPORTED_FORMAT
    assert error.message == "not a JPEG/PNG/WEBP image (starts with 00 01 02 03 67 61 72 62)"


FOREIGN_IMAGES: dict[str, Callable[[], bytes]] = {
    "GIF": lambda: encode(Image.new("RGB", (4, 4)), "GIF"),
    "BMP": lambda: encode(Image.new("RGB", (4, 4)), "BMP"),
    "TIFF": lambda: encode(Image.new("RGB", (4, 4)), "TIFF"),
    "ICO": lambda: encode(Image.new("RGB", (16, 16)), "ICO"),
    "JPEG2000": lambda: encode(Image.new("RGB", (4, 4)), "JPEG2000"),
    **{name: (lambda header=header: header) for name, header in FOREIGN_HEADERS.items()},
    "SVG with XML prolog": lambda: b'<?xml version="1.0"?>\n' + FOREIGN_HEADERS["SVG"],
}


@pytest.fixture()
def tripwired_plugins(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace every non-whitelisted Pillow opener with one that records that it ran."""
    ran: list[str] = []
    for name, (_factory, accept) in list(Image.OPEN.items()):
        if name not in DEFAULT.formats:

            def tripwire(fp: object, filename: object, name: str = name) -> Image.Image:
                ran.append(name)
                raise AssertionError(f"{name} parser ran on untrusted bytes")

            monkeypatch.setitem(Image.OPEN, name, (tripwire, accept))
    return ran


@pytest.mark.parametrize("case", list(FOREIGN_IMAGES))
def test_foreign_formats_are_named_without_running_their_parser(case: str, tripwired_plugins: list[str]) -> None:
    error = decode_error(FOREIGN_IMAGES[case]())
    assert error.kind is ErrorKind.UNSUPPORTED_FORMAT
    assert error.message == f"{case.split()[0]} image; allowed formats: JPEG/PNG/WEBP"
    assert tripwired_plugins == []


@pytest.mark.parametrize(
    ("body", "looks_like"),
    [
        (b"<!DOCTYPE html>\n<html><body><svg></svg>Not Found</body></html>", "HTML/XML"),
        (b"\xef\xbb\xbf  <html><head><title>403</title></head></html>", "HTML/XML"),
        (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code></Error>', "HTML/XML"),
        (b'{"error": "rate limited", "retry_after": 3}', "JSON"),
        (b'\n[{"url": "https://example.com/a.png"}]', "JSON"),
        ("Zugriff verweigert: Bild nicht gefunden. Grüße".encode(), "text"),
    ],
)
def test_text_bodies_are_not_images(body: bytes, looks_like: str) -> None:
    error = decode_error(body)
    assert (error.kind, error.message) == (ErrorKind.NOT_AN_IMAGE, f"body looks like {looks_like}, not an image")


# --- size limits ---------------------------------------------------------------------------------


def test_decompression_bomb_header_is_refused_quickly() -> None:
    start = time.perf_counter()
    for settings in (DEFAULT, replace(DEFAULT, max_pixels=10**12)):
        assert decode_error(png_header_only(100_000, 100_000), settings).kind is ErrorKind.IMAGE_TOO_LARGE
    assert time.perf_counter() - start < 10.0  # from the header: decoding 10^10 pixels would take minutes


def test_pillow_bomb_warning_zone_is_refused_even_over_max_pixels() -> None:
    width, height = 10_000, 9_000  # over Pillow's MAX_IMAGE_PIXELS, under twice that (only a warning)
    assert width * height > Image.MAX_IMAGE_PIXELS  # type: ignore[operator]
    with pytest.warns(Image.DecompressionBombWarning):
        error = decode_error(png_header_only(width, height), replace(DEFAULT, max_pixels=10**12))
    assert error.kind is ErrorKind.IMAGE_TOO_LARGE
    assert "10000x9000" in error.message


def test_max_pixels_is_checked_from_the_header_before_decoding() -> None:
    # The header claims 5000x5000 but carries no real pixel data: a decode would be a decode_error.
    error = decode_error(png_header_only(5000, 5000), replace(DEFAULT, max_pixels=1000))
    assert error.kind is ErrorKind.IMAGE_TOO_LARGE
    assert error.message == "5000x5000 is 25000000 pixels, over max_pixels=1000"


def test_max_pixels_boundary() -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    assert decode_image(data, replace(DEFAULT, max_pixels=10_000)).size == (100, 100)
    assert decode_error(data, replace(DEFAULT, max_pixels=9_999)).kind is ErrorKind.IMAGE_TOO_LARGE


def test_max_side_boundary() -> None:
    data = encode(Image.new("RGB", (100, 10)), "PNG")
    assert decode_image(data, replace(DEFAULT, max_side=100)).size == (100, 10)
    error = decode_error(data, replace(DEFAULT, max_side=99))
    assert (error.kind, error.message) == (ErrorKind.IMAGE_TOO_LARGE, "100x10 has a side over max_side=99")


@pytest.mark.parametrize("size", [(1, 1), (10_000, 1), (1, 10_000)])
def test_tiny_and_extreme_aspect_images_decode(size: tuple[int, int]) -> None:
    im = decode_image(encode(Image.new("RGB", size, (7, 8, 9)), "PNG"), DEFAULT)
    assert im.size == size
    assert im.getpixel((size[0] - 1, size[1] - 1)) == (7, 8, 9)


# --- robustness ----------------------------------------------------------------------------------


def test_result_is_a_detached_loaded_image() -> None:
    im = decode_image(encode(noise((8, 8)), "PNG"), DEFAULT)
    assert type(im) is Image.Image  # not a lazy, file-backed ImageFile
    assert rgb_pixels(im) == rgb_pixels(noise((8, 8)))


@hyp_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_row_errors(data: bytes) -> None:
    try:
        decode_image(data, DEFAULT)
    except RowError:
        pass


BYTE_LEVEL_KINDS = {
    ErrorKind.DECODE_ERROR,
    ErrorKind.UNSUPPORTED_FORMAT,
    ErrorKind.IMAGE_TOO_LARGE,
    ErrorKind.NOT_AN_IMAGE,
}
SEEDS = {fmt: encode(noise((16, 16)), fmt) for fmt in ("PNG", "JPEG", "WEBP", "GIF")}
ALL_FORMATS = replace(DEFAULT, formats=("JPEG", "PNG", "WEBP", "GIF"))


@hyp_settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(SEEDS)),
    st.integers(min_value=0, max_value=10_000),
    st.integers(min_value=0, max_value=255),
    st.integers(min_value=1, max_value=10_000),
)
def test_corrupted_real_images_only_raise_row_errors(fmt: str, position: int, xor: int, keep: int) -> None:
    data = bytearray(SEEDS[fmt])
    data[position % len(data)] ^= xor
    try:
        im = decode_image(bytes(data[:keep]), ALL_FORMATS)
    except RowError as error:
        assert error.kind in BYTE_LEVEL_KINDS
    else:
        assert im.mode == "RGB"


def test_concurrent_decodes_match_sequential_ones() -> None:
    images = [noise((24, 16), seed) for seed in range(200)]
    for im in images[::2]:
        im.putalpha(Image.linear_gradient("L").resize(im.size))  # half of them composite
    corpus = [encode(im, ("PNG", "WEBP")[i % 2]) for i, im in enumerate(images)]
    corpus[::5] = [encode(im.convert("RGB"), "JPEG") for im in images[::5]]
    settings = replace(DEFAULT, alpha_background=(1, 2, 3))
    expected = [decode_image(data, settings).tobytes() for data in corpus]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda data: decode_image(data, settings).tobytes(), corpus))
    assert results == expected


# ---------------------------------------------------------------- --fast-decode (JPEG draft mode)

FAST = replace(DEFAULT, fast_decode=True, draft_size=(64, 48))


def _large_jpeg() -> tuple[bytes, Image.Image]:
    """A 640x480 JPEG (10x the 64x48 target per side) and its exact full decode."""
    data = encode(noise((640, 480), seed=7), "JPEG", quality=85)
    with Image.open(io.BytesIO(data)) as im:
        return data, im.convert("RGB")


def test_fast_decode_scales_a_large_jpeg_in_the_dct_domain() -> None:
    data, full = _large_jpeg()
    image = decode_image(data, FAST)
    assert image.mode == "RGB"
    assert image.size == (160, 120)  # 1/4: the smallest scale keeping both sides >= 2 x (64, 48)
    assert image.size < full.size


def test_fast_decode_never_goes_below_twice_the_target() -> None:
    data, full = _large_jpeg()
    for target in [(100, 100), (224, 224), (300, 200), (320, 240), (640, 480)]:
        image = decode_image(data, replace(FAST, draft_size=target))
        assert image.width >= min(full.width, 2 * target[0]) and image.height >= min(full.height, 2 * target[1])


def test_default_decode_stays_exact_even_with_a_draft_size() -> None:
    data, full = _large_jpeg()
    image = decode_image(data, replace(DEFAULT, draft_size=(64, 48)))  # fast_decode off: draft_size unused
    assert image.size == full.size and image.tobytes() == full.tobytes()


def test_fast_decode_leaves_small_jpegs_and_other_formats_exact() -> None:
    small = encode(noise((100, 80)), "JPEG", quality=90)
    with Image.open(io.BytesIO(small)) as im:
        assert decode_image(small, FAST).tobytes() == im.convert("RGB").tobytes()
    png = noise((640, 480))
    assert decode_image(encode(png, "PNG"), FAST).tobytes() == png.tobytes()


def test_fast_decode_checks_limits_on_the_full_size() -> None:
    data, _ = _large_jpeg()
    assert decode_error(data, replace(FAST, max_side=600)).kind is ErrorKind.IMAGE_TOO_LARGE
