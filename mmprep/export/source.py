"""The entries of one model in a cache directory, streamed in shard order with their tensors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
            sql = "SELECT e.key, e.url, e.caller_id, e.content_sha256, NULL FROM entries e WHERE e.fingerprint=?"
            params: tuple[Any, ...] = (self.fingerprint,)
        else:
            sql = (
                "SELECT e.key, e.url, e.caller_id, e.content_sha256, v.identifier FROM entries e "
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
        rows = [ExportRow(r.key, r.url, r.caller_id, r.content_sha256, e) for r, e in zip(listed, found) if e is not None]
        self.vanished += len(listed) - len(rows)
        return rows

    def batches(self) -> Iterator[list[ExportRow]]:
        """Every entry of the model with its tensors, `batch_rows` at a time."""
        for listed in self.listing():
            rows = self.load(listed)
            if rows:
                yield rows

    def close(self) -> None:
        self._cache.close()
        self._conn.close()

    def __enter__(self) -> CacheSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
