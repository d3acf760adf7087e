"""The FETCH stage against real servers on 127.0.0.1, real files and real PNGs."""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
import ssl
import threading
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest
from _fetch_helpers import (
    PNG,
    Handler,
    fetch,
    fetch_error,
    image,
    png_bytes,
    redirect,
    run,
    self_signed_cert,
    serve,
    settings,
)

import mmprep
from mmprep.errors import ErrorKind, RowError
from mmprep.fetch import Fetcher, transport
from mmprep.fetch.addresses import IPAddress, parse_ip
from mmprep.fetch.policy import UrlPolicy
from mmprep.pipeline import CheckRun

# ---------------------------------------------------------------- schemes, data URLs


@pytest.mark.parametrize(
    "url",
    [
        "",
        "ftp://example.com/cat.png",
        "gopher://example.com/",
        "javascript:alert(1)",
        "C:\\images\\cat.png",
        "http:cat.png",
        "https:///cat.png",
        "mailto:a@b.c",
        "blob:https://example.com/1234",
    ],
)
def test_unsupported_urls_are_bad_scheme(url: str) -> None:
    assert fetch_error(settings(), url).kind is ErrorKind.BAD_SCHEME


def test_http_is_refused_unless_allowed() -> None:
    with serve() as server:
        error = fetch_error(settings(allow_http=False), server.url("/cat.png"))
        assert error.kind is ErrorKind.BAD_SCHEME
        assert "--allow-http" in error.message
        assert server.connections == 0


def test_data_url_roundtrip() -> None:
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    got = fetch(settings(), url)
    assert got is not None
    assert (got.data, got.url, got.content_type, got.attempts) == (PNG, url, "image/png", 1)


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("data:text/plain;base64,aGVsbG8=", "not an image type"),
        ("data:;base64,aGVsbG8=", "text/plain"),
        ("data:image/png,rawbytes", ";base64"),
        ("data:image/png;charset=utf-8,abc", ";base64"),
        ("data:image/png;base64,aGVsbG8", "not valid base64"),  # bad padding
        ("data:image/png;base64,aGV*bG8=", "not valid base64"),
        ("data:image/png;base64,aGVs bG8=", "not valid base64"),
        ("data:image/png;base64,aGVs%3D", "not valid base64"),
        ("data:image/png;base64,", "empty"),
        ("data:image/png;base64", "no ','"),
    ],
)
def test_bad_data_urls(url: str, needle: str) -> None:
    error = fetch_error(settings(), url)
    assert error.kind is ErrorKind.BAD_DATA_URL
    assert needle in error.message


def test_data_url_over_max_bytes_is_refused_before_decoding() -> None:
    fits = "data:image/png;base64," + base64.b64encode(b"x" * 300).decode()
    assert fetch(settings(max_bytes=300), fits) is not None
    too_long = "data:image/png;base64," + base64.b64encode(b"x" * 301).decode()
    assert fetch_error(settings(max_bytes=300), too_long).kind is ErrorKind.TOO_LARGE
    junk = "data:image/png;base64," + "!" * 1000  # never decoded, so never reported as bad base64
    assert fetch_error(settings(max_bytes=300), junk).kind is ErrorKind.TOO_LARGE


# ---------------------------------------------------------------- local files


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "cat.png").write_bytes(PNG)
    (allowed / "with space.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(png_bytes((1, 2, 3)))
    return allowed


def test_local_files_inside_the_allowed_dir(image_dir: Path) -> None:
    s = settings(allow_local_dirs=(image_dir,))
    for url in [
        str(image_dir / "cat.png"),
        f"file://{image_dir}/cat.png",
        f"file://localhost{image_dir}/cat.png",
        f"{image_dir}/sub/../cat.png",
        "file://" + urllib.parse.quote(f"{image_dir}/with space.png"),
    ]:
        got = fetch(s, url)
        assert got is not None and got.data == PNG and got.url == url, url


def test_relative_paths_resolve_against_the_current_directory(image_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(image_dir.parent)
    s = settings(allow_local_dirs=(Path("allowed"),))
    assert fetch(s, "allowed/cat.png").data == PNG  # type: ignore[union-attr]
    assert fetch(s, "./allowed/sub/../cat.png").data == PNG  # type: ignore[union-attr]
    for url in ["secret.png", "allowed/../secret.png", "example.com/cat.png"]:
        assert fetch_error(s, url).kind is ErrorKind.BAD_PATH, url


def test_local_files_outside_the_allowed_dir(image_dir: Path) -> None:
    s = settings(allow_local_dirs=(image_dir,))
    (image_dir / "escape.png").symlink_to(image_dir.parent / "secret.png")
    (image_dir / "escape_dir").symlink_to(image_dir.parent)
    (image_dir / "inside.png").symlink_to(image_dir / "cat.png")
    assert fetch(s, str(image_dir / "inside.png")).data == PNG  # type: ignore[union-attr]
    for url in [
        str(image_dir.parent / "secret.png"),
        f"{image_dir}/../secret.png",
        str(image_dir / "escape.png"),
        str(image_dir / "escape_dir" / "secret.png"),
        f"file://{image_dir}/%2E%2E/secret.png",
        f"{image_dir}-evil/cat.png",
        "/etc/passwd",
    ]:
        error = fetch_error(s, url)
        assert error.kind is ErrorKind.BAD_PATH, url
        assert "outside the allowed local directories" in error.message


def test_symlink_escape_names_the_real_target(image_dir: Path) -> None:
    (image_dir / "escape.png").symlink_to(image_dir.parent / "secret.png")
    error = fetch_error(settings(allow_local_dirs=(image_dir,)), str(image_dir / "escape.png"))
    assert f"resolves to {image_dir.parent / 'secret.png'}" in error.message


def test_local_file_problems(image_dir: Path) -> None:
    os.mkfifo(image_dir / "pipe.png")  # must not hang
    s = settings(allow_local_dirs=(image_dir,))
    cases = {
        str(image_dir / "missing.png"): "No such file",
        str(image_dir / "sub"): "not a regular file",
        str(image_dir / "pipe.png"): "not a regular file",
        f"file://elsewhere{image_dir}/cat.png": "another host",
        f"{image_dir}/bad\0name.png": "cannot resolve",
    }
    for url, needle in cases.items():
        error = fetch_error(s, url)
        assert (error.kind, needle in error.message) == (ErrorKind.BAD_PATH, True), (url, error)


def test_local_files_need_an_allowed_dir(image_dir: Path) -> None:
    for url in [str(image_dir / "cat.png"), f"file://{image_dir}/cat.png", "cat.png", "images.example.com/cat.png"]:
        error = fetch_error(settings(), url)
        assert error.kind is ErrorKind.BAD_PATH
        assert "local files are not allowed (see --allow-local-dir)" in error.message


def test_local_file_over_max_bytes(image_dir: Path) -> None:
    s = settings(allow_local_dirs=(image_dir,), max_bytes=len(PNG) - 1)
    assert fetch_error(s, str(image_dir / "cat.png")).kind is ErrorKind.TOO_LARGE
    assert fetch(settings(allow_local_dirs=(image_dir,), max_bytes=len(PNG)), str(image_dir / "cat.png")) is not None


# ---------------------------------------------------------------- plain HTTP


def test_http_image_with_headers() -> None:
    with serve() as server:
        server.routes["/cat.png"] = image(ETag='"v1"', **{"Last-Modified": "Wed, 21 Oct 2015 07:28:00 GMT"})
        got = fetch(settings(), server.url("/cat.png"))
        assert got is not None
        assert (got.data, got.url, got.content_type, got.attempts) == (PNG, server.url("/cat.png"), "image/png", 1)
        assert (got.etag, got.last_modified) == ('"v1"', "Wed, 21 Oct 2015 07:28:00 GMT")
        assert server.seen[0].headers["user-agent"] == f"mmprep/{mmprep.__version__}"
        fetch(settings(user_agent="my-crawler/2"), server.url("/cat.png"))
        assert server.seen[1].headers["user-agent"] == "my-crawler/2"


def test_conditional_request_304_returns_none() -> None:
    def conditional(h: Handler) -> None:
        if h.headers.get("If-None-Match") == '"v1"':
            h.reply(304)
        else:
            image(ETag='"v1"')(h)

    with serve() as server:
        server.routes["/cat.png"] = conditional
        assert (
            fetch(settings(), server.url("/cat.png"), etag='"v1"', last_modified="Wed, 21 Oct 2015 07:28:00 GMT")
            is None
        )
        assert server.seen[0].headers["if-modified-since"] == "Wed, 21 Oct 2015 07:28:00 GMT"
        changed = fetch(settings(), server.url("/cat.png"), etag='"v0"')
        assert changed is not None and changed.data == PNG and changed.etag == '"v1"'


def test_304_without_a_conditional_request_is_an_error() -> None:
    with serve() as server:
        server.routes["/x"] = lambda h: h.reply(304)
        error = fetch_error(settings(), server.url("/x"))
        assert (error.kind, error.status) == (ErrorKind.HTTP_STATUS, 304)


def test_https_to_a_plain_http_server_is_a_connection_error() -> None:
    with serve() as server:
        error = fetch_error(settings(), server.url("/cat.png", scheme="https"))
        assert error.kind is ErrorKind.CONNECTION_ERROR
        assert error.retryable


def test_https_connects_to_the_checked_ip_but_verifies_the_host_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed_cert(tmp_path, "img.test")
    server_names: list[str | None] = []
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    tls.sni_callback = lambda sock, name, ctx: server_names.append(name)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setattr(transport, "resolve", _resolver({"img.test": ["127.0.0.1"]}))
    with serve(tls=tls) as server:
        server.routes["/cat.png"] = image()
        url = server.url("/cat.png", scheme="https", host="img.test")
        got = fetch(settings(allow_http=False, allow_hosts=("img.test",)), url)
        assert got is not None and got.data == PNG
        assert server_names == ["img.test"]
        assert server.seen[0].headers["host"] == f"img.test:{server.port}"


def test_https_with_an_untrusted_or_mismatched_certificate_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed_cert(tmp_path, "img.test")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    monkeypatch.setattr(transport, "resolve", _resolver({"img.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}))
    s = settings(allow_http=False, allow_hosts=("img.test", "other.test"))
    with serve(tls=tls) as server:
        server.routes["/cat.png"] = image()
        untrusted = fetch_error(s, server.url("/cat.png", scheme="https", host="img.test"))
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted from here on, but for img.test only
        mismatched = fetch_error(s, server.url("/cat.png", scheme="https", host="other.test"))
        assert fetch(s, server.url("/cat.png", scheme="https", host="img.test")).data == PNG  # type: ignore[union-attr]
    for error in (untrusted, mismatched):
        assert error.kind is ErrorKind.CONNECTION_ERROR and "certificate" in error.message.lower(), error
    assert server.paths() == ["/cat.png"]  # only the verified connection sent a request


# ---------------------------------------------------------------- redirects


def test_redirects_are_followed() -> None:
    with serve() as server:
        server.routes.update(
            {"/a": redirect("/b", 301), "/b": redirect(server.url("/cat.png"), 307), "/cat.png": image()}
        )

        async def go() -> tuple[bytes, str, int]:
            async with Fetcher(settings()) as fetcher:
                got = await fetcher.fetch(server.url("/a"))
                assert got is not None
                return got.data, got.url, fetcher.requests_sent

        assert run(go()) == (PNG, server.url("/cat.png"), 3)


def test_redirect_loop_is_too_many_redirects() -> None:
    with serve() as server:
        server.routes["/loop"] = redirect("/loop")
        error = fetch_error(settings(max_redirects=3), server.url("/loop"))
        assert error.kind is ErrorKind.TOO_MANY_REDIRECTS
        assert server.paths() == ["/loop"] * 4
        assert not error.retryable


def test_redirect_to_a_blocked_address_never_connects() -> None:
    with serve() as server, serve("127.0.0.2") as internal:
        internal.routes["/admin"] = image()
        server.routes["/go"] = redirect(internal.url("/admin"))
        server.routes["/meta"] = redirect("http://169.254.169.254/latest/meta-data/")

        async def go(path: str) -> tuple[RowError, int]:
            async with Fetcher(settings(retries=2)) as fetcher:
                with pytest.raises(RowError) as caught:
                    await fetcher.fetch(server.url(path))
                return caught.value, fetcher.requests_sent

        for path, needle in [("/go", "127.0.0.2 is loopback"), ("/meta", "cloud metadata")]:
            error, sent = run(go(path))
            assert (error.kind, error.attempts, sent) == (ErrorKind.BLOCKED_URL, 1, 1)
            assert needle in error.message and "redirected to" in error.message
        assert internal.connections == 0


@pytest.mark.parametrize(
    "location",
    ["file:///etc/passwd", "data:image/png;base64,AAAA", "ftp://example.com/x", "http://a:port/", "https:/x"],
)
def test_redirect_off_http_is_refused(location: str) -> None:
    with serve() as server:
        server.routes["/go"] = redirect(location)
        assert fetch_error(settings(), server.url("/go")).kind is ErrorKind.BAD_SCHEME


def test_backslash_url_is_vetted_where_httpx_connects() -> None:
    """vLLM CVE-2026-24779: parsers disagree on `\\@` (WHATWG reads `\\` as `/`); check what httpx dials."""
    with serve() as server, serve("127.0.0.2") as internal:
        server.routes["/cat.png"] = image()
        internal.routes["/cat.png"] = image()
        to_internal = f"http://127.0.0.1:{server.port}\\@127.0.0.2:{internal.port}/cat.png"
        error = fetch_error(settings(), to_internal)
        assert error.kind is ErrorKind.BLOCKED_URL and "127.0.0.2 is loopback" in error.message
        to_allowed = f"http://127.0.0.2:{internal.port}\\@127.0.0.1:{server.port}/cat.png"
        assert fetch(settings(), to_allowed).data == PNG  # type: ignore[union-attr]
        assert (server.paths(), internal.connections) == (["/cat.png"], 0)


# ---------------------------------------------------------------- DNS: checked at connect time


def _resolver(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    """A stand-in for `transport.resolve` (the one mock: there is no DNS in the test sandbox)."""
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[IPAddress]:
        calls.append(host)
        if host not in table:
            raise OSError(f"no such host {host}")
        return [parse_ip(a) for a in table[host]]  # type: ignore[misc]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


def test_name_resolving_to_a_blocked_address_is_refused_at_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    with serve() as server, serve("127.0.0.2") as internal:
        internal.routes["/cat.png"] = image()
        resolver = _resolver({"rebind.test": ["127.0.0.2"], "mixed.test": ["127.0.0.1", "127.0.0.2"]})
        monkeypatch.setattr(transport, "resolve", resolver)
        for host, port in [("rebind.test", internal.port), ("mixed.test", server.port)]:
            error = fetch_error(settings(retries=2), f"http://{host}:{port}/cat.png")
            assert (error.kind, error.attempts) == (ErrorKind.BLOCKED_URL, 1)
            assert f"{host} resolves to 127.0.0.2, which is loopback" in error.message
        assert resolver.calls == ["rebind.test", "mixed.test"]
        assert internal.connections == server.connections == 0


def test_an_allowed_name_may_resolve_privately(monkeypatch: pytest.MonkeyPatch) -> None:
    with serve() as server:
        server.routes["/cat.png"] = image()
        monkeypatch.setattr(transport, "resolve", _resolver({"img.test": ["127.0.0.1"]}))
        s = settings(allow_hosts=("img.test",))
        assert fetch(s, server.url("/cat.png", host="img.test")).data == PNG  # type: ignore[union-attr]
        assert server.seen[0].headers["host"] == f"img.test:{server.port}"


def test_dns_failure_is_a_connection_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "resolve", _resolver({}))
    error = fetch_error(settings(), "https://nowhere.test/cat.png")
    assert error.kind is ErrorKind.CONNECTION_ERROR and "cannot resolve nowhere.test" in error.message


def test_the_transport_vets_every_address_it_dials_bare_ips_included() -> None:
    """The transport's own check (the socket factory), without the Fetcher's URL check in front of it:
    aiohttp never resolves an IP literal, so only the socket factory sees these addresses."""
    with serve("127.0.0.2") as internal:
        internal.routes["/admin"] = image()
        policy = UrlPolicy(allow_http=True, allow_hosts=("127.0.0.1",))

        async def go(url: str) -> RowError:
            async with httpx.AsyncClient(transport=transport.GuardedTransport(policy, max_connections=4)) as client:
                with pytest.raises(RowError) as caught:
                    await client.get(url)
                return caught.value

        for url, needle in [(internal.url("/admin"), "127.0.0.2 is loopback"),
                            (f"http://[::ffff:127.0.0.2]:{internal.port}/admin", "loopback")]:  # fmt: skip
            error = run(go(url))
            assert error.kind is ErrorKind.BLOCKED_URL and needle in error.message, error
        assert internal.connections == 0


def test_every_new_connection_resolves_and_is_vetted_anew(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DNS cache: a name that flips to a blocked address (rebinding) is refused on its next connection."""
    table = {"flip.test": ["127.0.0.1"]}
    resolver = _resolver(table)
    monkeypatch.setattr(transport, "resolve", resolver)
    with serve() as server:
        server.routes["/cat.png"] = image(PNG, Connection="close")  # the next request needs a new connection
        url = f"http://flip.test:{server.port}/cat.png"

        async def go() -> RowError:
            async with Fetcher(settings()) as fetcher:
                got = await fetcher.fetch(url)
                assert got is not None and got.data == PNG
                table["flip.test"] = ["127.0.0.2"]
                with pytest.raises(RowError) as caught:
                    await fetcher.fetch(url)
                return caught.value

        error = run(go())
        assert (
            error.kind is ErrorKind.BLOCKED_URL
            and "flip.test resolves to 127.0.0.2, which is loopback" in error.message
        )
        assert resolver.calls == ["flip.test", "flip.test"]
        assert server.connections == 1


# ---------------------------------------------------------------- limits


def test_slow_drip_ends_at_the_row_deadline() -> None:
    dripped = threading.Event()  # the server sent all 20 bytes (6 s): the client waited for the whole drip

    def drip(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", "1000")
        h.end_headers()
        for _ in range(20):
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(0.3)
        dripped.set()

    with serve() as server:
        server.routes["/drip"] = drip
        started = time.monotonic()
        error = fetch_error(settings(timeout=1.5, read_timeout=10.0), server.url("/drip"))
        elapsed = time.monotonic() - started
        assert error.kind is ErrorKind.TIMEOUT and "1.5s deadline" in error.message
        assert elapsed >= 1.4 and not dripped.is_set()  # gave up at the deadline, before the drip ended


def test_read_timeout() -> None:
    with serve() as server:
        server.routes["/stall"] = lambda h: time.sleep(1.0)
        error = fetch_error(settings(read_timeout=0.3), server.url("/stall"))
        assert error.kind is ErrorKind.TIMEOUT and "sent nothing for 0.3s" in error.message


def test_content_length_over_the_limit_is_refused_before_reading() -> None:
    def huge(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(50_000_000))
        h.end_headers()
        h.wfile.write(b"\0" * 1000)

    with serve() as server:
        server.routes["/huge"] = huge
        error = fetch_error(settings(max_bytes=1_000_000), server.url("/huge"))
        assert error.kind is ErrorKind.TOO_LARGE and "Content-Length 50,000,000" in error.message


def test_body_shorter_than_content_length_is_a_connection_error() -> None:
    def liar(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        h.wfile.write(PNG[:10])
        h.close_connection = True

    with serve() as server:
        server.routes["/liar"] = liar
        error = fetch_error(settings(), server.url("/liar"))
        assert error.kind is ErrorKind.CONNECTION_ERROR and "complete message body" in error.message


def test_unannounced_body_over_the_limit_stops_while_streaming() -> None:
    def endless(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Connection", "close")  # no Content-Length: the body runs until the socket closes
        h.end_headers()
        for _ in range(64):
            h.wfile.write(b"\xff" * 65536)
        h.close_connection = True

    with serve() as server:
        server.routes["/endless"] = endless
        error = fetch_error(settings(max_bytes=1_000_000), server.url("/endless"))
        assert error.kind is ErrorKind.TOO_LARGE and "stopped reading" in error.message


def test_gzip_bomb_is_caught_on_decoded_bytes() -> None:
    bomb = gzip.compress(b"\0" * 30_000_000, compresslevel=9)
    assert len(bomb) < 100_000
    with serve() as server:
        server.routes["/bomb"] = image(bomb, **{"Content-Encoding": "gzip"})
        error = fetch_error(settings(max_bytes=1_000_000), server.url("/bomb"))
        assert error.kind is ErrorKind.TOO_LARGE
        small = gzip.compress(PNG)
        server.routes["/small"] = image(small, **{"Content-Encoding": "gzip"})
        assert fetch(settings(), server.url("/small")).data == PNG  # type: ignore[union-attr]


# ---------------------------------------------------------------- status codes, retries, not-images


def test_404_is_not_retried() -> None:
    with serve() as server:
        error = fetch_error(settings(retries=3), server.url("/missing.png"))
        assert (error.kind, error.status, error.retryable, error.attempts) == (ErrorKind.HTTP_STATUS, 404, False, 1)
        assert "HTTP 404" in error.message
        assert server.paths() == ["/missing.png"]


def test_flaky_503_succeeds_on_the_second_try() -> None:
    with serve() as server:

        def flaky(h: Handler) -> None:
            if len(server.seen) == 1:
                h.reply(503, b"busy", {"Content-Type": "text/plain"})
            else:
                image()(h)

        server.routes["/cat.png"] = flaky
        got = fetch(settings(retries=2), server.url("/cat.png"))
        assert got is not None and got.data == PNG and got.attempts == 2
        assert server.paths() == ["/cat.png", "/cat.png"]


def test_persistent_500_uses_every_retry() -> None:
    with serve() as server:
        server.routes["/down"] = lambda h: h.reply(500, b"oops", {"Content-Type": "text/plain"})
        error = fetch_error(settings(retries=2), server.url("/down"))
        assert (error.kind, error.status, error.retryable, error.attempts) == (ErrorKind.HTTP_STATUS, 500, True, 3)
        assert len(server.seen) == 3


def test_429_honours_retry_after() -> None:
    with serve() as server:

        def limited(h: Handler) -> None:
            if len(server.seen) == 1:
                h.reply(429, b"slow down", {"Retry-After": "1", "Content-Type": "text/plain"})
            else:
                image()(h)

        server.routes["/cat.png"] = limited
        got = fetch(settings(retries=1, retry_backoff=0.01), server.url("/cat.png"))
        assert got is not None and got.attempts == 2
        first, second = server.seen
        assert second.at - first.at >= 0.95


def test_retry_after_longer_than_we_wait_gives_up_at_once() -> None:
    with serve() as server:
        server.routes["/x"] = lambda h: h.reply(503, b"", {"Retry-After": "3600"})
        error = fetch_error(settings(retries=3), server.url("/x"))
        assert (error.status, error.retryable, error.attempts) == (503, True, 1)
        assert "Retry-After 3600s" in error.message


def test_connection_refused_is_retried_then_reported() -> None:
    with serve() as server:
        url = server.url("/cat.png")
    error = fetch_error(settings(retries=1), url)  # the server is gone: nothing listens on the port
    assert (error.kind, error.retryable, error.attempts) == (ErrorKind.CONNECTION_ERROR, True, 2)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/html; charset=utf-8", b"<html><body><h1>Access denied</h1></body></html>"),
        ("application/json", b'{"error": "Access denied"}'),
        ("image/jpeg", b"\n  <!DOCTYPE html><html>Access denied</html>"),
        ("application/octet-stream", b'{"error": "Access denied"}'),
    ],
)
def test_text_body_with_200_is_not_an_image(content_type: str, body: bytes) -> None:
    with serve() as server:
        server.routes["/x"] = lambda h: h.reply(200, body, {"Content-Type": content_type})
        error = fetch_error(settings(), server.url("/x"))
        assert error.kind is ErrorKind.NOT_AN_IMAGE and "Access denied" in error.message


def test_html_error_page_stays_http_status() -> None:
    with serve() as server:
        page = b"<!DOCTYPE html><title>403 Forbidden</title><p>Bot traffic blocked</p>"
        server.routes["/x"] = lambda h: h.reply(403, page, {"Content-Type": "text/html"})
        error = fetch_error(settings(retries=2), server.url("/x"))
        assert (error.kind, error.status, error.attempts) == (ErrorKind.HTTP_STATUS, 403, 1)
        assert "HTML page" in error.message and "Bot traffic blocked" in error.message


# ---------------------------------------------------------------- concurrency


def _slow_image(seconds: float):  # type: ignore[no-untyped-def]
    def handler(h: Handler) -> None:
        time.sleep(seconds)
        image()(h)

    return handler


def test_per_host_cap_is_respected() -> None:
    with serve() as server:
        server.routes["/slow.png"] = _slow_image(0.2)

        async def go() -> None:
            async with Fetcher(settings(per_host=3, concurrency=16)) as fetcher:
                results = await asyncio.gather(*(fetcher.fetch(server.url("/slow.png")) for _ in range(10)))
                assert all(r is not None and r.data == PNG for r in results)

        run(go())
        assert server.max_active == 3
        assert len(server.seen) == 10


def test_host_slots_are_dropped_once_a_host_is_idle() -> None:
    """Per-host semaphores must not pile up over millions of rows with distinct hosts."""
    with serve() as server:
        server.routes["/slow.png"] = _slow_image(0.1)
        server.routes["/ok.png"] = image()

        async def go() -> None:
            async with Fetcher(settings(per_host=2, allow_private_network=True)) as fetcher:
                urls = [server.url("/slow.png"), server.url("/ok.png"), server.url("/missing.png"),
                        server.url("/ok.png", host="localhost")] * 3  # fmt: skip
                pending = asyncio.gather(*(fetcher.fetch(u) for u in urls), return_exceptions=True)
                await asyncio.sleep(0.05)
                assert "127.0.0.1" in fetcher._host_slots  # in flight: an entry per busy host
                results = await pending
                assert sum(isinstance(r, RowError) for r in results) == 3  # the 404s
                assert fetcher._host_slots == {}  # idle hosts leave nothing behind

        run(go())
        assert server.max_active <= 2 * 2  # per_host for each host name: 127.0.0.1 and localhost


def test_wait_for_a_host_slot_does_not_count_against_the_deadline() -> None:
    with serve() as server:
        server.routes["/slow.png"] = _slow_image(0.4)

        async def go() -> None:
            async with Fetcher(settings(per_host=1, timeout=1.0)) as fetcher:
                await asyncio.gather(*(fetcher.fetch(server.url("/slow.png")) for _ in range(4)))  # ~1.6 s queued

        run(go())
        assert server.max_active == 1


def test_rows_waiting_for_a_slot_never_time_out(tmp_path: Path) -> None:
    """--concurrency 256 over 320 rows of one slow host (--per-host 8): the last rows wait ~6 s for a host
    slot (and 64 rows for a pipeline slot first), twice the 3 s --timeout, yet only the request itself
    (~0.2 s) runs against the clock."""
    rows = 320
    with serve() as server:
        server.routes["/slow.png"] = _slow_image(0.2)
        manifest = tmp_path / "rows.txt"
        manifest.write_text("".join(server.url(f"/slow.png?row={i}") + "\n" for i in range(rows)))
        s = settings(concurrency=256, per_host=8, timeout=3.0)
        summary = CheckRun([str(manifest)], s, tmp_path / "errors.jsonl").run()
    assert (summary.ok, summary.failed, summary.failures_by_kind) == (rows, 0, {})
    assert server.max_active == 8 and len(server.seen) == rows


def test_pool_is_as_wide_as_concurrency() -> None:
    """Dynamo raised httpx.PoolTimeout under fan-out; the pool must fit `concurrency` requests at once."""
    with serve() as server:
        server.routes["/slow.png"] = _slow_image(0.5)

        async def go() -> None:
            s = settings(
                concurrency=64, per_host=64, timeout=60.0
            )  # width, not speed: a loaded machine must not time it out
            gate = asyncio.Semaphore(s.concurrency)  # what the pipeline does

            async def one() -> None:
                async with gate:
                    got = await fetcher.fetch(server.url("/slow.png"))
                    assert got is not None and got.data == PNG

            async with Fetcher(s) as fetcher:
                await asyncio.gather(*(one() for _ in range(128)))
                assert fetcher.requests_sent == 128

        run(go())
        assert server.max_active == 64
