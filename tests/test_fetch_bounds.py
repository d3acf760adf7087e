"""Untrusted bytes cannot make a fetch allocate past its documented bound (docs/operations.md#limits-and-security).

Each hostile body comes from a real server on 127.0.0.1; each test measures the fetch's peak Python
allocation (tracemalloc, server thread included) and asserts it stays under `fetch_memory_bound`,
not only that the error kind is right.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import tracemalloc
import zlib
from collections.abc import Iterator

import httpx
import pytest
from _fetch_helpers import PNG, Handler, image, redirect, run, serve, settings

from mmprep.errors import ErrorKind, RowError
from mmprep.fetch import Fetched, Fetcher
from mmprep.fetch.codings import ACCEPT_ENCODING, MAX_CODINGS, STEP, BodyDecoder
from mmprep.fetch.fetcher import fetch_memory_bound
from mmprep.fetch.transport import HEADER_LIMITS, MAX_FIELD_SIZE, MAX_HEADERS
from mmprep.settings import MiB

LIMIT = 4 * MiB  # --max-bytes in these tests; every bomb inflates to 8x that
BOMB = 32 * MiB


def zeros_stream(size: int, wbits: int) -> bytes:
    """`size` zero bytes compressed as one zlib/gzip/raw-deflate stream, without holding them inflated."""
    out = zlib.compressobj(9, zlib.DEFLATED, wbits)
    block = bytes(MiB)
    return b"".join(out.compress(block) for _ in range(size // MiB)) + out.flush()


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    gzipped = zeros_stream(BOMB, 31)
    return {
        "gzip": gzipped,
        "gzip, gzip": gzip.compress(gzipped, 9),
        "gzip, gzip, gzip": gzip.compress(gzip.compress(gzipped, 9), 9),
        "deflate": zeros_stream(BOMB, 15),
        "raw deflate": zeros_stream(BOMB, -15),
    }


def chunked(body: bytes, size: int, content_encoding: str, content_type: str = "image/png"):  # type: ignore[no-untyped-def]
    """A route sending `body` with chunked transfer encoding, `size` bytes an HTTP chunk."""

    def route(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Encoding", content_encoding)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        try:
            for i in range(0, len(body), size):
                piece = body[i : i + size]
                h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            h.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client stopped reading: what a bomb should get
            pass

    return route


def measured(url: str, **overrides: object) -> tuple[Fetched | RowError, int]:
    """Fetch `url` with a fresh Fetcher; its result (or RowError) and the peak bytes traced meanwhile."""

    async def go() -> tuple[Fetched | RowError, int]:
        tracemalloc.start()
        try:
            async with Fetcher(settings(max_bytes=LIMIT, **overrides)) as fetcher:
                try:
                    result: Fetched | RowError = await fetcher.fetch(url)  # type: ignore[assignment]
                except RowError as error:
                    result = error
                return result, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    return run(go())


def failed(url: str, kind: ErrorKind, bound: int = fetch_memory_bound(LIMIT), **overrides: object) -> RowError:
    """The RowError fetching `url` gives, checked for `kind` and for a peak under `bound`."""
    result, peak = measured(url, **overrides)
    assert isinstance(result, RowError), result
    assert result.kind is kind, result
    assert peak <= bound, f"peak {peak:,} bytes over the bound {bound:,} ({result})"
    return result


# ---------------------------------------------------------------- decompression bombs


@pytest.mark.parametrize("coding", ["gzip", "gzip, gzip", "gzip, gzip, gzip", "deflate", "raw deflate"])
@pytest.mark.parametrize("piece", [None, 256], ids=["one-chunk", "many-chunks"])
def test_bomb_fails_too_large_within_the_memory_bound(bombs: dict[str, bytes], coding: str, piece: int | None) -> None:
    body, header = bombs[coding], coding.replace("raw ", "")
    with serve() as server:
        server.routes["/bomb.png"] = (
            image(body, **{"Content-Encoding": header}) if piece is None else chunked(body, piece, header)
        )
        error = failed(server.url("/bomb.png"), ErrorKind.TOO_LARGE)
    assert f"over max_bytes={LIMIT:,}" in error.message and not error.retryable


def test_the_same_measurement_catches_httpx_own_decoding(bombs: dict[str, bytes]) -> None:
    """Reading the same bomb through httpx's decoders (what mmprep did before), stopping once past LIMIT
    as the old `_read_capped` did, breaks the bound: the measurement can fail."""

    async def go(url: str) -> int:
        tracemalloc.start()
        try:
            async with httpx.AsyncClient() as client, client.stream("GET", url) as response:
                seen = 0
                async for chunk in response.aiter_bytes():
                    seen += len(chunk)
                    if seen > LIMIT:
                        break
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    with serve() as server:
        server.routes["/bomb.png"] = image(bombs["gzip, gzip"], **{"Content-Encoding": "gzip, gzip"})
        peak = run(go(server.url("/bomb.png")))
    assert peak > BOMB > fetch_memory_bound(LIMIT)


def test_padding_an_inner_layer_swallows_is_bounded_too() -> None:
    """gzip around 32 MiB of empty stored deflate blocks: the inner layer outputs nothing, the outer is capped."""
    empty_blocks = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\x00\x00\x00\xff\xff" * (MiB // 5)
    body = b"".join(empty_blocks.compress(block) for _ in range(BOMB // MiB)) + empty_blocks.flush()
    with serve() as server:
        server.routes["/pad.png"] = image(body, **{"Content-Encoding": "deflate, gzip"})
        error = failed(server.url("/pad.png"), ErrorKind.TOO_LARGE)
    assert "gzip layer inflates to over 2 x max_bytes" in error.message


def test_error_pages_and_text_bodies_are_sniffed_within_the_bound(bombs: dict[str, bytes]) -> None:
    page = gzip.compress(gzip.compress(b"<html>gone</html>" + b" " * BOMB, 9), 9)
    with serve() as server:
        server.routes["/404"] = lambda h: h.reply(
            404, page, {"Content-Type": "text/html", "Content-Encoding": "gzip, gzip"}
        )
        server.routes["/page.png"] = image(bombs["gzip, gzip"], "text/html", **{"Content-Encoding": "gzip, gzip"})
        status = failed(server.url("/404"), ErrorKind.HTTP_STATUS)
        text = failed(server.url("/page.png"), ErrorKind.NOT_AN_IMAGE)
    assert "<html>gone</html>" in status.message and status.status == 404
    assert "text/html" in text.message


def test_decoder_never_hands_out_more_than_the_room_left() -> None:
    """Per raw chunk, at most min(STEP, room + 1) bytes at a time, whatever the chunk inflates to."""
    decoder = BodyDecoder(["gzip", "gzip"], 100_000)
    pieces: list[int] = []
    with pytest.raises(RowError) as caught:
        for piece in decoder.decode(gzip.compress(gzip.compress(bytes(10 * MiB)))):
            pieces.append(len(piece))
    assert caught.value.kind is ErrorKind.TOO_LARGE
    assert max(pieces) <= STEP and sum(pieces) == 100_001


# ---------------------------------------------------------------- stacked and unknown codings


def test_a_thousand_codings_are_refused_before_any_decoder_is_built() -> None:
    header = ", ".join(["gzip"] * 1300)  # 7,800 bytes: the longest header line the parser takes is MAX_FIELD_SIZE
    body = PNG
    for _ in range(4):
        body = gzip.compress(body)
    with serve() as server:
        server.routes["/many.png"] = image(body, **{"Content-Encoding": header})
        server.routes["/four.png"] = image(body, **{"Content-Encoding": "gzip, gzip, gzip, gzip"})
        many = failed(server.url("/many.png"), ErrorKind.BAD_ENCODING, bound=MiB)
        four = failed(server.url("/four.png"), ErrorKind.BAD_ENCODING, bound=MiB)
    assert many.message == four.message == f"more than {MAX_CODINGS} stacked content codings in Content-Encoding"
    assert not many.retryable


@pytest.mark.parametrize("coding", ["compress", "exi", "gzip;q=1", "br2"])
def test_unknown_codings_are_refused(coding: str) -> None:
    with serve() as server:
        server.routes["/x.png"] = image(PNG, **{"Content-Encoding": coding})
        error = failed(server.url("/x.png"), ErrorKind.BAD_ENCODING, bound=MiB)
    assert error.message.startswith("unsupported Content-Encoding") and "accepted: gzip, deflate" in error.message


def _raw_deflate(data: bytes) -> bytes:
    out = zlib.compressobj(9, zlib.DEFLATED, -15)
    return out.compress(data) + out.flush()


@pytest.mark.parametrize(
    ("header", "body"),
    [
        ("gzip", gzip.compress(PNG)),
        ("x-gzip", gzip.compress(PNG)),
        ("GZIP", gzip.compress(PNG)),
        ("identity, gzip", gzip.compress(PNG)),
        ("gzip, gzip, gzip", gzip.compress(gzip.compress(gzip.compress(PNG)))),
        ("deflate", zlib.compress(PNG)),
        ("deflate", _raw_deflate(PNG)),  # what some servers send for "deflate"
        ("deflate, gzip", gzip.compress(zlib.compress(PNG))),
        ("gzip", gzip.compress(PNG[:20]) + gzip.compress(PNG[20:])),  # two members
        ("gzip", gzip.compress(PNG) + b"\0" * 64),  # trailing padding after the member
        ("deflate", zlib.compress(PNG) + b"junk"),  # data after the end of the stream
        ("identity", PNG),
        ("", PNG),
    ],
)
def test_well_formed_codings_decode_exactly(header: str, body: bytes) -> None:
    with serve() as server:
        server.routes["/ok.png"] = image(body, **{"Content-Encoding": header})
        result, _ = measured(server.url("/ok.png"))
        chunks = chunked(body, 7, header)
        server.routes["/ok7.png"] = chunks
        result7, _ = measured(server.url("/ok7.png"))
    assert isinstance(result, Fetched) and result.data == PNG
    assert isinstance(result7, Fetched) and result7.data == PNG


def test_corrupt_and_truncated_streams() -> None:
    stream = gzip.compress(PNG * 20)
    with serve() as server:
        server.routes["/corrupt.png"] = image(stream[:10] + b"\xff" * 40, **{"Content-Encoding": "gzip"})
        server.routes["/cut.png"] = chunked(stream[:-12], 64, "gzip")
        corrupt = failed(server.url("/corrupt.png"), ErrorKind.BAD_ENCODING, bound=MiB)
        cut = failed(server.url("/cut.png"), ErrorKind.CONNECTION_ERROR, bound=MiB)
    assert corrupt.message.startswith("gzip body does not decode") and not corrupt.retryable
    assert cut.message == "body ends inside its gzip stream (truncated)"


def test_requests_advertise_only_the_codings_decoded() -> None:
    with serve() as server:
        server.routes["/a.png"] = image()
        result, _ = measured(server.url("/a.png"))
    assert isinstance(result, Fetched)
    assert server.seen[0].headers["accept-encoding"] == ACCEPT_ENCODING
    assert ACCEPT_ENCODING.startswith("gzip, deflate")


def test_encoded_body_over_max_bytes_stops_even_if_it_decodes_to_nothing() -> None:
    """An encoded stream past max_bytes (here: a gzip member, then megabytes of junk) is cut at max_bytes."""
    body = gzip.compress(PNG) + b"\0" * (LIMIT + MiB)
    with serve() as server:
        server.routes["/junk.png"] = chunked(body, 64 * 1024, "gzip")
        error = failed(server.url("/junk.png"), ErrorKind.TOO_LARGE)
    assert error.message == f"encoded body is over max_bytes={LIMIT:,} (stopped reading)"


# ---------------------------------------------------------------- br and zstd, where installed


def _optional_codings() -> Iterator[object]:
    try:
        import brotli  # type: ignore[import-not-found]

        yield pytest.param("br", lambda data: brotli.compress(data, quality=5), id="br")
    except ImportError:
        yield pytest.param("br", None, id="br", marks=pytest.mark.skip("brotli is not installed"))
    try:
        from backports import zstd  # type: ignore[import-not-found]

        yield pytest.param("zstd", zstd.compress, id="zstd")
    except ImportError:
        yield pytest.param("zstd", None, id="zstd", marks=pytest.mark.skip("backports.zstd is not installed"))


@pytest.mark.parametrize(("coding", "compress"), list(_optional_codings()))
def test_br_and_zstd_are_bounded_like_gzip(coding: str, compress) -> None:  # type: ignore[no-untyped-def]
    bomb = compress(bytes(BOMB))
    with serve() as server:
        server.routes["/ok.png"] = image(compress(PNG), **{"Content-Encoding": coding})
        server.routes["/bomb.png"] = chunked(gzip.compress(bomb), 256, f"{coding}, gzip")
        ok, _ = measured(server.url("/ok.png"))
        failed(server.url("/bomb.png"), ErrorKind.TOO_LARGE)
    assert isinstance(ok, Fetched) and ok.data == PNG
    assert coding in ACCEPT_ENCODING


# ---------------------------------------------------------------- headers, redirects, data URLs


def _headers(count: int, size: int = 0):  # type: ignore[no-untyped-def]
    """A PNG response carrying `count` extra headers of `size` + 4 bytes each (`x:`, the value, CRLF)."""

    def route(h: Handler) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n" % len(PNG)
        h.wfile.write(head + (b"x:" + b"v" * size + b"\r\n") * count + b"\r\n" + PNG)

    return route


def test_header_floods_are_bounded_by_the_header_block_limit() -> None:
    """The largest header block the parser takes (MAX_HEADERS fields of MAX_FIELD_SIZE bytes) parses within
    HEADER_OVERHEAD; more fields, or a longer line, fail, not retried."""
    largest = MAX_HEADERS - 2  # Content-Type and Content-Length are two of them
    with serve() as server:
        server.routes["/fits.png"] = _headers(largest, MAX_FIELD_SIZE - 3)  # ~1 MiB of headers
        server.routes["/flood.png"] = _headers(40_000)
        server.routes["/fields.png"] = _headers(largest + 1)
        server.routes["/line.png"] = _headers(1, MAX_FIELD_SIZE + 1)
        fits, peak = measured(server.url("/fits.png"))
        floods = [failed(server.url(path), ErrorKind.CONNECTION_ERROR, bound=fetch_memory_bound(0, header_flood=True))
                  for path in ("/flood.png", "/fields.png", "/line.png")]  # fmt: skip
    print(f"{largest} headers of {MAX_FIELD_SIZE - 1:,} bytes: peak {peak:,} bytes")
    assert isinstance(fits, Fetched) and fits.data == PNG and peak <= fetch_memory_bound(len(PNG), header_flood=True)
    for flood in floods:
        assert flood.message == f"response headers over the parser's limit ({HEADER_LIMITS}) (stopped reading)"
        assert not flood.retryable


def test_overlong_validators_are_not_kept() -> None:
    """ETag / Last-Modified go into the index and every shard header: over 1 KiB they are dropped."""
    with serve() as server:
        server.routes["/long.png"] = image(PNG, ETag='"' + "e" * 8_000 + '"', **{"Last-Modified": "x" * 2000})
        server.routes["/ok.png"] = image(PNG, ETag='"v1"', **{"Last-Modified": "Wed, 21 Oct 2015 07:28:00 GMT"})
        long, _ = measured(server.url("/long.png"))
        ok, _ = measured(server.url("/ok.png"))
    assert isinstance(long, Fetched) and long.data == PNG and long.etag is None and long.last_modified is None
    assert isinstance(ok, Fetched) and ok.etag == '"v1"' and ok.last_modified == "Wed, 21 Oct 2015 07:28:00 GMT"


def test_an_overlong_redirect_location_is_refused() -> None:
    with serve() as server:
        server.routes["/go"] = redirect(
            server.url("/" + "a" * 70_000)
        )  # over httpx's URL limit and the parser's line limit
        error = failed(server.url("/go"), ErrorKind.CONNECTION_ERROR, bound=MiB)
    assert error.message.startswith("response headers over the parser's limit") and len(error.message) < 300
    assert not error.retryable and server.paths() == ["/go"]


def test_data_url_header_is_bounded_before_anything_is_split() -> None:
    url = "data:image/png" + ";x=y" * 500_000 + ";base64," + base64.b64encode(PNG).decode()
    tracemalloc.start()
    try:
        result, peak = _fetch_data_url(url)
    finally:
        tracemalloc.stop()
    assert isinstance(result, RowError) and result.kind is ErrorKind.BAD_DATA_URL
    assert "header is longer than" in result.message and peak <= MiB


def test_data_url_at_max_bytes_decodes_within_its_bound() -> None:
    """The URL string is the manifest's; decoding holds the payload's copy (4/3) and the bytes (1)."""
    payload = base64.b64encode(bytes(range(256)) * (LIMIT // 256)).decode()
    url = "data:image/png;base64," + payload
    tracemalloc.start()
    try:
        result, peak = _fetch_data_url(url)
    finally:
        tracemalloc.stop()
    assert isinstance(result, Fetched) and len(result.data) == LIMIT
    assert peak <= LIMIT * 7 // 3 + MiB


def _fetch_data_url(url: str) -> tuple[Fetched | RowError, int]:
    async def go() -> tuple[Fetched | RowError, int]:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        async with Fetcher(settings(max_bytes=LIMIT)) as fetcher:
            try:
                result: Fetched | RowError = await fetcher.fetch(url)  # type: ignore[assignment]
            except RowError as error:
                result = error
            return result, tracemalloc.get_traced_memory()[1] - base

    return asyncio.run(go())
