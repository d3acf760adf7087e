"""The row-aligned exports (npy + parquet metadata, parquet with a vector column): the dtype choice,
rolling over to a new file every `rows_per_file` rows, and `export_tabular`, which runs either format."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mmprep.errors import ExportFormatError
from mmprep.export import npy, parquet
from mmprep.export.parts import PartWriter
from mmprep.export.progress import ExportCounters, ProgressReporter
from mmprep.export.source import CacheSource, ListedRow
from mmprep.export.staging import StagedDir
from mmprep.extras import require
from mmprep.settings import ExportSettings

OUT_DTYPES = {"float16": np.float16, "float32": np.float32}


def vector_layout(source: CacheSource, fmt: str, dtype: str | None) -> tuple[int, np.dtype]:
    """(dimension, output dtype) of a pooled model's vectors; refuses token sequences and mixed shapes."""
    shapes = source.shapes()
    if source.family != "pooled" or any(len(shape) != 1 for _dtype, shape, _n in shapes):
        raise ExportFormatError(
            f"model {source.model_name} ({source.family}) stores a token sequence per image "
            f"([n_tokens, hidden]), not one vector: --format {fmt} takes pooled models (CLIP, SigLIP); "
            "to pre-warm a vLLM server, use --format vllm-ec"
        )
    dims = sorted({shape[0] for _dtype, shape, _n in shapes})
    if len(dims) > 1:
        raise ExportFormatError(
            f"model {source.model_name} has vectors of several sizes ({dims}); cannot write one matrix"
        )
    stored = shapes[0][0] if shapes else "float32"
    chosen = dtype or ("float32" if stored == "bfloat16" else stored)  # numpy has no bfloat16: widen, losslessly
    if chosen not in OUT_DTYPES:
        raise ExportFormatError(f"vectors are stored as {stored}; pass --dtype float16 or float32")
    return (dims[0] if dims else 0), np.dtype(OUT_DTYPES[chosen])


class RollingWriter:
    """Feeds rows to parts of at most `rows_per_file` rows each, opened on demand by `open_part(i)`."""

    def __init__(self, rows_per_file: int, open_part: Callable[[int], PartWriter]) -> None:
        self.rows_per_file = rows_per_file
        self._open_part = open_part
        self._part: PartWriter | None = None
        self._in_part = 0
        self.files = 0
        self.bytes = 0
        self.rows = 0

    def write(self, rows: Sequence[ListedRow], matrix: np.ndarray) -> None:
        start = 0
        while start < len(rows):
            if self._part is None:
                self._part = self._open_part(self.files)
                self.files += 1
            take = min(len(rows) - start, self.rows_per_file - self._in_part)
            self._part.write(rows[start : start + take], matrix[start : start + take])
            start += take
            self._in_part += take
            self.rows += take
            if self._in_part == self.rows_per_file:
                self._finish_part()

    def close(self) -> None:
        if self._part is not None:
            self._finish_part()

    def _finish_part(self) -> None:
        assert self._part is not None
        self.bytes += self._part.close()
        self._part, self._in_part = None, 0


@dataclass(frozen=True)
class TabularReport:
    """What an npy / parquet export wrote."""

    format: str
    model: str
    fingerprint: str
    out: str
    rows: int
    files: int
    bytes: int
    dtype: str
    dim: int
    vanished: int  # entries removed (by a concurrent gc) between listing and reading
    duration_s: float

    exit_code = 0  # a partial export is never published: it either completes or raises

    def summary_line(self) -> str:
        rate = self.rows / self.duration_s if self.duration_s > 0 else 0.0
        return (
            f"exported {self.rows} rows of {self.model} to {self.out} ({self.format}): {self.files} file(s), "
            f"{self.bytes} bytes, {self.dtype}[{self.dim}], {self.duration_s:.1f}s ({rate:.0f} rows/s)"
        )


def export_tabular(settings: ExportSettings, reporter: ProgressReporter | None = None) -> TabularReport:
    """Write one pooled model's vectors and metadata as npy + parquet or as parquet, atomically."""
    pq = require("pyarrow.parquet", "parquet", f"--format {settings.format}")
    part_class = {"npy": npy.NpyPart, "parquet": parquet.ParquetPart}[settings.format]

    def owned(name: str) -> bool:  # --overwrite replaces an earlier export of either format
        return npy.owned(name) or parquet.owned(name)

    with CacheSource(settings.cache_dir, settings.model, settings.batch_rows) as source:
        dim, dtype = vector_layout(source, settings.format, settings.dtype)
        total = source.count()
        expected_files = max(1, -(-total // settings.rows_per_file))
        staged = StagedDir(settings.out, overwrite=settings.overwrite, owned=owned)
        counters = ExportCounters(total)
        writer = RollingWriter(
            settings.rows_per_file, lambda i: part_class(pq, staged.path, i, expected_files, dim, dtype)
        )
        if reporter is not None:
            reporter.start(counters)
        try:
            for rows, matrix in source.vector_batches():
                writer.write(rows, np.ascontiguousarray(matrix, dtype=dtype))
                counters.done = counters.written = writer.rows
                counters.bytes = writer.bytes
            writer.close()
            counters.bytes = writer.bytes
            staged.publish()
        except BaseException:
            staged.discard()
            raise
        finally:
            if reporter is not None:
                reporter.stop(counters)
        return TabularReport(
            format=settings.format, model=source.model_name, fingerprint=source.fingerprint, out=str(staged.out),
            rows=writer.rows, files=writer.files, bytes=writer.bytes, dtype=dtype.name, dim=dim,
            vanished=source.vanished, duration_s=round(counters.elapsed(), 3),
        )  # fmt: skip
