"""The one HTTP test server: a real threaded server on a loopback address, started by the test.

`serve()` runs a `LocalServer` for the duration of a block (the `image_server` fixture in conftest.py is
one). Routes map a path to a callable that answers the request: `image(body)`, `redirect(location)`,
`Route(body, content_type, status, etag)` (what `LocalServer.add` registers), `delayed(route, seconds)`,
or any function of the `Handler`; `fallback` answers every other path. The server records every request (`seen`), counts them per path
(`hits`; `not_modified` for 304 answers), and tracks connections and concurrency.
"""

from __future__ import annotations

import io
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

Responder = Callable[["Handler"], None]


def png_bytes(color: tuple[int, int, int] = (200, 30, 90), size: tuple[int, int] = (3, 2)) -> bytes:
    """A real PNG, encoded by Pillow."""
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


PNG = png_bytes()


@dataclass(frozen=True)
class Seen:
    """One request as the server saw it."""

    path: str
    headers: dict[str, str]
    at: float  # time.monotonic()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers
    server: LocalServer

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        server = self.server
        path = self.path.split("?")[0]
        with server.lock:
            server.seen.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()}, time.monotonic()))
            server.hits[path] += 1
            server.active += 1
            server.max_active = max(server.max_active, server.active)
        try:
            server.routes.get(path, server.fallback)(self)
        finally:
            with server.lock:
                server.active -= 1

    do_HEAD = do_GET  # reply() sends no body to a HEAD

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        """Send a complete response with a correct Content-Length."""
        self.send_response(status)
        headers = {"Content-Type": "application/octet-stream", **(headers or {})}
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # silence the stderr access log
        pass


def not_found(h: Handler) -> None:
    h.reply(404, b"<html><body>not found</body></html>", {"Content-Type": "text/html"})


def image(body: bytes = PNG, content_type: str = "image/png", **headers: str) -> Responder:
    """A route that serves `body` as an image."""
    return lambda h: h.reply(200, body, {"Content-Type": content_type, **headers})


def redirect(location: str, status: int = 302) -> Responder:
    return lambda h: h.reply(status, b"", {"Location": location})


def delayed(route: Responder, seconds: float) -> Responder:
    """`route`, answered after `seconds` (a slow server, so that a run lasts long enough to interrupt)."""

    def answer(h: Handler) -> None:
        time.sleep(seconds)
        route(h)

    return answer


@dataclass(frozen=True)
class Route:
    """A fixed answer: `body` with a status, and with `etag` set, 304 to a matching If-None-Match."""

    body: bytes
    content_type: str = "image/png"
    status: int = 200
    etag: str | None = None

    def __call__(self, h: Handler) -> None:
        if self.etag is not None and h.headers.get("If-None-Match") == self.etag:
            with h.server.lock:
                h.server.not_modified[h.path.split("?")[0]] += 1
            h.reply(304, b"", {"ETag": self.etag})
            return
        h.reply(
            self.status, self.body, {"Content-Type": self.content_type, **({"ETag": self.etag} if self.etag else {})}
        )


class LocalServer(ThreadingHTTPServer):
    """A threaded HTTP server on a loopback address that records requests, connections and concurrency."""

    request_queue_size = 128  # the stdlib backlog of 5 stalls concurrent clients on SYN retries
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), Handler)
        self.routes: dict[str, Responder] = {}
        self.fallback: Responder = not_found  # the answer for a path without a route
        self.seen: list[Seen] = []
        self.hits: Counter[str] = Counter()  # requests per path (query strings dropped)
        self.not_modified: Counter[str] = Counter()  # 304 answers per path
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.connections += 1
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-response are part of the tests

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def host(self) -> str:
        return str(self.server_address[0])

    def url(self, path: str, scheme: str = "http", host: str | None = None) -> str:
        return f"{scheme}://{host or self.server_address[0]}:{self.port}{path}"

    def add(
        self, path: str, body: bytes, content_type: str = "image/png", status: int = 200, etag: str | None = None
    ) -> str:
        """Serve `body` at `path` (a `Route`); returns the URL."""
        self.routes[path] = Route(body, content_type, status, etag)
        return self.url(path)

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]

    @property
    def total_hits(self) -> int:
        with self.lock:
            return sum(self.hits.values())


@contextmanager
def serve(host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> Iterator[LocalServer]:
    """Run a `LocalServer` in a thread for the duration of the block."""
    server = LocalServer(host)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
