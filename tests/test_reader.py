"""The serving-side reader on real shards and a real WAL index."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmprep import cache_key
from mmprep.errors import UsageError
from mmprep.store.index import CacheIndex, FailureRecord
from mmprep.store.layout import CacheLayout
from mmprep.serving import to_vllm
from mmprep.store.reader import EmbeddingCache, export_entry, show_entry
from mmprep.store.shards import ShardEntry, ShardWriter

POOLED, QWEN = "b1" + "0" * 62, "b2" + "0" * 62
ENTRY_BYTES = 16 * 4  # a pooled entry: float32[16]
URLS = [f"https://img.example/{i}.png" for i in range(10)]


def make_entry(url: str, qwen: bool = False) -> ShardEntry:
    g = torch.Generator().manual_seed(int(cache_key(url)[:8], 16))
    return ShardEntry(
        key=cache_key(url), url=url, caller_id="c-" + url[-5:],
        tensors={"embeddings": torch.randn(16, 8, generator=g).bfloat16(), "image_grid_thw": torch.tensor([[1, 8, 8]])}
        if qwen else {"embeddings": torch.randn(16, generator=g)},
        content_sha256="c" * 64, created=5.0,
    )  # fmt: skip


def write(
    layout: CacheLayout, urls: list[str], *, fp: str = POOLED, run: str = "run1", index: CacheIndex | None = None
) -> None:
    own = index is None
    index = index or CacheIndex(layout.index)
    qwen = fp == QWEN
    name = "tiny-qwen" if qwen else "tiny-clip"
    index.register_model(fp, name, "qwen2_vl" if qwen else "pooled", {})
    writer = ShardWriter(layout, fp, name, run)
    for url in urls:
        writer.add(make_entry(url, qwen))
    index.commit_shard(writer.flush(), fp, run)
    if own:
        index.close()


@pytest.fixture
def layout(tmp_path: Path) -> CacheLayout:
    layout = CacheLayout(tmp_path)
    write(layout, URLS[:5], run="run1")
    write(layout, URLS[5:], run="run2")
    return layout


def test_get_and_get_many_hits_misses_and_exact_stats(layout: CacheLayout) -> None:
    with EmbeddingCache(layout.root, memory_bytes=3 * ENTRY_BYTES) as cache:
        assert cache.fingerprint == POOLED and cache.family == "pooled"
        got = cache.get(URLS[0])
        assert got is not None and got.url == URLS[0] and got.key == cache_key(URLS[0]) and got.image_grid_thw is None
        assert torch.equal(got.embeddings, make_entry(URLS[0]).embeddings) and got.shard.endswith(
            "run1-00001.safetensors"
        )
        assert cache.get("https://img.example/missing.png") is None
        many = cache.get_many([URLS[1], "https://nope/", URLS[7], URLS[1], URLS[2]])
        assert [m is None for m in many] == [False, True, False, False, False]
        assert torch.equal(many[2].embeddings, make_entry(URLS[7]).embeddings) and many[0] is many[3]
        s = cache.stats
        # 6 found of 7 asked; 4 distinct entries loaded into room for 3: one eviction
        assert (s.hits, s.misses, s.memory_hits, s.evictions) == (5, 2, 0, 1)
        assert (s.entries_in_memory, s.bytes_in_memory, s.capacity) == (3, 3 * ENTRY_BYTES, 3 * ENTRY_BYTES)
        assert s.hit_rate == pytest.approx(5 / 7) and s.utilisation == 1.0
        assert cache.get(URLS[2]) is many[4]  # most recent: still in memory
        assert cache.get(URLS[0]) is not got  # least recent: evicted, read again from disk
        s = cache.stats
        assert (s.hits, s.memory_hits, s.evictions) == (7, 1, 2)


def test_capacity_zero_and_oversize_entries_are_not_kept(layout: CacheLayout) -> None:
    with EmbeddingCache(layout.root, memory_bytes=0) as cache:
        cache.get_many(URLS * 2)
        s = cache.stats
        assert (s.hits, s.memory_hits, s.bytes_in_memory, s.evictions, s.utilisation) == (20, 0, 0, 0, 0.0)
    with EmbeddingCache(layout.root, memory_bytes=ENTRY_BYTES - 1) as cache:
        assert cache.get(URLS[0]) is not None and cache.get(URLS[0]) is not None
        assert (cache.stats.memory_hits, cache.stats.entries_in_memory) == (0, 0)


def test_threads_share_one_cache(layout: CacheLayout) -> None:
    expected = {u: make_entry(u).embeddings for u in URLS}
    errors: list[str] = []
    with EmbeddingCache(layout.root, memory_bytes=4 * ENTRY_BYTES, max_open_shards=1) as cache:

        def work(seed: int) -> None:
            for i in range(200):
                url = URLS[(seed * 7 + i * 3) % len(URLS)]
                got = cache.get(url)
                if got is None or not torch.equal(got.embeddings, expected[url]):
                    errors.append(url)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        s = cache.stats
        assert errors == []
        assert (s.hits, s.misses) == (
            1600,
            0,
        ) and s.bytes_in_memory == s.entries_in_memory * ENTRY_BYTES <= 4 * ENTRY_BYTES
        assert 0 < s.memory_hits < 1600 and s.evictions > 0


def test_qwen_entry_and_vllm_input(layout: CacheLayout) -> None:
    write(layout, ["https://q/1"], fp=QWEN, run="runq")
    with EmbeddingCache(layout.root, model="tiny-qwen") as cache:
        got = cache.get("https://q/1")
        assert got is not None and got.embeddings.dtype == torch.bfloat16
        assert torch.equal(got.image_grid_thw, torch.tensor([[1, 8, 8]]))
        mm = to_vllm(got)
        assert mm["image_embeds"].shape == (16, 8) and mm["image_grid_thw"].shape == (1, 3)
        assert cache.stats.bytes_in_memory == 16 * 8 * 2 + 3 * 8
    with (
        EmbeddingCache(layout.root, model="tiny-clip") as cache,
        pytest.raises(ValueError, match="no precomputed-embedding"),
    ):
        to_vllm(cache.get(URLS[0]))


def test_model_selection(layout: CacheLayout) -> None:
    write(layout, ["https://q/1"], fp=QWEN, run="runq")
    with pytest.raises(ValueError, match=r"holds 2 models.*tiny-clip \(b100000000000000\).*tiny-qwen"):
        EmbeddingCache(layout.root)
    with pytest.raises(ValueError, match="matches 2 models"):
        EmbeddingCache(layout.root, model="b")
    with pytest.raises(ValueError, match="no model matches 'clip'"):
        EmbeddingCache(layout.root, model="clip")
    for choice in (QWEN, "b2", "tiny-qwen"):
        with EmbeddingCache(layout.root, model=choice) as cache:
            assert cache.fingerprint == QWEN and cache.get(URLS[0]) is None  # models never mix
    with pytest.raises(UsageError, match="not an mmprep cache"):
        EmbeddingCache(layout.root / "elsewhere")


def test_reads_while_a_writer_commits(layout: CacheLayout) -> None:
    new = ["https://img.example/new1.png", "https://img.example/new2.png"]
    writer = CacheIndex(layout.index)
    with EmbeddingCache(layout.root) as cache:
        assert cache.get_many(new) == [None, None]
        writer.conn.execute("BEGIN IMMEDIATE")  # a writer mid-transaction does not block the reader
        writer.conn.execute("DELETE FROM entries")
        assert cache.get(URLS[0]) is not None
        writer.conn.rollback()
        write(layout, new, run="run3", index=writer)
        got = cache.get_many(new)
        assert all(g is not None for g in got) and torch.equal(got[1].embeddings, make_entry(new[1]).embeddings)
    writer.close()


def test_show_and_export(layout: CacheLayout, tmp_path: Path) -> None:
    write(layout, ["https://q/1"], fp=QWEN, run="runq")
    index = CacheIndex(layout.index)
    bad = "https://img.example/broken.png"
    index.record_failures(
        POOLED, "run2", [FailureRecord(cache_key(bad), bad, None, "m.jsonl", 3, "decode_error", "truncated", False, 1)]
    )
    index.close()

    info = show_entry(layout.root, "https://q/1")
    assert info["cached"] and info["key"] == cache_key("https://q/1") and info["failures"] == []
    (row,) = info["entries"]
    assert row["model"] == "tiny-qwen" and row["shape"] == [16, 8] and row["dtype"] == "bfloat16"
    grid = cache_key("https://q/1") + ".image_grid_thw"
    assert row["stored"] == {
        cache_key("https://q/1"): {"dtype": "BF16", "shape": [16, 8]},
        grid: {"dtype": "I64", "shape": [1, 3]},
    }
    assert show_entry(layout.root, cache_key(URLS[3]), model="tiny-clip")["entries"][0]["url"] == URLS[3]
    assert show_entry(layout.root, URLS[3], model="tiny-qwen")["entries"] == []
    failed = show_entry(layout.root, bad)
    assert not failed["cached"] and failed["failures"][0]["kind"] == "decode_error"

    with EmbeddingCache(layout.root, model=QWEN) as cache:
        entry = cache.get("https://q/1")
    (st,) = export_entry(entry, tmp_path / "out" / "e.safetensors")
    loaded = load_file(st)
    assert torch.equal(loaded["embeddings"], entry.embeddings) and torch.equal(
        loaded["image_grid_thw"], entry.image_grid_thw
    )
    emb, grid_npy = export_entry(entry, tmp_path / "e.npy")
    assert np.load(emb).dtype == np.float32 and np.array_equal(np.load(emb), entry.embeddings.float().numpy())
    assert grid_npy.name == "e.image_grid_thw.npy" and np.load(grid_npy).tolist() == [[1, 8, 8]]
