"""Rebuilding the index from the shards: the index is derived data, losing it never loses the cache.

Every shard describes itself (model fingerprint, run, and each entry's url, id, content hash,
created time and tensor names); tensor dtypes and shapes come from the safetensors header.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmprep.errors import IndexUnreadableError
from mmprep.store.header import DTYPES, HeaderError, read_header
from mmprep.store.index import ENTRY_INSERT, FAILURE_COLUMNS, CacheIndex, connect, failure_columns
from mmprep.store.layout import (
    GRID_SUFFIX,
    INDEX_NAME,
    SHARD_FORMAT,
    SHARD_FORMAT_VERSION,
    SHARD_SUFFIX,
    TMP_SUFFIX,
    CacheLayout,
)
from mmprep.store.lock import WriterLock
from mmprep.store.shards import fsync_dir

_REBUILD_TMP = f"{INDEX_NAME}.rebuild-"

_REQUIRED = frozenset({"key", "url", "tensors", "content_sha256", "created"})


_ITEMSIZE = {name: size for name, size in DTYPES.values()}  # torch dtype name -> bytes per element


class ShardUnreadable(Exception):
    """A shard file whose header or self-description cannot be used.

    `corrupt` is False for a valid shard of another format version (never delete those).
    """

    def __init__(self, message: str, *, corrupt: bool = True) -> None:
        super().__init__(message)
        self.corrupt = corrupt


@dataclass(frozen=True)
class ShardInfo:
    """What a shard says about itself, read from its header only (no tensor data)."""

    name: str  # relative to shards/
    path: Path
    fingerprint: str
    model: str
    run_id: str
    entries: list[dict[str, Any]]  # the entries' self-descriptions, as stored
    tensors: dict[str, tuple[str, list[int]]]  # tensor name -> (torch dtype name, shape)
    nbytes: int  # file size
    recorded_family: str | None = None  # the shard's "model_family" (absent in shards of mmprep <= 0.x)

    def tensor_bytes(self, name: str) -> int:
        dtype, shape = self.tensors[name]
        n = _ITEMSIZE[dtype]
        for d in shape:
            n *= d
        return n

    def entry_rows(self) -> list[tuple[Any, ...]]:
        """`entries` table rows for the described entries whose tensors are all present."""
        rows = []
        for d in self.entries:
            if d["key"] not in self.tensors or any(t not in self.tensors for t in d["tensors"]):
                continue
            dtype, shape = self.tensors[d["key"]]
            rows.append((
                self.fingerprint, d["key"], d["url"], d.get("id"), self.name, json.dumps(d["tensors"]),
                dtype, json.dumps(shape), d["content_sha256"], d.get("etag"), d.get("last_modified"),
                self.run_id, d["created"],
            ))  # fmt: skip
        return rows

    def shard_row(self) -> tuple[Any, ...]:
        """The `shards` table row (hashes the whole file)."""
        created = self.path.stat().st_mtime
        return (self.name, self.fingerprint, len(self.entries), self.nbytes, file_sha256(self.path),
                self.run_id, created)  # fmt: skip

    @property
    def family(self) -> str:
        """The family the shard records; for older shards, as far as the tensors tell: qwen2_vl (grid
        tensor), pooled (1-D), llava (the only families that existed before shards recorded it)."""
        if self.recorded_family:
            return self.recorded_family
        if any(name.endswith(GRID_SUFFIX) for name in self.tensors):
            return "qwen2_vl"
        first = self.tensors.get(self.entries[0]["key"]) if self.entries else None
        return "pooled" if first is not None and len(first[1]) == 1 else "llava"


@dataclass(frozen=True)
class RebuildReport:
    """What `rebuild_index` found and wrote."""

    shards: int  # shards indexed
    entries: int  # entry rows in the new index
    models: list[str]  # fingerprints
    unreadable: list[str]  # shard files skipped (left on disk; see `mmprep verify`)
    duplicates: int  # entries found in more than one shard (the newest one is indexed)
    old_index: str  # "readable" (runs/failures/models kept), "unreadable" or "missing"
    kept_runs: int
    kept_failures: int


def read_shard(layout: CacheLayout, name: str) -> ShardInfo:
    """Read a shard's self-description and tensor header; raise ShardUnreadable if it is unusable."""
    path = layout.shard_path(name)
    try:
        header = read_header(path)
        meta = header.metadata
        tensors = {key: (info.torch_dtype, info.shape) for key, info in header.tensors.items()}
        nbytes = path.stat().st_size
    except (OSError, HeaderError) as exc:
        raise ShardUnreadable(f"{name}: {exc}") from exc
    if meta.get("format") != SHARD_FORMAT:
        raise ShardUnreadable(f"{name}: not an mmprep shard (format={meta.get('format')!r})")
    if meta.get("format_version") != SHARD_FORMAT_VERSION:
        raise ShardUnreadable(
            f"{name}: shard format version {meta.get('format_version')!r} (this mmprep reads "
            f"{SHARD_FORMAT_VERSION}); written by another mmprep version",
            corrupt=False,
        )
    try:
        entries = json.loads(meta["entries"])
        fingerprint, model, run_id = meta["model_fingerprint"], meta["model"], meta["run_id"]
        for d in entries:
            if missing := _REQUIRED - d.keys():
                raise KeyError(f"entry without {sorted(missing)}")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ShardUnreadable(f"{name}: bad self-description ({exc!r})") from exc
    return ShardInfo(name, path, fingerprint, model, run_id, entries, tensors, nbytes, meta.get("model_family"))


def shard_files(layout: CacheLayout) -> tuple[list[str], list[Path]]:
    """Shard names on disk (sorted, relative to shards/) and leftover temporary files."""
    names: list[str] = []
    tmps: list[Path] = []
    if layout.shards.is_dir():
        for dirpath, _dirs, files in os.walk(layout.shards):
            for f in files:
                p = Path(dirpath) / f
                if f.endswith(TMP_SUFFIX):
                    tmps.append(p)
                elif f.endswith(SHARD_SUFFIX):
                    names.append(p.relative_to(layout.shards).as_posix())
    tmps.extend(layout.root.glob(_REBUILD_TMP + "*"))
    return sorted(names), sorted(tmps)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def adopt_orphans(index: CacheIndex, layout: CacheLayout) -> list[str]:
    """Index shards that are on disk but not in the index, and delete temporary leftovers.

    A writer that crashed between a shard's rename and its index commit leaves such an orphan.
    Entries already indexed elsewhere keep their row (an orphan never overrides a committed
    entry), so the result does not depend on the order. Unreadable orphans are skipped (verify
    reports them). Call it holding the WriterLock; returns the adopted shard names.
    """
    names, tmps = shard_files(layout)
    for tmp in tmps:
        tmp.unlink(missing_ok=True)
    listed = {row[0] for row in index.conn.execute("SELECT name FROM shards")}
    adopted = []
    for name in names:
        if name in listed:
            continue
        try:
            info = read_shard(layout, name)
        except ShardUnreadable:
            continue
        index.register_model(info.fingerprint, info.model, info.family, {"adopted": True})
        rows = info.entry_rows()
        with index.conn:
            index.conn.execute("INSERT OR REPLACE INTO shards VALUES (?,?,?,?,?,?,?)", info.shard_row())
            index.conn.executemany("INSERT OR IGNORE " + ENTRY_INSERT, rows)
            index.conn.executemany("DELETE FROM failures WHERE fingerprint=? AND key=?", [r[:2] for r in rows])
        adopted.append(name)
    return adopted


def rebuild_index(root: Path | str, *, wait: float | None = 0) -> RebuildReport:
    """Recreate index.sqlite from the shards alone; runs, failures and models of a readable old
    index are kept. The new index is built under a temporary name and renamed into place."""
    layout = CacheLayout(Path(root))
    with WriterLock(layout.root, wait):
        old_status, old = _read_old_index(layout.index)
        names, _tmps = shard_files(layout)
        infos, unreadable = [], []
        for name in names:
            try:
                infos.append(read_shard(layout, name))
            except ShardUnreadable:
                unreadable.append(name)
        tmp = layout.root / f"{_REBUILD_TMP}{os.getpid()}{TMP_SUFFIX}"
        _unlink_db(tmp)
        index = CacheIndex(tmp)
        try:
            db = index.conn
            with db:
                for table, rows in old.items():
                    columns = f" ({FAILURE_COLUMNS})" if table == "failures" else ""  # an old index: schema 1 or 2
                    for row in rows:
                        db.execute(f"INSERT OR IGNORE INTO {table}{columns} VALUES ({','.join('?' * len(row))})", row)
                for info in infos:
                    created = min((d["created"] for d in info.entries), default=0.0)
                    db.execute(
                        "INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?, ?)",
                        (info.fingerprint, info.model, info.family, json.dumps({"rebuilt": True}), created),
                    )
                    db.execute("INSERT INTO shards VALUES (?,?,?,?,?,?,?)", info.shard_row())
                # the newest copy of an entry wins, whatever order the files are listed in
                rows = sorted((r for info in infos for r in info.entry_rows()), key=lambda r: (r[12], r[4]))
                db.executemany("INSERT OR REPLACE " + ENTRY_INSERT, rows)
                db.execute(
                    "DELETE FROM failures WHERE EXISTS (SELECT 1 FROM entries e "
                    "WHERE e.fingerprint=failures.fingerprint AND e.key=failures.key)"
                )
            entries = db.execute("SELECT count(*) FROM entries").fetchone()[0]
            models = [r[0] for r in db.execute("SELECT fingerprint FROM models ORDER BY created")]
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file before the rename
        finally:
            index.close()
        _unlink_db(tmp, keep_main=True)
        for suffix in ("-wal", "-shm"):  # a stale WAL must never be applied to the new file
            Path(f"{layout.index}{suffix}").unlink(missing_ok=True)
        os.replace(tmp, layout.index)
        fsync_dir(layout.root)
    return RebuildReport(
        shards=len(infos), entries=entries, models=models, unreadable=unreadable,
        duplicates=len(rows) - entries, old_index=old_status,
        kept_runs=len(old.get("runs", [])), kept_failures=len(old.get("failures", [])),
    )  # fmt: skip


def _read_old_index(path: Path) -> tuple[str, dict[str, list[tuple[Any, ...]]]]:
    if not path.is_file():
        return "missing", {}
    try:
        conn = connect(path, readonly=True)
        try:
            selects = {"models": "*", "runs": "*", "failures": failure_columns(conn)}
            return "readable", {
                t: [tuple(r) for r in conn.execute(f"SELECT {cols} FROM {t}")] for t, cols in selects.items()
            }
        finally:
            conn.close()
    except (sqlite3.DatabaseError, IndexUnreadableError):
        return "unreadable", {}


def _unlink_db(path: Path, *, keep_main: bool = False) -> None:
    for suffix in ("-wal", "-shm") if keep_main else ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
