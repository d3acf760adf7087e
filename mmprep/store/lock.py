"""The writer lock: at most one process writes a cache directory at a time; readers never lock.

An exclusive `flock` on `<root>/.lock`. The kernel drops it when the holder exits or is killed,
so a crashed writer never leaves the cache locked. The file's content (pid, host, start time) is
only for the error message of the next writer. `flock` is not reliable on some network file
systems; keep cache directories on local disks.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from mmprep.errors import CacheLockedError, UsageError
from mmprep.store.layout import CacheLayout

LOCK_NAME = ".lock"
_POLL_S = 0.05


class WriterLock:
    """Exclusive writer lock of one cache directory; use as a context manager."""

    def __init__(self, root: Path | str, wait: float | None = 0) -> None:
        """`wait`: seconds to keep trying (0 = fail at once, None = wait forever)."""
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.wait = wait
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise CacheLockedError naming the holder."""
        if self._fd is not None:
            raise RuntimeError("WriterLock is not re-entrant")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            read_only = read_only_part(self.root)
            if read_only is not None:
                raise OSError(errno.EACCES, f"{read_only} is not writable")
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a file in the way, no permission, a read-only file system, ...
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise UsageError(
                    f"cache directory {self.root} is read-only ({exc.strerror or exc}): this command writes it; "
                    "stats, show, verify (without --repair), export and rewrite read it as it is"
                ) from exc
            raise UsageError(f"cannot use {self.root} as a cache directory: {exc.strerror or exc}") from exc
        deadline = None if self.wait is None else time.monotonic() + self.wait
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait is None else fcntl.LOCK_NB))
                    break
                except BlockingIOError:
                    if deadline is None or time.monotonic() >= deadline:
                        raise CacheLockedError(_locked_message(self.root, _read_holder(fd))) from None
                    time.sleep(_POLL_S)
            holder = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.time(),
                "command": " ".join(sys.argv)[:200],
            }
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(holder).encode(), 0)
            except OSError:  # a full disk: the note only names the holder; the flock is the lock
                pass
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (clearing the holder note first, so it never names a past holder)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def read_only_part(root: Path) -> Path | None:
    """The first part of a cache directory this process may not write (the directory, its index files, shards/),
    or None; a read-only mount makes them all read-only."""
    layout = CacheLayout(root)
    index = layout.index
    for path in (
        root,
        index,
        index.with_name(f"{index.name}-wal"),
        index.with_name(f"{index.name}-shm"),
        layout.shards,
    ):
        if path.exists() and not os.access(path, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
            return path
    return None


def lock_holder(root: Path | str) -> str | None:
    """Who holds the writer lock right now ("pid 12 on host since …"), or None when nobody does.

    Probes with a momentary non-blocking shared lock; it never waits.
    """
    path = Path(root) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a lock file this user may not read: whether a writer runs is unknown
        return f"unknown (cannot read {path}: {exc.strerror or exc})"
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(_read_holder(fd))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict[str, object]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, object]) -> str:
    if not holder.get("pid"):
        return "an unknown process (it is just starting)"
    started = holder.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder['pid']} on {holder.get('host', '?')} since {since} ({holder.get('command', '')})"


def _locked_message(root: Path, holder: dict[str, object]) -> str:
    return (
        f"cache directory {root} is being written by {_describe(holder)}; "
        "only one writer at a time (wait for it to finish, or give a wait time)"
    )
