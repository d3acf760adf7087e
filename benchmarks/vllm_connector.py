"""`python -m benchmarks.vllm_connector {ttft,lookup}`: what serving straight from the cache costs.

ttft (needs MMPREP_VLLM_PYTHON): one vLLM engine with `MmprepECConnector` on a cache of the tiny
Qwen2-VL of tests/interop answers max_tokens=1 requests for N distinct 224x224 images (64 image
tokens; the first image is a warm-up), the four kinds interleaved image by image:
  image_url (encoder)         a uuid the cache lacks: vLLM fetches, decodes, preprocesses and encodes
  image_url + uuid            `rewrite --target vllm-ec --uuid-only`: the connector's entry replaces the encoder
  metadata-only               `rewrite --target vllm-ec`: no image at all, the grid and the uuid
  inline image_embeds         `rewrite --target vllm`: base64 tensors in the request (another uuid: no hit)
Each figure is the median wall time of one request's call (one output token: its time to first token)
and the median size of its request line.

lookup: the connector's per-entry cost (`EcSource.check`: index lookup by uuid or by vLLM identifier,
shard read, checks) on synthetic caches of 100k and 1M entries written through mmprep's own writer
(tiny [4, 64] float16 embeddings + grid, 256 entries a shard: as many as a default 128 MiB shard holds
of Qwen2-VL-7B's 224x224 images; one vLLM identifier each), random keys, after a warm-up; the
process's RSS growth from opening the source and looking up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARD_ENTRIES = (
    256  # what a 128 MiB shard (the default --shard-size) holds of Qwen2-VL-7B's 224x224 images (458 KB each)
)
MODEL_ID = "bench-served-model"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_cache(cache: Path, rows: int) -> None:
    """`rows` Qwen2-VL-shaped entries ([4, 64] float16, grid [1, 4, 4]) and their vLLM identifiers."""
    import torch

    from mmprep.keys import cache_key
    from mmprep.store.index import CacheIndex
    from mmprep.store.layout import CacheLayout
    from mmprep.store.shards import ShardEntry, ShardWriter

    if (cache / "ready").is_file():
        return
    shutil.rmtree(cache, ignore_errors=True)
    fingerprint = hashlib.sha256(b"bench-connector").hexdigest()
    layout = CacheLayout(cache)
    index = CacheIndex(layout.index)
    generator = torch.Generator().manual_seed(0)
    grid = torch.tensor([[1, 4, 4]])
    try:
        index.register_model(
            fingerprint, "bench-qwen2-vl", "qwen2_vl", {"architecture": "Qwen2VLForConditionalGeneration"}
        )
        writer = ShardWriter(layout, fingerprint, "bench-qwen2-vl", "bench", "qwen2_vl")
        now = time.time()
        for start in range(0, rows, SHARD_ENTRIES):
            n = min(SHARD_ENTRIES, rows - start)
            embeddings = torch.randn(n, 4, 64, generator=generator).half()
            for i in range(n):
                url = f"https://images.example/{start + i:09d}.jpg"
                writer.add(
                    ShardEntry(
                        cache_key(url),
                        url,
                        None,
                        {"embeddings": embeddings[i].clone(), "image_grid_thw": grid.clone()},
                        f"{start + i:064x}",
                        now,
                    )
                )
            index.commit_shard(writer.flush(), fingerprint, "bench")
            index.record_vllm_identifiers((f"{start + i:064x}", MODEL_ID, _vllm_id(start + i)) for i in range(n))
    finally:
        index.close()
    (cache / "ready").write_text("ok")


def _vllm_id(i: int) -> str:
    return hashlib.sha256(f"vllm-{i}".encode()).hexdigest()


LOOKUP_CHILD = """
import json, random, sys, time
import torch
from benchmarks.vllm_connector import MODEL_ID, _rss_mb, _vllm_id
from mmprep.keys import cache_key
from mmprep.serving.ec_source import EcSource, ServedModel
cache, rows, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(0)
before = _rss_mb()
start = time.perf_counter()
source = EcSource(cache, None, ServedModel(64, torch.float16, ("Qwen2VLForConditionalGeneration",), MODEL_ID))
open_s = time.perf_counter() - start
picks = [rng.randrange(rows) for _ in range(n + 200)]
for i in picks[:200]:  # warm-up: SQLite pages, shard handles
    assert source.check(cache_key(f"https://images.example/{i:09d}.jpg"), 4).hit
timings = {}
for how in ("uuid", "vllm-id", "uuid-again"):  # uuid-again: the same entries once more (their pages cached)
    start = time.perf_counter()
    for i in picks[200:]:
        ident = _vllm_id(i) if how == "vllm-id" else cache_key(f"https://images.example/{i:09d}.jpg")
        assert source.check(ident, 4).hit
    timings[how] = (time.perf_counter() - start) / n * 1e6
start = time.perf_counter()
for i in range(n):
    assert not source.check(f"{rows + i:064x}", 4).found
timings["miss"] = (time.perf_counter() - start) / n * 1e6
print(json.dumps({"open_ms": open_s * 1000, "us": timings, "rss_growth_mb": _rss_mb() - before}))
"""


def lookup(work: Path, sizes: list[int], n: int) -> None:
    results = {}
    for rows in sizes:
        cache = work / f"lookup-{rows}"
        start = time.perf_counter()
        build_cache(cache, rows)
        built = time.perf_counter() - start
        done = subprocess.run([sys.executable, "-c", LOOKUP_CHILD, str(cache), str(rows), str(n)], capture_output=True,
                              text=True, check=True, cwd=HERE.parent)  # fmt: skip
        results[rows] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{rows:>9,} entries (built in {built:.0f} s): {json.dumps(results[rows])}", flush=True)
    small, large = min(sizes), max(sizes)
    print(f"\nEcSource.check, {n:,} random entries, one process per size (mean us per entry):")
    print(f"  {'':10s} " + "  ".join(f"{rows:>12,}" for rows in sizes) + f"  {large:,}/{small:,}")
    for how in ("uuid", "vllm-id", "uuid-again", "miss"):
        values = [results[rows]["us"][how] for rows in sizes]
        print(f"  {how:10s} " + "  ".join(f"{v:12.0f}" for v in values) + f"  {values[-1] / values[0]:.2f}x")
    print("  open (ms)  " + "  ".join(f"{results[rows]['open_ms']:12.0f}" for rows in sizes))
    print("  RSS growth (MB) " + "  ".join(f"{results[rows]['rss_growth_mb']:8.1f}" for rows in sizes))


KINDS = {
    "encoder": "image_url (encoder)",
    "uuid": "image_url + uuid (connector)",
    "meta": "metadata-only (connector)",
    "inline": "inline image_embeds",
}


def ttft(work: Path, images: int) -> None:
    sys.path[:0] = [str(HERE.parent / "tests" / "interop"), str(HERE.parent / "tests")]
    from _image_corpus import encode as encode_image
    from _image_corpus import noise
    from _tiny_vlm import save_tiny_qwen2_vl
    from _vllm import QUESTION, encode, mmprep, run_vllm, served

    model = save_tiny_qwen2_vl(work / "model")
    pictures = {f"{i}.png": encode_image(noise((224, 224), seed=100 + i), "PNG") for i in range(images)}
    with served(pictures) as urls:
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        encode(list(urls.values()), model, cache)
        batch = work / "batch.jsonl"
        lines = []
        for i, url in enumerate(urls.values()):
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
            lines.append(
                {"custom_id": str(i), "body": {"model": "tiny", "messages": [{"role": "user", "content": content}]}}
            )
        batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
        files = {"encoder": batch}
        for kind, options in (
            ("uuid", ["--target", "vllm-ec", "--uuid-only"]),
            ("meta", ["--target", "vllm-ec"]),
            ("inline", ["--target", "vllm"]),
        ):
            files[kind] = work / f"batch.{kind}.jsonl"
            done = mmprep("rewrite", str(batch), "-o", str(files[kind]), "--cache", str(cache), *options)
            assert done.returncode == 0, done.stderr
        texts = {kind: path.read_text().splitlines() for kind, path in files.items()}
        requests = []
        for i in range(images):
            for kind in KINDS:
                messages = json.loads(texts[kind][i])["body"]["messages"]
                part = messages[0]["content"][0]
                if kind == "encoder":
                    part["uuid"] = f"bench-not-cached-{i}"
                elif kind == "inline":
                    part["uuid"] = f"bench-inline-{i}"  # vLLM takes the inline tensor: the connector has no such entry
                requests.append({"id": f"{kind}:{i}", "messages": messages})
        ec = {"ec_connector": "MmprepECConnector", "ec_connector_module_path": "mmprep.serving.vllm_connector",
              "ec_role": "ec_consumer", "ec_connector_extra_config": {"cache_dir": str(cache)}}  # fmt: skip
        run = run_vllm(work / "vllm", model, requests, llm={"ec_transfer_config": ec}, max_tokens=1, with_mmprep=True)
    assert not run.errors, run.errors
    seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    sizes: dict[str, list[int]] = {kind: [] for kind in KINDS}
    for request_id, generation in run.generations.items():
        kind, index = request_id.split(":")
        if int(index) > 0:
            seconds[kind].append(generation.seconds)
            sizes[kind].append(len(texts[kind][int(index)].encode()))
    ms = {kind: statistics.median(v) * 1000 for kind, v in seconds.items()}
    size = {kind: statistics.median(v) for kind, v in sizes.items()}
    print(f"vLLM {run.version}, tiny Qwen2-VL (64 image tokens, 224x224 PNG), {images - 1} images, medians:")
    print(f"  {'':32s} {'TTFT ms':>9s} {'vs encoder':>10s} {'request bytes':>14s} {'vs image_url':>12s}")
    for kind, label in KINDS.items():
        print(
            f"  {label:32s} {ms[kind]:9.1f} {ms[kind] / ms['encoder']:9.2f}x {size[kind]:14,.0f} {size[kind] / size['encoder']:11.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["ttft", "lookup"])
    parser.add_argument("--images", type=int, default=25, help="ttft: distinct images (the first is a warm-up)")
    parser.add_argument("--sizes", default="100000,1000000", help="lookup: cache sizes (entries)")
    parser.add_argument("--lookups", type=int, default=2000, help="lookup: random entries looked up per size")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mmprep-bench-connector")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.what == "ttft":
        ttft(args.work, args.images)
    else:
        lookup(args.work, [int(s) for s in args.sizes.split(",")], args.lookups)


if __name__ == "__main__":
    random.seed(0)
    main()
