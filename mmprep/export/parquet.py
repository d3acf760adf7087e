"""`--format parquet`: `part-{i}.parquet` with the metadata columns and `embedding` as a fixed-size list
of floats (what LanceDB and embedding_reader's `parquet` mode take)."""

from __future__ import annotations

import re
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

PART_NAME = "part-{}.parquet"
_PART_RE = re.compile(r"part-\d+\.parquet")


def owned(name: str) -> bool:
    """Top-level names a parquet export writes (what --overwrite may replace)."""
    return bool(_PART_RE.fullmatch(name))


class ParquetPart(PartWriter):
    """One `part-{i}.parquet`, one row group per batch."""

    def __init__(self, pq: Any, root: Path, index: int, expected_files: int, dim: int, dtype: np.dtype) -> None:
        import pyarrow as pa

        self._pa = pa
        self.dim = dim
        self.path = part_path(root / part_name(PART_NAME, index, expected_files))
        value = pa.float16() if dtype == np.float16 else pa.float32()
        schema = pa.schema([(name, pa.string()) for name in META_COLUMNS] + [("embedding", pa.list_(value, dim))])
        self._writer = pq.ParquetWriter(str(self.path), schema)

    def write(self, rows: Sequence[ListedRow], matrix: np.ndarray) -> None:
        pa = self._pa
        columns = metadata_columns(pa, rows)
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), self.dim)
        self._writer.write_table(pa.table(columns, schema=self._writer.schema))

    def close(self) -> int:
        self._writer.close()
        fault_point("export_after_file")
        return file_size(self.path)
