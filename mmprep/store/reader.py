"""The serving-side reader: look embeddings up by URL in a cache directory, cheaply and thread-safely.

It opens the index read-only (WAL: it never blocks the writer and sees each commit whole) and
reads tensors from memory-mapped shards. A byte-bounded LRU keeps recently returned entries in
memory. Returned tensors are shared with that LRU: treat them as read-only.

Concurrent maintenance is safe: `mmprep gc` writes compacted shards under new names, repoints the
index rows in one transaction and only then deletes the old file; a shard already open here keeps
working (POSIX keeps an unlinked file's data while it is mapped), and a shard that vanished before
it was opened is looked up again in the index.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from mmprep.errors import UsageError
from mmprep.keys import cache_key
from mmprep.store.header import HeaderError, read_header
from mmprep.store.index import (
    LIVE,
    ReadOnlyIndex,
    connect,
    index_created,
    open_readonly,
    utc_iso,
)
from mmprep.store.layout import EMBEDDINGS, CacheLayout, entry_tensor_name

if TYPE_CHECKING:  # torch is imported where tensors are read: show/stats answer without it
    import torch

log = logging.getLogger(__name__)

DEFAULT_MEMORY_BYTES = 256 << 20
MAX_OPEN_SHARDS = 32
_CHUNK = 500
_KEY_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CachedEmbedding:
    """One cached entry: the model's named tensors for one image URL ("embeddings" always, plus the
    family's others, e.g. "image_grid_thw"; docs/cache.md#what-is-stored-per-family)."""

    key: str
    url: str
    shard: str
    fingerprint: str
    tensors: dict[str, torch.Tensor]
    family: str  # the model family (pooled, llava, qwen2_vl, ...): what `mmprep.serving.to_vllm` dispatches on

    @property
    def embeddings(self) -> torch.Tensor:
        return self.tensors[EMBEDDINGS]

    @property
    def image_grid_thw(self) -> torch.Tensor | None:
        """[1, 3] int64 for the families with dynamic resolution (Qwen2-VL and later), else None."""
        return self.tensors.get("image_grid_thw")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True)
class ReaderStats:
    """Counters of one EmbeddingCache. A hit is an entry found (in memory or on disk)."""

    hits: int
    misses: int
    memory_hits: int  # the hits served from the in-memory LRU
    evictions: int
    entries_in_memory: int
    bytes_in_memory: int
    capacity: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def utilisation(self) -> float:
        return self.bytes_in_memory / self.capacity if self.capacity else 0.0


@dataclass(frozen=True)
class _Row:
    url: str
    shard: str
    tensors: list[str]


def resolve_model(conn: sqlite3.Connection, model: str | None) -> sqlite3.Row:
    """The models row meant by `model` (fingerprint, fingerprint prefix or name); None = the only
    model that has entries. ValueError, listing the models, when that is not exactly one."""
    rows = (
        list(
            conn.execute(
                "SELECT fingerprint, name, family, info, EXISTS (SELECT 1 FROM entries e "
                "WHERE e.fingerprint = models.fingerprint) AS used FROM models ORDER BY created"
            )
        )
        if index_created(conn)
        else []
    )
    if model is None:
        matches = [r for r in rows if r["used"]] or rows
    else:
        matches = [r for r in rows if model in (r["fingerprint"], r["name"])]
        matches = matches or [r for r in rows if r["fingerprint"].startswith(model.lower())]
    if len(matches) == 1:
        return matches[0]
    listing = ", ".join(f"{r['name']} ({r['fingerprint'][:16]}{_decode_note(r['info'])})" for r in rows) or "none"
    if not matches:
        what = "the cache holds no model" if model is None else f"no model matches {model!r}"
    elif model is None:
        what = f"the cache holds {len(matches)} models; choose one"
    else:
        what = f"{model!r} matches {len(matches)} models; give more of the fingerprint"
    raise ValueError(f"{what} (models: {listing})")


def _decode_note(info: str) -> str:
    """ ", decoded with fast_decode, ..." for a model entry made with pixel-changing decode options."""
    options = json.loads(info).get("decode") or {}
    return ", decoded with " + ", ".join(f"{k}={v}" for k, v in options.items()) if options else ""


class EmbeddingCache:
    """Read embeddings of one model from a cache directory by URL. Safe to share between threads."""

    def __init__(
        self,
        root: Path | str,
        model: str | None = None,
        *,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        max_open_shards: int = MAX_OPEN_SHARDS,
    ) -> None:
        """`model`: fingerprint, fingerprint prefix or model name (None: the cache's only model)."""
        self.layout = CacheLayout(Path(root))
        if not self.layout.index.is_file():
            raise UsageError(f"not an mmprep cache directory (no {self.layout.index.name}): {root}")
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        row = resolve_model(self._conn(), model)
        self.fingerprint: str = row["fingerprint"]
        self.model_name: str = row["name"]
        self.family: str = row["family"]
        self.model_info: dict[str, Any] = json.loads(
            row["info"]
        )  # Encoder.describe(): architecture, output shapes, ...
        self.capacity = max(0, memory_bytes)
        self._memory: OrderedDict[str, CachedEmbedding] = OrderedDict()
        self._memory_bytes = 0
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self._max_handles = max(1, max_open_shards)
        self._hits = self._misses = self._memory_hits = self._evictions = 0

    # -- public ------------------------------------------------------------------------------

    def get(self, url: str) -> CachedEmbedding | None:
        """The cached entry for `url`, or None when it is not cached for this model."""
        return self.get_keys([cache_key(url)])[0]

    def get_many(self, urls: Sequence[str]) -> list[CachedEmbedding | None]:
        """Entries for many URLs (in order, None where not cached), with one batched index query."""
        return self.get_keys([cache_key(u) for u in urls])

    def get_key(self, key: str) -> CachedEmbedding | None:
        """Like `get`, by entry key (`mmprep.cache_key(url)`)."""
        return self.get_keys([key])[0]

    def get_keys(self, keys: Sequence[str]) -> list[CachedEmbedding | None]:
        """Like `get_many`, by entry keys."""
        results: list[CachedEmbedding | None] = [None] * len(keys)
        wanted: dict[str, list[int]] = {}
        memory_hits = 0
        with self._lock:
            for i, key in enumerate(keys):
                found = self._memory.get(key)
                if found is not None:
                    self._memory.move_to_end(key)
                    results[i] = found
                    memory_hits += 1
                else:
                    wanted.setdefault(key, []).append(i)
        rows = self._lookup(list(wanted)) if wanted else {}
        loaded = []
        for key, positions in wanted.items():
            row = rows.get(key)
            found = self._load(key, row) if row is not None else None
            if found is not None:
                loaded.append(found)
                for i in positions:
                    results[i] = found
        hits = sum(r is not None for r in results)
        with self._lock:
            self._hits += hits
            self._misses += len(keys) - hits
            self._memory_hits += memory_hits
            for found in loaded:
                self._remember(found)
        return results

    def cached_keys(self, keys: Sequence[str]) -> set[str]:
        """Which of `keys` are cached for this model, from the index alone (no tensor is read): what a
        caller that only needs the key, such as `mmprep rewrite --uuid-only`, asks."""
        with self._lock:
            found = {key for key in keys if key in self._memory}
        return found | self._lookup([key for key in dict.fromkeys(keys) if key not in found]).keys()

    def key_of_vllm_identifier(self, identifier: str, model_id: str | None = None) -> str | None:
        """The key of this model's entry whose image vLLM identifies as `identifier` (recorded by `encode
        --vllm-model-id`; `model_id`: only for that server --model string), or None."""
        sql = (  # CROSS JOIN: SQLite keeps this order (identifier first), else it may scan the model's entries
            "SELECT e.key FROM vllm_identifiers v CROSS JOIN entries e ON e.fingerprint = ? "
            "AND e.content_sha256 = v.content_sha256 WHERE v.identifier = ?"
        )
        args: tuple[str, ...] = (self.fingerprint, identifier)
        if model_id is not None:
            sql, args = sql + " AND v.model_id = ?", (*args, model_id)
        try:
            row = self._conn().execute(sql + " LIMIT 1", args).fetchone()
        except sqlite3.OperationalError as exc:  # an index made before the table existed
            if "no such table" in str(exc):
                return None
            raise
        return None if row is None else row[0]

    @property
    def stats(self) -> ReaderStats:
        with self._lock:
            return ReaderStats(
                hits=self._hits, misses=self._misses, memory_hits=self._memory_hits,
                evictions=self._evictions, entries_in_memory=len(self._memory),
                bytes_in_memory=self._memory_bytes, capacity=self.capacity,
            )  # fmt: skip

    def close(self) -> None:
        """Close every thread's connection and drop the memory layer; later calls raise ValueError."""
        with self._lock:
            self._closed = True
            self._handles.clear()
            self._memory.clear()
            self._memory_bytes = 0
            for conn in self._conns:
                conn.close()
            self._conns.clear()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """This thread's read-only connection, reopened when it no longer reads the index as it is: a new index
        renamed over the old one (`mmprep index rebuild`), or, on a read-only cache read without its WAL, any
        change to the index files (such a connection does not see later commits)."""
        if self._closed:
            raise ValueError("this EmbeddingCache is closed")
        index: ReadOnlyIndex | None = getattr(self._local, "index", None)
        if index is not None and index.changed():
            self._drop(index)
            index = None
        if index is None:
            index = self._local.index = open_readonly(self.layout.index)
            with self._lock:
                self._conns.append(index.conn)
        return index.conn

    def _drop(self, index: ReadOnlyIndex) -> None:
        """Forget this thread's connection (and the memory layer: the index it reads now may differ in any entry)."""
        self._local.index = None
        with self._lock:
            if index.conn in self._conns:
                self._conns.remove(index.conn)
            self._memory.clear()
            self._memory_bytes = 0
        index.close()

    def _lookup(self, keys: list[str]) -> dict[str, _Row]:
        for attempt in range(2):
            conn = self._conn()
            try:
                return self._query(conn, keys)
            except sqlite3.DatabaseError:
                index = self._local.index
                if attempt or index is None or index.mode == LIVE:
                    raise
                # read without its WAL while a writer elsewhere checkpointed into the file: read it again, freshly
                self._drop(index)
        raise AssertionError("unreachable")

    def _query(self, conn: sqlite3.Connection, keys: list[str]) -> dict[str, _Row]:
        rows: dict[str, _Row] = {}
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            for r in conn.execute(
                f"SELECT key, url, shard, tensors FROM entries WHERE fingerprint=? AND key IN "
                f"({','.join('?' * len(chunk))})",
                (self.fingerprint, *chunk),
            ):
                rows[r[0]] = _Row(r[1], r[2], json.loads(r[3]))
        return rows

    def _load(self, key: str, row: _Row) -> CachedEmbedding | None:
        """Read an entry's tensors; if its shard vanished (gc moved it), look the key up again once."""
        for attempt in range(2):
            try:
                handle = self._handle(row.shard)
                tensors = {entry_tensor_name(key, name): handle.get_tensor(name) for name in row.tensors}
                return CachedEmbedding(key, row.url, row.shard, self.fingerprint, tensors, self.family)
            except (OSError, SafetensorError, RuntimeError) as exc:  # RuntimeError: gc unlinked it inside safe_open
                with self._lock:
                    self._handles.pop(row.shard, None)
                again = self._lookup([key]).get(key) if attempt == 0 else None
                if again is None or again.shard == row.shard:
                    log.warning("cannot read entry %s from shard %s: %s", key, row.shard, exc)
                    return None
                row = again
        return None

    def _handle(self, shard: str) -> Any:
        with self._lock:
            handle = self._handles.get(shard)
            if handle is not None:
                self._handles.move_to_end(shard)
                return handle
        handle = safe_open(str(self.layout.shard_path(shard)), "pt")
        with self._lock:
            self._handles[shard] = handle
            while len(self._handles) > self._max_handles:
                self._handles.popitem(last=False)
        return handle

    def _remember(self, entry: CachedEmbedding) -> None:
        """Keep `entry` in the LRU (caller holds the lock); entries larger than capacity are not kept."""
        n = entry.nbytes
        if n > self.capacity or entry.key in self._memory:
            return
        self._memory[entry.key] = entry
        self._memory_bytes += n
        while self._memory_bytes > self.capacity:
            _key, old = self._memory.popitem(last=False)
            self._memory_bytes -= old.nbytes
            self._evictions += 1


_TIMES = ("created", "checked", "first_seen", "last_seen")  # index columns holding Unix times, shown as ISO 8601


def show_entry(
    root: Path | str, url_or_key: str | None = None, model: str | None = None, *, caller_id: str | None = None
) -> dict[str, Any]:
    """What the cache holds for one URL or key, or for a caller id (`caller_id`, a scan of the index): index rows
    (every model unless `model` is given), the tensors' dtypes and shapes as stored in the shard, and the recorded
    failure if any. Times are ISO 8601 (UTC). `id_matches` counts rows whose caller id is `url_or_key` (a caller id
    given where a URL was expected)."""
    layout = CacheLayout(Path(root))
    if not layout.index.is_file():
        raise UsageError(f"not an mmprep cache directory (no {layout.index.name}): {root}")
    key = None
    if caller_id is None:
        assert url_or_key is not None
        key = url_or_key if _KEY_RE.fullmatch(url_or_key) else cache_key(url_or_key)
    conn = connect(layout.index, readonly=True)
    try:
        if not index_created(conn):  # nothing cached, nothing failed
            return {"query": url_or_key if caller_id is None else {"id": caller_id}, "key": key, "keys": [],
                    "cached": False, "entries": [], "failures": [], "id_matches": 0}  # fmt: skip
        where, args = ("key=?", [key]) if caller_id is None else ("caller_id=?", [caller_id])
        if model is not None:
            where, args = f"{where} AND fingerprint=?", [*args, resolve_model(conn, model)["fingerprint"]]
        names = {r[0]: (r[1], r[2]) for r in conn.execute("SELECT fingerprint, name, family FROM models")}
        entries = []
        for r in conn.execute(f"SELECT * FROM entries WHERE {where} ORDER BY created", args):
            row = _with_iso_times(dict(r))
            row["tensors"], row["shape"] = json.loads(row["tensors"]), json.loads(row["shape"])
            row["model"], row["family"] = names.get(row["fingerprint"], (None, None))
            row["stored"] = _stored_tensors(layout, row["shard"], row["tensors"])
            row["by_name"] = {entry_tensor_name(row["key"], n): row["stored"].get(n) for n in row["tensors"]}
            entries.append(row)
        failures = [_failure_json(dict(r)) for r in conn.execute(f"SELECT * FROM failures WHERE {where}", args)]
        id_matches = 0
        if caller_id is None and not entries and not failures:  # a caller id given as the URL?
            id_matches = conn.execute(
                "SELECT (SELECT count(*) FROM entries WHERE caller_id=?) + (SELECT count(*) FROM failures WHERE caller_id=?)",
                (url_or_key, url_or_key),
            ).fetchone()[0]
    finally:
        conn.close()
    keys = sorted({row["key"] for row in entries + failures})
    if caller_id is not None:
        key = keys[0] if len(keys) == 1 else None
    return {
        "query": url_or_key if caller_id is None else {"id": caller_id}, "key": key, "keys": keys,
        "cached": bool(entries), "entries": entries, "failures": failures, "id_matches": id_matches,
    }  # fmt: skip


def _failure_json(row: dict[str, Any]) -> dict[str, Any]:
    """A failures row as errors.jsonl writes a record: `retryable` a boolean, `depends_on` an object (not JSON text)."""
    row = _with_iso_times(row)
    row["retryable"] = bool(row["retryable"])
    if row.get("depends_on") is not None:
        row["depends_on"] = json.loads(row["depends_on"])
    return row


def _with_iso_times(row: dict[str, Any]) -> dict[str, Any]:
    return {name: utc_iso(value) if name in _TIMES else value for name, value in row.items()}


def _stored_tensors(layout: CacheLayout, shard: str, names: list[str]) -> dict[str, Any]:
    try:
        stored = read_header(layout.shard_path(shard)).tensors
    except (OSError, HeaderError) as exc:
        return {"error": f"shard unreadable: {exc}"}
    return {
        n: {"dtype": stored[n].dtype, "shape": stored[n].shape} if n in stored else {"error": "missing from shard"}
        for n in names
    }


def export_entry(entry: CachedEmbedding, path: Path | str) -> list[Path]:
    """Write all of an entry's tensors to `path`: .safetensors (one tensor per name: "embeddings",
    "image_grid_thw", ...), or .npy (the embeddings; each other tensor to "<stem>.<name>.npy";
    bfloat16 becomes float32). Returns the files written."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--export names a file (.safetensors or .npy), and {path} is a directory")
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        import numpy as np

        written = []
        for name, tensor in entry.tensors.items():
            target = path if name == EMBEDDINGS else path.with_name(f"{path.stem}.{name}.npy")
            np.save(target, (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy())
            written.append(target)
        return written
    tensors = {name: tensor.contiguous() for name, tensor in entry.tensors.items()}
    meta = {
        "key": entry.key, "url": entry.url, "model_fingerprint": entry.fingerprint, "shard": entry.shard,
        "family": entry.family,
    }  # fmt: skip
    save_file(tensors, str(path), metadata=meta)
    return [path]
