"""The entries of one model in a cache directory, streamed in shard order with their tensors."""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmprep.errors import UsageError
from mmprep.store.index import connect
from mmprep.store.layout import CacheLayout
from mmprep.store.reader import CachedEmbedding, EmbeddingCache, resolve_model


@dataclass(frozen=True)
class ListedRow:
    """One entry as listed by the index, before its tensors are read."""

    key: str
    url: str
    caller_id: str | None
    content_sha256: str
    shard: str
    vllm_identifier: str | None = None


@dataclass(frozen=True)
class ExportRow:
    """One cached entry with the metadata an export writes next to its tensors."""

    key: str
    url: str  # as stored: data URLs are "data:sha256=<hex>"
    caller_id: str | None
    content_sha256: str
    entry: CachedEmbedding


class CacheSource:
    """Reads one model's entries: its shapes and dtypes from the index, the tensors through `EmbeddingCache`.

    Entries are listed by one SQLite statement (a consistent snapshot, sorted by shard so that each
    shard is read in one pass) and fetched `batch_rows` at a time, so memory stays bounded.
    """

    def __init__(self, root: Path, model: str | None, batch_rows: int = 2048) -> None:
        layout = CacheLayout(root)
        if not layout.index.is_file():
            raise UsageError(f"not an mmprep cache directory (no {layout.index.name}): {root}")
        self.root = root
        self.batch_rows = batch_rows
        self._conn = connect(layout.index, readonly=True)
        try:
            row = resolve_model(self._conn, model)
        except ValueError as exc:
            self._conn.close()
            raise UsageError(f"{exc}: pass --model NAME or a fingerprint prefix") from None
        self.fingerprint: str = row["fingerprint"]
        self.model_name: str = row["name"]
        self.family: str = row["family"]
        self.info: dict[str, Any] = json.loads(row["info"])
        self._layout = layout
        self._cache = EmbeddingCache(root, model=self.fingerprint, memory_bytes=0)
        self.vanished = 0  # entries listed but gone by the time their tensors were read (a concurrent gc)

    def shapes(self) -> list[tuple[str, list[int], int]]:
        """(dtype, shape, entries) of this model's embeddings, most common first."""
        rows = self._conn.execute(
            "SELECT dtype, shape, count(*) FROM entries WHERE fingerprint=? GROUP BY dtype, shape ORDER BY 3 DESC",
            (self.fingerprint,),
        )
        return [(dtype, json.loads(shape), n) for dtype, shape, n in rows]

    def count(self) -> int:
        (n,) = self._conn.execute("SELECT count(*) FROM entries WHERE fingerprint=?", (self.fingerprint,)).fetchone()
        return int(n)

    def listing(self, *, vllm_model_id: str | None = None) -> Iterator[list[ListedRow]]:
        """Every entry's metadata, `batch_rows` at a time, in shard order. With `vllm_model_id`, only the
        entries whose vLLM identifier for that model id is recorded, with it."""
        if vllm_model_id is None:
            sql = (
                "SELECT e.key, e.url, e.caller_id, e.content_sha256, e.shard, NULL FROM entries e WHERE e.fingerprint=?"
            )
            params: tuple[Any, ...] = (self.fingerprint,)
        else:
            sql = (
                "SELECT e.key, e.url, e.caller_id, e.content_sha256, e.shard, v.identifier FROM entries e "
                "JOIN vllm_identifiers v ON v.content_sha256 = e.content_sha256 AND v.model_id = ? "
                "WHERE e.fingerprint=?"
            )
            params = (vllm_model_id, self.fingerprint)
        cursor = self._conn.execute(sql + " ORDER BY e.shard, e.key", params)
        while True:
            rows = cursor.fetchmany(self.batch_rows)
            if not rows:
                return
            yield [ListedRow(*r) for r in rows]

    def without_vllm_identifier(self, vllm_model_id: str) -> int:
        """How many entries have no vLLM identifier for `vllm_model_id` recorded (encode --vllm-model-id)."""
        if not self._conn.execute("SELECT 1 FROM sqlite_master WHERE name='vllm_identifiers'").fetchone():
            return self.count()
        (n,) = self._conn.execute(
            "SELECT count(*) FROM entries e WHERE e.fingerprint=? AND NOT EXISTS (SELECT 1 FROM vllm_identifiers v "
            "WHERE v.content_sha256 = e.content_sha256 AND v.model_id = ?)",
            (self.fingerprint, vllm_model_id),
        ).fetchone()
        return int(n)

    def load(self, listed: list[ListedRow]) -> list[ExportRow]:
        """The listed entries with their tensors (one batched lookup); entries gone meanwhile are counted, not returned."""
        found = self._cache.get_keys([r.key for r in listed])
        rows = [
            ExportRow(r.key, r.url, r.caller_id, r.content_sha256, e) for r, e in zip(listed, found) if e is not None
        ]
        self.vanished += len(listed) - len(rows)
        return rows

    def vector_batches(self) -> Iterator[tuple[list[ListedRow], np.ndarray]]:
        """Every entry of a pooled model with its vector, `batch_rows` at a time: (rows, [rows, dim] matrix).

        Bulk reads: each shard's vectors are gathered straight from their byte offsets in the file (one
        memory map, one shard at a time) instead of one tensor object per entry, the same values
        `EmbeddingCache.get` returns. A shard gone meanwhile (a concurrent gc) falls back to the reader.
        """
        shard: _ShardVectors | None = None
        for listed in self.listing():
            rows: list[ListedRow] = []
            parts: list[np.ndarray] = []
            for name, grouped in itertools.groupby(listed, key=lambda r: r.shard):
                group = list(grouped)
                if shard is None or shard.name != name:
                    shard = _ShardVectors.open(self._layout, name)
                matrix = shard.gather([r.key for r in group]) if shard is not None else None
                if matrix is None:
                    loaded = self.load(group)
                    if not loaded:
                        continue
                    present = {r.key for r in loaded}
                    group = [r for r in group if r.key in present]
                    stacked = torch.stack([r.entry.embeddings for r in loaded])
                    matrix = (stacked.float() if stacked.dtype == torch.bfloat16 else stacked).numpy()
                rows.extend(group)
                parts.append(matrix)
            if rows:
                yield rows, np.concatenate(parts)

    def close(self) -> None:
        self._cache.close()
        self._conn.close()

    def __enter__(self) -> CacheSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


class _ShardVectors:
    """One shard's 1-D tensors, read by their offsets in the safetensors file."""

    def __init__(self, name: str, header: dict[str, Any], base: int, data: np.ndarray) -> None:
        self.name, self.header, self.base, self.data = name, header, base, data

    @classmethod
    def open(cls, layout: CacheLayout, name: str) -> _ShardVectors | None:
        path = layout.shard_path(name)
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            data = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError, struct.error):
            return None
        return cls(name, header, 8 + size, data)

    def gather(self, keys: list[str]) -> np.ndarray | None:
        """The [len(keys), dim] matrix of these keys' vectors (bfloat16 widened to float32), or None when a
        key is missing or the tensors are not all 1-D of one dtype and size."""
        infos = [self.header.get(k) for k in keys]
        if not infos or any(i is None for i in infos):
            return None
        first = infos[0]
        if any(i["dtype"] != first["dtype"] or i["shape"] != first["shape"] for i in infos) or len(first["shape"]) != 1:
            return None
        width = first["data_offsets"][1] - first["data_offsets"][0]
        starts = np.fromiter((i["data_offsets"][0] for i in infos), np.int64, len(infos)) + self.base
        raw = self.data[starts[:, None] + np.arange(width)]  # one copy of just these rows
        if first["dtype"] == "BF16":
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        dtype = _NUMPY_DTYPES.get(first["dtype"])
        return None if dtype is None else raw.view(dtype)
