"""Which reader a manifest takes (by its file extension), and the checks made before a run starts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from mmprep.errors import UsageError
from mmprep.manifest.delimited import DELIMITERS, header_of, read_delimited
from mmprep.manifest.jsonl import read_jsonl
from mmprep.manifest.parquet import parquet_columns, read_parquet
from mmprep.manifest.records import BadLine, Record
from mmprep.manifest.source import READ_ERRORS
from mmprep.manifest.tabular import pick_columns
from mmprep.manifest.txt import read_txt
from mmprep.settings import ManifestSettings

TABULAR = ("parquet", "csv", "tsv")
_NAMED = (*TABULAR, "txt")  # anything else (.jsonl, .json, .ndjson, no extension, stdin) is JSONL


def manifest_format(path: str) -> str:
    """`jsonl`, `parquet`, `csv`, `tsv` or `txt`, from the file name (a `.gz` suffix looked through)."""
    if path == "-":
        return "jsonl"
    name = Path(path).name.lower()
    packed = name.endswith(".gz")
    stem, dot, ext = name.removesuffix(".gz").rpartition(".")
    kind = ext if dot and stem and ext in _NAMED else "jsonl"
    if kind == "parquet" and packed:
        raise UsageError(f"manifest {path}: a gzipped parquet file cannot be streamed; parquet compresses "
                         "inside the file, so gunzip it")  # fmt: skip
    return kind


def read_manifests(paths: Iterable[str], settings: ManifestSettings = ManifestSettings()) -> Iterator[Record | BadLine]:
    """Yield every record of every manifest in order, streaming (never a whole file in memory)."""
    for path in paths:
        yield from read_manifest(path, settings)


def read_manifest(path: str, settings: ManifestSettings = ManifestSettings()) -> Iterator[Record | BadLine]:
    """Every record of one manifest, read the way its file extension says."""
    kind = manifest_format(path)
    if kind == "parquet":
        return read_parquet(path, settings)
    if kind in DELIMITERS:
        return read_delimited(path, kind, settings)
    if kind == "txt":
        return read_txt(path)
    return read_jsonl(path)


def rowless_manifests(paths: Iterable[str], settings: ManifestSettings = ManifestSettings()) -> list[str]:
    """The manifest files that yield no row at all, not even a bad one (an empty or truncated file, a
    header alone); stdin is never read here, as it cannot be read twice. Reads each up to its first row."""
    empty = []
    for path in paths:
        if path == "-":
            continue
        rows = read_manifest(path, settings)
        try:
            if next(iter(rows), None) is None:
                empty.append(path)
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()
    return empty


def check_readable(paths: Iterable[str], settings: ManifestSettings = ManifestSettings()) -> None:
    """Fail early (UsageError, exit 2) when a manifest cannot be opened or lacks the columns asked for."""
    kinds = []
    for path in paths:
        kinds.append(kind := manifest_format(path))
        if path == "-":
            continue
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"manifest not found or not a file: {path}")
        try:
            with p.open("rb"):
                pass
            if kind == "parquet":
                parquet_columns(path, settings)
            elif kind in DELIMITERS:
                pick_columns(header_of(path, kind), settings, path)
        except READ_ERRORS as exc:
            raise UsageError(f"cannot read manifest {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    if settings.columns_chosen and not any(kind in TABULAR for kind in kinds):
        raise UsageError("--url-col and --id-col apply to parquet, csv and tsv manifests only (JSONL lines name "
                         "their URL with url / image_url / messages; a .txt manifest holds one URL a line)")  # fmt: skip
