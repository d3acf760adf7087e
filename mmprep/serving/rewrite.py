"""`mmprep rewrite`: OpenAI chat requests whose cached images go to the server as embeddings.

Request files (bare Chat Completions bodies or Batch API lines `{"custom_id", "method", "url", "body"}`,
`.gz` or stdin) are streamed line by line, and every line is written again, in order:
- a request whose image parts are all cached for the model: each image part becomes the part
  `mmprep.serving.to_vllm_part` builds (`image_embeds`, uuid = entry key); the rest of the line is kept
  (same keys in the same order; the line is re-serialised by `json.dumps`).
- a request with an image that is not cached stays as it is: vLLM 0.32 refuses a request that mixes
  `image_url` and `image_embeds` parts ("Mixing raw image and embedding inputs is not allowed",
  vllm/renderers/chat_utils.py); its uncached images count as misses, its cached ones as kept.
- `uuid_only` (for a server that reads an encoder-cache store): only `"uuid": <entry key>` is added to
  each cached image part; nothing else changes, so mixing does not arise.
- target `vllm-ec` (a vLLM serving the cache through `MmprepECConnector`): for the families whose vLLM
  parser takes placeholder metadata (`METADATA_ONLY_FAMILIES`), each image part of a request whose
  images are all cached becomes the metadata-only part `to_vllm_ec_part` builds (no pixels, no
  tensor: the request stays the size of the original); for the other families, `uuid_only`.
- every other line (text-only requests, blank lines, lines that are not requests) is copied byte for
  byte; a line rewrite cannot read is copied too, and reported.
Memory stays bounded: one line at a time (a line over MAX_LINE_CHARS is copied in pieces), and a
byte-bounded memo of the parts built for recently seen images.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import secrets
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

from mmprep.keys import cache_key
from mmprep.manifest.openai import is_request, request_body, request_image_parts
from mmprep.manifest.records import Malformed
from mmprep.manifest.source import MAX_LINE_CHARS, READ_ERRORS, open_text
from mmprep.serving.formats import (
    EC_LAYOUTS,
    METADATA_ONLY_FAMILIES,
    EcLayout,
    ServingFormatError,
    check_rows,
    has_embedding_input,
    to_vllm_ec_part,
    to_vllm_part,
    vllm_ec_layout,
)
from mmprep.store.reader import EmbeddingCache

__all__ = ["PART_MEMO_BYTES", "TARGETS", "RequestRewriter", "RewriteSummary", "open_output"]

TARGETS = ("vllm", "vllm-ec")  # --target: vLLM's image_embeds part, or the MmprepECConnector's metadata-only part
PART_MEMO_BYTES = 64 * 1024 * 1024  # parts kept (as JSON text) for images seen again
MAX_PROBLEMS = 20  # problem lines named in the summary (all are counted)
REFUSAL_MEMO = 65536  # entries whose vllm-ec verdict is remembered
CHUNK_LINES = 1024  # lines whose image keys are looked up in one index query ...
CHUNK_CHARS = 16 * 1024 * 1024  # ... unless they hold more characters than this first


class _Request(NamedTuple):
    """A parsed chat request line: the object, its image parts (the object's own dicts) and their keys."""

    obj: dict[str, Any]
    parts: list[dict[str, Any]]
    keys: list[str]
    path: str
    line: int


@dataclass
class RewriteSummary:
    """What one rewrite did; printed on stderr (as JSON with --json)."""

    lines: int = 0  # lines read (blank ones included)
    requests: int = 0  # request lines (Batch API lines or bare requests), text-only ones included
    images: int = 0  # image parts in those requests
    replaced: int = 0  # image parts rewritten (image_embeds, or a uuid added with --uuid-only)
    misses: int = 0  # image parts not cached for the model
    kept: int = 0  # cached image parts left as image_url because their request has a miss
    invalid: int = 0  # cached image parts whose entry cannot be served (e.g. rows that do not fill the grid)
    skipped_lines: int = 0  # lines copied unchanged because they are not readable requests (see problems)
    bytes_in: int = 0
    bytes_out: int = 0
    duration_s: float = 0.0
    requests_per_s: float = 0.0
    mb_per_s: float = 0.0  # (bytes_in + bytes_out) / 1e6 per second
    problems: list[str] = field(default_factory=list)  # the first MAX_PROBLEMS, "<file>:<line>: <why>"

    @property
    def exit_code(self) -> int:
        """0 when every image part was rewritten and every line read; 1 otherwise."""
        return 0 if self.replaced == self.images and not self.skipped_lines else 1

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "exit_code": self.exit_code}


class RequestRewriter:
    """Rewrites request lines against one model of a cache (see the module docstring)."""

    def __init__(self, cache: EmbeddingCache, *, target: str = "vllm", uuid_only: bool = False) -> None:
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r} (expected one of {', '.join(TARGETS)})")
        if target == "vllm-ec" and cache.family not in EC_LAYOUTS:
            raise ServingFormatError(
                f"{cache.model_name} is a {cache.family} model: vLLM's encoder-cache connector has no layout for it"
            )
        if target == "vllm" and not uuid_only and not has_embedding_input(cache.family):
            raise ServingFormatError(
                f"{cache.model_name} is a {cache.family} model: {target} takes no precomputed embeddings for it "
                "(--uuid-only still adds uuids)"
            )
        self.cache = cache
        self.target = target
        self.uuid_only = uuid_only or (target == "vllm-ec" and cache.family not in METADATA_ONLY_FAMILIES)
        # vllm-ec: each entry is checked as the connector checks it (rows vs the placeholder vLLM reserves)
        self._layout: EcLayout | None = vllm_ec_layout(cache.family, cache.model_info) if target == "vllm-ec" else None
        self._refusals: OrderedDict[str, str | None] = OrderedDict()  # entry key -> why it cannot be served (memo)
        self.summary = RewriteSummary()
        self._parts: OrderedDict[str, str] = OrderedDict()  # entry key -> its part's JSON text
        self._part_bytes = 0
        self._marker = f"mmprep-part-{secrets.token_hex(16)}"  # stands in for a part while the request is serialised
        self._marker_re = re.compile(r"\{" + re.escape(json.dumps(self._marker)) + r": (\d+)\}")  # as _dumps writes it

    def run(self, paths: Iterable[str], out: IO[bytes]) -> RewriteSummary:
        """Rewrite every line of `paths` (`-`: stdin) to `out`, in order; return the summary."""
        start = time.perf_counter()
        for path in paths:
            self._rewrite_file(path, out)
        s = self.summary
        s.duration_s = round(time.perf_counter() - start, 3)
        if s.duration_s > 0:
            s.requests_per_s = round(s.requests / s.duration_s, 1)
            s.mb_per_s = round((s.bytes_in + s.bytes_out) / 1e6 / s.duration_s, 2)
        return s

    def _rewrite_file(self, path: str, out: IO[bytes]) -> None:
        """Read `path` in chunks of lines (one index query a chunk), write each line as it comes out."""
        number, chunk, chars = 0, [], 0
        with open_text(path) as stream:
            try:
                while raw := stream.readline(MAX_LINE_CHARS):
                    number += 1
                    self.summary.lines += 1
                    if len(raw) == MAX_LINE_CHARS and not raw.endswith("\n"):  # copied through in pieces
                        self._flush(chunk, out)
                        chunk, chars = [], 0
                        self._problem(path, number, f"line longer than {MAX_LINE_CHARS} characters (copied unread)")
                        self._emit(raw, None, out)
                        while (raw := stream.readline(MAX_LINE_CHARS)) and not raw.endswith("\n"):
                            self._emit(raw, None, out)
                        self._emit(raw, None, out)
                        continue
                    chunk.append((raw, self._parse(raw, path, number)))
                    chars += len(raw)
                    if len(chunk) >= CHUNK_LINES or chars >= CHUNK_CHARS:
                        self._flush(chunk, out)
                        chunk, chars = [], 0
            except READ_ERRORS as exc:
                self._problem(path, number + 1, f"the rest of the file is unreadable: {type(exc).__name__}: {exc}")
            self._flush(chunk, out)

    def _flush(self, chunk: list[tuple[str, _Request | None]], out: IO[bytes]) -> None:
        """Look the chunk's image keys up at once, then rewrite and write its lines in order."""
        cached = self.cache.cached_keys([key for _, request in chunk if request is not None for key in request.keys])
        for raw, request in chunk:
            self._emit(raw, self._rewrite(request, cached) if request is not None else None, out)

    def _emit(self, raw: str, new: str | None, out: IO[bytes]) -> None:
        """Write `new` (with `raw`'s line ending) in place of `raw`, or `raw` itself when `new` is None."""
        data = raw.encode("utf-8", "surrogateescape")
        self.summary.bytes_in += len(data)
        if new is not None:
            data = (new + raw[len(raw.rstrip("\r\n")) :]).encode("utf-8", "surrogateescape")
        self.summary.bytes_out += len(data)
        out.write(data)

    def _parse(self, raw: str, path: str, number: int) -> _Request | None:
        """The chat request of one line with its image parts, or None when the line is copied as it is."""
        text = raw.strip()
        if number == 1 and text.startswith("\ufeff"):
            text = text[1:].strip()
        if not text:
            return None
        try:
            obj = json.loads(text)
            if not is_request(obj):
                return self._problem(path, number, "not an OpenAI request (no body, messages or input)")
            found = list(request_image_parts(obj))
            is_chat = "messages" in request_body(obj)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, Malformed, 4300+-digit integers
            reason = exc if isinstance(exc, Malformed) else f"invalid JSON: {type(exc).__name__}: {str(exc)[:200]}"
            return self._problem(path, number, str(reason))
        self.summary.requests += 1
        if not found:
            return None
        if not is_chat:
            return self._problem(
                path, number, "a Responses API request (input): only Chat Completions requests are rewritten"
            )
        self.summary.images += len(found)
        return _Request(obj, [part for part, _ in found], [cache_key(url) for _, url in found], path, number)

    def _rewrite(self, request: _Request, cached: set[str]) -> str | None:
        """The new text of a request line (without its line ending), or None to copy it unchanged."""
        s, keys = self.summary, request.keys
        hits = sum(key in cached for key in keys)
        if self.uuid_only:
            served = 0
            for part, key in zip(request.parts, keys):
                refusal = self._refusal(key) if key in cached and self._layout is not None else None
                if refusal is not None:  # the connector would refuse it: the image stays as it is
                    s.invalid += 1
                    self._problem(
                        request.path, request.line, f"{refusal}; its image_url is left as it is", skipped=False
                    )
                elif key in cached:
                    part["uuid"] = key
                    served += 1
            s.replaced += served
            s.misses += len(keys) - hits
            return _dumps(request.obj) if served else None
        if hits < len(keys):  # vLLM refuses a request mixing image_url and image_embeds parts
            s.misses += len(keys) - hits
            s.kept += hits
            return None
        try:
            fragments = [self._part_json(key) for key in keys]
        except ServingFormatError as exc:
            s.invalid += len(keys)
            return self._problem(request.path, request.line, str(exc), skipped=False)
        if any(f is None for f in fragments):  # an entry vanished since the lookup (a concurrent gc)
            s.misses += len(keys)
            return None
        # Serialise the small request with a marker in each image part's place, then put the parts' JSON
        # (made once per image) in: json.dumps never scans the megabytes of base64 again.
        for i, part in enumerate(request.parts):
            part.clear()
            part[self._marker] = i
        text, count = self._marker_re.subn(lambda m: fragments[int(m[1])], _dumps(request.obj))  # type: ignore[arg-type, return-value]  # re.Match[str] indexes to str
        if count != len(keys):  # cannot happen unless the request's own text holds the random marker
            raise RuntimeError(f"{request.path}:{request.line}: part marker found {count} times, expected {len(keys)}")
        s.replaced += len(keys)
        return text

    def _part_json(self, key: str) -> str | None:
        """The image_embeds part of one cached entry as JSON text, from the memo when seen recently."""
        memo = self._parts.get(key)
        if memo is not None:
            self._parts.move_to_end(key)
            return memo
        entry = self.cache.get_key(key)
        if entry is None:
            return None
        if self._layout is not None:
            ec_check(self._layout, entry)
        text = _dumps(to_vllm_ec_part(entry) if self.target == "vllm-ec" else to_vllm_part(entry))
        if len(text) <= PART_MEMO_BYTES // 4:
            self._parts[key] = text
            self._part_bytes += len(text)
            while self._part_bytes > PART_MEMO_BYTES:
                self._part_bytes -= len(self._parts.popitem(last=False)[1])
        return text

    def _refusal(self, key: str) -> str | None:
        """Why MmprepECConnector would refuse `key`'s entry, or None when it serves it (memoised per key)."""
        if key in self._refusals:
            self._refusals.move_to_end(key)
            return self._refusals[key]
        entry = self.cache.get_key(key)
        assert self._layout is not None  # only for target vllm-ec
        try:
            if entry is None:
                raise ServingFormatError(f"entry {key[:16]} left the cache during the rewrite")
            ec_check(self._layout, entry)
            refusal = None
        except ServingFormatError as exc:
            refusal = str(exc)
        self._refusals[key] = refusal
        if len(self._refusals) > REFUSAL_MEMO:
            self._refusals.popitem(last=False)
        return refusal

    def _problem(self, path: str, line: int, message: str, *, skipped: bool = True) -> None:
        """Record a line that is copied unchanged for a reason the user should see."""
        if skipped:
            self.summary.skipped_lines += 1
        if len(self.summary.problems) < MAX_PROBLEMS:
            self.summary.problems.append(f"{path}:{line}: {message}")
        return None


def _dumps(obj: Any) -> str:
    """A rewritten line: keys in their order, non-ASCII text as it was (not escaped)."""
    return json.dumps(obj, ensure_ascii=False)


def ec_check(layout: EcLayout, entry: Any) -> None:
    """ServingFormatError unless the connector would serve `entry`: its tensor fills the placeholder vLLM reserves."""
    check_rows(entry)
    tensor = layout.checked(entry)
    if not tensor.dtype.is_floating_point:
        raise ServingFormatError(f"entry {entry.key[:16]} has a {tensor.dtype} tensor, not floating point")


class open_output:  # noqa: N801  (a context manager used like open())
    """Where rewritten lines go: stdout (`None` or `-`), or a file written under a temporary name and
    renamed into place on success (removed on failure); a name ending in `.gz` is gzip-compressed."""

    def __init__(self, target: str | None) -> None:
        self.path = None if target in (None, "-") else Path(target)
        self._tmp: Path | None = None
        self._files: list[IO[bytes]] = []  # innermost last: closed in reverse

    def __enter__(self) -> IO[bytes]:
        if self.path is None:
            return sys.stdout.buffer
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._files.append(open(self._tmp, "wb"))
        if self.path.suffix == ".gz":
            self._files.append(gzip.GzipFile(self.path.name[:-3], "wb", fileobj=self._files[0], mtime=0))  # type: ignore[arg-type]  # _files[0] is the binary file opened above
        return self._files[-1]

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.path is None:
            sys.stdout.buffer.flush()
            return
        assert self._tmp is not None
        raw, done = self._files[0], False
        try:
            if len(self._files) > 1:
                self._files[1].close()  # writes the gzip trailer into `raw`
            if exc_type is None:
                raw.flush()
                os.fsync(raw.fileno())
                done = True
        finally:
            raw.close()
            if done:
                os.replace(self._tmp, self.path)
            else:
                self._tmp.unlink(missing_ok=True)
