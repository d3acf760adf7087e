"""Shared test fixtures: offline environment, a real local image server, Pillow-made images."""

from __future__ import annotations

import io
import os
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def mmprep_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Builtin smoke-test models are created once per test session in a private MMPREP_HOME."""
    home = os.environ.get("MMPREP_TEST_HOME") or str(tmp_path_factory.mktemp("mmprep-home"))
    old = os.environ.get("MMPREP_HOME")
    os.environ["MMPREP_HOME"] = home
    yield home
    if old is None:
        os.environ.pop("MMPREP_HOME", None)
    else:
        os.environ["MMPREP_HOME"] = old


def image_bytes(mode: str = "RGB", size: tuple[int, int] = (48, 40), fmt: str = "PNG", seed: int = 0) -> bytes:
    """A deterministic, non-uniform Pillow image encoded as `fmt`."""
    base = Image.linear_gradient("L").resize(size).rotate(seed * 37 % 360)
    if mode == "RGB":
        img = Image.merge("RGB", (base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT), base.point(lambda v: (v * 3 + seed * 11) % 256)))
    elif mode == "RGBA":
        img = Image.merge("RGBA", (base, base, base.point(lambda v: 255 - v), base.point(lambda v: (v * 2) % 256)))
    else:
        img = base.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@dataclass
class Route:
    body: bytes
    content_type: str = "image/png"
    status: int = 200
    etag: str | None = None  # when set, If-None-Match with this value gets 304


@dataclass
class ImageServer:
    """A real HTTP server on 127.0.0.1 that serves `routes` and counts requests per path."""

    host: str
    port: int
    routes: dict[str, Route] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    not_modified: Counter[str] = field(default_factory=Counter)  # 304 answers per path
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def add(
        self, path: str, body: bytes, content_type: str = "image/png", status: int = 200, etag: str | None = None
    ) -> str:
        self.routes[path] = Route(body, content_type, status, etag)
        return self.url(path)

    @property
    def total_hits(self) -> int:
        with self.lock:
            return sum(self.hits.values())


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the stdlib default of 5 stalls concurrent clients on SYN retries
    daemon_threads = True


@pytest.fixture()
def image_server() -> Iterator[ImageServer]:
    state = ImageServer("127.0.0.1", 0)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0]
            with state.lock:
                state.hits[path] += 1
            route = state.routes.get(path)
            if route is None:
                route = Route(b"<html><body>not found</body></html>", "text/html", 404)
            if route.etag is not None and self.headers.get("If-None-Match") == route.etag:
                with state.lock:
                    state.not_modified[path] += 1
                self.send_response(304)
                self.send_header("ETag", route.etag)
                self.end_headers()
                return
            self.send_response(route.status)
            if route.etag is not None:
                self.send_header("ETag", route.etag)
            self.send_header("Content-Type", route.content_type)
            self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            self.wfile.write(route.body)

        def log_message(self, *args: object) -> None:
            pass

    server = _Server(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
