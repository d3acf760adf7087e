"""Cache-store operations on real files: writer lock, index rebuild, orphan adoption, verify, gc."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mmprep import cache_key
from mmprep.errors import CacheLockedError, UsageError
from mmprep.store.gc import collect_garbage, parse_duration
from mmprep.store.index import CacheIndex, FailureRecord
from mmprep.store.layout import CacheLayout
from mmprep.store.lock import WriterLock, lock_holder
from mmprep.store.reader import EmbeddingCache
from mmprep.store.rebuild import adopt_orphans, rebuild_index
from mmprep.store.shards import ShardEntry, ShardWriter, WrittenShard
from mmprep.store.verify import verify_cache

QWEN, POOLED = "a" * 64, "b" * 64
DAY = 86400.0
LOCK_PY = Path(__file__).resolve().parents[1] / "mmprep" / "store" / "lock.py"


def make_entry(url: str, *, grid: bool = False, created: float = 1.0) -> ShardEntry:
    g = torch.Generator().manual_seed(int(cache_key(url)[:8], 16))
    return ShardEntry(
        key=cache_key(url), url=url, caller_id=None,
        tensors={"embeddings": torch.randn(4, 8, generator=g), "image_grid_thw": torch.tensor([[1, 4, 4]])}
        if grid else {"embeddings": torch.randn(16, generator=g)},
        content_sha256="c" * 64, created=created,
    )  # fmt: skip


def add_shard(
    layout: CacheLayout,
    urls: list[str],
    *,
    fp: str = POOLED,
    run: str = "r1",
    created: float | list[float] = 1.0,
    commit: bool = True,
) -> WrittenShard:
    """Write one shard of `urls` (and index it unless commit=False, i.e. a crash before the commit)."""
    index = CacheIndex(layout.index)
    family = "qwen2_vl" if fp == QWEN else "pooled"
    index.register_model(fp, f"model-{family}", family, {"dtype": "float32"})
    if not index.conn.execute("SELECT 1 FROM runs WHERE run_id=?", (run,)).fetchone():
        index.start_run(run, fp, f"model-{family}")
    writer = ShardWriter(layout, fp, f"model-{family}", run)
    times = created if isinstance(created, list) else [created] * len(urls)
    for url, t in zip(urls, times):
        writer.add(make_entry(url, grid=fp == QWEN, created=t))
    written = writer.flush()
    assert written is not None
    if commit:
        index.commit_shard(written, fp, run)
    index.close()
    return written


def rows(layout: CacheLayout, table: str, order: str) -> list[tuple]:
    conn = sqlite3.connect(layout.index)
    try:
        return [tuple(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY {order}")]
    finally:
        conn.close()


@pytest.fixture
def cache(tmp_path: Path) -> CacheLayout:
    """Two models: qwen (grid tensors) in two shards, pooled (1-D) in one; one recorded failure."""
    layout = CacheLayout(tmp_path / "cache")
    add_shard(layout, [f"https://h/q{i}" for i in range(3)], fp=QWEN, run="rq1", created=10.0)
    add_shard(layout, [f"https://h/q{i}" for i in range(3, 5)], fp=QWEN, run="rq2", created=20.0)
    add_shard(layout, [f"https://h/p{i}" for i in range(4)], fp=POOLED, run="rp1", created=30.0)
    index = CacheIndex(layout.index)
    index.record_failures(
        POOLED,
        "rp1",
        [FailureRecord(cache_key("https://h/bad"), "https://h/bad", None, "m", 7, "timeout", "slow", True, 1)],
    )
    index.close()
    return layout


def shard_names(layout: CacheLayout) -> list[str]:
    return sorted(p.relative_to(layout.shards).as_posix() for p in layout.shards.rglob("*.safetensors"))


# -- writer lock -------------------------------------------------------------------------------


def _holder(root: Path) -> subprocess.Popen[str]:
    """Another process holding the lock (lock.py loaded alone: no torch import) until stdin closes."""
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('lock', sys.argv[1])\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "lock = m.WriterLock(sys.argv[2]); lock.acquire(); print('locked', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(LOCK_PY), str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_is_exclusive_across_processes_and_waits(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(CacheLockedError, match=f"pid {proc.pid} on "):
            WriterLock(tmp_path).acquire()
        assert time.monotonic() - start < 5  # refused at once: wait=0 never sleeps (the 0.2 s wait is below)
        assert lock_holder(tmp_path).startswith(f"pid {proc.pid} ")
        with pytest.raises(CacheLockedError):
            WriterLock(tmp_path, wait=0.2).acquire()
        threading.Timer(0.3, proc.stdin.close).start()  # the holder exits while we wait
        start = time.monotonic()
        with WriterLock(tmp_path, wait=1.0) as lock:
            assert lock.held and time.monotonic() - start >= 0.2
            assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        assert lock_holder(tmp_path) is None and (tmp_path / ".lock").read_text() == ""
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_holder_is_released(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    with pytest.raises(CacheLockedError):
        WriterLock(tmp_path).acquire()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with WriterLock(tmp_path):  # no wait needed: the kernel dropped the dead holder's lock
        with pytest.raises(CacheLockedError, match=f"pid {os.getpid()} "):
            WriterLock(tmp_path).acquire()  # a second writer in the same process is refused too


# -- rebuild and adopt -------------------------------------------------------------------------


def test_rebuild_from_shards_alone_gives_identical_entries(cache: CacheLayout) -> None:
    entries = rows(cache, "entries", "fingerprint, key")
    shards = [r[:6] for r in rows(cache, "shards", "name")]  # all but `created`
    for suffix in ("", "-wal", "-shm"):
        Path(f"{cache.index}{suffix}").unlink(missing_ok=True)

    report = rebuild_index(cache.root)

    assert rows(cache, "entries", "fingerprint, key") == entries
    assert [r[:6] for r in rows(cache, "shards", "name")] == shards
    assert report.shards == 3 and report.entries == 9 and report.old_index == "missing" and report.duplicates == 0
    models = {r[0]: (r[1], r[2], json.loads(r[3])) for r in rows(cache, "models", "fingerprint")}
    assert models == {QWEN: ("model-qwen2_vl", "qwen2_vl", {"rebuilt": True}),
                      POOLED: ("model-pooled", "pooled", {"rebuilt": True})}  # fmt: skip
    assert rows(cache, "runs", "run_id") == [] and rows(cache, "failures", "key") == []
    assert not list(cache.root.glob("*.tmp*"))
    assert sqlite3.connect(cache.index).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_rebuild_keeps_runs_failures_models_of_a_readable_index(cache: CacheLayout) -> None:
    before = {t: rows(cache, t, "1, 2") for t in ("entries", "runs", "failures", "models")}
    report = rebuild_index(cache.root)
    assert report.old_index == "readable" and report.kept_runs == 3 and report.kept_failures == 1
    assert {t: rows(cache, t, "1, 2") for t in before} == before
    cache.index.write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        Path(f"{cache.index}{suffix}").unlink(missing_ok=True)
    assert rebuild_index(cache.root).old_index == "unreadable"
    assert rows(cache, "entries", "1, 2") == before["entries"]


def test_rebuild_skips_unreadable_shard_and_indexes_newest_duplicate(cache: CacheLayout) -> None:
    add_shard(cache, ["https://h/p0"], run="rp0", created=99.0)  # re-encoded later (name sorts first): newest wins
    bad = cache.shards / "bbbbbbbbbbbbbbbb" / "broken.safetensors"
    bad.write_bytes(b"\x00" * 50)
    Path(cache.index).unlink()
    report = rebuild_index(cache.root)
    assert report.unreadable == ["bbbbbbbbbbbbbbbb/broken.safetensors"] and report.duplicates == 1
    row = CacheIndex(cache.index, readonly=True).entry(POOLED, cache_key("https://h/p0"))
    assert row["run_id"] == "rp0" and row["created"] == 99.0


def test_rebuild_needs_the_writer_lock(cache: CacheLayout) -> None:
    with WriterLock(cache.root), pytest.raises(CacheLockedError):
        rebuild_index(cache.root)


def test_adopt_orphans_after_a_crash_between_rename_and_commit(cache: CacheLayout) -> None:
    lost = add_shard(cache, ["https://h/p9", "https://h/p0"], run="rp2", created=50.0, commit=False)
    index = CacheIndex(cache.index)
    index.record_failures(
        POOLED,
        "rp2",
        [FailureRecord(cache_key("https://h/p9"), "https://h/p9", None, None, None, "timeout", "x", True, 1)],
    )
    tmp = cache.shard_dir(POOLED) / "rp3-00001.safetensors.tmp"
    tmp.write_bytes(b"partial")
    assert index.entry(POOLED, cache_key("https://h/p9")) is None

    assert adopt_orphans(index, cache) == [lost.name]
    assert index.entry(POOLED, cache_key("https://h/p9"))["shard"] == lost.name
    assert index.entry(POOLED, cache_key("https://h/p0"))["run_id"] == "rp1"  # a committed entry is never overridden
    assert index.key_states(POOLED, [cache_key("https://h/p9")])[cache_key("https://h/p9")].cached
    assert not tmp.exists()
    assert adopt_orphans(index, cache) == []
    index.close()
    assert verify_cache(cache.root, deep=True).ok


# -- verify ------------------------------------------------------------------------------------


def test_verify_clean_cache(cache: CacheLayout) -> None:
    report = verify_cache(cache.root, deep=True)
    assert report.ok and report.exit_code == 0 and report.problems == []
    assert report.shards_checked == 3 and report.entries_checked == 9 and report.writer_active is None


def _corrupt(layout: CacheLayout, kind: str) -> None:
    first = shard_names(layout)[0]
    path = layout.shard_path(first)
    db = sqlite3.connect(layout.index)
    if kind == "missing_shard":
        path.unlink()
    elif kind == "orphan_shard":
        add_shard(layout, ["https://h/orphan"], run="rp9", commit=False)
    elif kind == "unreadable_shard":
        path.write_bytes(path.read_bytes()[:-7])
    elif kind == "checksum_mismatch":
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF  # inside the tensor data: the header stays valid
        path.write_bytes(bytes(data))
    elif kind == "shape_mismatch":
        db.execute("UPDATE entries SET shape='[9, 9]' WHERE shard=?", (first,))
    elif kind == "dtype_mismatch":
        db.execute("UPDATE entries SET dtype='float16' WHERE shard=?", (first,))
    elif kind == "missing_tensor":
        db.execute("UPDATE entries SET tensors=json_insert(tensors, '$[#]', 'nope') WHERE shard=?", (first,))
    elif kind == "stray_tmp":
        (layout.shard_dir(POOLED) / "x.safetensors.tmp").write_bytes(b"half")
    db.commit()
    db.close()


@pytest.mark.parametrize(
    "kind",
    ["missing_shard", "orphan_shard", "unreadable_shard", "checksum_mismatch", "shape_mismatch",
     "dtype_mismatch", "missing_tensor", "stray_tmp"],
)  # fmt: skip
def test_verify_detects_and_repairs(cache: CacheLayout, kind: str) -> None:
    _corrupt(cache, kind)
    shallow = verify_cache(cache.root)
    deep = verify_cache(cache.root, deep=True)
    if kind == "checksum_mismatch":
        assert shallow.ok  # a flipped data byte is only seen by re-hashing
    else:
        assert set(shallow.counts()) == {kind} and shallow.exit_code == 1
    assert set(deep.counts()) == {kind}
    assert all(p.detail for p in deep.problems)

    repaired = verify_cache(cache.root, deep=True, repair=True)
    assert repaired.counts() == deep.counts() and repaired.repairs
    after = verify_cache(cache.root, deep=True)
    assert after.ok, after.problems
    # what survives is still served
    with EmbeddingCache(cache.root, model=QWEN, memory_bytes=0) as reader:
        served = [reader.get(f"https://h/q{i}") for i in range(5)]
    for i, got in enumerate(served):
        if got is not None:
            assert torch.equal(got.embeddings, make_entry(f"https://h/q{i}", grid=True).embeddings)
    expect_lost = kind in ("missing_shard", "unreadable_shard", "checksum_mismatch", "missing_tensor")
    assert sum(g is None for g in served) == (3 if expect_lost else 0)


def test_verify_of_a_corrupt_index_points_to_rebuild(cache: CacheLayout) -> None:
    cache.index.write_bytes(b"garbage" * 1000)
    for suffix in ("-wal", "-shm"):
        Path(f"{cache.index}{suffix}").unlink(missing_ok=True)
    for repair in (False, True):
        with pytest.raises(UsageError, match="mmprep index rebuild"):
            verify_cache(cache.root, repair=repair)
    rebuild_index(cache.root)
    assert verify_cache(cache.root, deep=True).ok


def test_verify_skips_racy_checks_while_a_writer_runs(cache: CacheLayout) -> None:
    _corrupt(cache, "stray_tmp")
    with WriterLock(cache.root):
        report = verify_cache(cache.root)
        assert report.ok and report.writer_active is not None
        with pytest.raises(CacheLockedError):
            verify_cache(cache.root, repair=True)


# -- gc ----------------------------------------------------------------------------------------


def snapshot(layout: CacheLayout) -> tuple:
    return (
        rows(layout, "entries", "1, 2"),
        rows(layout, "shards", "1"),
        rows(layout, "models", "1"),
        shard_names(layout),
    )


def test_parse_duration() -> None:
    assert [parse_duration(t) for t in ("30d", "12h", "90m", "45s", "2w", "10")] == [
        30 * DAY,
        12 * 3600,
        90 * 60,
        45,
        14 * DAY,
        10,
    ]
    with pytest.raises(ValueError):
        parse_duration("soon")


@pytest.fixture
def aged(tmp_path: Path) -> CacheLayout:
    """Pooled: run r1 10 days old (one shard), run r2 mixed ages in one shard; qwen: one recent shard."""
    layout = CacheLayout(tmp_path / "cache")
    now = time.time()
    add_shard(layout, [f"https://h/old{i}" for i in range(4)], run="r1", created=now - 10 * DAY)
    add_shard(layout, [f"https://h/mix{i}" for i in range(6)], run="r2",
              created=[now - 9 * DAY] * 4 + [now - 60] * 2)  # fmt: skip
    add_shard(layout, ["https://h/q0", "https://h/q1"], fp=QWEN, run="rq", created=now - 60)
    db = sqlite3.connect(layout.index)
    db.executemany(
        "UPDATE runs SET started=? WHERE run_id=?", [(now - 10 * DAY, "r1"), (now - 9 * DAY, "r2"), (now - 60, "rq")]
    )
    db.commit()
    db.close()
    return layout


def test_gc_older_than_deletes_dead_shards_and_compacts_half_dead_ones(aged: CacheLayout) -> None:
    r1, r2 = [n for n in shard_names(aged) if n.startswith(POOLED[:16])]
    old_handle = safe_open(str(aged.shard_path(r2)), "pt")  # a reader that mapped the shard before gc
    reader = EmbeddingCache(aged.root, model=POOLED, memory_bytes=0)
    stale = reader._lookup([cache_key("https://h/mix5")])[cache_key("https://h/mix5")]

    report = collect_garbage(aged.root, older_than=parse_duration("8d"))

    assert report.entries_dropped == 8 and report.shards_deleted == [r1]
    assert [old for old, _new in report.shards_compacted] == [r2]
    new = report.shards_compacted[0][1]
    assert not aged.shard_path(r1).exists() and not aged.shard_path(r2).exists() and aged.shard_path(new).exists()
    assert report.bytes_freed > 0 and report.models_removed == []
    for i in range(6):  # survivors read back identical from the compacted shard
        got = reader.get(f"https://h/mix{i}")
        assert (got is None) == (i < 4)
        if got is not None:
            assert got.shard == new and torch.equal(got.embeddings, make_entry(f"https://h/mix{i}").embeddings)
    assert torch.equal(old_handle.get_tensor(cache_key("https://h/mix0")), make_entry("https://h/mix0").embeddings)
    moved = reader._load(cache_key("https://h/mix5"), stale)  # the row it looked up pointed to the deleted file
    assert moved is not None and moved.shard == new
    reader.close()
    shard_row = rows(aged, "shards", "1")
    assert [(r[0], r[2], r[5]) for r in shard_row if r[0] == new] == [(new, 2, "r2")]
    assert verify_cache(aged.root, deep=True).ok
    entries = rows(aged, "entries", "1, 2")
    Path(aged.index).unlink()
    rebuild_index(aged.root)  # the compacted shard describes itself, run included
    assert rows(aged, "entries", "1, 2") == entries


def test_gc_keep_last_runs_and_model_selection(aged: CacheLayout) -> None:
    report = collect_garbage(aged.root, model="model-pooled", keep_last_runs=1, live_threshold=0.0)
    assert report.entries_dropped == 4 and report.shards_compacted == []  # only r1, the older pooled run
    runs = {r[11] for r in rows(aged, "entries", "1, 2")}
    assert runs == {"r2", "rq"}
    report = collect_garbage(aged.root, model=QWEN[:8])
    assert report.entries_dropped == 2 and report.models_removed == [QWEN]
    assert [r[0] for r in rows(aged, "models", "1")] == [POOLED]
    assert verify_cache(aged.root).ok


def test_gc_threshold_and_dry_run(aged: CacheLayout) -> None:
    before = snapshot(aged)
    dry = collect_garbage(aged.root, older_than=8 * DAY, dry_run=True)
    assert snapshot(aged) == before
    real = collect_garbage(aged.root, older_than=8 * DAY)
    assert dry.entries_dropped == real.entries_dropped and dry.shards_deleted == real.shards_deleted
    assert [o for o, _ in dry.shards_compacted] == [o for o, _ in real.shards_compacted]
    # one dead entry of six leaves a shard mostly live: not rewritten
    add_shard(aged, [f"https://h/x{i}" for i in range(6)], run="r4", created=[1.0] + [time.time()] * 5)
    report = collect_garbage(aged.root, older_than=DAY)
    assert report.entries_dropped == 1 and report.shards_compacted == [] and report.shards_deleted == []
    assert collect_garbage(aged.root).entries_dropped == 0  # no filter: compaction only


def test_gc_needs_the_writer_lock(aged: CacheLayout) -> None:
    with WriterLock(aged.root), pytest.raises(CacheLockedError):
        collect_garbage(aged.root, older_than=1)
