"""A safetensors file's header, read and checked without torch or numpy.

`stats`, `verify`, `show` and `gc` only need what a shard says about itself (its metadata and each
tensor's dtype, shape and byte range); `safetensors.safe_open(..., "pt")` would import torch (~1.5 s)
for that. The checks are those safetensors makes when it opens a file: a bounded header, valid JSON,
known dtypes, byte ranges that match the shapes and tile the data section exactly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit

# safetensors dtype -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "I16": ("int16", 2), "U16": ("uint16", 2),
    "I32": ("int32", 4), "U32": ("uint32", 4), "I64": ("int64", 8), "U64": ("uint64", 8),
    "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F32": ("float32", 4), "F64": ("float64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}  # fmt: skip


class HeaderError(ValueError):
    """A file that is not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it."""

    dtype: str  # safetensors name, e.g. "F32"
    shape: list[int]
    start: int  # byte range in the data section
    end: int

    @property
    def torch_dtype(self) -> str:
        """The torch dtype's name ("float32"), as stored in the index."""
        return DTYPES[self.dtype][0]


@dataclass(frozen=True)
class SafetensorsHeader:
    """A file's metadata and tensor table."""

    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]


def read_header(path: Path | str) -> SafetensorsHeader:
    """Read and check the header of the safetensors file at `path`; HeaderError when it is malformed."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise HeaderError("file too short for a safetensors header")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES or length + 8 > size:
            raise HeaderError(f"header length {length} does not fit the file ({size} bytes)")
        raw = f.read(length)
    try:
        table = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HeaderError(f"header is not JSON: {exc}") from exc
    if not isinstance(table, dict):
        raise HeaderError("header is not a JSON object")
    metadata = table.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError("__metadata__ is not a map of strings")
    tensors = {name: _tensor(name, entry) for name, entry in table.items()}
    _check_layout(tensors, size - 8 - length)
    return SafetensorsHeader(metadata, tensors)


def _tensor(name: str, entry: object) -> TensorInfo:
    try:
        dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]  # type: ignore[index]  # not a dict: TypeError below
    except (TypeError, KeyError, ValueError) as exc:
        raise HeaderError(f"tensor {name!r}: malformed entry") from exc
    if dtype not in DTYPES:
        raise HeaderError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise HeaderError(f"tensor {name!r}: bad shape {shape!r}")
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
        raise HeaderError(f"tensor {name!r}: bad data offsets {[start, end]!r}")
    count = DTYPES[dtype][1]
    for d in shape:
        count *= d
    if end - start != count:
        raise HeaderError(f"tensor {name!r}: {end - start} bytes for shape {shape} of {dtype}")
    return TensorInfo(dtype, list(shape), start, end)


def _check_layout(tensors: dict[str, TensorInfo], data_bytes: int) -> None:
    """The byte ranges must tile the data section: no gap, no overlap, nothing past the end."""
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.start != position:
            raise HeaderError(f"tensor {name!r}: data offsets leave a gap or overlap at byte {position}")
        position = info.end
    if position != data_bytes:
        raise HeaderError(f"the tensors cover {position} bytes, the data section has {data_bytes}")
