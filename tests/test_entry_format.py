"""The cache entry as a named set of tensors: old-style caches read unchanged, any set of names survives
every store operation (write, read, verify, rebuild, gc, merge, export), and `mmprep.serving.to_vllm`."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from mmprep import cache_key
from mmprep.serving import ServingFormatError, to_vllm
from mmprep.store.gc import collect_garbage
from mmprep.store.index import CacheIndex
from mmprep.store.layout import CacheLayout
from mmprep.store.merge import merge_caches
from mmprep.store.reader import EmbeddingCache, export_entry, show_entry
from mmprep.store.rebuild import rebuild_index
from mmprep.store.shards import ShardEntry, ShardWriter
from mmprep.store.verify import verify_cache

OLD_FP, NEW_FP = "0d" * 32, "e1" * 32
URLS = [f"https://img.example/{i}.png" for i in range(4)]


def _randn(url: str, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(int(cache_key(url)[:8], 16)))


def write_old_style_cache(root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A Qwen2-VL cache laid out byte for byte as mmprep 0.1.0 wrote it, without today's ShardEntry:
    tensors "<key>" and "<key>.image_grid_thw", no "model_family" in the shard metadata."""
    layout = CacheLayout(root)
    expected, tensors, described, rows = {}, {}, [], []
    name = f"{OLD_FP[:16]}/old-00001.safetensors"
    for url in URLS:
        key = cache_key(url)
        emb, grid = _randn(url, 4, 8).bfloat16(), torch.tensor([[1, 4, 4]])
        expected[url] = (emb, grid)
        tensors[key], tensors[key + ".image_grid_thw"] = emb, grid
        described.append({"key": key, "url": url, "id": None, "content_sha256": "c" * 64, "created": 1.0,
                          "tensors": [key, key + ".image_grid_thw"], "etag": None, "last_modified": None})  # fmt: skip
        rows.append((OLD_FP, key, url, None, name, json.dumps([key, key + ".image_grid_thw"]), "bfloat16", "[4, 8]",
                     "c" * 64, None, None, "old", 1.0))  # fmt: skip
    meta = {"format": "mmprep.shard", "format_version": "1", "mmprep_version": "0.1.0", "model_fingerprint": OLD_FP,
            "model": "old-qwen", "run_id": "old", "entries": json.dumps(described)}  # fmt: skip
    blob = save(tensors, metadata=meta)
    path = layout.shard_path(name)
    path.parent.mkdir(parents=True)
    path.write_bytes(blob)
    index = CacheIndex(layout.index)
    index.register_model(OLD_FP, "old-qwen", "qwen2_vl", {"output": {"embeddings": {"shape": ["n_tokens", 8]}}})
    index.commit_rows(name, OLD_FP, "old", len(blob), hashlib.sha256(blob).hexdigest(), rows)
    index.close()
    return expected


def new_entry(url: str) -> ShardEntry:
    """An entry with three tensors, as a deepstack family stores them."""
    return ShardEntry(
        key=cache_key(url), url=url, caller_id=None, content_sha256="d" * 64, created=2.0,
        tensors={"embeddings": _randn(url, 6, 8), "image_grid_thw": torch.tensor([[1, 4, 6]]),
                 "deepstack": _randn(url + "#ds", 2, 6, 8)},
    )  # fmt: skip


def write_new(root: Path, urls: list[str], run: str = "new") -> None:
    layout = CacheLayout(root)
    index = CacheIndex(layout.index)
    index.register_model(NEW_FP, "three-tensors", "multi", {})
    writer = ShardWriter(layout, NEW_FP, "three-tensors", run, "multi")
    for url in urls:
        writer.add(new_entry(url))
    index.commit_shard(writer.flush(), NEW_FP, run)
    index.close()


def read_all(root: Path, fp: str) -> dict[str, dict[str, torch.Tensor]]:
    with EmbeddingCache(root, model=fp, memory_bytes=0) as cache:
        return {u: e.tensors for u, e in zip(URLS, cache.get_many(URLS)) if e is not None}


def test_old_style_cache_reads_verifies_and_rebuilds_unchanged(tmp_path: Path) -> None:
    expected = write_old_style_cache(tmp_path)
    with EmbeddingCache(tmp_path) as cache:
        got = cache.get(URLS[1])
        assert got is not None and got.family == "qwen2_vl" and list(got.tensors) == ["embeddings", "image_grid_thw"]
        assert torch.equal(got.embeddings, expected[URLS[1]][0]) and torch.equal(
            got.image_grid_thw, expected[URLS[1]][1]
        )
        mm = to_vllm(got)
        assert torch.equal(mm["image_embeds"], expected[URLS[1]][0]) and mm["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert verify_cache(tmp_path, deep=True).problems == []
    os.remove(tmp_path / "index.sqlite")  # rebuilt from shards that do not record their family: told by the tensors
    rebuild_index(tmp_path)
    with EmbeddingCache(tmp_path) as cache:
        assert cache.family == "qwen2_vl" and torch.equal(cache.get(URLS[3]).embeddings, expected[URLS[3]][0])


def test_any_set_of_tensor_names_survives_every_store_operation(tmp_path: Path) -> None:
    root, other = tmp_path / "a", tmp_path / "b"
    write_new(root, URLS[:2], run="r1")
    write_new(root, URLS[2:], run="r2")
    want = {u: new_entry(u).tensors for u in URLS}
    with safe_open(str(next((root / "shards").rglob("r1-*.safetensors"))), "pt") as f:
        key = cache_key(URLS[0])
        assert set(f.keys()) >= {key, key + ".image_grid_thw", key + ".deepstack"}
        assert f.metadata()["model_family"] == "multi"

    def same(root: Path) -> None:
        got = read_all(root, NEW_FP)
        assert set(got) == set(URLS)
        for url in URLS:
            assert list(got[url]) == ["embeddings", "image_grid_thw", "deepstack"]
            assert all(torch.equal(got[url][n], want[url][n]) for n in want[url])

    same(root)
    assert verify_cache(root, deep=True).problems == []
    merge_caches(other, [root])
    same(other)
    db = CacheIndex(root / "index.sqlite")
    with db.conn:
        db.conn.execute("DELETE FROM entries WHERE key=?", (cache_key(URLS[0]),))
    db.close()
    report = collect_garbage(
        root, live_threshold=0.9
    )  # r1's shard is half dead: compacted with all three tensors of the live entry
    assert len(report.shards_compacted) == 1
    got = read_all(root, NEW_FP)
    assert set(got) == set(URLS[1:]) and torch.equal(got[URLS[1]]["deepstack"], want[URLS[1]]["deepstack"])
    os.remove(other / "index.sqlite")
    rebuild_index(other)  # the family comes back from the shards' metadata
    with EmbeddingCache(other) as cache:
        assert cache.family == "multi" and cache.get(URLS[2]).family == "multi"
    same(other)

    info = show_entry(other, URLS[2])
    stored = info["entries"][0]["stored"]
    assert stored[cache_key(URLS[2]) + ".deepstack"] == {"dtype": "F32", "shape": [2, 6, 8]}
    with EmbeddingCache(other) as cache:
        entry = cache.get(URLS[2])
    (st,) = export_entry(entry, tmp_path / "x.safetensors")
    assert sorted(load_file(st)) == ["deepstack", "embeddings", "image_grid_thw"]
    npys = export_entry(entry, tmp_path / "x.npy")
    assert [p.name for p in npys] == ["x.npy", "x.image_grid_thw.npy", "x.deepstack.npy"]
    assert np.array_equal(np.load(npys[2]), want[URLS[2]]["deepstack"].numpy())


def test_entry_names_are_checked() -> None:
    with pytest.raises(ValueError, match="no 'embeddings'"):
        ShardEntry(cache_key("u"), "u", None, {"image_grid_thw": torch.zeros(1, 3)}, "c" * 64, 1.0)
    with pytest.raises(ValueError, match="cannot be stored"):
        ShardEntry(
            cache_key("u"), "u", None, {"embeddings": torch.zeros(2), "Deep.Stack": torch.zeros(1)}, "c" * 64, 1.0
        )


def test_to_vllm_dispatches_on_family(tmp_path: Path) -> None:
    layout = CacheLayout(tmp_path)
    index = CacheIndex(layout.index)
    for fp, family, tensors in (
        ("a" * 64, "pooled", {"embeddings": torch.randn(16)}),
        ("b" * 64, "llava", {"embeddings": torch.randn(9, 8)}),
        ("c" * 64, "qwen2_vl", {"embeddings": torch.randn(4, 8)}),  # no grid: refused by name
        ("d" * 64, "martian", {"embeddings": torch.randn(4, 8)}),
    ):
        index.register_model(fp, family, family, {})
        writer = ShardWriter(layout, fp, family, "r", family)
        writer.add(ShardEntry(cache_key("u"), "u", None, tensors, "c" * 64, 1.0))
        index.commit_shard(writer.flush(), fp, "r")
    index.close()

    def entry(fp: str):  # noqa: ANN202
        with EmbeddingCache(tmp_path, model=fp) as cache:
            return cache.get("u")

    llava = entry("b" * 64)
    out = to_vllm(llava)
    assert out.shape == (1, 9, 8) and torch.equal(out[0], llava.embeddings)
    with pytest.raises(ServingFormatError, match="no precomputed-embedding image input"):
        to_vllm(entry("a" * 64))
    with pytest.raises(ServingFormatError, match="has no 'image_grid_thw' tensor"):
        to_vllm(entry("c" * 64))
    with pytest.raises(ServingFormatError, match="family 'martian', which has no vLLM layout.*llava, qwen2_vl"):
        to_vllm(entry("d" * 64))
