"""`--format npy`: clip-retrieval's layout, `img_emb/img_emb_{i}.npy` + `metadata/metadata_{i}.parquet`,
row-aligned file by file (what embedding_reader's `parquet_npy` mode and autofaiss read)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmprep.export.parts import (
    META_COLUMNS,
    PartWriter,
    file_size,
    metadata_columns,
    part_name,
)
from mmprep.export.source import ListedRow
from mmprep.export.staging import part_path
from mmprep.faults import fault_point

EMB_DIR, META_DIR = "img_emb", "metadata"
EMB_NAME, META_NAME = "img_emb_{}.npy", "metadata_{}.parquet"
HEADER_BYTES = 128  # numpy's own header size for a 2-D float matrix, reserved so that it is written last


def owned(name: str) -> bool:
    """Top-level names an npy export writes (what --overwrite may replace)."""
    return name in (EMB_DIR, META_DIR)


def npy_header(rows: int, dim: int, dtype: np.dtype) -> bytes:
    """A numpy format 1.0 header of exactly HEADER_BYTES for a C-order [rows, dim] matrix."""
    text = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': ({rows}, {dim}), }}"
    preamble = b"\x93NUMPY\x01\x00" + (HEADER_BYTES - 10).to_bytes(2, "little")
    body = text.ljust(HEADER_BYTES - 10 - 1) + "\n"
    if len(body) != HEADER_BYTES - 10:
        raise ValueError(f"shape ({rows}, {dim}) does not fit a {HEADER_BYTES}-byte npy header")
    return preamble + body.encode("latin1")


class NpyPart(PartWriter):
    """One `img_emb_{i}.npy` (streamed: rows are appended, the header written once the count is known)
    and its `metadata_{i}.parquet` (one row group per batch)."""

    def __init__(self, pq: Any, root: Path, index: int, expected_files: int, dim: int, dtype: np.dtype) -> None:
        import pyarrow as pa

        self._pa = pa
        self.dim, self.dtype, self.rows = dim, dtype, 0
        self.emb_path = part_path(root / EMB_DIR / part_name(EMB_NAME, index, expected_files))
        self.meta_path = part_path(root / META_DIR / part_name(META_NAME, index, expected_files))
        self.emb_path.parent.mkdir(exist_ok=True)
        self.meta_path.parent.mkdir(exist_ok=True)
        self._emb = open(self.emb_path, "wb")
        self._emb.write(npy_header(0, dim, dtype))
        schema = pa.schema([(name, pa.string()) for name in META_COLUMNS])
        self._meta = pq.ParquetWriter(str(self.meta_path), schema)

    def write(self, rows: Sequence[ListedRow], matrix: np.ndarray) -> None:
        self._emb.write(memoryview(matrix).cast("B"))
        self._meta.write_table(self._pa.table(metadata_columns(self._pa, rows)))
        self.rows += len(rows)

    def close(self) -> int:
        self._meta.close()
        self._emb.seek(0)
        self._emb.write(npy_header(self.rows, self.dim, self.dtype))
        self._emb.close()
        fault_point("export_after_file")
        return file_size(self.emb_path) + file_size(self.meta_path)
