from __future__ import annotations

import hashlib
import json
import sqlite3

import torch
from safetensors import safe_open

from mmprep import cache_key
from mmprep.store.index import CacheIndex, FailureRecord
from mmprep.store.layout import CacheLayout
from mmprep.store.shards import ShardEntry, ShardWriter


def entry(url: str, n: int = 4, grid: bool = False) -> ShardEntry:
    g = torch.Generator().manual_seed(len(url))
    return ShardEntry(
        key=cache_key(url),
        url=url,
        caller_id="id-" + url[-1],
        tensors={
            "embeddings": torch.randn(n, 8, generator=g),
            **({"image_grid_thw": torch.tensor([[1, 2, 2]])} if grid else {}),
        },
        content_sha256="c" * 64,
        created=1.0,
        etag='"v1"',
    )


def test_cache_key_is_sha256_of_exact_url():
    assert cache_key("https://h/Cat.png") == hashlib.sha256(b"https://h/Cat.png").hexdigest()
    assert cache_key("https://h/Cat.png") != cache_key("https://h/cat.png")


def test_shard_is_atomic_self_describing_and_indexed(tmp_path):
    layout = CacheLayout(tmp_path)
    writer = ShardWriter(layout, "f" * 64, "builtin:tiny-qwen2-vl", "run1")
    a, b = entry("https://h/a"), entry("https://h/b", grid=True)
    writer.add(a)
    writer.add(b)
    assert writer.pending_bytes == a.nbytes + b.nbytes
    written = writer.flush()
    assert writer.flush() is None and writer.pending_count == 0
    path = layout.shard_path(written.name)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == written.sha256
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == {a.key, b.key, b.key + ".image_grid_thw"}
        assert torch.equal(f.get_tensor(a.key), a.embeddings)
        assert torch.equal(f.get_tensor(b.key + ".image_grid_thw"), torch.tensor([[1, 2, 2]]))
    assert meta["format"] == "mmprep.shard" and meta["model_fingerprint"] == "f" * 64
    described = json.loads(meta["entries"])
    assert [d["url"] for d in described] == ["https://h/a", "https://h/b"]

    index = CacheIndex(layout.index)
    index.commit_shard(written, "f" * 64, "run1")
    row = index.entry("f" * 64, a.key)
    assert row["shard"] == written.name and json.loads(row["shape"]) == [4, 8] and row["dtype"] == "float32"
    assert row["etag"] == '"v1"' and row["caller_id"] == "id-a"
    states = index.key_states("f" * 64, [a.key, b.key, cache_key("https://h/none")])
    assert states[a.key].cached and states[a.key].run_id == "run1"
    assert cache_key("https://h/none") not in states
    assert index.key_states("0" * 64, [a.key]) == {}  # other model fingerprint: nothing shared
    index.close()


def test_failures_upsert_accumulate_attempts_and_heal(tmp_path):
    layout = CacheLayout(tmp_path)
    index = CacheIndex(layout.index)
    url = "https://h/flaky"
    fail = FailureRecord(cache_key(url), url, None, "m", 1, "timeout", "slow", True, 3)
    index.record_failures("f" * 64, "run1", [fail])
    index.record_failures("f" * 64, "run2", [fail])
    row = index.conn.execute("SELECT attempts, run_id FROM failures").fetchone()
    assert tuple(row) == (6, "run2")
    state = index.key_states("f" * 64, [fail.key])[fail.key]
    assert not state.cached and state.failed_kind == "timeout" and state.failed_retryable
    writer = ShardWriter(layout, "f" * 64, "m", "run3")
    writer.add(entry(url))
    index.commit_shard(writer.flush(), "f" * 64, "run3")
    assert index.conn.execute("SELECT count(*) FROM failures").fetchone()[0] == 0
    index.close()


def test_index_is_wal_and_readers_open_read_only(tmp_path):
    layout = CacheLayout(tmp_path)
    CacheIndex(layout.index).close()
    mode = sqlite3.connect(layout.index).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    reader = CacheIndex(layout.index, readonly=True)
    try:
        reader.conn.execute("INSERT INTO meta VALUES ('x', 'y')")
        raise AssertionError("read-only index accepted a write")
    except sqlite3.OperationalError as exc:
        assert "readonly" in str(exc)
    reader.close()


def test_stats_and_the_index_do_not_import_torch():
    """`mmprep stats` on a cron box answers in a fraction of a second: no torch import (~1.5 s) on its path."""
    import subprocess
    import sys

    code = "import sys, mmprep.cli, mmprep.store.stats, mmprep.store.index; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
