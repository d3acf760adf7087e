"""Real local HTTP(S) servers and real images for the fetch tests."""

from __future__ import annotations

import asyncio
import datetime
import io
import ipaddress
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from mmprep.errors import RowError
from mmprep.fetch import Fetched, Fetcher
from mmprep.settings import LoadSettings

T = TypeVar("T")
Route = Callable[["Handler"], None]


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
        with server.lock:
            server.seen.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()}, time.monotonic()))
            server.active += 1
            server.max_active = max(server.max_active, server.active)
        try:
            server.routes.get(self.path.split("?")[0], not_found)(self)
        finally:
            with server.lock:
                server.active -= 1

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        """Send a complete response with a correct Content-Length."""
        self.send_response(status)
        headers = {"Content-Type": "application/octet-stream", **(headers or {})}
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # silence the stderr access log
        pass


def not_found(h: Handler) -> None:
    h.reply(404, b"not found", {"Content-Type": "text/plain"})


def image(body: bytes = PNG, content_type: str = "image/png", **headers: str) -> Route:
    """A route that serves `body` as an image."""
    return lambda h: h.reply(200, body, {"Content-Type": content_type, **headers})


def redirect(location: str, status: int = 302) -> Route:
    return lambda h: h.reply(status, b"", {"Location": location})


class LocalServer(ThreadingHTTPServer):
    """A threaded HTTP server on a loopback address that records requests, connections and concurrency."""

    request_queue_size = 128  # the stdlib backlog of 5 stalls under fan-out
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), Handler)
        self.routes: dict[str, Route] = {}
        self.seen: list[Seen] = []
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

    def url(self, path: str, scheme: str = "http", host: str | None = None) -> str:
        return f"{scheme}://{host or self.server_address[0]}:{self.port}{path}"

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]


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


def settings(**overrides: Any) -> LoadSettings:
    """Settings for tests against local servers: http and 127.0.0.1 allowed explicitly, no retry wait."""
    base: dict[str, Any] = dict(allow_http=True, allow_hosts=("127.0.0.1",), retries=0, retry_backoff=0.01, timeout=5.0)
    return LoadSettings(**{**base, **overrides})


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def _fetch(s: LoadSettings, url: str, **kwargs: Any) -> tuple[Fetched | None, Fetcher]:
    async with Fetcher(s) as fetcher:
        return await fetcher.fetch(url, **kwargs), fetcher


def fetch(s: LoadSettings, url: str, **kwargs: Any) -> Fetched | None:
    """Fetch one URL with a fresh Fetcher."""
    return run(_fetch(s, url, **kwargs))[0]


def fetch_error(s: LoadSettings, url: str, **kwargs: Any) -> RowError:
    """The RowError fetching `url` raises (fails the test if it succeeds)."""
    try:
        result = fetch(s, url, **kwargs)
    except RowError as error:
        return error
    raise AssertionError(f"expected a RowError, got {result!r}")


def self_signed_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for `name` and 127.0.0.1 (cert path, key path), made with `cryptography`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
