"""`mmprep verify`: check that the index and the shards agree, and optionally repair what does not.

The shards are the truth and the index is derived from them, so repairs move the index towards
the shards: rows of missing or corrupt shards are dropped (those URLs are simply encoded again by
the next run), shapes/dtypes are corrected from the shard header, valid orphan shards are adopted.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mmprep.errors import UsageError
from mmprep.store.index import NEVER_CREATED, CacheIndex, index_created
from mmprep.store.layout import CacheLayout
from mmprep.store.lock import WriterLock, lock_holder
from mmprep.store.rebuild import ShardInfo, ShardUnreadable, adopt_orphans, file_sha256, read_shard, shard_files

KINDS = (
    "missing_shard",  # the index lists a shard that is not on disk
    "orphan_shard",  # a shard on disk that the index does not list
    "missing_tensor",  # an entry's tensor is absent from its shard
    "shape_mismatch",  # index and shard header disagree on an entry's shape
    "dtype_mismatch",  # ... or dtype
    "unreadable_shard",  # corrupt header / not an mmprep shard / another format version
    "checksum_mismatch",  # deep only: the file's sha256 differs from the one recorded at write time
    "stray_tmp",  # a temporary file left by a crashed writer
)


@dataclass(frozen=True)
class Problem:
    """One disagreement between the index and the files."""

    kind: str  # one of KINDS
    shard: str | None  # relative to shards/ (or the temporary file's path for stray_tmp)
    key: str | None
    detail: str


@dataclass
class VerifyReport:
    """Problems found (before any repair) and repairs done."""

    deep: bool
    problems: list[Problem] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    shards_checked: int = 0
    entries_checked: int = 0
    entries_dropped: int = 0  # repair: index rows dropped; the next run that lists their URLs encodes them again
    quarantined: list[str] = field(default_factory=list)  # repair: damaged shards moved to quarantine/
    writer_active: str | None = None  # holder of the writer lock: orphan/temp checks were skipped
    index_note: str | None = None  # the index itself, when it is not an ordinary one (never created)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        """0 clean, 1 problems found (repaired or not)."""
        return 0 if self.ok else 1

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.problems))

    def counts_text(self) -> str:
        """'2 missing_shard, 1 stray_tmp': the problems by kind, in words."""
        return ", ".join(f"{n} {kind}" for kind, n in self.counts().items())


def verify_cache(root: Path | str, *, deep: bool = False, repair: bool = False, wait: float | None = 0) -> VerifyReport:
    """Compare the index with the shard files; `deep` re-hashes every shard; `repair` fixes what it
    can (it takes the writer lock; a plain check does not and skips checks a live writer makes racy)."""
    layout = CacheLayout(Path(root))
    if not layout.index.is_file():
        raise UsageError(f"not an mmprep cache directory (no {layout.index.name}): {root}; see `mmprep index rebuild`")
    report = VerifyReport(deep=deep)
    try:
        if not repair:
            report.writer_active = lock_holder(layout.root)
            index = CacheIndex(layout.index, readonly=True)
            try:
                _check(index, layout, report)
            finally:
                index.close()
            return report
        with WriterLock(layout.root, wait):
            index = CacheIndex(layout.index)
            try:
                infos, foreign = _check(index, layout, report)
                _repair(index, layout, report, infos, foreign)
            finally:
                index.close()
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"index {layout.index} is unreadable ({exc}); run `mmprep index rebuild`") from exc
    return report


def _check(index: CacheIndex, layout: CacheLayout, report: VerifyReport) -> tuple[dict[str, ShardInfo], set[str]]:
    """Fill report.problems; return the readable shards' headers and the shards of other format versions."""
    db = index.conn
    db.execute("BEGIN")  # one consistent snapshot of shards and entries
    recorded: dict[str, str] = {}
    entries: dict[str, list[sqlite3.Row]] = {}
    if index_created(db):
        recorded = {r[0]: r[1] for r in db.execute("SELECT name, sha256 FROM shards")}
        for r in db.execute("SELECT shard, key, tensors, dtype, shape FROM entries"):
            entries.setdefault(r["shard"], []).append(r)
    else:  # (only without --repair: opened writable, it gets its tables)
        report.index_note = f"{layout.index.name} {NEVER_CREATED}"
    db.execute("ROLLBACK")
    report.entries_checked = sum(len(v) for v in entries.values())
    names, tmps = shard_files(layout)
    racy = report.writer_active is not None
    problems = report.problems
    if not racy:
        problems += [Problem("stray_tmp", str(t), None, "temporary file of an interrupted write") for t in tmps]
    for name in sorted((set(recorded) | set(entries)) - set(names)):
        if racy and not _still_missing(index, layout, name):
            continue
        n = len(entries.get(name, []))
        problems.append(Problem("missing_shard", name, None, f"file gone; {n} index entries point to it"))
    infos: dict[str, ShardInfo] = {}
    foreign: set[str] = set()
    for name in names:
        report.shards_checked += 1
        try:
            info = infos[name] = read_shard(layout, name)
        except ShardUnreadable as exc:
            problems.append(Problem("unreadable_shard", name, None, str(exc)))
            if not exc.corrupt:
                foreign.add(name)
            continue
        if name not in recorded:
            if not racy:
                problems.append(Problem("orphan_shard", name, None, f"not in the index ({len(info.entries)} entries)"))
            continue
        for row in entries.get(name, []):
            problems += _check_entry(info, row)
        if report.deep and file_sha256(info.path) != recorded[name]:
            problems.append(Problem("checksum_mismatch", name, None, "file content changed since it was written"))
    return infos, foreign


def _check_entry(info: ShardInfo, row: sqlite3.Row) -> list[Problem]:
    key, out = row["key"], []
    for t in json.loads(row["tensors"]):
        if t not in info.tensors:
            out.append(Problem("missing_tensor", info.name, key, f"tensor {t} is not in the shard"))
    if key in info.tensors:
        dtype, shape = info.tensors[key]
        if dtype != row["dtype"]:
            out.append(Problem("dtype_mismatch", info.name, key, f"index {row['dtype']}, shard {dtype}"))
        if shape != json.loads(row["shape"]):
            out.append(Problem("shape_mismatch", info.name, key, f"index {row['shape']}, shard {shape}"))
    return out


def _still_missing(index: CacheIndex, layout: CacheLayout, name: str) -> bool:
    """Re-check a missing shard against the index now (a concurrent gc may just have moved it)."""
    row = index.conn.execute(
        "SELECT 1 FROM shards WHERE name=? UNION ALL SELECT 1 FROM entries WHERE shard=? LIMIT 1", (name, name)
    ).fetchone()
    return row is not None and not layout.shard_path(name).exists()


def _repair(
    index: CacheIndex, layout: CacheLayout, report: VerifyReport, infos: dict[str, ShardInfo], foreign: set[str]
) -> None:
    db, repairs, doomed = index.conn, report.repairs, []
    with db:
        for p in report.problems:
            if p.kind == "unreadable_shard" and p.shard in foreign:
                repairs.append(f"left {p.shard} alone (written by another mmprep version)")
            elif p.kind in ("missing_shard", "unreadable_shard", "checksum_mismatch"):
                n = db.execute("DELETE FROM entries WHERE shard=?", (p.shard,)).rowcount
                db.execute("DELETE FROM shards WHERE name=?", (p.shard,))
                report.entries_dropped += n
                repairs.append(f"dropped {n} index rows of {p.kind.replace('_', ' ')} {p.shard}")
                if p.kind != "missing_shard":
                    doomed.append(p.shard)
            elif p.kind == "missing_tensor":
                if db.execute("DELETE FROM entries WHERE shard=? AND key=?", (p.shard, p.key)).rowcount:
                    report.entries_dropped += 1
                    repairs.append(f"dropped entry {p.key} (tensor missing from {p.shard})")
            elif p.kind in ("shape_mismatch", "dtype_mismatch"):
                dtype, shape = infos[p.shard].tensors[p.key]  # type: ignore[index]  # a shape/dtype problem is only found in a shard whose header was read
                db.execute(
                    "UPDATE entries SET dtype=?, shape=? WHERE shard=? AND key=?",
                    (dtype, json.dumps(shape), p.shard, p.key),
                )
                repairs.append(f"set {p.kind.split('_')[0]} of entry {p.key} from {p.shard}")
    for name in dict.fromkeys(doomed):  # a corrupt shard can be reported twice (checksum and unreadable)
        source = layout.shard_path(name)
        target = layout.quarantine / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.exists():
            os.replace(source, target)  # kept aside for inspection; delete quarantine/ when done with it
            report.quarantined.append(name)
            repairs.append(f"moved {name} to {target.relative_to(layout.root)}")
    for p in report.problems:
        if p.kind == "stray_tmp" and p.shard is not None:
            Path(p.shard).unlink(missing_ok=True)
            repairs.append(f"deleted temporary file {p.shard}")
    repairs += [f"adopted orphan shard {name}" for name in adopt_orphans(index, layout)]
