"""`python -m benchmarks.run [--quick] [--only SECTION...]`: one table of side-by-side throughput figures.

Sections (each builds its own inputs under --work, default /tmp/mmprep-bench; --quick skips vlm and rewrite):
  check    `mmprep check` images/s vs a naive sequential httpx+Pillow loop vs the machine's decode+preprocess limit
  encode   `mmprep encode` images/s vs model-only (pre-processed tensors, same batch size and device)
  fast     --fast-decode speed-up (check, camera-size JPEGs) and its effect on embeddings
  cached   fully cached rerun of 10k vs 1M rows (subprocess `mmprep encode`): rows/s and peak RSS
  vlm      peak RSS loading LLaVA / Qwen2-VL / Qwen3-VL vision-only vs the whole checkpoint (subprocesses)
  gpu      check + encode on CUDA with a ViT-B/16 in float16 (skipped without a GPU)
  rewrite  `mmprep rewrite` of an OpenAI batch file (100k lines) vs json.loads+dumps of every line; a
           Qwen2-VL-7B-sized payload (256 tokens x 3584, fp32) for MB/s
  export   `mmprep export` npy vs a naive EmbeddingCache.get loop (vectors/s, peak RSS); vllm-ec entries/s
Figures of one row are measured in the same run, one after the other, so ratios compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks import inputs  # noqa: E402

SECTIONS = ("check", "encode", "fast", "cached", "vlm", "gpu", "rewrite", "export")
QUICK_SECTIONS = (
    "check",
    "encode",
    "fast",
    "cached",
    "gpu",
)  # vlm: eight model-loading subprocesses; rewrite: four more (--only rewrite); export: 1M vectors
LOOPBACK = dict(allow_http=True, allow_hosts=("127.0.0.1",))


@dataclass(frozen=True)
class Scale:
    """How big each section's inputs are."""

    check_rows: int = 512
    encode_rows: int = 256
    fast_rows: int = 128
    diff_images: int = 32
    cached_rows: tuple[int, int] = (10_000, 1_000_000)
    clip_layers: int = 12  # ViT-B: 12 layers of 768
    batch_size: int = 32
    gpu_rows: int = 2048
    rewrite_rows: int = 100_000  # request lines of the batch file
    rewrite_images: int = 64  # distinct images they reference (1 or 2 a request)
    rewrite_large: int = 64  # requests with a Qwen2-VL-7B-sized embedding each, all distinct
    export_rows: int = 1_000_000
    export_ec_rows: int = 2_000


QUICK = Scale(check_rows=48, encode_rows=32, fast_rows=16, diff_images=4, cached_rows=(1_000, 10_000),
              clip_layers=2, batch_size=8, gpu_rows=256, rewrite_rows=5_000, rewrite_images=8, rewrite_large=4,
              export_rows=5_000, export_ec_rows=50)  # fmt: skip


@dataclass
class Row:
    """One line of the table: what was measured, its figures, and the ratio that matters."""

    section: str
    what: str
    figures: str
    ratio: str
    target: str = ""
    values: dict[str, float] = field(default_factory=dict)


# -- helpers ---------------------------------------------------------------------------------------


def load_settings(**overrides: Any) -> Any:
    from mmprep.settings import LoadSettings

    return LoadSettings(**{**LOOPBACK, **overrides})


def check_rate(manifest: Path, prepare: Callable[[Any], Any] | None, work: Path, **load: Any) -> float:
    """`mmprep check` (the CheckRun behind it) on a manifest: images/s as it reports them."""
    from mmprep.pipeline import CheckRun

    summary = CheckRun([str(manifest)], load_settings(**load), work / "check-errors.jsonl", prepare).run()
    assert summary.failed == 0, summary
    return summary.images_per_s


def naive_rate(urls: list[str], prepare: Callable[[Any], Any]) -> float:
    """What a first script does: one row at a time, httpx get, Pillow decode, the processor."""
    import io

    import httpx
    from PIL import Image

    start = time.perf_counter()
    with httpx.Client() as client:
        for url in urls:
            image = Image.open(io.BytesIO(client.get(url).content)).convert("RGB")
            prepare(image)
    return len(urls) / (time.perf_counter() - start)


def limit_rate(bodies: list[bytes], prepare: Callable[[Any], Any], **load: Any) -> float:
    """The machine's in-process ceiling: decode + preprocess of bytes already in memory, one thread per core."""
    from mmprep.imaging.decode import decode_image

    settings = load_settings(**load)

    def one(data: bytes) -> None:  # the result is dropped, as `check` drops it (keeping 256 of them costs page faults)
        prepare(decode_image(data, settings))

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for _ in pool.map(one, bodies):
            pass
    return len(bodies) / (time.perf_counter() - start)


def model_only_rate(encoder: Any, items: list[dict[str, Any]], batch_size: int) -> float:
    """Images/s of encoder.encode alone on pre-processed inputs, after one warm-up batch."""
    encoder.encode(items[:batch_size])
    if encoder.device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(items), batch_size):
        encoder.encode(items[i : i + batch_size])  # returns CPU tensors: synchronised
    return len(items) / (time.perf_counter() - start)


def encode_rate(manifest: Path, encoder: Any, batch_size: int, out: Path, **load: Any) -> float:
    """`mmprep encode` (the EncodeRun behind it) into a fresh cache with an already loaded encoder."""
    from mmprep.pipeline import EncodeRun
    from mmprep.settings import ModelSettings, Settings

    settings = Settings(
        out=out, model=ModelSettings(name=encoder.name, batch_size=batch_size), load=load_settings(**load)
    )
    summary = EncodeRun([str(manifest)], settings, encoder).run()
    assert summary.failed == 0 and summary.encoded > 0, summary
    return summary.images_per_s


def load_encoder(model_dir: Path, device: str = "cpu", dtype: str = "auto", batch_size: int = 32) -> Any:
    from mmprep.models import load_encoder as load

    from mmprep.settings import ModelSettings

    return load(ModelSettings(name=str(model_dir), device=device, dtype=dtype, batch_size=batch_size))


def fetch_all(urls: list[str]) -> list[bytes]:
    import httpx

    with httpx.Client() as client:
        return [client.get(url).content for url in urls]


def run_child(argv: list[str]) -> tuple[float, str]:
    """Run `python -m MODULE ...` or `python -c CODE ...` (argv without the interpreter) in a subprocess; its peak RSS (MB) and stdout."""
    with tempfile.NamedTemporaryFile(suffix=".rss") as peak:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.peak", peak.name, *argv], capture_output=True, text=True
        )
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"{argv[:3]} exited {proc.returncode}: {proc.stderr[-2000:]}")
        return float(Path(peak.name).read_text()), proc.stdout


# -- sections --------------------------------------------------------------------------------------


def section_check(scale: Scale, work: Path, server: inputs.BenchServer, prepare: Any) -> list[Row]:
    urls = [server.url("vga", i) for i in range(scale.check_rows)]
    manifest = inputs.write_manifest(work / "check.jsonl", urls)
    bodies = fetch_all(urls)
    check = check_rate(manifest, prepare, work)
    naive = naive_rate(urls[: max(16, len(urls) // 4)], prepare)
    limit = limit_rate(bodies, prepare)
    return [Row("1 check", f"640x480 JPEG → CLIP 224 processor, {len(urls)} rows",
                f"check {check:.0f} · naive loop {naive:.0f} · decode+preprocess limit {limit:.0f} img/s",
                f"{check / limit:.2f}x limit, {check / naive:.1f}x naive", "≈1x limit",
                {"check": check, "naive": naive, "limit": limit})]  # fmt: skip


def section_encode(scale: Scale, work: Path, server: inputs.BenchServer, model_dir: Path, label: str,
                   device: str = "cpu", dtype: str = "auto", rows: int | None = None, target: str = "≥ 0.9x") -> list[Row]:  # fmt: skip
    from mmprep.imaging.decode import decode_image

    rows = rows or scale.encode_rows
    encoder = load_encoder(model_dir, device, dtype, scale.batch_size)
    urls = [server.url("enc", i) for i in range(rows)]
    manifest = inputs.write_manifest(work / f"encode-{device}.jsonl", urls)
    settings = load_settings()
    items = [encoder.preprocess(decode_image(data, settings)) for data in fetch_all(urls)]
    before = model_only_rate(encoder, items, scale.batch_size)
    with tempfile.TemporaryDirectory(dir=work) as out:
        end_to_end = encode_rate(manifest, encoder, scale.batch_size, Path(out))
    after = model_only_rate(encoder, items, scale.batch_size)
    model_only = (before + after) / 2
    return [Row(f"2 encode{'' if device == 'cpu' else ' ' + device}", f"{label}, batch {scale.batch_size}, {rows} rows, {device}",
                f"encode {end_to_end:.1f} · model-only {model_only:.1f} img/s (before {before:.1f} / after {after:.1f})",
                f"{end_to_end / model_only:.2f}x model-only", target,
                {"encode": end_to_end, "model_only": model_only})]  # fmt: skip


def section_fast(scale: Scale, work: Path, server: inputs.BenchServer, model_dir: Path) -> list[Row]:
    import torch

    from mmprep.imaging.decode import decode_image

    encoder = load_encoder(model_dir, batch_size=scale.batch_size)
    target = encoder.input_size()
    urls = [server.url("large", i) for i in range(scale.fast_rows)]
    manifest = inputs.write_manifest(work / "fast.jsonl", urls)
    full = check_rate(manifest, encoder.preprocess, work)
    fast = check_rate(manifest, encoder.preprocess, work, fast_decode=True, draft_size=target)
    bodies = fetch_all(urls[: scale.diff_images])
    exact, drafted = load_settings(), load_settings(fast_decode=True, draft_size=target)
    a = encoder.encode([encoder.preprocess(decode_image(b, exact)) for b in bodies])
    b = encoder.encode([encoder.preprocess(decode_image(b, drafted)) for b in bodies])
    ea, eb = torch.stack([x["embeddings"] for x in a]).float(), torch.stack([x["embeddings"] for x in b]).float()
    max_abs = float((ea - eb).abs().max())
    scale_abs = float(ea.abs().max())
    min_cos = float(torch.nn.functional.cosine_similarity(ea, eb).min())
    size = decode_image(bodies[0], drafted).size
    return [
        Row("3 fast-decode", f"1600x1200 JPEG → {target[0]} (decoded at {size[0]}x{size[1]}), check, {len(urls)} rows",
            f"fast {fast:.0f} · full {full:.0f} img/s", f"{fast / full:.2f}x speed-up", "> 1x",
            {"fast": fast, "full": full}),
        Row("3 fast-decode", f"embeddings vs full decode, {len(bodies)} images (random-weight ViT)",
            f"max abs diff {max_abs:.2e} (max |e| {scale_abs:.2f})", f"min cosine {min_cos:.5f}", "report",
            {"max_abs": max_abs, "min_cos": min_cos}),
    ]  # fmt: skip


def section_cached(scale: Scale, work: Path) -> list[Row]:
    from mmprep.imaging.decode import pixel_options
    from mmprep.models import load_encoder as load
    from mmprep.settings import LoadSettings, ModelSettings

    model = "builtin:tiny-clip"
    fingerprint = load(
        ModelSettings(name=model), pixel_options(LoadSettings())
    ).fingerprint  # the default decode profile's
    results: dict[int, tuple[float, float, float]] = {}
    for rows in scale.cached_rows:
        base = work / f"cached-{rows}"
        manifest = base / "manifest.jsonl"
        cache = base / "cache"
        if not (base / "ready").is_file():
            base.mkdir(parents=True, exist_ok=True)
            inputs.write_manifest(manifest, (f"https://images.example/{i % 997}/{i:09d}.jpg" for i in range(rows)))
            inputs.build_cached(cache, manifest, fingerprint, model, rows)
            (base / "ready").write_text(fingerprint)
        argv = [
            "-m",
            "mmprep",
            "encode",
            str(manifest),
            "--model",
            model,
            "--out",
            str(cache),
            "--json",
            "--progress",
            "none",
        ]
        start = time.perf_counter()
        rss, out = run_child(argv)
        wall = time.perf_counter() - start
        summary = json.loads(out)
        assert summary["cached"] == rows and summary["encoded"] == 0, summary
        results[rows] = (rows / summary["duration_s"], rss, rows / wall)
    small, large = scale.cached_rows
    (rs, ms, _ws), (rl, ml, wl) = results[small], results[large]
    return [
        Row("4 cached rerun", f"{large:,} rows fully cached (subprocess mmprep encode)",
            f"{rl:,.0f} rows/s in the run ({wl:,.0f} incl. start-up); {small:,} rows: {rs:,.0f} rows/s",
            f"{rl / 100_000:.2f}x target", "≥ 100,000 rows/s", {"rows_per_s": rl, "rows_per_s_small": rs}),
        Row("4 cached rerun", f"peak RSS, {small:,} vs {large:,} rows",
            f"{ms:.0f} MB vs {ml:.0f} MB", f"{ml - ms:+.0f} MB", "≤ +64 MB", {"rss_small": ms, "rss_large": ml}),
    ]  # fmt: skip


JSON_FLOOR_CHILD = """
import json, sys
with open(sys.argv[1], encoding="utf-8") as src, open(sys.argv[2], "w", encoding="utf-8") as out:
    for line in src:
        out.write(json.dumps(json.loads(line), ensure_ascii=False) + "\\n")
"""


REWRITE_CHILD = """
import sys
sys.stderr = sys.stdout  # the --json summary goes to stderr; hand it to the parent on stdout
from mmprep.cli import app
app(sys.argv[1:], prog_name="mmprep")
"""


def section_rewrite(scale: Scale, work: Path) -> list[Row]:
    """`mmprep rewrite` (subprocesses, like a user runs it) next to the floor of any line rewriter."""
    base = work / f"rewrite-{scale.rewrite_rows}"
    small, large = base / "tiny", base / "large"
    if not (base / "ready").is_file():
        base.mkdir(parents=True, exist_ok=True)
        inputs.rewrite_inputs(small, "builtin:tiny-qwen2-vl", scale.rewrite_images, scale.rewrite_rows, (56, 56))
        model = inputs.save_qwen2_vl_7b_shaped(base / "qwen2-vl-7b-shaped")
        inputs.rewrite_inputs(large, str(model), scale.rewrite_large, scale.rewrite_large, (448, 448))
        (base / "ready").write_text("ok")

    def run_rewrite(where: Path, *flags: str) -> tuple[dict[str, Any], float, float]:
        """One `mmprep rewrite` subprocess: its --json summary (stderr, sent to stdout here), peak RSS, wall time."""
        argv = [
            "rewrite",
            str(where / "batch.jsonl"),
            "--cache",
            str(where / "cache"),
            "-o",
            str(where / "out.jsonl"),
            "--json",
            *flags,
        ]
        start = time.perf_counter()
        rss, out = run_child(["-c", REWRITE_CHILD, *argv])
        return json.loads(out), rss, time.perf_counter() - start

    start = time.perf_counter()
    floor_rss, _ = run_child(["-c", JSON_FLOOR_CHILD, str(small / "batch.jsonl"), str(small / "floor.jsonl")])
    floor_rate = scale.rewrite_rows / (time.perf_counter() - start)
    results = {}
    for name, where, flags in (("embeds", small, ()), ("uuid", small, ("--uuid-only",)), ("large", large, ())):
        summary, rss, wall = run_rewrite(where, *flags)
        assert summary["replaced"] == summary["images"] > 0, summary
        results[name] = (summary, rss, wall)
    (e, e_rss, e_wall), (u, _, _u_wall), (g, g_rss, _) = results["embeds"], results["uuid"], results["large"]
    return [
        Row("7 rewrite", f"OpenAI batch file, {e['requests']:,} requests, {e['images']:,} images (tiny Qwen2-VL, "
            f"{e['bytes_out'] / e['requests'] / 1e3:.1f} kB written a request)",
            f"image_embeds {e['requests_per_s']:,.0f} req/s ({e['mb_per_s']:.0f} MB/s; {e['requests'] / e_wall:,.0f} incl. start-up) · "
            f"--uuid-only {u['requests_per_s']:,.0f} req/s · json.loads+dumps of every line {floor_rate:,.0f} lines/s",
            f"{e['requests_per_s'] / floor_rate:.2f}x loads+dumps", "report",
            {"requests_per_s": e["requests_per_s"], "uuid_requests_per_s": u["requests_per_s"], "floor": floor_rate}),
        Row("7 rewrite", f"{g['requests']} requests with a Qwen2-VL-7B-sized part each (256 x 3584 fp32, distinct images)",
            f"{g['mb_per_s']:,.0f} MB/s ({g['bytes_out'] / 1e6:,.0f} MB written), {g['requests_per_s']:,.1f} req/s; peak RSS "
            f"{g_rss:.0f} MB (small parts: {e_rss:.0f} MB; floor child {floor_rss:.0f} MB)",
            f"{g['bytes_out'] / g['requests'] / 1e6:.1f} MB a request", "report",
            {"mb_per_s": g["mb_per_s"], "rss": g_rss}),
    ]  # fmt: skip


VLM_CHILD = """
import sys
import torch
family, mode, path, dtype = sys.argv[1:5]
if mode == "vision-only":
    from mmprep.models import load_encoder
    from mmprep.settings import ModelSettings
    load_encoder(ModelSettings(name=path, dtype=dtype))
else:  # what mmprep did before: the whole checkpoint through from_pretrained, language model dropped after
    import transformers
    cls = {"llava": transformers.LlavaForConditionalGeneration, "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
           "qwen3_vl": transformers.Qwen3VLForConditionalGeneration}[family]
    cls.from_pretrained(path, dtype=getattr(torch, dtype))
"""


def language_model_share(checkpoint: Path) -> float:
    """The fraction of a checkpoint's parameters that belong to the language model (and LM head)."""
    import math

    from safetensors import safe_open

    total = lm = 0
    for path in checkpoint.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118
                count = math.prod(f.get_slice(name).get_shape())
                total += count
                lm += count if "language_model" in name or name.startswith("lm_head") else 0
    return lm / total


VLM_FAMILIES = ("llava", "qwen2_vl", "qwen3_vl")


def section_vlm(scale: Scale, work: Path, only: Sequence[str] = VLM_FAMILIES) -> list[Row]:
    from benchmarks.vlm import save_big_llava, save_big_qwen2_vl, save_big_qwen3_vl

    quick = scale is QUICK
    rows = []
    families = (("llava", save_big_llava, "float32"), ("qwen2_vl", save_big_qwen2_vl, "float32"),
                ("qwen3_vl", save_big_qwen3_vl, "bfloat16"))  # fmt: skip
    for family, save, stored in families:
        if family not in only:
            continue
        path = save(work / f"vlm-{family}{'-quick' if quick else ''}", quick=quick)
        size_mb = sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**20
        lm = language_model_share(path)
        for dtype in ("float32", "bfloat16"):  # the checkpoint's own dtype: transformers maps it lazily
            whole, _ = run_child(["-c", VLM_CHILD, family, "whole", str(path), dtype])
            vision, _ = run_child(["-c", VLM_CHILD, family, "vision-only", str(path), dtype])
            rows.append(Row("5 vision-only load", f"{family}: {size_mb:.0f} MB {stored} checkpoint, LM {lm:.0%} of it, loaded as {dtype}",
                            f"vision-only {vision:.0f} MB · whole model {whole:.0f} MB peak RSS",
                            f"{vision / whole:.2f}x memory", "< 1x", {"vision_only": vision, "whole": whole}))  # fmt: skip
    return rows


def section_gpu(scale: Scale, work: Path, server: inputs.BenchServer) -> list[Row]:
    """Sections 1 and 2 on CUDA with a ViT-B/16 in float16 (a batch large enough to fill the device)."""
    import torch

    if not torch.cuda.is_available():
        return [Row("6 gpu", "CUDA, ViT-B/16 float16", "no GPU on this machine: skipped", "-", "≥ 0.85x")]
    model_dir = inputs.save_clip(work / f"clip-b16-{scale.clip_layers}", layers=scale.clip_layers, patch=16)
    card = torch.cuda.get_device_name(0)
    gpu = Scale(**{**scale.__dict__, "batch_size": 32 if scale is QUICK else 256, "check_rows": scale.gpu_rows})
    rows = section_encode(gpu, work, server, model_dir, f"ViT-B/16 fp16 on {card}", "cuda", "float16",
                          rows=scale.gpu_rows, target="≥ 0.85x")  # fmt: skip
    rows += section_check(gpu, work, server, load_encoder(model_dir, "cuda", "float16").preprocess)
    rows[-1].section = "6 gpu check"
    return rows


# -- table -----------------------------------------------------------------------------------------


def machine() -> str:
    import torch
    import transformers
    from PIL import __version__ as pillow

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    mem = next((int(line.split()[1]) // 2**20 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {mem} GiB RAM, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, Pillow {pillow}")  # fmt: skip


def render(rows: list[Row]) -> str:
    """The table as GitHub markdown."""
    lines = ["| # | measured | figures | ratio | target |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r.section} | {r.what} | {r.figures} | **{r.ratio}** | {r.target} |" for r in rows]
    return "\n".join(lines)


def run(sections: list[str], scale: Scale, work: Path, vlm_families: Sequence[str] = VLM_FAMILIES) -> list[Row]:
    """Build the inputs, run the chosen sections, return their rows."""
    import logging

    logging.getLogger("mmprep.models").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    work.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    needs_server = {"check", "encode", "fast", "gpu"} & set(sections)
    clip = inputs.save_clip(work / f"clip-b32-{scale.clip_layers}", layers=scale.clip_layers) if needs_server else None
    pools = (
        {
            "vga": inputs.jpeg_pool((640, 480)),
            "enc": inputs.jpeg_pool((640, 480)),
            "large": inputs.jpeg_pool((1600, 1200), 8),
        }
        if needs_server
        else {}
    )
    with inputs.serving(pools) as server:
        if "check" in sections:
            rows += section_check(scale, work, server, load_encoder(clip).preprocess)
        if "encode" in sections:
            rows += section_encode(scale, work, server, clip, f"CLIP ViT-B/32-shaped ({scale.clip_layers} layers)")
        if "fast" in sections:
            rows += section_fast(scale, work, server, clip)
        if "gpu" in sections:
            rows += section_gpu(scale, work, server)
    if "cached" in sections:
        rows += section_cached(scale, work)
    if "vlm" in sections:
        rows += section_vlm(scale, work, vlm_families)
    if "rewrite" in sections:
        rows += section_rewrite(scale, work)
    if "export" in sections:
        from benchmarks.export import section_export

        rows += section_export(scale.export_rows, scale.export_ec_rows, work, run_child, Row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="small inputs, a 2-layer ViT, no vlm section: a smoke test (< 60 s)"
    )
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument(
        "--vlm-family",
        nargs="+",
        choices=VLM_FAMILIES,
        default=VLM_FAMILIES,
        help="vlm section: only these checkpoints",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "mmprep-bench",
        help="inputs are built (and reused) here",
    )
    args = parser.parse_args(argv)
    sections = args.only or list(QUICK_SECTIONS if args.quick else SECTIONS)
    rows = run(sections, QUICK if args.quick else Scale(), args.work, args.vlm_family)
    print(machine())
    print(render(rows))


if __name__ == "__main__":
    main()
