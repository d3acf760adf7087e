"""Garbage collection: drop entries nobody needs any more and give their disk space back.

Order of operations, so that readers never break and a crash never loses a live entry:
1. entry rows are deleted from the index (one transaction);
2. a shard whose live bytes fell under `live_threshold` is rewritten with only its live tensors
   under a NEW name (written atomically) and its index rows are repointed in one transaction; then
   the old file is deleted, then its (now entry-less) row; a shard with no live entry loses its
   file, then its row.
A reader that already mapped the old file keeps reading it (POSIX keeps an unlinked file's data
while it is open); a reader that looks the entry up afterwards gets the new shard. A file is never
deleted while still listed with live entries, and never left unlisted with entries gc dropped. A
crash inside the write leaves a temporary file; between the write and the commit, an orphan whose
entries are all indexed elsewhere; after the commit, a listed shard (or a row whose file is gone)
with no entry. The next gc deletes the temporary files, indexes the orphans (`adopt_orphans`: no
entry of theirs is live) and deletes every shard without live entries: no `verify --repair` needed.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mmprep.version import __version__
from mmprep.errors import UsageError
from mmprep.faults import fault_point
from mmprep.settings import parse_duration  # noqa: F401 (its old home)
from mmprep.store.index import CacheIndex
from mmprep.store.layout import SHARD_SUFFIX, CacheLayout
from mmprep.store.lock import WriterLock
from mmprep.store.reader import resolve_model
from mmprep.store.rebuild import ShardInfo, ShardUnreadable, adopt_orphans, read_shard, shard_files
from mmprep.store.shards import fsync_dir, write_atomic


@dataclass
class GcReport:
    """What `collect_garbage` did (or, with dry_run, would do)."""

    dry_run: bool
    entries_dropped: int = 0
    shards_deleted: list[str] = field(default_factory=list)  # no live entry left
    shards_compacted: list[tuple[str, str | None]] = field(default_factory=list)  # (old, new); new None in dry run
    bytes_freed: int = 0  # estimated in a dry run
    models_removed: list[str] = field(default_factory=list)  # fingerprints with nothing left
    skipped: list[str] = field(default_factory=list)  # shards not compacted (missing/unreadable: run verify)
    # left by an interrupted gc or encode (not in a dry run): temporary files deleted, orphan shards indexed
    # (an interrupted gc's orphans hold no live entry: they are deleted with the dead shards)
    temp_files_removed: list[str] = field(default_factory=list)
    orphans_adopted: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Doomed:
    fingerprint: str
    key: str
    shard: str


def collect_garbage(
    root: Path | str,
    *,
    model: str | None = None,
    older_than: float | None = None,
    keep_last_runs: int | None = None,
    dry_run: bool = False,
    live_threshold: float = 0.5,
    wait: float | None = 0,
) -> GcReport:
    """Drop entries, then compact or delete the shards they leave mostly or wholly dead.

    Entries are dropped when they match every given filter: `model` (fingerprint, prefix or name),
    `older_than` (seconds since encoded), `keep_last_runs` (not written by the model's N newest
    runs that wrote entries). With no filter nothing is dropped and gc only compacts.
    """
    layout = CacheLayout(Path(root))
    if not layout.index.is_file():
        raise UsageError(f"not an mmprep cache directory (no {layout.index.name}): {root}")
    report = GcReport(dry_run=dry_run)
    with WriterLock(layout.root, wait):
        index = CacheIndex(layout.index)
        try:
            db = index.conn
            fingerprint = resolve_model(db, model)["fingerprint"] if model is not None else None
            if not dry_run:  # what a killed gc (or encode) left: its temporary files, its orphan shards
                report.temp_files_removed = [str(t) for t in shard_files(layout)[1]]
                report.orphans_adopted = adopt_orphans(index, layout)  # deletes the temporary files too
            doomed = _select(index, fingerprint, older_than, keep_last_runs)
            report.entries_dropped = len(doomed)
            if not dry_run:
                with db:
                    db.executemany(
                        "DELETE FROM entries WHERE fingerprint=? AND key=?", [(d.fingerprint, d.key) for d in doomed]
                    )
            _sweep_shards(index, layout, doomed if dry_run else [], live_threshold, report)
            if fingerprint is not None:
                left = db.execute("SELECT count(*) FROM entries WHERE fingerprint=?", (fingerprint,)).fetchone()[0]
                if left - (len(doomed) if dry_run else 0) == 0:
                    report.models_removed.append(fingerprint)
                    if not dry_run:
                        with db:
                            db.execute("DELETE FROM failures WHERE fingerprint=?", (fingerprint,))
                            db.execute("DELETE FROM models WHERE fingerprint=?", (fingerprint,))
        finally:
            index.close()
    return report


def forget_failures(
    root: Path | str,
    *,
    model: str | None = None,
    kind: str | None = None,
    older_than: float | None = None,
    dry_run: bool = False,
    wait: float | None = 0,
) -> int:
    """Forget the failure records that match every given filter (`model`; `kind`; `older_than`: last failed more
    than that many seconds ago), so the next run tries those rows again as new. Returns how many (would) go."""
    from mmprep.errors import ErrorKind

    kinds = [k.value for k in ErrorKind]
    if kind is not None and kind not in kinds:
        raise UsageError(f"--kind: unknown error kind {kind!r}; kinds: {', '.join(kinds)}")
    layout = CacheLayout(Path(root))
    if not layout.index.is_file():
        raise UsageError(f"not an mmprep cache directory (no {layout.index.name}): {root}")
    with WriterLock(layout.root, wait):
        index = CacheIndex(layout.index)
        try:
            db = index.conn
            where, args = ["1"], []
            if model is not None:
                where.append("fingerprint=?")
                args.append(resolve_model(db, model)["fingerprint"])
            if kind is not None:
                where.append("kind=?")
                args.append(kind)
            if older_than is not None:
                where.append("last_seen < ?")
                args.append(time.time() - older_than)
            condition = " AND ".join(where)
            if dry_run:
                return int(db.execute(f"SELECT count(*) FROM failures WHERE {condition}", args).fetchone()[0])
            with db:
                return db.execute(f"DELETE FROM failures WHERE {condition}", args).rowcount
        finally:
            index.close()


def _select(
    index: CacheIndex, fingerprint: str | None, older_than: float | None, keep_last_runs: int | None
) -> list[_Doomed]:
    if fingerprint is None and older_than is None and keep_last_runs is None:
        return []
    where, args = ["1"], []
    if fingerprint is not None:
        where.append("fingerprint=?")
        args.append(fingerprint)
    if older_than is not None:
        where.append("created < ?")
        args.append(time.time() - older_than)
    kept: set[tuple[str, str]] | None = None
    if keep_last_runs is not None:
        ranked: dict[str, list[tuple[float, str]]] = {}
        for fp, run_id, started in index.conn.execute(
            "SELECT e.fingerprint, e.run_id, coalesce(r.started, min(e.created)) FROM entries e "
            "LEFT JOIN runs r ON r.run_id = e.run_id GROUP BY e.fingerprint, e.run_id"
        ):
            ranked.setdefault(fp, []).append((started, run_id))
        kept = {(fp, run) for fp, runs in ranked.items() for _t, run in sorted(runs, reverse=True)[:keep_last_runs]}
    rows = index.conn.execute(f"SELECT fingerprint, key, shard, run_id FROM entries WHERE {' AND '.join(where)}", args)
    return [_Doomed(fp, key, shard) for fp, key, shard, run in rows if kept is None or (fp, run) not in kept]


def _sweep_shards(
    index: CacheIndex, layout: CacheLayout, gone: list[_Doomed], threshold: float, report: GcReport
) -> None:
    """Delete shards without live entries; compact those whose live fraction (live tensor bytes /
    all tensor bytes of the shard) is under `threshold`."""
    db = index.conn
    live = Counter(dict(db.execute("SELECT shard, count(*) FROM entries GROUP BY shard")))
    live.subtract(d.shard for d in gone)  # dry run: the entries that would have been dropped
    gone_keys = {(d.fingerprint, d.key) for d in gone}
    for name, stored_entries, nbytes, run_id in list(db.execute("SELECT name, entries, bytes, run_id FROM shards")):
        if live[name] <= 0:
            report.shards_deleted.append(name)
            report.bytes_freed += nbytes
            if not report.dry_run:  # the file first: killed in between, its row (no entry) is deleted next time
                layout.shard_path(name).unlink(missing_ok=True)
                with db:
                    db.execute("DELETE FROM shards WHERE name=?", (name,))
            continue
        if live[name] >= stored_entries:
            continue
        keys = [k for fp, k in db.execute("SELECT fingerprint, key FROM entries WHERE shard=?", (name,))
                if (fp, k) not in gone_keys]  # fmt: skip
        try:
            info = read_shard(layout, name)
        except ShardUnreadable:
            report.skipped.append(name)
            continue
        described = {d["key"]: d for d in info.entries}
        live_bytes = sum(info.tensor_bytes(t) for k in keys for t in described[k]["tensors"])
        if live_bytes >= threshold * sum(info.tensor_bytes(t) for t in info.tensors):
            continue
        if report.dry_run:
            report.shards_compacted.append((name, None))
            report.bytes_freed += info.nbytes - live_bytes
            continue
        new, new_bytes = _compact(index, layout, info, [described[k] for k in keys], run_id)
        report.shards_compacted.append((name, new))
        report.bytes_freed += info.nbytes - new_bytes


def _compact(
    index: CacheIndex, layout: CacheLayout, info: ShardInfo, keep: list[dict[str, object]], run_id: str
) -> tuple[str, int]:
    """Rewrite `info` with only the `keep` entries under a new name; repoint the index; delete the old."""
    from safetensors import safe_open  # here, not at the top: only compaction reads tensors (torch)
    from safetensors.torch import save

    with safe_open(str(info.path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {t: f.get_tensor(t) for d in keep for t in d["tensors"]}  # type: ignore[attr-defined]  # safe_open's "pt" handle: untyped
    meta.update(entries=json.dumps(keep, separators=(",", ":")), compacted_from=info.name, mmprep_version=__version__)
    blob = save(tensors, metadata=meta)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + uuid.uuid4().hex[:6]
    new = f"{layout.shard_dir(info.fingerprint).name}/{run_id}-gc{stamp}{SHARD_SUFFIX}"
    write_atomic(layout.shard_path(new), blob)
    fault_point("gc_after_rename")
    with index.conn as db:
        db.execute(
            "INSERT INTO shards VALUES (?,?,?,?,?,?,?)",
            (new, info.fingerprint, len(keep), len(blob), hashlib.sha256(blob).hexdigest(), run_id, time.time()),
        )
        db.execute("UPDATE entries SET shard=? WHERE shard=?", (new, info.name))
    fault_point("gc_after_commit")
    # The old file goes before its row: an orphan of it would hold the entries this gc dropped (and adopting it
    # would bring them back); a row without entries is what the next gc deletes anyway.
    info.path.unlink(missing_ok=True)
    fsync_dir(info.path.parent)
    with index.conn as db:
        db.execute("DELETE FROM shards WHERE name=?", (info.name,))
    return new, len(blob)
