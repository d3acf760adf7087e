"""One `mmprep encode` run over a manifest full of hostile rows: each gets its exact error kind,
the run finishes, and every good row of the same run lands in the cache."""

from __future__ import annotations

import functools
import gzip
import json
import time

from _http import Handler, image, redirect, serve
from _image_corpus import png_header_only
from conftest import image_bytes
from mmprep import EmbeddingCache
from _cli import encode_json, write_manifest


def drip(h: Handler) -> None:
    """Promises 10 kB, sends a byte every 0.3 s: only the per-row deadline ends it."""
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Content-Length", "10000")
    h.end_headers()
    try:
        for _ in range(40):
            h.wfile.write(b"\x89")
            h.wfile.flush()
            time.sleep(0.3)
    except OSError:
        pass


@functools.cache
def bomb_body(layers: int) -> bytes:
    """50 MiB of zeros, gzipped `layers` times (made once: compressing it per request can outlast --timeout)."""
    body = b"\0" * (50 << 20)
    for _ in range(layers):
        body = gzip.compress(body)
    return body


def gzip_bomb(layers: int = 1):  # type: ignore[no-untyped-def]
    body, coding = bomb_body(layers), ", ".join(["gzip"] * layers)
    return lambda h: h.reply(200, body, {"Content-Type": "image/png", "Content-Encoding": coding})


def test_hostile_manifest_each_row_gets_its_kind_and_good_rows_land(tmp_path):
    jpeg = image_bytes("RGB", (64, 48), "JPEG", 3)
    with serve() as server:
        routes = {
            "/good1.png": image(image_bytes("RGB", (40, 30), "PNG", 1)),
            "/good2.webp": image(image_bytes("RGB", (30, 40), "WEBP", 2), "image/webp"),
            "/to-metadata": redirect("http://169.254.169.254/latest/meta-data/"),
            "/to-loopback": redirect(server.url("/good1.png", host="127.0.0.2")),
            "/drip.png": drip,
            "/bomb.png": gzip_bomb(),
            "/bomb2.png": gzip_bomb(2),  # ~1 KB inflating to 50 MiB through two layers
            "/codings.png": image(gzip.compress(b"x"), **{"Content-Encoding": ", ".join(["gzip"] * 1300)}),
            "/huge.png": image(b"\x89PNG" + b"\0" * 300_000),
            "/login.png": image(b"<!DOCTYPE html><html><body>Sign in</body></html>", "text/html"),
            "/truncated.jpg": image(jpeg[: len(jpeg) // 2], "image/jpeg"),
            "/photo.jpg": image(b"8BPS\x00\x01" + b"\0" * 64, "image/jpeg"),  # a PSD dressed as JPEG
            "/pixels.png": image(png_header_only(30000, 30000)),
            "/forbidden.png": lambda h: h.reply(403, b"<html>no</html>", {"Content-Type": "text/html"}),
        }
        server.routes.update(routes)
        urls = {path: server.url(path) for path in routes}
        manifest = write_manifest(tmp_path / "m.jsonl", list(urls.values()) + ["gopher://old.example/x.png"])
        cache = tmp_path / "cache"
        start = time.monotonic()
        code, s = encode_json(
            manifest,
            "--model",
            "builtin:tiny-clip",
            "--out",
            str(cache),
            "--allow-http",
            "--allow-host",
            "127.0.0.1",
            "--timeout",
            "1.5",
            "--retries",
            "0",
            "--max-bytes",
            "200KiB",
            "--max-pixels",
            "1000000",
        )
        elapsed = time.monotonic() - start
    assert code == 1 and s["encoded"] == 2 and s["failed"] == 13
    assert elapsed < 30  # the drip row cannot hold the run hostage
    kinds = {json.loads(line)["url"].rsplit("/", 1)[-1]: json.loads(line)["kind"]
             for line in (cache / "errors.jsonl").read_text().splitlines()}  # fmt: skip
    assert kinds == {
        "to-metadata": "blocked_url",
        "to-loopback": "blocked_url",
        "drip.png": "timeout",
        "bomb.png": "too_large",
        "bomb2.png": "too_large",
        "codings.png": "bad_encoding",
        "huge.png": "too_large",
        "login.png": "not_an_image",
        "truncated.jpg": "decode_error",
        "photo.jpg": "unsupported_format",
        "pixels.png": "image_too_large",
        "forbidden.png": "http_status",
        "x.png": "bad_scheme",
    }
    assert not any("169.254.169.254" in p or "127.0.0.2" in p for p in server.paths())  # never connected
    with EmbeddingCache(cache) as reader:
        assert reader.get(urls["/good1.png"]) is not None and reader.get(urls["/good2.webp"]) is not None
