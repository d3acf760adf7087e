"""`mmprep merge`: fold several cache directories into one (e.g. the N parts of a `--shard I/N` job).

Crash safety follows encode's rule: a shard file lands in DEST first (atomically, under its own
name; shard names are unique per run), then its index rows are committed in one transaction. A
rerun skips the shards DEST already lists and places the others again, so kill -9 at any point and
a rerun give the result of one clean merge. Sources are only read (their index read-only).

Per model fingerprint, a key present on both sides keeps DEST's entry: identical image bytes
(same content sha256) are simply one entry, different bytes are a conflict listed in the report.
Different fingerprints are different namespaces and never meet.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from mmprep.errors import UsageError
from mmprep.faults import fault_point
from mmprep.store.index import FAILURE_COLUMNS, CacheIndex, connect, failure_columns
from mmprep.store.layout import TMP_SUFFIX, CacheLayout
from mmprep.store.lock import WriterLock
from mmprep.store.rebuild import adopt_orphans
from mmprep.store.shards import fsync_dir

ENTRY_ALL_COLUMNS = (
    "fingerprint, key, url, caller_id, shard, tensors, dtype, shape, content_sha256, etag, last_modified, "
    "run_id, created, checked"
)


@dataclass(frozen=True)
class MergeConflict:
    """One key of one model with different image bytes in DEST and in a source (DEST's is kept)."""

    source: str
    fingerprint: str
    key: str
    url: str
    kept_shard: str  # DEST's entry
    source_shard: str  # the source's entry, not indexed (its bytes stay in the copied shard)


@dataclass
class MergeReport:
    """What `merge_caches` did; rerunning a finished merge reports the same conflicts and adds nothing."""

    dest: str
    sources: list[str]
    shards_copied: int = 0
    shards_linked: int = 0  # --move: hard links instead of copies
    shards_present: int = 0  # already in DEST (an earlier merge of the same source)
    entries_added: int = 0
    entries_identical: int = 0  # key already in DEST with the same content
    failures_merged: int = 0
    runs_merged: int = 0
    models_merged: int = 0
    missing_shards: list[str] = field(default_factory=list)  # listed by a source but not on its disk
    conflicts: list[MergeConflict] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 clean, 1 when conflicts were found."""
        return 1 if self.conflicts else 0


def merge_caches(
    dest: Path | str, sources: list[Path | str], *, move: bool = False, wait: float | None = 0
) -> MergeReport:
    """Merge the `sources` cache directories into `dest` (created if needed) under DEST's writer lock.

    `move`: hard-link shard files instead of copying them where the file system allows (no bytes
    copied; the sources stay valid caches and can be deleted afterwards).
    """
    layout = CacheLayout(Path(dest))
    source_layouts = [CacheLayout(Path(s)) for s in sources]
    for src in source_layouts:
        if not src.index.is_file():
            raise UsageError(f"not an mmprep cache directory (no {src.index.name}): {src.root}")
        if layout.root.exists() and src.root.resolve() == layout.root.resolve():
            raise UsageError(f"cannot merge {src.root} into itself")
        if layout.root.resolve().is_relative_to(src.root.resolve()):  # its shards would be the source's orphans
            raise UsageError(
                f"DEST {layout.root} lies inside the source cache {src.root}; choose a directory outside it"
            )
        connect(src.index, readonly=True).close()  # a corrupt or newer source is refused before DEST is made
    report = MergeReport(dest=str(layout.root), sources=[str(s.root) for s in source_layouts])
    with WriterLock(layout.root, wait):
        index = CacheIndex(layout.index)
        try:
            for src in source_layouts:
                source = connect(src.index, readonly=True)
                try:
                    _merge_one(index, layout, src, source, move, report)
                finally:
                    source.close()
            adopt_orphans(index, layout)  # DEST's own leftovers of a crashed encode; temp files
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"cannot merge: {exc}") from exc
        finally:
            index.close()
    return report


def _merge_one(
    index: CacheIndex, layout: CacheLayout, src: CacheLayout, source: sqlite3.Connection, move: bool,
    report: MergeReport,
) -> None:  # fmt: skip
    """Models first, then shard by shard (file, then rows), then failures, runs and error files."""
    db = index.conn
    with db:
        for row in source.execute("SELECT * FROM models"):
            report.models_merged += db.execute("INSERT OR IGNORE INTO models VALUES (?,?,?,?,?)", tuple(row)).rowcount
    listed = {r[0]: r[1] for r in db.execute("SELECT name, sha256 FROM shards")}
    for shard in source.execute("SELECT * FROM shards ORDER BY name").fetchall():
        rows = source.execute(f"SELECT {ENTRY_ALL_COLUMNS} FROM entries WHERE shard=?", (shard["name"],)).fetchall()
        new_rows = _sort_rows(db, src, rows, report)
        if shard["name"] in listed:
            report.shards_present += 1
            continue
        origin = src.shard_path(shard["name"])
        if not origin.is_file():
            report.missing_shards.append(str(origin))
            continue
        linked = _place(origin, layout.shard_path(shard["name"]), link=move)
        report.shards_linked += linked
        report.shards_copied += not linked
        fault_point("merge_after_copy")
        with db:
            db.execute("INSERT OR REPLACE INTO shards VALUES (?,?,?,?,?,?,?)", tuple(shard))
            db.executemany(f"INSERT OR IGNORE INTO entries ({ENTRY_ALL_COLUMNS}) VALUES ({_marks(14)})", new_rows)
            fault_point("merge_in_commit")
            db.executemany("DELETE FROM failures WHERE fingerprint=? AND key=?", [r[:2] for r in new_rows])
        report.entries_added += len(new_rows)
    with db:
        for row in source.execute(f"SELECT {failure_columns(source)} FROM failures"):
            # a cached entry beats a failure; between two failures the most recent one wins
            report.failures_merged += db.execute(
                f"""INSERT INTO failures ({FAILURE_COLUMNS}) SELECT {_marks(15)}
                    WHERE NOT EXISTS (SELECT 1 FROM entries WHERE fingerprint=? AND key=?)
                    ON CONFLICT (fingerprint, key) DO UPDATE SET
                      url=excluded.url, caller_id=excluded.caller_id, source=excluded.source,
                      line=excluded.line, kind=excluded.kind, message=excluded.message,
                      status=excluded.status, retryable=excluded.retryable, attempts=excluded.attempts,
                      run_id=excluded.run_id, first_seen=min(failures.first_seen, excluded.first_seen),
                      last_seen=excluded.last_seen, depends_on=excluded.depends_on
                    WHERE excluded.last_seen > failures.last_seen""",
                (*tuple(row), row["fingerprint"], row["key"]),
            ).rowcount
        for row in source.execute("SELECT * FROM runs"):
            report.runs_merged += db.execute(  # a run copied while it was still running is completed later
                "INSERT INTO runs VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (run_id) DO UPDATE SET finished=excluded.finished, "
                "status=excluded.status, exit_code=excluded.exit_code, summary=excluded.summary "
                "WHERE runs.finished IS NULL AND excluded.finished IS NOT NULL",
                tuple(row),
            ).rowcount
    for errors in sorted(src.errors.glob("*.jsonl")) if src.errors.is_dir() else []:
        target = layout.errors / errors.name
        if not target.exists():
            _place(errors, target, link=False)


def _sort_rows(
    db: sqlite3.Connection, src: CacheLayout, rows: list[sqlite3.Row], report: MergeReport
) -> list[tuple[object, ...]]:
    """The source rows DEST lacks; rows DEST already holds count as identical or as conflicts."""
    new_rows = []
    for row in rows:
        mine = db.execute(
            "SELECT shard, content_sha256 FROM entries WHERE fingerprint=? AND key=?", (row["fingerprint"], row["key"])
        ).fetchone()
        if mine is None:
            new_rows.append(tuple(row))
        elif mine["content_sha256"] != row["content_sha256"]:
            report.conflicts.append(
                MergeConflict(str(src.root), row["fingerprint"], row["key"], row["url"], mine["shard"], row["shard"])
            )
        elif mine["shard"] != row["shard"]:
            report.entries_identical += 1
    return new_rows


def _place(origin: Path, target: Path, *, link: bool) -> bool:
    """Put a copy (or a hard link) of `origin` at `target` atomically; True when it was linked."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + TMP_SUFFIX)
    tmp.unlink(missing_ok=True)
    linked = False
    if link:
        try:
            os.link(origin, tmp)
            linked = True
        except OSError:  # another file system, or links not supported: copy instead
            pass
    if not linked:
        with open(origin, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)
    return linked


def _marks(n: int) -> str:
    return ",".join("?" * n)
