"""What the row-aligned formats' files share: the metadata columns, the part interface and names.

Below `npy`, `parquet` and `tabular` (which picks one of them), so no format imports the module that runs it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmprep.export.source import ListedRow

META_COLUMNS = ("url", "id", "key", "content_sha256")


def metadata_columns(pa: Any, rows: Sequence[ListedRow]) -> dict[str, Any]:
    """The metadata columns of `rows` as pyarrow string arrays (`id` is null where the manifest gave none)."""
    return {
        "url": pa.array([r.url for r in rows], pa.string()),
        "id": pa.array([r.caller_id for r in rows], pa.string()),
        "key": pa.array([r.key for r in rows], pa.string()),
        "content_sha256": pa.array([r.content_sha256 for r in rows], pa.string()),
    }


class PartWriter(ABC):
    """One output file (or aligned pair of files) being written."""

    @abstractmethod
    def write(self, rows: Sequence[ListedRow], matrix: np.ndarray) -> None: ...

    @abstractmethod
    def close(self) -> int:
        """Finish the part; returns the bytes it wrote."""


def part_name(template: str, index: int, expected_files: int) -> str:
    """`template` with the part number, zero-padded so that name order is row order (readers sort names)."""
    return template.format(str(index).zfill(len(str(max(expected_files - 1, 0)))))


def file_size(path: Path) -> int:
    return path.stat().st_size
