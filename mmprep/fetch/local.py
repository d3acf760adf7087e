"""Local files: paths (relative ones against the current directory) and `file://` URLs, readable
only inside the allowed directories.

Everything here blocks on the disk; the fetcher calls it from a worker thread.
"""

from __future__ import annotations

import os
import stat
from urllib.parse import unquote, urlsplit

from mmprep.errors import ErrorKind, RowError


def path_of(url: str) -> str:
    """The filesystem path a plain path or a `file://` URL names (percent-escapes decoded for URLs)."""
    if url[:5].lower() != "file:":
        return url
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unbalanced "[" in the host part
        raise _bad(f"not a valid file URL: {exc}") from None
    if parts.netloc not in ("", "localhost"):
        raise _bad(f"file URL names another host ({parts.netloc!r}); only local files can be read")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise _bad("file URL has no absolute path (expected file:///abs/path)")
    return path


def resolve_inside(path: str, allowed_dirs: tuple[str, ...]) -> str:
    """`path` with every symlink and `..` resolved, provided the result lies in one of `allowed_dirs`.

    `allowed_dirs` must already be resolved with os.path.realpath.
    """
    if not allowed_dirs:
        raise _bad(f"{path!r} is a local path, and local files are not allowed (see --allow-local-dir)")
    try:
        real = os.path.realpath(path)
    except (ValueError, OSError) as exc:  # NUL byte, or an OS error while resolving
        raise _bad(f"cannot resolve path: {exc}") from None
    if any(os.path.commonpath([directory, real]) == directory for directory in allowed_dirs):
        return real
    via = f" (it resolves to {real})" if real != os.path.normpath(path) else ""
    raise _bad(f"{path} is outside the allowed local directories{via}")


def read_file(path: str, max_bytes: int) -> bytes:
    """Read a regular file, failing with too_large once it holds more than `max_bytes` bytes."""
    try:
        # O_NONBLOCK: a FIFO planted under an allowed directory must not hang the read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _bad(f"cannot open {path}: {exc.strerror or exc}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise _bad(f"{path} is not a regular file")
    with os.fdopen(fd, "rb", buffering=0) as file:
        try:
            # Sized by the file (a max_bytes + 1 buffer would be allocated, then shrunk, for every row);
            # a file that grew since fstat is read on, up to the limit.
            data = file.read(min(info.st_size, max_bytes) + 1)
            while len(data) <= max_bytes and (more := file.read(min(1 << 16, max_bytes + 1 - len(data)))):
                data += more
        except OSError as exc:
            raise _bad(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise RowError(ErrorKind.TOO_LARGE, f"file is larger than max_bytes={max_bytes:,}")
    return data


def _bad(reason: str) -> RowError:
    return RowError(ErrorKind.BAD_PATH, reason)
