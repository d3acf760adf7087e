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

    def batches(self, extra_sql: str = "", params: tuple[Any, ...] = ()) -> Iterator[list[ExportRow]]:
        """Every entry of the model (optionally filtered by `extra_sql` on entries `e`), `batch_rows` at a time."""
        cursor = self._conn.execute(
            "SELECT e.key, e.url, e.caller_id, e.content_sha256 FROM entries e "
            f"WHERE e.fingerprint=? {extra_sql} ORDER BY e.shard, e.key",
            (self.fingerprint, *params),
        )
        while True:
            listed = cursor.fetchmany(self.batch_rows)
            if not listed:
                return
            found = self._cache.get_keys([r[0] for r in listed])
            batch = [ExportRow(r[0], r[1], r[2], r[3], e) for r, e in zip(listed, found) if e is not None]
            self.vanished += len(listed) - len(batch)
            if batch:
                yield batch

    def close(self) -> None:
        self._cache.close()
        self._conn.close()

    def __enter__(self) -> CacheSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
