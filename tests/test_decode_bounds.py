"""Image bytes cannot make decoding allocate past its bounds: PNG text/ICC bombs and animations.

Text chunks are Python objects (tracemalloc sees them); frames live in Pillow's and libwebp's own
buffers, so animations are measured as the growth of VmHWM in a fresh subprocess.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from mmprep.imaging.decode import PNG_TEXT_MEMORY, decode_image
from mmprep.errors import ErrorKind, RowError
from mmprep.settings import LoadSettings, MiB


def _png(**save: object) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(out, "PNG", **save)
    return out.getvalue()


def _traced_decode(data: bytes) -> tuple[RowError | Image.Image, int]:
    tracemalloc.start()
    try:
        try:
            result: RowError | Image.Image = decode_image(data, LoadSettings())
        except RowError as error:
            result = error
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_png_text_bomb_stops_at_the_text_budget() -> None:
    """64 zTXt chunks of 1 KB, each inflating to 1 MiB: Pillow alone would hold 64 MiB of text."""
    info = PngImagePlugin.PngInfo()
    for i in range(64):
        info.add_text(f"k{i}", "a" * (MiB - 1), zip=True)
    bomb = _png(pnginfo=info)
    assert len(bomb) < 80_000
    error, peak = _traced_decode(bomb)
    assert isinstance(error, RowError) and error.kind is ErrorKind.IMAGE_TOO_LARGE
    assert "text chunks" in error.message
    assert peak <= PNG_TEXT_MEMORY + 2 * PngImagePlugin.MAX_TEXT_CHUNK + MiB, peak


def test_png_icc_bomb_stops_at_one_chunk() -> None:
    bomb = _png(icc_profile=bytes(16 * MiB))
    error, peak = _traced_decode(bomb)
    assert isinstance(error, RowError) and error.kind is ErrorKind.IMAGE_TOO_LARGE
    assert "MAX_TEXT_CHUNK" in error.message and peak <= 2 * PngImagePlugin.MAX_TEXT_CHUNK + MiB, peak


def test_ordinary_png_text_still_decodes() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "x" * 100_000, zip=True)
    image, _ = _traced_decode(_png(pnginfo=info, icc_profile=bytes(4000)))
    assert isinstance(image, Image.Image) and image.getpixel((0, 0)) == (10, 20, 30)


_MEASURE = """
import json, sys
from pathlib import Path
from mmprep.imaging.decode import decode_image
from mmprep.settings import LoadSettings
def hwm():
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
data = Path(sys.argv[1]).read_bytes()
before = hwm()
image = decode_image(data, LoadSettings(formats=("GIF", "PNG", "WEBP")))
print(json.dumps({"growth": hwm() - before, "size": list(image.size)}))
"""

SIDE, FRAMES = 600, 24  # one RGBA frame is 1.4 MB; all of them 35 MB


def _growth(path: Path) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animations_decode_one_frame(tmp_path: Path, fmt: str) -> None:
    """An animation costs what its first frame alone costs: the other frames are never decoded."""
    frames = [Image.new("RGB", (SIDE, SIDE), (i * 10, 255 - i * 10, (i * 77) % 256)) for i in range(FRAMES)]
    options = {"lossless": True, "method": 0} if fmt == "WEBP" else {}
    animated, single = tmp_path / f"anim.{fmt.lower()}", tmp_path / f"one.{fmt.lower()}"
    frames[0].save(animated, fmt, save_all=True, append_images=frames[1:], duration=40, **options)
    frames[0].save(single, fmt, **options)
    with Image.open(animated) as check:
        assert check.n_frames == FRAMES
    many, one = _growth(animated), _growth(single)
    assert many["size"] == one["size"] == [SIDE, SIDE]
    frame = SIDE * SIDE * 4
    assert many["growth"] <= one["growth"] + 2 * MiB, (many, one)  # FRAMES frames would be 34 MB more
    assert many["growth"] <= 5 * frame + 4 * MiB, (
        many
    )  # docs/operations.md#limits-and-security: ~16-20 bytes a pixel of the first frame
