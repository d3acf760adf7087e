"""Fault injection for crash tests: `MMPREP_FAULT=<point>[:N]` makes the process SIGKILL itself
the Nth time (default 1st) it reaches that point (MMPREP_FAULT_ONCE: see _first_time).

The points sit where a crash is most dangerous (between a shard's rename and its index commit,
inside the index transaction, ...). Unset — as always outside tests — it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

POINTS = frozenset(
    {
        "after_fetch",
        "in_encode",
        "after_shard_write",
        "in_index_commit",  # encode
        "merge_after_copy",
        "merge_in_commit",  # merge
        "export_after_file",
        "ec_before_rename",  # export
        "before_shard_rename",  # any shard write (encode, gc): its temporary file is whole, not yet renamed
        "gc_after_rename",
        "gc_after_commit",  # gc compaction: new shard in place / index repointed, old file not deleted
    }
)
_reached: Counter[str] = Counter()
_lock = threading.Lock()


def fault_point(name: str) -> None:
    """Die here, like `kill -9` would, when MMPREP_FAULT names this point (and count)."""
    spec = os.environ.get("MMPREP_FAULT")
    if not spec or spec.partition(":")[0] != name:
        return
    with _lock:
        _reached[name] += 1
        if _reached[name] >= int(spec.partition(":")[2] or 1) and _first_time():
            os.kill(os.getpid(), signal.SIGKILL)


def _first_time() -> bool:
    """With MMPREP_FAULT_ONCE=<file>, only the process that creates that file dies (a restarted
    worker of a distributed run then goes on); without it, always."""
    marker = os.environ.get("MMPREP_FAULT_ONCE")
    if not marker:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
