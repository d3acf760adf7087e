"""`python -m benchmarks.peak OUT -m MODULE ARGS... | -c CODE ARGS...`: run, then write the process's peak RSS (MB) to OUT.

The peak is VmHWM of this process's own address space, read at exit. (A parent's ru_maxrss of its
children is no good here: Linux carries the parent's RSS at fork into the child's maxrss across exec.)
"""

from __future__ import annotations

import atexit
import runpy
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """VmHWM of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    out, mode, target, *args = sys.argv[1:]
    atexit.register(lambda: Path(out).write_text(f"{peak_rss_mb():.1f}"))
    sys.argv = [target, *args]
    if mode == "-m":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        exec(compile(target, "<peak>", "exec"), {"__name__": "__main__"})


if __name__ == "__main__":
    main()
