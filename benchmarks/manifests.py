"""`python -m benchmarks.manifests [--rows 1000000 --small 10000] [--dir D]`: manifest readers' peak memory and rate.

For parquet (one row group, as pyarrow writes up to 1Mi rows), CSV and JSONL manifests of img2dataset/LAION
shape (URL, a ~170-character caption, key), each read to the end in a fresh process by
`mmprep.manifest.read_manifests` at `--small` and at `--rows` rows, next to the naive way (the whole table
with pyarrow / every CSV row in a list / every JSON line parsed). Peak RSS is the process's VmHWM
(benchmarks.peak); "growth" is the peak at `--rows` over the peak at `--small`: ~1x when reading is bounded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READ = """
import sys, time
from mmprep.manifest import read_manifests
from mmprep.settings import ManifestSettings
start = time.perf_counter()
rows = sum(1 for _ in read_manifests([sys.argv[1]], ManifestSettings("URL", "key")))
print(rows, time.perf_counter() - start)
"""
NAIVE = {
    "parquet": """
import sys, time
import pyarrow.parquet as pq
start = time.perf_counter()
table = pq.read_table(sys.argv[1])
rows = len(list(zip(table.column("URL").to_pylist(), table.column("key").to_pylist())))
print(rows, time.perf_counter() - start)
""",
    "csv": """
import csv, sys, time
start = time.perf_counter()
with open(sys.argv[1], newline="") as f:
    rows = len(list(csv.reader(f))) - 1
print(rows, time.perf_counter() - start)
""",
    "jsonl": """
import json, sys, time
start = time.perf_counter()
with open(sys.argv[1]) as f:
    rows = len([json.loads(line) for line in f.read().splitlines()])
print(rows, time.perf_counter() - start)
""",
}


def url(i: int) -> str:
    return f"https://images.example.com/laion/{i:09d}/{i * 7919 % 1000003:07d}.jpg"


def write_inputs(directory: Path, rows: int) -> dict[str, Path]:
    """The same `rows` rows as parquet, CSV and JSONL (reused when already there)."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {kind: directory / f"m{rows}.{kind}" for kind in ("parquet", "csv", "jsonl")}
    if all(p.exists() for p in paths.values()):
        return paths
    caption = "a photo of a cat sitting on a mat, in the afternoon sun, next to a window, number {} "
    urls, keys = [url(i) for i in range(rows)], [f"{i:09d}" for i in range(rows)]
    captions = [caption.format(i) * 2 for i in range(rows)]
    pq.write_table(pa.table({"URL": urls, "TEXT": captions, "key": keys}), paths["parquet"])
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["URL", "TEXT", "key"])
        writer.writerows(zip(urls, captions, keys))
    with open(paths["jsonl"], "w") as f:
        f.writelines(json.dumps({"url": u, "id": k, "caption": c}) + "\n" for u, c, k in zip(urls, captions, keys))
    return paths


def measure(code: str, *args: str) -> tuple[float, str]:
    """Peak RSS (MB) of a fresh process running `code`, and what it printed."""
    with tempfile.NamedTemporaryFile(suffix=".peak") as out:
        done = subprocess.run([sys.executable, "-m", "benchmarks.peak", out.name, "-c", code, *args],
                              capture_output=True, text=True, check=True)  # fmt: skip
        return float(Path(out.name).read_text()), done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "mmprep-bench-manifests")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    inputs = {n: write_inputs(args.dir, n) for n in (args.small, args.rows)}
    print(
        f"| format | reader | peak RSS, {args.small:,} rows | peak RSS, {args.rows:,} rows | growth | rows/s ({args.rows:,}) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for kind in ("parquet", "csv", "jsonl"):
        for label, code in (("mmprep", READ), ("naive", NAIVE[kind])):
            peaks, rate = [], 0.0
            for n in (args.small, args.rows):
                peak, printed = measure(code, str(inputs[n][kind]))
                rows, seconds = printed.split()
                assert int(rows) == n, (kind, label, printed)
                peaks.append(peak)
                rate = n / float(seconds)
            size = inputs[args.rows][kind].stat().st_size / 2**20
            print(f"| {kind} ({size:.0f} MB) | {label} | {peaks[0]:.0f} MB | {peaks[1]:.0f} MB | "
                  f"{peaks[1] / peaks[0]:.2f}x | {rate:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"\n({time.perf_counter() - started:.0f} s)")
