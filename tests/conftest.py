"""Shared test fixtures: offline environment, a real local image server (tests/_http.py), Pillow-made images."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import pytest
from PIL import Image

from _http import LocalServer as ImageServer
from _http import serve

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def mmprep_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Builtin smoke-test models are created once per test session in a private MMPREP_HOME."""
    home = os.environ.get("MMPREP_TEST_HOME") or str(tmp_path_factory.mktemp("mmprep-home"))
    old = os.environ.get("MMPREP_HOME")
    os.environ["MMPREP_HOME"] = home
    yield home
    if old is None:
        os.environ.pop("MMPREP_HOME", None)
    else:
        os.environ["MMPREP_HOME"] = old


def image_bytes(mode: str = "RGB", size: tuple[int, int] = (48, 40), fmt: str = "PNG", seed: int = 0) -> bytes:
    """A deterministic, non-uniform Pillow image encoded as `fmt`."""
    base = Image.linear_gradient("L").resize(size).rotate(seed * 37 % 360)
    if mode == "RGB":
        img = Image.merge(
            "RGB",
            (base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT), base.point(lambda v: (v * 3 + seed * 11) % 256)),
        )
    elif mode == "RGBA":
        img = Image.merge("RGBA", (base, base, base.point(lambda v: 255 - v), base.point(lambda v: (v * 2) % 256)))
    else:
        img = base.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture()
def image_server() -> Iterator[ImageServer]:
    """A real HTTP server on 127.0.0.1 (tests/_http.py): `add(path, body, ...)` serves a file, `hits` counts requests."""
    with serve() as server:
        yield server
