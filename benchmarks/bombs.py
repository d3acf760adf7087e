"""`python -m benchmarks.bombs [--code DIR]`: peak RSS of a `mmprep check` run over 1,000 rows of which 64
are stacked-gzip bombs, against the same run with those 64 rows serving ordinary images.

Each bomb is a ~1 KB body sent with `Content-Encoding: gzip, gzip` that inflates to `--bomb-mib`
(512) MiB of zeros (built once, cached under /tmp/mmprep-bench). Both runs are fresh subprocesses
(`benchmarks.peak` reads VmHWM); `--code DIR` runs the mmprep found in DIR (e.g. an older checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

from benchmarks.inputs import _Handler, jpeg_pool, serving, write_manifest

BENCH_DIR = Path("/tmp/mmprep-bench")


def stacked_gzip_bomb(mib: int) -> bytes:
    """gzip(gzip(`mib` MiB of zeros)), built once (the inner stream is streamed, never held inflated)."""
    path = BENCH_DIR / f"bomb-gzip-gzip-{mib}MiB.bin"
    if not path.exists():
        inner = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip member
        zeros = bytes(1 << 20)
        parts = [inner.compress(zeros) for _ in range(mib)]
        outer = zlib.compressobj(9, zlib.DEFLATED, 31)
        body = outer.compress(b"".join(parts) + inner.flush()) + outer.flush()
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    return path.read_bytes()


class _BombHandler(_Handler):
    """Serves /bomb/N.jpg as a stacked-gzip bomb; every other path as BenchServer does."""

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        if not self.path.startswith("/bomb/"):
            super().do_GET()
            return
        body = self.server.bomb  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Encoding", "gzip, gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def check_peak(code: Path, manifest: Path, concurrency: int, work: Path) -> tuple[float, dict[str, object]]:
    """Peak RSS (MB) and the JSON summary of `mmprep check MANIFEST` run with the mmprep in `code`."""
    peak_file = work / "peak.txt"
    command = [
        sys.executable, "-m", "benchmarks.peak", str(peak_file), "-m", "mmprep", "check", str(manifest),
        "--size", "224x224", "--allow-http", "--allow-host", "127.0.0.1", "--concurrency", str(concurrency),
        "--retries", "0", "--progress", "none", "--json", "--errors", str(work / "errors.jsonl"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"mmprep check exited {done.returncode}: {done.stderr[-2000:]}")
    return float(peak_file.read_text()), json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--bombs", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--bomb-mib", type=int, default=512)
    args = parser.parse_args()
    work = BENCH_DIR / "bombs"
    work.mkdir(parents=True, exist_ok=True)
    bomb = stacked_gzip_bomb(args.bomb_mib)
    every = args.rows // args.bombs
    with serving({"vga": jpeg_pool((640, 480), count=8)}) as server:
        server.RequestHandlerClass = _BombHandler
        server.bomb = bomb  # type: ignore[attr-defined]
        port = server.server_address[1]
        plain = [server.url("vga", i) for i in range(args.rows)]
        bombed = [f"http://127.0.0.1:{port}/bomb/{i}.jpg" if i % every == 0 and i // every < args.bombs else url
                  for i, url in enumerate(plain)]  # fmt: skip
        for name, urls in (("without bombs", plain), (f"with {args.bombs} bombs", bombed)):
            peak, summary = check_peak(args.code, write_manifest(work / "m.jsonl", urls), args.concurrency, work)
            print(f"{name}: peak RSS {peak:.0f} MB, rows {summary['rows']}, ok {summary.get('ok')}, "
                  f"failed {summary['failures_by_kind']}, {summary['duration_s']:.1f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
