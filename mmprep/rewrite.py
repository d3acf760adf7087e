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
- every other line (text-only requests, blank lines, lines that are not requests) is copied byte for
  byte; a line rewrite cannot read is copied too, and reported.
Memory stays bounded: one line at a time (a line over MAX_LINE_CHARS is copied in pieces), and a
byte-bounded memo of the parts built for recently seen images.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from mmprep.keys import cache_key
from mmprep.manifest.openai import is_request, request_body, request_image_parts
from mmprep.manifest.records import Malformed
from mmprep.manifest.source import MAX_LINE_CHARS, READ_ERRORS, open_text
from mmprep.serving import ServingFormatError, has_embedding_input, to_vllm_part
from mmprep.store.reader import EmbeddingCache

__all__ = ["PART_MEMO_BYTES", "TARGETS", "RequestRewriter", "RewriteSummary", "open_output"]

TARGETS = ("vllm",)  # --target: whose image-embedding content part is written
PART_MEMO_BYTES = 64 * 1024 * 1024  # parts kept for images seen again (base64 strings, counted by length)
MAX_PROBLEMS = 20  # problem lines named in the summary (all are counted)


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
        if not uuid_only and not has_embedding_input(cache.family):
            raise ServingFormatError(
                f"{cache.model_name} is a {cache.family} model: {target} takes no precomputed embeddings for it "
                "(--uuid-only still adds uuids)"
            )
        self.cache = cache
        self.uuid_only = uuid_only
        self.summary = RewriteSummary()
        self._parts: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()
        self._part_bytes = 0

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
        number = 0
        with open_text(path) as stream:
            try:
                while raw := stream.readline(MAX_LINE_CHARS):
                    number += 1
                    self.summary.lines += 1
                    if len(raw) == MAX_LINE_CHARS and not raw.endswith("\n"):  # copied through in pieces
                        self._problem(path, number, f"line longer than {MAX_LINE_CHARS} characters (copied unread)")
                        self._emit(raw, None, out)
                        while (raw := stream.readline(MAX_LINE_CHARS)) and not raw.endswith("\n"):
                            self._emit(raw, None, out)
                        self._emit(raw, None, out)
                        continue
                    self._emit(raw, self._rewrite_line(raw, path, number), out)
            except READ_ERRORS as exc:
                self._problem(path, number + 1, f"the rest of the file is unreadable: {type(exc).__name__}: {exc}")

    def _emit(self, raw: str, new: str | None, out: IO[bytes]) -> None:
        """Write `new` (with `raw`'s line ending) in place of `raw`, or `raw` itself when `new` is None."""
        data = raw.encode("utf-8", "surrogateescape")
        self.summary.bytes_in += len(data)
        if new is not None:
            data = (new + raw[len(raw.rstrip("\r\n")) :]).encode("utf-8", "surrogateescape")
        self.summary.bytes_out += len(data)
        out.write(data)

    def _rewrite_line(self, raw: str, path: str, number: int) -> str | None:
        """The new text of one line (without its line ending), or None to copy it unchanged."""
        text = raw.strip()
        if number == 1 and text.startswith("\ufeff"):
            text = text[1:].strip()
        if not text:
            return None
        try:
            obj = json.loads(text)
            if not is_request(obj):
                return self._problem(path, number, "not an OpenAI request (no body, messages or input)")
            parts = list(request_image_parts(obj))
            is_chat = "messages" in request_body(obj)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, Malformed, 4300+-digit integers
            reason = exc if isinstance(exc, Malformed) else f"invalid JSON: {type(exc).__name__}: {str(exc)[:200]}"
            return self._problem(path, number, str(reason))
        s = self.summary
        s.requests += 1
        if not parts:
            return None
        if not is_chat:
            return self._problem(path, number, "a Responses API request (input): only Chat Completions requests are rewritten")
        s.images += len(parts)
        keys = [cache_key(url) for _, url in parts]
        cached = self.cache.cached_keys(keys)
        if self.uuid_only:
            for (part, _), key in zip(parts, keys):
                if key in cached:
                    part["uuid"] = key
            hits = sum(key in cached for key in keys)
            s.replaced += hits
            s.misses += len(keys) - hits
            return _dumps(obj) if hits else None
        misses = sum(key not in cached for key in keys)
        if misses:
            s.misses += misses
            s.kept += len(keys) - misses
            return None
        try:
            new_parts = [self._part(key) for key in keys]
        except ServingFormatError as exc:
            s.invalid += len(keys)
            return self._problem(path, number, str(exc), skipped=False)
        if any(p is None for p in new_parts):  # an entry vanished between the two lookups (gc)
            s.misses += len(keys)
            return None
        for (part, _), new in zip(parts, new_parts):
            part.clear()
            part.update(new)  # type: ignore[arg-type]
        s.replaced += len(keys)
        return _dumps(obj)

    def _part(self, key: str) -> dict[str, Any] | None:
        """The image_embeds part for one cached entry, from the memo when the image was seen recently."""
        memo = self._parts.get(key)
        if memo is not None:
            self._parts.move_to_end(key)
            return memo[0]
        entry = self.cache.get_key(key)
        if entry is None:
            return None
        part = to_vllm_part(entry)
        size = _payload_size(part["image_embeds"])
        if size <= PART_MEMO_BYTES // 4:
            self._parts[key] = (part, size)
            self._part_bytes += size
            while self._part_bytes > PART_MEMO_BYTES:
                _, (_, dropped) = self._parts.popitem(last=False)
                self._part_bytes -= dropped
        return part

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


def _payload_size(payload: str | dict[str, str]) -> int:
    return len(payload) if isinstance(payload, str) else sum(len(v) for v in payload.values())


class open_output:  # noqa: N801  (a context manager used like open())
    """Where rewritten lines go: stdout (`None` or `-`), or a file written under a temporary name and
    renamed into place on success (removed on failure); a name ending in `.gz` is gzip-compressed."""

    def __init__(self, target: str | None) -> None:
        self.path = None if target in (None, "-") else Path(target)  # type: ignore[arg-type]
        self._tmp: Path | None = None
        self._files: list[IO[bytes]] = []  # innermost last: closed in reverse

    def __enter__(self) -> IO[bytes]:
        if self.path is None:
            return sys.stdout.buffer
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._files.append(open(self._tmp, "wb"))
        if self.path.suffix == ".gz":
            self._files.append(gzip.GzipFile(self.path.name[:-3], "wb", fileobj=self._files[0], mtime=0))  # type: ignore[arg-type]
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
