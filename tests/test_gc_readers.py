"""gc and its readers in other processes: a lookup racing compaction gets the entry (from whichever shard holds it
now) or a clean miss, never an exception and never another entry's data; a killed gc is cleaned up by the next
gc, without `verify --repair`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmprep import EmbeddingCache, cache_key
from mmprep.store.index import CacheIndex
from mmprep.store.layout import CacheLayout
from mmprep.store.shards import ShardEntry, ShardWriter
from mmprep.store.verify import verify_cache

REPO = Path(__file__).resolve().parent.parent
FP = "c" * 64
LIVE = [f"https://h/live{i}" for i in range(8)]
CYCLES = 80  # gc runs while the readers read: each moves every live entry twice (a new shard, then a compacted one)
READERS = 3

# Shared by the test and its processes: the cache's entries, each a tensor that only its URL gives.
COMMON = r'''
import time, torch
from mmprep import cache_key
from mmprep.store.index import CacheIndex
from mmprep.store.lock import WriterLock
from mmprep.store.shards import ShardEntry, ShardWriter

def tensor(url):
    g = torch.Generator().manual_seed(int(cache_key(url)[:8], 16))
    return torch.randn(16, generator=g)

def add_shard(layout, fp, run, urls, created):
    """One shard of `urls` (their entries move to it), written and indexed under the writer lock."""
    with WriterLock(layout.root, wait=None):
        index = CacheIndex(layout.index)
        index.register_model(fp, "tiny", "pooled", {"dtype": "float32"})
        writer = ShardWriter(layout, fp, "tiny", run)
        for url in urls:
            writer.add(ShardEntry(key=cache_key(url), url=url, caller_id=None, tensors={"embeddings": tensor(url)},
                                  content_sha256="c" * 64, created=created.get(url, time.time())))
        index.commit_shard(writer.flush(), fp, run)
        index.close()
'''

GC = (
    COMMON
    + r"""
import json, sys, time
from pathlib import Path
from mmprep.store.gc import collect_garbage
from mmprep.store.layout import CacheLayout

layout, fp, live, cycles, done = CacheLayout(Path(sys.argv[1])), sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
moved = 0
try:
    for cycle in range(cycles):
        dead = [f"https://h/dead{cycle}-{i}" for i in range(16)]
        add_shard(layout, fp, f"run{cycle}", live + dead, {u: 1.0 for u in dead})  # the old shard: no live entry left
        report = collect_garbage(layout.root, older_than=3600, wait=None)  # drops `dead`, compacts the new shard
        moved += len(report.shards_compacted) + len(report.shards_deleted)
finally:
    done.touch()
print(moved)
"""
)

READER = (
    COMMON
    + r"""
import json, sys
from pathlib import Path
from mmprep import EmbeddingCache

root, fp, live, done = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])
want = {u: tensor(u) for u in live}
counts = {"lookups": 0, "hits": 0, "misses": 0, "wrong": 0, "errors": []}
while not done.exists():
    try:  # a new reader each time: every lookup opens the shard its entries are in now
        with EmbeddingCache(root, model=fp, memory_bytes=0) as cache:
            got = cache.get_many(live)
    except Exception as exc:
        counts["errors"].append(repr(exc))
        continue
    counts["lookups"] += len(live)
    for url, entry in zip(live, got):
        if entry is None:
            counts["misses"] += 1
        elif entry.url == url and torch.equal(entry.embeddings, want[url]):
            counts["hits"] += 1
        else:
            counts["wrong"] += 1
print(json.dumps(counts))
"""
)


def _tensor(url: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(cache_key(url)[:8], 16))
    return torch.randn(16, generator=g)


def _add_shard(layout: CacheLayout, run: str, urls: list[str], created: float) -> None:
    index = CacheIndex(layout.index)
    index.register_model(FP, "tiny", "pooled", {"dtype": "float32"})
    writer = ShardWriter(layout, FP, "tiny", run)
    for url in urls:
        writer.add(ShardEntry(key=cache_key(url), url=url, caller_id=None, tensors={"embeddings": _tensor(url)},
                              content_sha256="c" * 64, created=created))  # fmt: skip
    written = writer.flush()
    assert written is not None
    index.commit_shard(written, FP, run)
    index.close()


@pytest.mark.slow  # reader processes against a real gc
def test_readers_in_other_processes_never_fail_while_gc_compacts(tmp_path: Path) -> None:
    layout = CacheLayout(tmp_path / "cache")
    _add_shard(layout, "run-start", LIVE, 2e9)
    done = tmp_path / "gc-done"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    readers = [
        subprocess.Popen([sys.executable, "-c", READER, str(layout.root), FP, json.dumps(LIVE), str(done)],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(READERS)
    ]  # fmt: skip
    gc = subprocess.run(
        [sys.executable, "-c", GC, str(layout.root), FP, json.dumps(LIVE), str(CYCLES), str(done)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    done.touch()  # (the gc process touches it too; here in case it died first)
    results = []
    for proc in readers:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        results.append(json.loads(stdout))
    assert gc.returncode == 0, gc.stderr
    assert int(gc.stdout) == 2 * CYCLES  # every cycle deleted one shard and compacted another: entries moved
    print("readers during gc:", results)
    assert [r["errors"] for r in results] == [[]] * READERS  # never an exception
    assert sum(r["wrong"] for r in results) == 0  # never another entry's data
    assert all(r["lookups"] > 0 for r in results)
    assert sum(r["hits"] for r in results) > 0
    with EmbeddingCache(layout.root, model=FP) as cache:  # afterwards every live entry is there, intact
        assert all(e is not None and torch.equal(e.embeddings, _tensor(u)) for u, e in zip(LIVE, cache.get_many(LIVE)))
    assert verify_cache(layout.root, deep=True).ok


@pytest.mark.parametrize(
    ("fault", "left"),
    [("before_shard_rename", "stray_tmp"), ("gc_after_rename", "orphan_shard"), ("gc_after_commit", None)],
)
@pytest.mark.slow  # a real gc killed in a subprocess
def test_the_next_gc_cleans_up_after_a_killed_gc(fault: str, left: str | None, tmp_path: Path) -> None:
    """kill -9 of a real `mmprep gc` inside a compaction (its new shard half-written; written, not indexed; indexed,
    the old file not deleted): the next gc deletes what it left; no dropped entry comes back, nothing live is lost."""
    layout = CacheLayout(tmp_path / "cache")
    dead = [f"https://h/dead{i}" for i in range(8)]
    _add_shard(layout, "r1", LIVE[:4], 2e9)
    _add_shard(layout, "r2", LIVE[4:], 2e9)
    _add_shard(layout, "r3", dead, 1.0)  # dropped whole: deleted
    index = CacheIndex(layout.index)  # r1's shard gets dead company: compacted
    index.conn.execute("UPDATE entries SET created=1.0 WHERE key IN (?, ?, ?)", [cache_key(u) for u in LIVE[1:4]])
    index.conn.commit()
    index.close()
    live = [LIVE[0], *LIVE[4:]]
    gc = [sys.executable, "-m", "mmprep", "gc", str(layout.root)]
    killed = subprocess.run([*gc, "--older-than", "1h"], cwd=REPO, env={**os.environ, "MMPREP_FAULT": fault},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    before = verify_cache(layout.root)
    if left is None:  # killed after its commit: the old shard is still listed, without entries; nothing to repair
        assert before.ok, before.problems
    else:
        assert left in before.counts(), before.problems  # what the killed gc left behind

    again = subprocess.run(gc, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert ("cleaned up after an interrupted run" in again.stderr) == (left is not None), again.stderr

    report = verify_cache(layout.root, deep=True)
    assert report.ok, report.problems  # no temporary file, no orphan: verify --repair has nothing to do
    assert not list(layout.shards.rglob("*.tmp"))
    index = CacheIndex(layout.index, readonly=True)
    listed = {r[0] for r in index.conn.execute("SELECT name FROM shards")}
    holding = {r[0] for r in index.conn.execute("SELECT DISTINCT shard FROM entries")}
    index.close()
    assert listed == holding  # every shard left holds a live entry: the killed gc's leftovers are gone
    assert {p.relative_to(layout.shards).as_posix() for p in layout.shards.rglob("*.safetensors")} == listed
    with EmbeddingCache(layout.root, model=FP) as cache:
        got = cache.get_many(live)
        assert all(e is not None and torch.equal(e.embeddings, _tensor(u)) for u, e in zip(live, got))
    finished = subprocess.run([*gc, "--older-than", "1h"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr  # and the interrupted gc's work can be finished
    with EmbeddingCache(layout.root, model=FP) as cache:
        assert cache.get_many(LIVE[1:4] + dead) == [None] * 11
        assert all(e is not None for e in cache.get_many(live))
    assert verify_cache(layout.root, deep=True).ok
