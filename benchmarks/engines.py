"""`python -m benchmarks.engines [--rows N]`: local engine vs `--engine ray` on this machine, same manifest and model.

Each engine runs as its own `mmprep encode --json` process on a fresh cache. "run img/s" is the
summary's images_per_s (planning to last commit); "wall" is the whole process, Ray start-up and the
model load on the workers included. Models: builtin:tiny-clip (overhead-bound) and a ViT-B/32-sized
CLIP with random weights (compute-bound), both float32 on CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image


def make_images(directory: Path, rows: int) -> Path:
    """`rows` distinct 320x240 JPEGs and a manifest of their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(rows):
        path = directory / f"{i}.jpg"
        if not path.exists():
            image = Image.linear_gradient("L").resize((320, 240)).rotate(i % 360)
            buf = io.BytesIO()
            Image.merge(
                "RGB",
                (image, image.point(lambda v, i=i: (v + i) % 256), image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
            ).save(buf, "JPEG", quality=85)
            path.write_bytes(buf.getvalue())
        lines.append(json.dumps({"url": str(path)}))
    manifest = directory / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def vit_b32_clip(directory: Path) -> Path:
    """A CLIP with ViT-B/32's vision tower shape (12 layers, 768 wide, 224 px), random weights."""
    if not (directory / "config.json").exists():
        import torch
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

        torch.manual_seed(0)
        config = CLIPConfig(
            vision_config={
                "hidden_size": 768,
                "intermediate_size": 3072,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "patch_size": 32,
                "image_size": 224,
            },
            text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2},
            projection_dim=512,
        )
        CLIPModel(config).save_pretrained(directory)
        CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
            directory
        )
    return directory


def encode(manifest: Path, model: str, out: Path, *extra: str) -> tuple[float, dict]:
    argv = [sys.executable, "-m", "mmprep", "encode", str(manifest), "--model", model, "--out", str(out),
            "--allow-local-dir", str(manifest.parent), "--progress", "none", "--json", *extra]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return wall, json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmprep-bench-engines"))
    args = parser.parse_args()
    manifest = make_images(args.work / "images", args.rows)
    models = {"builtin:tiny-clip": "builtin:tiny-clip", "CLIP ViT-B/32 shape": str(vit_b32_clip(args.work / "vit-b32"))}
    print("| model | engine | rows | run img/s | wall s |\n| --- | --- | ---: | ---: | ---: |")
    for label, model in models.items():
        for engine in ("local", "ray"):
            out = args.work / f"cache-{engine}-{label.split()[0].replace(':', '-')}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            wall, summary = encode(manifest, model, out, "--engine", engine)
            assert summary["encoded"] == args.rows, summary
            print(f"| {label} | {engine} | {args.rows} | {summary['images_per_s']:.1f} | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
