"""Parquet manifests, read with pyarrow (the `parquet` extra): only the URL and id columns, a batch of
rows at a time, pages streamed from disk, so a file of any length costs a bounded amount of memory."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mmprep.errors import UsageError
from mmprep.extras import require
from mmprep.manifest.records import BadLine, Record
from mmprep.manifest.source import unreadable_rest
from mmprep.manifest.tabular import Columns, pick_columns, row_record
from mmprep.settings import ManifestSettings

BATCH_ROWS = 1024  # rows converted to Python at a time
READ_BUFFER = 1024 * 1024  # bytes read from disk at a time: pages are decoded as they stream in


def load_pyarrow() -> Any:
    """The pyarrow module with its parquet reader; MissingExtraError naming the `parquet` extra when absent."""
    require("pyarrow.parquet", "parquet", "reading parquet manifests")
    return require("pyarrow", "parquet", "reading parquet manifests")


def _open(path: str) -> Any:
    pa = load_pyarrow()
    try:  # not pre-buffered: a whole row group's column chunks would be read into memory at once
        return pa.parquet.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER)
    except (pa.ArrowException, OSError) as exc:
        raise UsageError(f"cannot read manifest {path} as parquet: {exc}") from None


def parquet_columns(path: str, settings: ManifestSettings) -> Columns:
    """The URL and id columns of a parquet manifest, checked: present, and holding strings (ids: or integers)."""
    file = _open(path)
    try:
        return _columns(file, settings, path)
    finally:
        file.close()


def _columns(file: Any, settings: ManifestSettings, path: str) -> Columns:
    schema = file.schema_arrow
    columns = pick_columns(schema.names, settings, path)
    _check_type(schema.field(columns.url).type, columns.url_name, "--url-col", "strings", path)
    if columns.id is not None:
        _check_type(schema.field(columns.id).type, columns.id_name, "--id-col", "strings or integers", path,
                    integers=True)  # fmt: skip
    return columns


def _check_type(type_: Any, name: str | None, option: str, wanted: str, path: str, integers: bool = False) -> None:
    pa = load_pyarrow()
    value_type = type_.value_type if pa.types.is_dictionary(type_) else type_
    is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    text = pa.types.is_string(value_type) or pa.types.is_large_string(value_type) or is_view(value_type)
    if text or (integers and pa.types.is_integer(value_type)):
        return
    raise UsageError(f"manifest {path}: column {name!r} ({option}) holds {type_}, not {wanted}")


def read_parquet(path: str, settings: ManifestSettings) -> Iterator[Record | BadLine]:
    """Every row of a parquet manifest as a record; `line` is the 1-based row number."""
    pa, file = load_pyarrow(), _open(path)
    row = 0
    try:
        columns = _columns(file, settings, path)
        names = list(dict.fromkeys(n for n in (columns.url_name, columns.id_name) if n is not None))
        for batch in file.iter_batches(batch_size=BATCH_ROWS, columns=names, use_threads=False):
            urls = batch.column(columns.url_name).to_pylist()
            ids = batch.column(columns.id_name).to_pylist() if columns.id_name is not None else [None] * len(urls)
            for url, rid in zip(urls, ids):
                row += 1
                yield row_record(url, rid, columns, path, row)
    except (pa.ArrowException, OSError) as exc:  # a damaged page or footer part-way through
        yield unreadable_rest(path, row + 1, exc)
    finally:
        file.close()
