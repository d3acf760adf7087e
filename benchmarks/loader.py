"""`python -m benchmarks.loader [--only SECTION...]`: the loading half against its limits and against img2dataset.

Sections (inputs under --work, default /tmp/mmprep-bench; figures of one row are measured in the same run,
alternating the contenders, so ratios compare like with like on a shared machine):
  prep     the exact fast preprocessing path, with the native resampler and with Pillow's resize, vs the
           transformers processor it replaces (CLIP 224, SigLIP 224x224, Qwen2-VL)
  size     `mmprep check --size 224x224` wall time vs img2dataset (subprocesses, start-up included),
           same URLs, same loopback server; with --before DIR also the mmprep tree in DIR
  model    `mmprep check --model` (in process) vs the in-process decode+preprocess limit, CLIP and Qwen2-VL
  rss      peak RSS of `mmprep check --size 224x224` at 2k vs 60k rows (tiny JPEGs, subprocesses)
  start    `encode` with the weights loading behind the loading half vs loaded first (as before), in process:
           wall time and time to the first encoded batch, from before the model is opened
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks import inputs
from benchmarks.run import Row, check_rate, encode_rate, fetch_all, limit_rate, render

SECTIONS = ("prep", "size", "model", "rss", "start")


def _best(times: list[float]) -> float:
    return min(times)


def section_prep(work: Path, images: int = 64, rounds: int = 3) -> list[Row]:
    """Per-image CPU time: the fast path with the native resampler, with Pillow's resize, and the transformers
    processor, alternating, best of `rounds`."""
    import io

    from PIL import Image
    from transformers import CLIPImageProcessorPil, Qwen2VLImageProcessorPil, SiglipImageProcessorPil

    from mmprep.models import ImagePreprocessor
    from mmprep.imaging import resample as native

    pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in inputs.jpeg_pool((640, 480), images)]
    rows = []
    for label, processor in [("CLIP 224 (resize+crop+normalize)", CLIPImageProcessorPil()),
                             ("SigLIP 224x224 (resize+normalize, bicubic)", SiglipImageProcessorPil()),
                             ("Qwen2-VL default (smart resize+patchify)", Qwen2VLImageProcessorPil())]:  # fmt: skip
        fast, slow = ImagePreprocessor(processor), ImagePreprocessor(processor, fast=False)
        assert fast.fast_path is not None
        contenders = {"transformers": (slow, "0"), "fast+Pillow": (fast, "0")}
        if native.native_enabled(processor.resample):
            contenders["fast+native"] = (fast, "1")
        times: dict[str, list[float]] = {name: [] for name in contenders}
        switch = os.environ.get(native.NATIVE_SWITCH)
        try:
            for _ in range(rounds):
                for name, (prep, native_on) in contenders.items():
                    os.environ[native.NATIVE_SWITCH] = native_on
                    start = time.thread_time()  # this thread's CPU time: robust to a loaded machine
                    for picture in pictures:
                        prep(picture)
                    times[name].append((time.thread_time() - start) / len(pictures) * 1e6)
        finally:
            if switch is None:
                os.environ.pop(native.NATIVE_SWITCH, None)
            else:
                os.environ[native.NATIVE_SWITCH] = switch
        best = {name: _best(values) for name, values in times.items()}
        t, pil = best["transformers"], best["fast+Pillow"]
        fastest = best.get("fast+native", pil)
        figures = " · ".join(f"{name} {value:,.0f} µs" for name, value in best.items())
        ratio = f"{t / fastest:.2f}x faster" + (
            f" (with Pillow's resize {t / pil:.2f}x)" if "fast+native" in best else " (native resampler not built)"
        )
        rows.append(Row("prep", f"640x480 photo → {label}, {len(pictures)} images, 1 thread",
                        f"{figures} CPU per image (best of {rounds}, alternating)", ratio, "≥ 2x", best))  # fmt: skip
    if native.native_enabled(Image.Resampling.BICUBIC):
        rows.append(_resize_alone(pictures, rounds))
    return rows


def _resize_alone(pictures: list[Any], rounds: int) -> Any:
    """CLIP's resize + center crop alone: Pillow's resize then a crop vs the native resampler's crop window."""
    from mmprep.imaging import resample as native

    times: dict[str, list[float]] = {"Pillow resize+crop": [], "native window": []}
    bicubic, size, window = 3, (298, 224), (37, 0, 261, 224)
    for _ in range(rounds):
        for name, values in times.items():
            resize = native._native if name == "native window" else native._pillow
            start = time.thread_time()
            for picture in pictures:
                resize(picture, size, bicubic, window)
            values.append((time.thread_time() - start) / len(pictures) * 1e6)
    best = {name: _best(values) for name, values in times.items()}
    return Row("prep", f"640x480 photo → 298x224 bicubic, center 224x224 (CLIP's resize alone), {len(pictures)} images",
               " · ".join(f"{name} {value:,.0f} µs" for name, value in best.items()) + " CPU per image",
               f"{best['Pillow resize+crop'] / best['native window']:.2f}x faster", "", best)  # fmt: skip


def _run_wall(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, check=False, capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:4]} exited {done.returncode}: {done.stderr[-2000:]}")
    return wall


def section_size(
    work: Path,
    server: Any,
    rows: int = 1000,
    rounds: int = 2,
    before: Path | None = None,
    img2dataset: str | None = None,
) -> list[Row]:
    """check --size 224x224 vs img2dataset (2 processes x 32 threads, resize to 224, center crop) on the same URLs."""
    urls = [server.url("vga", i) for i in range(rows)]
    manifest = inputs.write_manifest(work / f"size-{rows}.jsonl", urls)
    url_list = work / f"size-{rows}.txt"
    url_list.write_text("\n".join(urls) + "\n")
    flags = [
        "--size",
        "224x224",
        "--allow-http",
        "--allow-host",
        "127.0.0.1",
        "--progress",
        "none",
        "--errors",
        str(work / "size-errors.jsonl"),
    ]
    contenders: dict[str, Any] = {}
    here = Path(__file__).resolve().parent.parent
    for name, tree in (("mmprep", here), ("mmprep before", before)):
        if tree is not None:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            contenders[name] = ([sys.executable, "-m", "mmprep", "check", str(manifest), *flags], env)
    img2dataset = img2dataset or shutil.which("img2dataset")
    if img2dataset is None:
        raise RuntimeError("img2dataset is not installed (pip install img2dataset==1.47.0)")
    out = work / "img2dataset-out"

    def i2d_argv() -> list[str]:
        shutil.rmtree(out, ignore_errors=True)
        return [img2dataset, "--url_list", str(url_list), "--input_format", "txt", "--output_folder", str(out),
                "--output_format", "files", "--image_size", "224", "--resize_mode", "center_crop",
                "--processes_count", "2", "--thread_count", "32", "--timeout", "30", "--retries", "0",
                "--enable_wandb", "False", "--disallowed_header_directives", "[]"]  # fmt: skip

    walls: dict[str, list[float]] = {name: [] for name in [*contenders, "img2dataset"]}
    for _ in range(rounds):
        walls["img2dataset"].append(_run_wall(i2d_argv(), cwd=work))
        for name, (argv, env) in contenders.items():
            walls[name].append(_run_wall(argv, env=env, cwd=work))
    done = len(list(out.rglob("*.jpg")))
    i2d = _best(walls["img2dataset"])
    figures = " · ".join(f"{name} {', '.join(f'{w:.2f}' for w in ws)} s" for name, ws in walls.items())
    ratio = " · ".join(f"{name} {_best(walls[name]) / i2d:.2f}x" for name in contenders)
    where = "nginx" if isinstance(server, inputs.NginxServer) else "Python server"
    return [Row("size", f"{rows} 640x480 JPEGs → 224, loopback {where}, wall incl. start-up (img2dataset wrote {done})",
                figures, f"{ratio} img2dataset's wall (best runs)", "≤ 0.3x",
                {name: _best(ws) for name, ws in walls.items()})]  # fmt: skip


def section_model(work: Path, server: Any, rows: int = 512) -> list[Row]:
    """check --model vs the in-process decode+preprocess limit, for a CLIP-style and the Qwen2-VL processor:
    over HTTP from `server` (best in another process) and from the same bytes as local files; for CLIP also
    `encode` over HTTP with a 1-layer CLIP 224 whose forward costs next to nothing: its loading half."""
    import shutil

    from transformers import Qwen2VLImageProcessorPil

    from mmprep.models import ImagePreprocessor, load_encoder
    from mmprep.settings import ModelSettings

    urls = [server.url("vga", 10_000 + i) for i in range(rows)]
    manifest = inputs.write_manifest(work / f"model-{rows}.jsonl", urls)
    bodies = fetch_all(urls)
    files = work / "model-files"
    files.mkdir(exist_ok=True)
    for i, body in enumerate(bodies):
        (files / f"{i}.jpg").write_bytes(body)
    local = inputs.write_manifest(work / f"model-{rows}-files.jsonl", [str(files / f"{i}.jpg") for i in range(rows)])
    # CLIP 224 (shortest edge 224, center crop 224, bicubic): the encoder's own processor for every contender
    encoder = load_encoder(ModelSettings(name=str(inputs.save_clip(work / "clip224-1layer", layers=1, hidden=64))))
    cache = work / "model-encode-out"

    def encode_once() -> float:
        shutil.rmtree(cache, ignore_errors=True)  # a fresh cache: every row is loaded and encoded
        return encode_rate(manifest, encoder, 64, cache)

    out = []
    for label, prepare, with_encode in [("CLIP 224", encoder.preprocess, True),
                                        ("Qwen2-VL default", ImagePreprocessor(Qwen2VLImageProcessorPil()), False)]:  # fmt: skip
        contenders = {
            "limit": lambda: limit_rate(bodies, prepare),
            "http": lambda: check_rate(manifest, prepare, work),
            "files": lambda: check_rate(local, prepare, work, allow_local_dirs=(files,)),
        }
        if with_encode:
            contenders["encode http"] = encode_once
        rates: dict[str, list[float]] = {name: [] for name in contenders}
        cpu: dict[str, list[float]] = {name: [] for name in contenders}  # ms of CPU per image: this process
        server_cpu: list[float] = []  # ms per image the image server's process spent (HTTP only)
        for _ in range(3):  # alternate: limit, check over HTTP, check on files, and again
            for name, measure in contenders.items():
                own, served = time.process_time(), server.cpu_seconds()
                rates[name].append(measure())
                cpu[name].append((time.process_time() - own) / rows * 1e3)
                if name == "http":
                    server_cpu.append((server.cpu_seconds() - served) / rows * 1e3)
        best = {name: max(values) for name, values in rates.items()}
        middle = {name: sorted(values)[len(values) // 2] for name, values in rates.items()}
        low = {name: min(values) for name, values in cpu.items()}
        figures = " · ".join(f"{name} {', '.join(f'{v:.0f}' for v in values)}" for name, values in rates.items())
        costs = " · ".join(f"{name} {value:.2f}" for name, value in low.items())
        over = [name for name in contenders if name != "limit"]
        ratio = " · ".join(
            f"{name} {best[name] / best['limit']:.2f}x ({middle[name] / middle['limit']:.2f}x)" for name in over
        )
        ratio += f" of the limit, best runs (medians); HTTP − limit CPU {low['http'] - low['limit']:.2f} ms"
        where = "nginx" if isinstance(server, inputs.NginxServer) else "Python server in another process"
        out.append(Row("model", f"640x480 JPEG → {label} processor (fast path), {rows} rows, in process, HTTP from {where}, load {os.getloadavg()[0]:.1f}",
                       f"{figures} img/s; CPU per image (ms, lowest): {costs}, + image server {min(server_cpu):.2f} for HTTP",
                       ratio, "≥ 0.9x; ≤ 0.5 ms", {**best, "cpu_ms": low}))  # fmt: skip
    return out


def section_rss(work: Path, server: inputs.BenchServer, sizes: tuple[int, int] = (2_000, 60_000)) -> list[Row]:
    """Peak RSS (VmHWM) of `mmprep check --size 224x224` over `sizes` rows of small JPEGs."""
    peaks = {}
    for rows in sizes:
        manifest = inputs.write_manifest(work / f"rss-{rows}.jsonl", (server.url("tiny", i) for i in range(rows)))
        with tempfile.NamedTemporaryFile(suffix=".rss") as peak:
            argv = [sys.executable, "-m", "benchmarks.peak", peak.name, "-m", "mmprep", "check", str(manifest), "--size", "224x224",
                    "--allow-http", "--allow-host", "127.0.0.1", "--progress", "none", "--errors", str(work / "rss-errors.jsonl")]  # fmt: skip
            start = time.perf_counter()
            _run_wall(argv, cwd=work)
            wall = time.perf_counter() - start
            peaks[rows] = (float(Path(peak.name).read_text()), wall)
    (a, wa), (b, wb) = peaks[sizes[0]], peaks[sizes[1]]
    return [Row("rss", f"`check --size 224x224`, 96x64 JPEGs, {sizes[0]:,} vs {sizes[1]:,} rows",
                f"{a:.0f} MB ({wa:.0f} s) vs {b:.0f} MB ({wb:.0f} s) peak RSS", f"+{b - a:.0f} MB", "flat",
                {"small_mb": a, "large_mb": b})]  # fmt: skip


def _evict_from_page_cache(directory: Path) -> None:
    """Drop the kernel's cached pages of every file in `directory` (clean pages; no root needed)."""
    for path in directory.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def section_start(
    work: Path, server: inputs.BenchServer, rows: int = 48, batch: int = 16, rounds: int = 3
) -> list[Row]:
    """encode from a cold start: weights loaded behind the run (EncoderHandle.start) vs loaded first (load_encoder)."""
    from mmprep.models import open_encoder
    from mmprep.pipeline import EncodeRun
    from mmprep.settings import ModelSettings, Settings

    from benchmarks.run import load_settings

    model_dir = inputs.save_clip(
        work / "clip-L32", layers=24, hidden=1024, patch=32
    )  # ViT-L-sized weights, /32 compute
    urls = [server.url("vga", 20_000 + i) for i in range(rows)]
    manifest = inputs.write_manifest(work / f"start-{rows}.jsonl", urls)
    model = ModelSettings(name=str(model_dir), batch_size=batch)
    open_encoder(model).load()  # warm-up: imports and first-use costs are paid before the rounds
    figures: dict[str, list[tuple[float, float, float | None]]] = {"behind": [], "first": []}
    for round_ in range(rounds):
        for how in ("first", "behind") if round_ % 2 == 0 else ("behind", "first"):
            out = work / f"start-cache-{how}-{round_}"
            shutil.rmtree(out, ignore_errors=True)
            _evict_from_page_cache(model_dir)  # the weights come from disk, as on a fresh start
            started = time.monotonic()
            handle = open_encoder(model)
            if how == "behind":
                handle.start()
                encoder: Any = handle
            else:
                encoder = handle.load()
            settings = Settings(out=out, model=model, load=load_settings())
            summary = EncodeRun([str(manifest)], settings, encoder, started=started).run()
            assert summary.encoded == rows and summary.first_batch_s is not None, summary
            figures[how].append((time.monotonic() - started, summary.first_batch_s, summary.model_load_s))
            shutil.rmtree(out, ignore_errors=True)
    best = {how: sorted(runs)[len(runs) // 2] for how, runs in figures.items()}  # the median run by wall time
    first_batch = {how: sorted(f for _, f, _ in runs)[len(runs) // 2] for how, runs in figures.items()}
    loads = [m for _, _, m in figures["behind"] if m is not None]
    text = (
        " · ".join(
            f"{how}: wall {', '.join(f'{w:.1f}' for w, _, _ in runs)} s, first batch {', '.join(f'{f:.1f}' for _, f, _ in runs)} s"
            for how, runs in figures.items()
        )
        + f" · weights load {', '.join(f'{m:.1f}' for m in loads)} s"
    )
    return [Row("start", f"`encode` cold start (weights evicted from the page cache), ViT-L-sized CLIP weights (/32 patches), {rows} 640x480 JPEGs, batch {batch}, cpu",
                text, f"wall {best['behind'][0] / best['first'][0]:.2f}x · first batch {first_batch['behind'] / first_batch['first']:.2f}x of loading first (medians)",
                "fetch while the model loads", {"behind": best["behind"][0], "first": best["first"][0]})]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mmprep-bench")
    parser.add_argument("--rows", type=int, default=1000, help="rows of the size section")
    parser.add_argument(
        "--before", type=Path, help="an older mmprep source tree to time beside this one (size section)"
    )
    parser.add_argument("--server", choices=("nginx", "python"), default="nginx" if inputs.nginx_available() else "python",
                        help="the image server of the size and model sections: nginx (apt-get install nginx-light; the "
                             "default where installed) or the Python BenchServer")  # fmt: skip
    parser.add_argument(
        "--img2dataset", help="the img2dataset executable (default: on PATH); e.g. a venv's, as it pins old packages"
    )
    args = parser.parse_args(argv)
    sections = args.only or list(SECTIONS)
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    if "prep" in sections:
        rows += section_prep(args.work)
    pools = {"vga": inputs.jpeg_pool((640, 480)), "tiny": inputs.jpeg_pool((96, 64))}
    with inputs.serving(pools) as server:
        if "size" in sections and args.server == "python":
            rows += section_size(args.work, server, args.rows, before=args.before, img2dataset=args.img2dataset)
        if "rss" in sections:
            rows += section_rss(args.work, server)
        if "start" in sections:
            rows += section_start(args.work, server)
    if "size" in sections and args.server == "nginx":
        with inputs.nginx_serving(args.work, pools) as nginx:
            rows += section_size(args.work, nginx, args.rows, before=args.before, img2dataset=args.img2dataset)
    if "model" in sections:  # the image server in its own process: its request handling takes no GIL from `check`
        with (
            inputs.nginx_serving(args.work, pools)
            if args.server == "nginx"
            else inputs.serving_elsewhere(args.work) as remote
        ):
            rows += section_model(args.work, remote)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(render(rows))


if __name__ == "__main__":
    main()
