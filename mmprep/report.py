"""Progress while a run goes (a rich bar on a terminal, plain log lines under cron) and the summary after."""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text


class Reporter:
    """Shows a run's live counters; `mode` is bar, log or none (auto picks bar on a TTY)."""

    def __init__(self, mode: str = "auto", every: float = 10.0, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "log"
        self.mode = mode
        self.every = every
        self.console = Console(file=self.stream, stderr=self.stream is sys.stderr)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Live | None = None

    def start(self, counters: Any) -> None:
        if self.mode == "none":
            return
        if self.mode == "bar":
            self._live = Live(self._line(counters), console=self.console, refresh_per_second=4, transient=False)
            self._live.start()
        self._thread = threading.Thread(target=self._tick, args=(counters,), name="mmprep-progress", daemon=True)
        self._thread.start()

    def stop(self, counters: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._live is not None:
            self._live.update(self._line(counters))
            self._live.stop()
        elif self.mode == "log":
            self._log(counters)

    def note(self, message: str) -> None:
        """A one-off message (e.g. 'stopping…') that does not disturb the bar."""
        if self.mode != "none":
            self.console.print(f"[yellow]{escape(message)}[/yellow]", soft_wrap=True)  # one line in logs

    def _tick(self, counters: Any) -> None:
        interval = 0.25 if self._live is not None else self.every
        while not self._stop.wait(interval):
            if self._live is not None:
                self._live.update(self._line(counters))
            else:
                self._log(counters)

    def _line(self, c: Any) -> Text:
        return Text.assemble(
            ("encoding ", "bold"),
            f"rows {c.done}/{c.rows} read · ",
            (f"encoded {c.encoded}", "green"),
            f" · cached {c.cached} · ",
            (f"failed {c.failed}", "red" if c.failed else ""),
            f" · {c.images_per_s():.1f} img/s · {c.elapsed():.0f}s",
        )

    def _log(self, c: Any) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        print(
            f"{stamp} mmprep: rows={c.rows} done={c.done} encoded={c.encoded} cached={c.cached} "
            f"duplicates={c.duplicates} failed={c.failed} img/s={c.images_per_s():.1f} "
            f"elapsed={c.elapsed():.0f}s",
            file=self.stream,
            flush=True,
        )


def print_run_summary(summary: Any, console: Console) -> None:
    """Human summary of one run."""
    s = summary
    table = Table(title=f"mmprep run {s.run_id} ({s.status})", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", f"{s.model}  [dim]{s.fingerprint[:16]}[/dim]")
    table.add_row("rows", str(s.rows))
    table.add_row("encoded", f"[green]{s.encoded}[/green]")
    table.add_row("already cached", str(s.cached))
    table.add_row("duplicates in run", str(s.duplicates))
    table.add_row("failed", f"[red]{s.failed}[/red]" if s.failed else "0")
    for kind, n in s.failures_by_kind.items():
        table.add_row("", f"  {kind}: {n}")
    if s.skipped_failed:
        table.add_row("skipped", f"{s.skipped_failed} rows that failed permanently before (not retried)")
    if s.skipped_other:
        table.add_row("skipped", f"{s.skipped_other} rows that had not failed before (--retry-failed)")
    if s.error:
        table.add_row("error", f"[red]{escape(s.error)}[/red] (what was committed stays; rerun to go on)")
    for other in s.other_decodes:
        table.add_row(
            "other decode",
            f"[yellow]{other['entries']} entries of this model decoded with {escape(other['flags'])} "
            f"are not reused; pass {escape(other['flags'])} to use them[/yellow]",
        )
    table.add_row("throughput", f"{s.images_per_s:.1f} images/s over {s.duration_s:.1f}s")
    table.add_row("cache", s.cache_dir)
    if s.failed:
        table.add_row("errors", s.errors_file)
    console.print(table)
