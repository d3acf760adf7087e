"""vLLM's identifier for an image, computed from the original bytes: what `--key vllm` names store entries by.

A re-implementation of `MultiModalHasher.hash_kwargs(model_id=..., image=...)` (vllm/multimodal/hasher.py)
for an image that vLLM loaded from bytes (`ImageMediaIO.load_bytes` -> `MediaWithBytes`): the digest
of a framed stream (every chunk preceded by its 8-byte little-endian length, every value by a one-byte
tag) of the sorted keyword arguments. Checked against vLLM 0.32's own hasher (tests/interop).

It holds when the request carries no uuid, no `mm_processor_kwargs` and no `media_io_kwargs`, and the
server runs with the default `--mm-hasher-algorithm blake3` (or the one given here).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from typing import Any

_TAG_NONE, _TAG_SEQUENCE, _TAG_MAPPING, _TAG_LEAF = b"\x00", b"\x01", b"\x02", b"\x03"
ALGORITHMS = ("blake3", "sha256", "sha512")
RGBA_BACKGROUND = (255, 255, 255)  # vLLM's default rgba_background_color


def vllm_image_identifier(data: bytes, model_id: str, *, mode: str | None = None, algorithm: str = "blake3") -> str:
    """The identifier vLLM gives an image part whose encoded bytes are `data`, on a server started with
    `--model model_id`. `mode`: the image's PIL mode (read from `data` when None); vLLM converts every
    mode but RGB and then hashes its conversion settings with the bytes."""
    if mode is None:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            mode = image.mode
    image: Any = data
    if mode != "RGB":  # ImageMediaIO.load_bytes: io_config when the converted image is a new object
        image = {"io_config": {"image_mode": "RGB", "rgba_background_color": RGBA_BACKGROUND}, "data": data}
    hasher = _hasher(algorithm)
    for name, value in sorted({"image": _Media(image), "model_id": model_id}.items()):
        for chunk in _item(name, value):
            hasher.update(chunk)
    return hasher.hexdigest()


class _Media:
    """A MediaWithBytes image: serialised as the item "image" of its bytes (or of io_config + bytes)."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _hasher(algorithm: str) -> Any:
    if algorithm == "blake3":
        from blake3 import blake3

        return blake3()
    if algorithm in ("sha256", "sha512"):
        return hashlib.new(algorithm)
    raise ValueError(f"unknown hash algorithm {algorithm!r}; vLLM has {', '.join(ALGORITHMS)}")


def _framed(chunk: bytes) -> Iterator[bytes]:
    yield len(chunk).to_bytes(8, "little")
    yield chunk


def _item(key: str, value: Any) -> Iterator[bytes]:
    """MultiModalHasher.iter_item_to_bytes."""
    yield from _framed(key.encode("utf-8"))
    yield from _value(value)


def _value(value: Any) -> Iterator[bytes]:
    """MultiModalHasher.iter_value_to_bytes: tagged containers, then leaves."""
    if value is None:
        yield _TAG_NONE
    elif isinstance(value, (list, tuple)):
        yield _TAG_SEQUENCE
        yield len(value).to_bytes(8, "little")
        for element in value:
            yield from _value(element)
    elif isinstance(value, dict):
        yield _TAG_MAPPING
        yield len(value).to_bytes(8, "little")
        for k, v in value.items():
            yield from _framed(str(k).encode("utf-8"))
            yield from _value(v)
    else:
        yield _TAG_LEAF
        yield from _leaf(value)


def _leaf(value: Any) -> Iterator[bytes]:
    """MultiModalHasher.serialize_item for the leaves an image hash meets."""
    if isinstance(value, _Media):
        yield from _item("image", value.value)
    elif isinstance(value, bytes):
        yield from _framed(value)
    elif isinstance(value, str):
        yield from _framed(value.encode("utf-8"))
    elif isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"no vLLM serialisation for {type(value).__name__} here")
    else:  # np.array(int).tobytes(): int64, native (little-endian) byte order
        yield from _framed(value.to_bytes(8, "little", signed=True))
