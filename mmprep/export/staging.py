"""An export directory is built under a hidden sibling name and renamed into place whole.

So a reader never sees a half export: until the final rename, OUT does not exist (or keeps its old
content); a killed export leaves only the hidden staging directory, which the next export removes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from mmprep.errors import UsageError
from mmprep.store.shards import fsync_dir

_STAGING = ".{name}.mmprep-export-{pid}.tmp"
PART_SUFFIX = ".part"  # files are written as "<name>.part" and renamed at publish: no glob for *.npy finds them early
_OLD = ".{name}.mmprep-old-{pid}.tmp"


class StagedDir:
    """Build an export in `path` (a hidden sibling of `out`), then `publish()` it as `out`."""

    def __init__(self, out: Path, *, overwrite: bool, owned: Callable[[str], bool]) -> None:
        """`owned(name)`: whether a top-level name in OUT is one an export of this format writes
        (--overwrite refuses to delete anything else)."""
        self.out = out.absolute()
        self.overwrite = overwrite
        self._check_out(overwrite, owned)
        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create {parent}: {exc.strerror or exc}") from None
        self._remove_stale(parent)
        self.path = parent / _STAGING.format(name=self.out.name, pid=os.getpid())
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            self.path.mkdir()
        except OSError as exc:
            raise UsageError(f"cannot write next to {self.out}: {exc.strerror or exc}") from None

    def _check_out(self, overwrite: bool, owned: Callable[[str], bool]) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file; give a directory")
        names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        if names and not overwrite:
            raise UsageError(f"--out {out} is not empty ({len(names)} entries); pass --overwrite to replace it")
        foreign = [n for n in names if not owned(n)]
        if foreign:
            raise UsageError(
                f"--out {out} holds files an export does not write ({', '.join(foreign[:3])}"
                f"{' …' if len(foreign) > 3 else ''}); refusing to delete them: choose another directory"
            )

    def _remove_stale(self, parent: Path) -> None:
        """Staging directories of killed exports to the same OUT (their process is gone)."""
        suffix = ".tmp"
        for pattern in (_STAGING, _OLD):
            prefix = pattern.format(name=self.out.name, pid="\0").split("\0")[0]
            for path in parent.glob(glob_escape(prefix) + "*" + suffix):
                pid = path.name[len(prefix) : -len(suffix)]
                if pid.isdigit() and not _alive(int(pid)):
                    shutil.rmtree(path, ignore_errors=True)

    def publish(self) -> None:
        """Give every file its final name, then rename the staging directory to OUT (an old OUT is
        moved aside first, then deleted)."""
        for path in sorted(self.path.rglob("*" + PART_SUFFIX)):
            os.rename(path, path.with_name(path.name.removesuffix(PART_SUFFIX)))
        fsync_tree(self.path)
        if self.out.is_dir() and any(self.out.iterdir()) and not self.overwrite:
            raise UsageError(f"--out {self.out} was filled by someone else meanwhile; pass --overwrite to replace it")
        old = None
        if self.out.is_dir() and any(self.out.iterdir()):
            old = self.out.parent / _OLD.format(name=self.out.name, pid=os.getpid())
            shutil.rmtree(old, ignore_errors=True)
            os.rename(self.out, old)
        try:
            os.rename(self.path, self.out)  # replaces an empty directory in one step
        except OSError as exc:
            if old is not None:
                os.rename(old, self.out)
            raise UsageError(
                f"cannot rename the finished export into {self.out} ({exc.strerror or exc}; a mount point?): "
                "give a directory inside it"
            ) from None
        fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def part_path(path: Path) -> Path:
    """Where a file that will be `path` once published is written meanwhile."""
    return path.with_name(path.name + PART_SUFFIX)


def fsync_tree(root: Path) -> None:
    """Make every file and directory under `root` durable before it is renamed into view."""
    for directory, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(directory))


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
