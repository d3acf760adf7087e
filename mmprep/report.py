"""Progress while a run goes (a rich progress bar on a terminal, plain log lines under cron) and the summary after."""

from __future__ import annotations

import collections
import io
import json
import os
import sys
import threading
import time
from collections.abc import Iterable
from typing import IO, Any

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from mmprep.export.progress import ExportCounters
from mmprep.store.index import utc_iso

RATE_WINDOW = 30.0  # seconds of history behind the rate and ETA of log lines
FIRST_ERRORS = 5  # error records printed at the end of a run
SUMMARY_WIDTH = 200  # columns of the summary when it goes to a log, not a terminal
LOG_WIDTH = 100  # columns of tables (stats) when they go to a log or a pipe
ESTIMATE_BLOCK = 1 << 20  # bytes read at a time while counting a manifest's lines
GZIP_MAGIC = b"\x1f\x8b"


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 row', '2 rows' (`many` for irregular plurals)."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def estimate_rows(paths: Iterable[str]) -> int | None:
    """The manifests' rows, as the progress total (exact once the manifests are read): lines of a JSONL or txt
    file, lines less the header of a CSV/TSV, a parquet file's row count; None when a manifest has no size to
    measure (stdin) or counting it means decompressing it (gzip)."""
    from mmprep.manifest.formats import manifest_format

    total = 0
    for path in paths:
        if path == "-":
            return None
        try:
            kind = manifest_format(path)
            if kind == "parquet":
                import pyarrow.parquet as pq

                total += pq.ParquetFile(path).metadata.num_rows
                continue
            with open(path, "rb") as f:
                if f.read(2) == GZIP_MAGIC:
                    return None
                f.seek(0)
                lines, last = 0, b"\n"
                while block := f.read(ESTIMATE_BLOCK):
                    lines += block.count(b"\n")
                    last = block[-1:]
                lines += last != b"\n"
            total += max(lines - (kind in ("csv", "tsv")), 0)
        except Exception:  # an unreadable file, no pyarrow, ...: the run reports it; the bar just has no total
            return None
    return total


class _BarAndCounts(Progress):
    """A rich progress bar (count, percentage, elapsed, ETA; a pulse when the total is unknown) with the run's
    counts on a line of their own below it, so a narrow terminal never cuts them off."""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            yield Text("  " + task.fields.get("detail", ""), overflow="fold")


class Reporter:
    """Shows a run's live counters; `mode` is bar, log or none (auto picks bar on a terminal, log elsewhere).
    `done_word` names what a finished row is: "encoded" (encode) or "ok" (check). The bar reads `done` and
    `total` of the counters; a subclass for other counters overrides `title`, `detail` and `_log`."""

    title_of = {"encoded": "encoding", "ok": "checking"}

    def __init__(
        self, mode: str = "auto", every: float = 10.0, stream: IO[str] | None = None, done_word: str = "encoded"
    ) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "log"
        self.mode = mode
        self.every = every
        self.done_word = done_word
        self.title = self.title_of.get(done_word, done_word)
        self.console = Console(file=self.stream, stderr=self.stream is sys.stderr, soft_wrap=True)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress: Progress | None = None
        self._task: Any = None
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def start(self, counters: Any, manifests: Iterable[str] = ()) -> None:
        if self.mode == "none":
            return
        if self.mode == "bar":
            self._progress = _BarAndCounts(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=30),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                TextColumn("eta {task.fields[eta]}"),
                console=self.console,
                refresh_per_second=4,
            )
            self._task = self._progress.add_task(self.title, total=None, detail="", eta="-")
            self._progress.start()
        self._samples.append((time.monotonic(), counters.done))  # the rate, and so the ETA, counts from the start
        self._thread = threading.Thread(
            target=self._tick, args=(counters, list(manifests)), name="mmprep-progress", daemon=True
        )
        self._thread.start()

    def stop(self, counters: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._progress is not None:
            self._update_bar(counters)
            self._progress.stop()
        elif self.mode == "log":
            self._log(counters)

    def note(self, message: str) -> None:
        """A one-off message (e.g. 'stopping…') on a line of its own, above the bar."""
        if self.mode != "none":
            self.console.print(f"[yellow]{escape(message)}[/yellow]", soft_wrap=True)  # one line in logs

    def _tick(self, counters: Any, manifests: list[str]) -> None:
        if manifests and counters.rows_expected is None:
            counters.rows_expected = estimate_rows(manifests)
        interval = 0.25 if self._progress is not None else self.every
        while not self._stop.wait(interval):
            if self._progress is not None:
                self._update_bar(counters)
            else:
                self._log(counters)

    def detail(self, c: Any) -> str:
        """The counts next to the bar: encoded (and committed), cached, failed, images/s."""
        parts = [f"{self.done_word} {c.encoded}"]
        if self.done_word == "encoded":
            parts[0] += f" ({c.committed} committed)"
            if c.content_dedup:
                parts.append(f"content dedup {c.content_dedup}")
        if c.cached or c.refreshed:
            parts.append(f"cached {c.cached + c.refreshed}")
        if c.skipped_failed:
            parts.append(f"skipped {c.skipped_failed} failed before")
        parts.append(f"failed {c.failed}")
        parts.append(f"{c.images_per_s():.1f} img/s")
        return " · ".join(parts)

    def _update_bar(self, c: Any) -> None:
        assert self._progress is not None
        eta = self._eta(c.done, c.total)
        self._progress.update(
            self._task, completed=c.done, total=c.total, detail=self.detail(c), eta="-" if eta is None else clock(eta)
        )

    def _eta(self, done: int, total: int | None) -> float | None:
        """Seconds left at the rate of the last RATE_WINDOW seconds (from the start at first); None when unknown."""
        rate = self._rate(done)
        return max(total - done, 0) / rate if total is not None and rate else None

    def _rate(self, done: int) -> float | None:
        """Rows per second over the last RATE_WINDOW seconds (None until two samples exist)."""
        now = time.monotonic()
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW:
            self._samples.popleft()
        (t0, d0) = self._samples[0]
        return (done - d0) / (now - t0) if now > t0 and len(self._samples) > 1 else None

    def _log(self, c: Any) -> None:
        done, total = c.done, c.total
        eta = self._eta(done, total)
        line = f"{utc_iso(time.time())} mmprep: done={done}/{'?' if total is None else total}"
        if total:
            line += f" ({min(done / total, 1.0):.0%})"
        line += f" {self.done_word}={c.encoded}"
        if self.done_word == "encoded":
            line += f" committed={c.committed} content_dedup={c.content_dedup}"
        line += (
            f" cached={c.cached + c.refreshed} duplicates={c.duplicates} failed={c.failed}"
            f" skipped={c.skipped_failed + c.skipped_other} img/s={c.images_per_s():.1f} elapsed={c.elapsed():.0f}s"
        )
        if eta is not None:
            line += f" eta={eta:.0f}s"
        print(line, file=self.stream, flush=True)


def print_unpadded(console: Console, renderable: RenderableType, width: int = LOG_WIDTH) -> None:
    """`renderable` as rich draws it on a terminal; elsewhere (cron logs, pipes) drawn `width` columns wide,
    without colours and without the blanks rich pads each line with, so logs hold no trailing padding."""
    if console.is_terminal:
        console.print(renderable)
        return
    drawn = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
    with drawn.capture() as capture:
        drawn.print(renderable)
    console.file.write("".join(line.rstrip() + "\n" for line in capture.get().splitlines()))
    console.file.flush()


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss, like the bar's elapsed time."""
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def first_errors(path: str, limit: int = FIRST_ERRORS) -> list[dict[str, Any]]:
    """The first `limit` error records of a run's errors file (none when it cannot be read)."""
    records: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if len(records) >= limit:
                    break
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return records


def error_line(record: dict[str, Any]) -> str:
    """One error record as a line: where, kind, message, URL."""
    where = f"{os.path.basename(str(record.get('source')))}:{record.get('line')}"
    url = record.get("url") or ""
    url = url if len(url) <= 80 else url[:77] + "..."
    return f"{where} {record.get('kind')}: {record.get('message')}" + (f"  ({url})" if url else "")


def print_errors(errors_file: str, failed: int, console: Console) -> None:
    """The first few error records of a run, and where the rest are."""
    records = first_errors(errors_file)
    if not records:
        return
    more = f" (first {len(records)} of {failed})" if failed > len(records) else ""
    console.print(f"[bold]errors[/bold]{more}, all in {escape(errors_file)}:", soft_wrap=True)
    for record in records:
        console.print("  " + escape(error_line(record)), soft_wrap=True, highlight=False)


def exit_reason(s: Any) -> str:
    """Why the run exits with its code, in words."""
    if s.exit_code == 0:
        return "0"
    if s.status == "interrupted":
        return f"{s.exit_code} (interrupted)"
    if s.status == "failed":
        return f"{s.exit_code} (the run gave up: see error)"
    return f"{s.exit_code} ({plural(s.new_failures, 'row')} failed that had not failed before)"


def print_run_summary(summary: Any, console: Console) -> None:
    """Human summary of one run, then its first error records."""
    s = summary
    table = Table(title=f"mmprep run {s.run_id} ({s.status})", show_header=False, box=None, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", f"{escape(s.model)}  [dim]{s.fingerprint[:16]}[/dim]")
    table.add_row("rows", str(s.rows) + (f" ({s.other_shard} in other --shard parts)" if s.other_shard else ""))
    table.add_row("encoded", f"[green]{s.encoded}[/green]")
    if s.content_dedup:
        table.add_row("content dedup", f"{s.content_dedup} (same bytes as a cached entry: copied, not encoded)")
    table.add_row("already cached", str(s.cached))
    if s.refreshed:
        table.add_row("re-validated", f"{s.refreshed} (source unchanged)")
    if s.duplicates:
        table.add_row(
            "duplicates", f"{plural(s.duplicates, 'row')} repeating a URL of this run (the first row's id is kept)"
        )
    failed = f"[red]{s.failed}[/red]" if s.failed else "0"
    if s.failed and s.new_failures != s.failed:
        failed += f" ({s.new_failures} new, {s.failed - s.new_failures} failed again as before)"
    table.add_row("failed", failed)
    for kind, n in s.failures_by_kind.items():
        table.add_row("", f"  {kind}: {n}")
    if s.retried_failures:
        table.add_row(
            "retried", f"{plural(s.retried_failures, 'earlier failure')} (retryable, settings changed, or expired)"
        )
    if s.skipped_failed:
        table.add_row(
            "skipped", f"{plural(s.skipped_failed, 'row')} that failed permanently before (see --retry-permanent-after)"
        )
    if s.skipped_other:
        table.add_row("skipped", f"{plural(s.skipped_other, 'row')} that had not failed before (--retry-failed)")
    if s.error:
        table.add_row("error", f"[red]{escape(s.error)}[/red] (what was committed stays; rerun to go on)")
    for other in s.other_decodes:
        table.add_row(
            "other decode",
            f"[yellow]{other['entries']} entries of this model decoded with {escape(other['flags'])} "
            f"are not reused; pass {escape(other['flags'])} to use them[/yellow]",
        )
    table.add_row("throughput", f"{s.images_per_s:.1f} images/s encoded, over {s.duration_s:.1f}s")
    if getattr(s, "first_batch_s", None) is not None:
        table.add_row("first batch", f"{s.first_batch_s:.1f}s after the command started (model loading included)")
    if getattr(s, "model_load_s", None) is not None:
        table.add_row("model load", f"{s.model_load_s:.1f}s, while rows were read, fetched and preprocessed")
    table.add_row("cache", escape(s.cache_dir))
    table.add_row("exit", exit_reason(s))
    print_unpadded(console, table, SUMMARY_WIDTH)  # logs: whole lines, no padding
    if s.failed:
        print_errors(s.errors_file, s.failed, console)
    if s.status == "interrupted":
        console.print(interrupted_line(s), soft_wrap=True)


def interrupted_line(s: Any) -> str:
    """The last line of an interrupted run: what is safe, and that a rerun goes on from there."""
    left = "" if s.rows_left is None else f", about {plural(s.rows_left, 'row')} left"
    return f"interrupted: {s.encoded + s.content_dedup} committed{left}; rerun the same command to continue"


class ExportReporter(Reporter):
    """`Reporter` with an export's counts: done/total on the bar; written, skipped, bytes, rate below it."""

    title_of = {"encoded": "exporting"}

    def detail(self, c: ExportCounters) -> str:
        replaced = f" · replaced {c.replaced}" if c.replaced else ""
        return f"written {c.written}{replaced} · skipped {c.skipped} · {c.bytes / 2**20:.1f} MiB · {c.rate():.0f} {c.unit}/s"

    def _log(self, c: ExportCounters) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        replaced = f"replaced={c.replaced} " if c.replaced else ""
        print(
            f"{stamp} mmprep export: {c.unit}={c.done}/{c.total} written={c.written} {replaced}skipped={c.skipped} "
            f"bytes={c.bytes} {c.unit}/s={c.rate():.0f} elapsed={c.elapsed():.0f}s",
            file=self.stream,
            flush=True,
        )
