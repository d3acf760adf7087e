"""Benchmark inputs built from scratch: photo-like JPEGs, a local HTTP server, manifests, models, caches."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

POOL = 16  # distinct pictures; every URL still gets unique bytes (a JPEG comment), so content dedup never kicks in


def photo_like(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth colour blobs + gradients + sensor-like grain: compresses like a photo (not like flat colour or noise)."""
    width, height = size
    rng = np.random.default_rng(seed)
    coarse = rng.random((height // 32 + 2, width // 32 + 2, 3)) * 255
    blobs = np.asarray(
        Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC), np.float32
    )
    ramp = np.linspace(0, 60, width, dtype=np.float32)[None, :, None]
    grain = rng.normal(0, 9, (height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(blobs * 0.75 + ramp + grain, 0, 255).astype(np.uint8))


def jpeg_pool(size: tuple[int, int], count: int = POOL, quality: int = 85) -> list[bytes]:
    """`count` distinct photo-like JPEGs of `size`."""
    out = []
    for seed in range(count):
        buf = io.BytesIO()
        photo_like(size, seed).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def unique_jpeg(pool: list[bytes], index: int) -> bytes:
    """Picture `index % len(pool)` with a COM segment naming `index`: same pixels, bytes unique per URL."""
    base = pool[index % len(pool)]
    comment = f"mmprep-bench {index}".encode()
    return base[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + base[2:]


class BenchServer(ThreadingHTTPServer):
    """127.0.0.1 image server; a deep accept backlog (the stdlib's 5 stalls concurrent clients)."""

    request_queue_size = 1024
    daemon_threads = True

    def __init__(self, pools: dict[str, list[bytes]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.pools = pools  # URL prefix (e.g. "vga") -> pictures

    def url(self, pool: str, index: int) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{pool}/{index}.jpg"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: BenchServer

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        try:
            _, pool, name = self.path.split("/")
            body = unique_jpeg(self.server.pools[pool], int(name.removesuffix(".jpg")))
        except (ValueError, KeyError):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serving(pools: dict[str, list[bytes]]) -> Iterator[BenchServer]:
    """Run a BenchServer in a thread for the duration of the block."""
    server = BenchServer(pools)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class RemoteServer:
    """The URLs of a BenchServer running in another process, and the CPU time that process has used."""

    def __init__(self, port: int, pid: int) -> None:
        self.port = port
        self.pid = pid

    def url(self, pool: str, index: int) -> str:
        return f"http://127.0.0.1:{self.port}/{pool}/{index}.jpg"

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def serving_elsewhere(work: Path) -> Iterator[RemoteServer]:
    """A BenchServer with the "vga" (640x480) and "tiny" (96x64) pools in a child process: its request
    handling then takes no GIL (and no profiler time) from the process being measured."""
    port_file = work / f"server-{time.monotonic_ns()}.port"
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.inputs", "--serve", str(port_file)],
                             cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    try:
        while not port_file.exists():
            if child.poll() is not None:
                raise RuntimeError(f"the benchmark image server exited with {child.returncode}")
            time.sleep(0.05)
        yield RemoteServer(int(port_file.read_text()), child.pid)
    finally:
        child.kill()
        child.wait()
        port_file.unlink(missing_ok=True)


class NginxServer(RemoteServer):
    """Debian's nginx (one worker, keep-alive, sendfile) serving unique JPEGs from files it writes on demand:
    the fast static server for the loader's HTTP cost (the Python BenchServer spends ~0.3-0.5 ms a request)."""

    def __init__(self, port: int, pid: int, root: Path, pools: dict[str, list[bytes]]) -> None:
        super().__init__(port, pid)
        self.root = root
        self.pools = pools

    def url(self, pool: str, index: int) -> str:
        path = self.root / pool / f"{index}.jpg"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(unique_jpeg(self.pools[pool], index))
            path.chmod(0o644)
        return super().url(pool, index)

    def cpu_seconds(self) -> float:
        """CPU time of nginx's worker process (the master only forks it)."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        return sum(RemoteServer(self.port, int(pid)).cpu_seconds() for pid in children)


_NGINX_CONF = """worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_timeout 120s; keepalive_requests 1000000; open_file_cache max=8000 inactive=60s;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  types {{ image/jpeg jpg; }} default_type application/octet-stream;
  server {{ listen 127.0.0.1:{port} backlog=4096; root {root}; etag off; }}
}}
"""


def nginx_available() -> bool:
    return shutil.which("nginx") is not None


@contextmanager
def nginx_serving(work: Path, pools: dict[str, list[bytes]]) -> Iterator[NginxServer]:
    """nginx on a free 127.0.0.1 port, in the foreground of a child process (`apt-get install nginx-light`)."""
    nginx = shutil.which("nginx")
    if nginx is None:
        raise RuntimeError("nginx is not installed (apt-get install -y nginx-light)")
    d = work / "nginx"
    root = d / "root"
    (d / "tmp").mkdir(parents=True, exist_ok=True)
    root.mkdir(exist_ok=True)
    for directory in (work, d, root):
        directory.chmod(0o755)  # nginx's worker runs as www-data
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (d / "nginx.conf").write_text(_NGINX_CONF.format(d=d, port=port, root=root))
    child = subprocess.Popen([nginx, "-p", str(d), "-c", str(d / "nginx.conf")])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if child.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start: {(d / 'error.log').read_text()[-1000:]}") from None
                time.sleep(0.05)
        yield NginxServer(port, child.pid, root, pools)
    finally:
        child.terminate()
        child.wait()


def _serve(port_file: Path) -> None:
    """serving_elsewhere's child: serve until killed."""
    with serving({"vga": jpeg_pool((640, 480)), "tiny": jpeg_pool((96, 64))}) as server:
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(str(server.server_address[1]))
        tmp.rename(port_file)  # whole, never half-written
        while True:
            time.sleep(3600)


def write_manifest(path: Path, urls: Iterator[str] | list[str]) -> Path:
    """One {"url": ...} line per URL."""
    with open(path, "w", encoding="utf-8") as f:
        for url in urls:
            f.write(json.dumps({"url": url}) + "\n")
    return path


def save_clip(directory: Path, *, layers: int = 12, hidden: int = 768, patch: int = 32, image: int = 224) -> Path:
    """A CLIP with a ViT-B-shaped vision tower (random weights: the compute is what is measured), saved once."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    text = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                  num_attention_heads=max(1, hidden // 64), patch_size=patch, image_size=image)  # fmt: skip
    torch.manual_seed(0)
    tmp = directory.with_name(directory.name + ".tmp")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)).save_pretrained(tmp)
    CLIPImageProcessor(size={"shortest_edge": image}, crop_size={"height": image, "width": image}).save_pretrained(tmp)
    tmp.rename(directory)
    return directory


def build_cached(
    cache_dir: Path, manifest: Path, fingerprint: str, model_name: str, rows: int, shard_rows: int = 100_000
) -> None:
    """A cache whose index already holds every manifest row (tiny tensors, a few real shards), via the store API."""
    import torch

    from mmprep.keys import cache_key
    from mmprep.store.index import CacheIndex
    from mmprep.store.layout import CacheLayout
    from mmprep.store.shards import ShardEntry, ShardWriter

    layout = CacheLayout(cache_dir)
    index = CacheIndex(layout.index)
    try:
        index.register_model(fingerprint, model_name, "pooled", {"name": model_name, "note": "benchmark cache"})
        index.start_run("bench-build", fingerprint, model_name)
        writer = ShardWriter(layout, fingerprint, model_name, "bench-build")
        vector = torch.zeros(4, dtype=torch.float16)
        now = time.time()
        with open(manifest, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                url = json.loads(line)["url"]
                writer.add(ShardEntry(cache_key(url), url, None, {"embeddings": vector.clone()}, "0" * 64, now))
                if number % shard_rows == 0 or number == rows:
                    written = writer.flush()
                    if written is not None:
                        index.commit_shard(written, fingerprint, "bench-build")
        index.finish_run("bench-build", "completed", 0, {"rows": rows})
    finally:
        index.close()


def save_qwen2_vl_7b_shaped(directory: Path) -> Path:
    """A Qwen2-VL whose merged image tokens are Qwen2-VL-7B-sized (3584 wide) behind a 1-block, 32-wide
    tower (random weights: only the size of what `mmprep rewrite` moves matters); 448x448 -> 256 tokens.
    The text side is tiny (mmprep never loads it), so this is no model to generate with."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    config = Qwen2VLConfig(
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=3584, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=127, video_token_id=126, vision_start_token_id=125, vision_end_token_id=124,
    )  # fmt: skip
    torch.manual_seed(0)
    tmp = directory.with_name(directory.name + ".tmp")
    Qwen2VLForConditionalGeneration(config).save_pretrained(tmp)
    Qwen2VLImageProcessor(min_pixels=448 * 448, max_pixels=448 * 448).save_pretrained(tmp)
    tmp.rename(directory)
    return directory


def rewrite_inputs(where: Path, model: str, images: int, requests: int, size: tuple[int, int]) -> None:
    """`images` distinct PNGs, a cache of them (`mmprep encode`), and an OpenAI batch file of `requests`
    lines, each a system and a user message with text and one or two of the images."""
    folder = where / "img"
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for i in range(images):
        photo_like(size, seed=i).save(folder / f"{i}.png")
        urls.append(str(folder / f"{i}.png"))
    write_manifest(where / "manifest.jsonl", urls)
    done = subprocess.run([sys.executable, "-m", "mmprep", "encode", str(where / "manifest.jsonl"), "--model", model,
                           "--out", str(where / "cache"), "--allow-local-dir", str(folder), "--progress", "none"],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"encode for the rewrite benchmark failed: {done.stderr[-2000:]}")
    with open(where / "batch.jsonl", "w", encoding="utf-8") as f:
        for i in range(requests):
            content: list[dict[str, Any]] = [{"type": "text", "text": f"Describe product photo {i} in one sentence."}]
            content += [{"type": "image_url", "image_url": {"url": urls[(i + j) % images]}} for j in range(1 + i % 2)]
            body = {"model": "Qwen/Qwen2-VL-7B-Instruct", "max_tokens": 64, "messages": [
                {"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": content}]}  # fmt: skip
            f.write(
                json.dumps({"custom_id": f"request-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
                + "\n"
            )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        _serve(Path(sys.argv[2]))
