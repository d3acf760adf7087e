"""The `export` section: `mmprep export` against a naive loop over `EmbeddingCache.get`, and the vLLM store.

Inputs are built through the store API (random vectors, real shards and index), once per size:
  - a pooled cache of N 512-d float16 vectors (CLIP ViT-B/32's size), shards of 50k entries;
  - a Qwen2-VL-shaped cache of M entries of [64, 1536] float16 merged tokens (a 224x224 image on
    Qwen2-VL-2B) with their grids, whose model is a directory holding Qwen2-VL's config.
Each figure is one subprocess (peak RSS = its VmHWM), run one after the other.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

DIM = 512
EC_TOKENS, EC_HIDDEN = 64, 1536
SHARD_ROWS = 50_000

NAIVE_CHILD = """
import sys, time
import numpy as np
from mmprep import EmbeddingCache
cache_dir, urls_file, out = sys.argv[1:4]
start = time.perf_counter()
with open(urls_file) as f:
    urls = [line.rstrip("\\n") for line in f]
with EmbeddingCache(cache_dir) as cache:
    vectors = [cache.get(url).embeddings.numpy() for url in urls]
np.save(out, np.stack(vectors))
print(len(vectors) / (time.perf_counter() - start))
"""


def build_pooled(base: Path, rows: int) -> tuple[Path, Path]:
    """A cache of `rows` random 512-d float16 vectors, and the file of their URLs (one a line)."""
    cache, urls = base / "cache", base / "urls.txt"
    if (base / "ready").is_file():
        return cache, urls
    import torch

    base.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    with open(urls, "w") as f:
        f.writelines(f"https://images.example/{i % 997}/{i:09d}.jpg\n" for i in range(rows))
    _build(cache, "pooled", "bench-clip", {"name": "bench-clip"}, urls, rows,
           lambda n: {"embeddings": torch.randn(n, DIM, generator=generator).half()})  # fmt: skip
    (base / "ready").write_text("ok")
    return cache, urls


def build_qwen(base: Path, rows: int) -> Path:
    """A cache of `rows` Qwen2-VL-shaped entries ([64, 1536] tokens + a 16x16 grid) for --format vllm-ec."""
    cache = base / "cache"
    if (base / "ready").is_file():
        return cache
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLImageProcessor

    base.mkdir(parents=True, exist_ok=True)
    model_dir = base / "qwen2-vl-config"
    Qwen2VLConfig(vision_config={"spatial_merge_size": 2}).save_pretrained(model_dir)
    Qwen2VLImageProcessor().save_pretrained(model_dir)  # the export reads the model's config and processor
    urls = base / "urls.txt"
    urls.write_text("".join(f"https://images.example/q/{i:07d}.jpg\n" for i in range(rows)))
    generator = torch.Generator().manual_seed(1)
    grid = torch.tensor([[1, 16, 16]])
    _build(cache, "qwen2_vl", str(model_dir), {"name": str(model_dir), "revision": None}, urls, rows,
           lambda n: {"embeddings": torch.randn(n, EC_TOKENS, EC_HIDDEN, generator=generator).half(),
                      "image_grid_thw": grid.expand(n, 1, 3)})  # fmt: skip
    (base / "ready").write_text("ok")
    return cache


def _build(cache: Path, family: str, name: str, info: dict[str, Any], urls: Path, rows: int, make: Any) -> None:
    from mmprep.keys import cache_key
    from mmprep.store.index import CacheIndex
    from mmprep.store.layout import CacheLayout
    from mmprep.store.shards import ShardEntry, ShardWriter

    fingerprint = f"{family}-bench".encode().hex().ljust(64, "0")[:64]
    layout = CacheLayout(cache)
    index = CacheIndex(layout.index)
    try:
        index.register_model(fingerprint, name, family, info)
        writer = ShardWriter(layout, fingerprint, name, "bench-build")
        now = time.time()
        with open(urls) as f:
            lines = [line.rstrip("\n") for line in f]
        step = min(SHARD_ROWS, max(1, (256 << 20) // (EC_TOKENS * EC_HIDDEN * 2))) if family != "pooled" else SHARD_ROWS
        for start in range(0, rows, step):
            chunk = lines[start : start + step]
            tensors = make(len(chunk))
            for i, url in enumerate(chunk):
                named = {k: v[i].clone() for k, v in tensors.items()}
                writer.add(ShardEntry(cache_key(url), url, f"id-{start + i}", named, f"{start + i:064x}", now))
            index.commit_shard(writer.flush(), fingerprint, "bench-build")
    finally:
        index.close()


def section_export(rows: int, ec_rows: int, work: Path, run_child: Any, row_class: Any) -> list[Any]:
    """mmprep export (npy) vs a naive EmbeddingCache.get loop on `rows` vectors; vllm-ec on `ec_rows` entries."""
    import shutil

    cache, urls = build_pooled(work / f"export-{rows}", rows)
    out = work / f"export-{rows}" / "out"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    rss_export, stdout = run_child(["-m", "mmprep", "export", str(cache), "--out", str(out), "--format", "npy",
                                    "--progress", "none", "--json"])  # fmt: skip
    wall = time.perf_counter() - start
    report = json.loads(stdout[: stdout.rindex("}") + 1])
    assert report["rows"] == rows, report
    export_rate = rows / report["duration_s"]
    shutil.rmtree(out)
    naive_out = work / f"export-{rows}" / "naive.npy"
    rss_naive, stdout = run_child(["-c", NAIVE_CHILD, str(cache), str(urls), str(naive_out)])
    naive_rate = float(stdout.strip().splitlines()[-1])
    naive_out.unlink()
    result = [
        row_class("7 export", f"{rows:,} vectors float16[{DIM}] → npy + parquet metadata (subprocess)",
                  f"mmprep export {export_rate:,.0f} vectors/s ({rows / wall:,.0f} incl. start-up) · naive get() loop "
                  f"{naive_rate:,.0f} vectors/s", f"{export_rate / naive_rate:.1f}x naive", "> 1x",
                  {"export": export_rate, "naive": naive_rate}),
        row_class("7 export", f"peak RSS, {rows:,} vectors", f"mmprep export {rss_export:.0f} MB · naive loop {rss_naive:.0f} MB",
                  f"{rss_export / rss_naive:.2f}x memory", "flat in rows", {"rss_export": rss_export, "rss_naive": rss_naive}),
    ]  # fmt: skip
    qwen = build_qwen(work / f"export-ec-{ec_rows}", ec_rows)
    store = work / f"export-ec-{ec_rows}" / "store"
    shutil.rmtree(store, ignore_errors=True)
    rates = []
    for _ in range(2):  # the first run writes every entry, the second (incremental) none
        _rss, stdout = run_child(["-m", "mmprep", "export", str(qwen), "--out", str(store), "--format", "vllm-ec",
                                  "--progress", "none", "--json"])  # fmt: skip
        report = json.loads(stdout[: stdout.rindex("}") + 1])
        rates.append((ec_rows / report["duration_s"], report))
    (first, written), (again, skipped) = rates
    assert written["written"] == ec_rows and skipped["skipped"] == ec_rows, (written, skipped)
    mb_s = written["bytes"] / written["duration_s"] / 2**20
    result.append(row_class(
        "7 export", f"vllm-ec store, {ec_rows:,} Qwen2-VL entries float16[{EC_TOKENS}, {EC_HIDDEN}] (subprocess)",
        f"write {first:,.0f} entries/s ({mb_s:,.0f} MiB/s, fsync per entry) · rerun {again:,.0f} entries/s (nothing written)",
        f"{first:,.0f} entries/s", "report", {"written_per_s": first, "rerun_per_s": again},
    ))  # fmt: skip
    shutil.rmtree(store)
    return result
