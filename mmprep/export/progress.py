"""Progress of an export: the run reporter's bar (terminal) or log lines (cron), with export counters."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mmprep.report import Reporter


@dataclass
class ExportCounters:
    """Live counters of one export (read by the progress thread)."""

    total: int
    unit: str = "rows"
    done: int = 0
    written: int = 0
    skipped: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def rate(self) -> float:
        elapsed = self.elapsed()
        return self.done / elapsed if elapsed > 0 else 0.0


class ExportReporter(Reporter):
    """`Reporter` with an export's counts: done/total on the bar; written, skipped, bytes, rate below it."""

    title_of = {"encoded": "exporting"}

    def detail(self, c: ExportCounters) -> str:  # type: ignore[override]
        return f"written {c.written} · skipped {c.skipped} · {c.bytes / 2**20:.1f} MiB · {c.rate():.0f} {c.unit}/s"

    def _log(self, c: ExportCounters) -> None:  # type: ignore[override]
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        print(
            f"{stamp} mmprep export: {c.unit}={c.done}/{c.total} written={c.written} skipped={c.skipped} "
            f"bytes={c.bytes} {c.unit}/s={c.rate():.0f} elapsed={c.elapsed():.0f}s",
            file=self.stream,
            flush=True,
        )
