"""Content codings (`Content-Encoding`), undone with a hard bound on what one network read can allocate.

httpx inflates each network chunk in one call with no output cap and stacks one decoder per coding
named, however many; a ~1 KB `gzip, gzip` body then takes gigabytes before any size check can run.
Here the fetcher reads the raw stream and `BodyDecoder` undoes the codings itself:

- at most MAX_CODINGS codings (urllib3 refuses more than 5, GHSA-gm62-xv2j-4w53); unknown ones refused;
- every decoder call returns at most STEP bytes, and the last stage is asked for no more than the
  body's remaining room (+1, to see it overflow), so one raw chunk never yields more than
  min(STEP, room + 1) bytes at a time however it inflates;
- intermediate stages hand on STEP bytes at a time and may produce at most INTERMEDIATE_FACTOR x the
  limit in all (bounding CPU too: a layer that inflates to padding the next layer swallows);
- the raw (still encoded) body is capped at the same limit as the decoded one.

gzip, x-gzip and deflate always work; br with `brotli`/`brotlicffi` >= 1.2 (which can cap output),
zstd with `compression.zstd` (Python 3.14) or `backports.zstd`, its window capped at 8 MiB (RFC 9659).
"""

from __future__ import annotations

import importlib
import re
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from mmprep.errors import ErrorKind, RowError

MAX_CODINGS = 3  # stacked content codings accepted ("identity" not counted)
STEP = 64 * 1024  # most bytes one decoder call returns; also what moves between two stages at a time
INTERMEDIATE_FACTOR = 2  # an inner layer may inflate to this many times the limit, in all
ZSTD_WINDOW_LOG_MAX = 23  # 8 MiB: the largest window RFC 9659 lets a zstd content coding use

_TOKEN = re.compile(r"[^,\s]+")


def _optional(*modules: str) -> Any:
    """The first of `modules` that imports, or None."""
    for name in modules:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


_brotli = _optional("brotli", "brotlicffi")
_zstd = _optional("compression.zstd", "backports.zstd")


class _Stage(Protocol):
    """One coding's decoder: takes input when starved, hands out at most `n` bytes at a time."""

    name: str

    def feed(self, data: bytes) -> None: ...
    def read(self, n: int) -> bytes: ...  # b"": needs more input (or the stream ended)
    def finish(self) -> None: ...  # raise if the stream stopped short of its end


def _bad(message: str) -> RowError:
    return RowError(ErrorKind.BAD_ENCODING, message)


class _ZlibStage:
    """gzip (several members, trailing garbage after the first ignored, as curl and urllib3 do) or
    deflate (zlib-wrapped per RFC 9110, or raw deflate as some servers send: told by the header)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._gzip = name in ("gzip", "x-gzip")
        self._obj: Any = zlib.decompressobj(zlib.MAX_WBITS | 16) if self._gzip else None
        self._input = b""
        self._more = False  # the last call filled its output: zlib may hold more without new input
        self._started = False  # any input seen
        self._ended = False  # the stream (or, for gzip, the last member so far) reached its end
        self._ended_once = False  # a first gzip member was complete
        self._swallow = False  # past the end for good: input is dropped

    def feed(self, data: bytes) -> None:
        if self._swallow or not data:
            return
        self._started = True
        self._input += data  # only fed when starved, so this is at most one step's worth
        if self._obj is None:  # deflate: wait for the two bytes that tell zlib from raw deflate
            if len(self._input) < 2:
                return
            cmf, flg = self._input[0], self._input[1]
            wrapped = cmf & 0x0F == 8 and cmf >> 4 <= 7 and (cmf << 8 | flg) % 31 == 0
            self._obj = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)

    def read(self, n: int) -> bytes:
        while not self._swallow and self._obj is not None and (self._input or self._more):
            if self._ended:  # more input after a gzip member: the next member starts
                self._obj, self._ended = zlib.decompressobj(zlib.MAX_WBITS | 16), False
            try:
                out = self._obj.decompress(self._input, n)
            except zlib.error as exc:
                if self._gzip and self._ended_once:
                    self._swallow = True  # garbage after a complete member
                    return b""
                raise _bad(f"{self.name} body does not decode: {exc}") from None
            self._more = len(out) == n
            self._input = self._obj.unconsumed_tail
            if self._obj.eof:
                self._ended = self._ended_once = True
                self._input, self._more = self._obj.unused_data, False
                if not self._gzip:
                    self._swallow = True  # data after the end of a deflate stream is ignored
            if out:
                return out
        return b""

    def finish(self) -> None:
        if self._started and not self._ended and not self._swallow:
            raise RowError(ErrorKind.CONNECTION_ERROR, f"body ends inside its {self.name} stream (truncated)")


class _BrotliStage:
    """br, with the output cap that brotli >= 1.2 offers (`output_buffer_limit`)."""

    name = "br"

    def __init__(self) -> None:
        self._obj = _brotli.Decompressor()
        self._process = getattr(self._obj, "process", None) or self._obj.decompress
        self._input = b""
        self._started = False

    @property
    def done(self) -> bool:
        return self._obj.is_finished()

    def feed(self, data: bytes) -> None:
        self._started = self._started or bool(data)
        if not self.done:  # data after the end of the stream is ignored
            self._input += data

    def read(self, n: int) -> bytes:
        while not self.done:
            if not self._obj.can_accept_more_data():  # output still inside: drain it before new input
                data = b""
            elif self._input:
                data, self._input = self._input, b""
            else:
                return b""
            try:
                out = self._process(data, output_buffer_limit=n)
            except _brotli.error as exc:
                raise _bad(f"br body does not decode: {exc}") from None
            if out or not data:
                return bytes(out)
        return b""

    def finish(self) -> None:
        if self._started and not self.done:
            raise RowError(ErrorKind.CONNECTION_ERROR, "body ends inside its br stream (truncated)")


class _ZstdStage:
    """zstd, one decompressor per frame, window capped at 2**ZSTD_WINDOW_LOG_MAX."""

    name = "zstd"

    def __init__(self) -> None:
        self._obj = self._new()
        self._input = b""
        self._started = False

    @staticmethod
    def _new() -> Any:
        return _zstd.ZstdDecompressor(options={_zstd.DecompressionParameter.window_log_max: ZSTD_WINDOW_LOG_MAX})

    def feed(self, data: bytes) -> None:
        self._started = self._started or bool(data)
        self._input += data

    def read(self, n: int) -> bytes:
        while self._input or not (self._obj.needs_input or self._obj.eof):
            if self._obj.eof:
                self._obj = self._new()
            data, self._input = self._input, b""
            try:
                out = self._obj.decompress(data, n)
            except _zstd.ZstdError as exc:
                raise _bad(f"zstd body does not decode: {exc}") from None
            if self._obj.eof:
                self._input = self._obj.unused_data
            if out:
                return bytes(out)
        return b""

    def finish(self) -> None:
        if self._started and not self._obj.eof:
            raise RowError(ErrorKind.CONNECTION_ERROR, "body ends inside its zstd stream (truncated)")


def _brotli_caps_output() -> bool:
    if _brotli is None:
        return False
    obj = _brotli.Decompressor()
    return hasattr(obj, "can_accept_more_data") and hasattr(obj, "is_finished")


_STAGES: dict[str, Any] = {"gzip": _ZlibStage, "x-gzip": _ZlibStage, "deflate": _ZlibStage}
if _brotli_caps_output():
    _STAGES["br"] = lambda name: _BrotliStage()
if _zstd is not None:
    _STAGES["zstd"] = lambda name: _ZstdStage()

SUPPORTED: tuple[str, ...] = tuple(name for name in _STAGES if name != "x-gzip")
ACCEPT_ENCODING = ", ".join(SUPPORTED)  # what requests advertise: only what BodyDecoder undoes


def parse_codings(values: Iterable[str]) -> list[str]:
    """The codings that Content-Encoding header values list, in the order applied; RowError for an
    unknown one or more than MAX_CODINGS (checked token by token: a huge header builds nothing)."""
    codings: list[str] = []
    for value in values:
        for match in _TOKEN.finditer(value):
            coding = match.group().lower()
            if coding == "identity":
                continue
            if coding not in _STAGES:
                raise _bad(f"unsupported Content-Encoding {coding[:40]!r} (accepted: {', '.join(SUPPORTED)})")
            if len(codings) == MAX_CODINGS:
                raise _bad(f"more than {MAX_CODINGS} stacked content codings in Content-Encoding")
            codings.append(coding)
    return codings


class BodyDecoder:
    """Undoes a body's content codings one raw chunk at a time, never producing more than `limit`
    bytes (plus one piece, to see the overflow), and failing `too_large` as soon as it would."""

    def __init__(self, codings: list[str], limit: int) -> None:
        self.limit = limit
        self.raw = 0  # encoded bytes seen
        self.decoded = 0  # decoded bytes handed out
        self._stages: list[_Stage] = [_STAGES[name](name) for name in reversed(codings)]  # outermost first
        self._made = [0] * len(self._stages)  # bytes each stage produced

    def decode(self, raw: bytes) -> Iterator[bytes]:
        """The decoded pieces of one raw chunk (each at most STEP bytes; with no coding, the chunk itself);
        RowError(too_large) once the body passes `limit` (the piece that passes it is yielded first)."""
        self.raw += len(raw)
        if not self._stages:
            yield from self._counted(raw)
            return
        if self.raw > self.limit:
            raise RowError(ErrorKind.TOO_LARGE, f"encoded body is over max_bytes={self.limit:,} (stopped reading)")
        self._stages[0].feed(raw)
        last = len(self._stages) - 1
        while piece := self._pull(last, min(STEP, self.limit - self.decoded + 1)):
            yield from self._counted(piece)

    def finish(self) -> None:
        """After the last chunk: RowError if a compressed stream stopped short of its end."""
        for stage in self._stages:
            stage.finish()

    def _counted(self, piece: bytes) -> Iterator[bytes]:
        self.decoded += len(piece)
        yield piece
        if self.decoded > self.limit:
            how = f"decodes ({'+'.join(s.name for s in reversed(self._stages))}) to" if self._stages else "is"
            raise RowError(ErrorKind.TOO_LARGE, f"body {how} over max_bytes={self.limit:,} (stopped reading)")

    def _pull(self, i: int, n: int) -> bytes:
        """Up to `n` bytes out of stage `i`, feeding it from stage i-1 STEP bytes at a time."""
        stage = self._stages[i]
        while True:
            out = stage.read(n)
            if out or i == 0:
                return out
            piece = self._pull(i - 1, STEP)  # drained even once `stage` is done, so its trailer is checked
            if not piece:
                return b""
            self._made[i - 1] += len(piece)
            if self._made[i - 1] > INTERMEDIATE_FACTOR * self.limit:
                inner = self._stages[i - 1].name
                raise RowError(
                    ErrorKind.TOO_LARGE,
                    f"the {inner} layer inflates to over {INTERMEDIATE_FACTOR} x max_bytes={self.limit:,} (stopped reading)",
                )
            stage.feed(piece)
