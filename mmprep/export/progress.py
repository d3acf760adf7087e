"""Progress of an export: its live counters, and what shows them (`mmprep.report.ExportReporter` in the CLI).

Exports take any `ProgressReporter`, so export/ never imports the terminal module report.py."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class ExportCounters:
    """Live counters of one export (read by the progress thread)."""

    total: int
    unit: str = "rows"
    done: int = 0
    written: int = 0
    replaced: int = 0  # vllm-ec: entries rewritten in place (the summary counts them apart from `written`)
    skipped: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def rate(self) -> float:
        elapsed = self.elapsed()
        return self.done / elapsed if elapsed > 0 else 0.0


class ProgressReporter(Protocol):
    """Shows an export's counters while it runs: started once, stopped once (also when the export fails)."""

    def start(self, counters: ExportCounters) -> None: ...

    def stop(self, counters: ExportCounters) -> None: ...
