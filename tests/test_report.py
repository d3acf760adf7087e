"""Progress output: a live line on a terminal, plain periodic log lines under cron."""

from __future__ import annotations

import gzip
import io
import re
import time

from mmprep.pipeline.core import RunCounters
from mmprep.report import Reporter, estimate_rows


class FakeTty(io.StringIO):
    """A text stream that says it is a terminal (rich then renders a live display)."""

    def isatty(self) -> bool:
        return True


def test_auto_mode_picks_bar_on_a_terminal_and_log_elsewhere():
    assert Reporter("auto", stream=FakeTty()).mode == "bar"
    assert Reporter("auto", stream=io.StringIO()).mode == "log"


def wait_for(condition, timeout: float = 30.0) -> None:
    """Until `condition()` holds (the reporter's thread has written), however slowly the machine runs it."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_log_mode_prints_periodic_plain_lines():
    stream = io.StringIO()
    reporter = Reporter("log", every=0.05, stream=stream)
    counters = RunCounters(rows=10, encoded=7, committed=4, cached=2, failed=1, manifests_read=True)
    reporter.start(counters)
    wait_for(lambda: stream.getvalue().count("\n") >= 2)  # two periodic lines
    reporter.stop(counters)
    lines = [line for line in stream.getvalue().splitlines() if line]
    assert len(lines) >= 3  # periodic lines plus the final one
    assert all(" mmprep: done=10/10 (100%) encoded=7 committed=4 " in line and " failed=1 " in line for line in lines)
    assert lines[0].split()[0].endswith("Z")  # UTC timestamps


def test_log_total_is_the_manifest_line_count_until_the_manifest_is_read(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(f'"https://x.example/{i}.png"\n' for i in range(40)))
    stream = io.StringIO()
    reporter = Reporter("log", every=0.05, stream=stream)
    counters = RunCounters(rows=12, encoded=3)
    reporter.start(counters, [str(manifest)])
    wait_for(lambda: " done=3/40 (8%) " in stream.getvalue())
    reporter.stop(counters)
    assert counters.rows_expected == 40 and " done=3/40 (8%) " in stream.getvalue()
    gz = tmp_path / "m.jsonl.gz"
    gz.write_bytes(gzip.compress(manifest.read_bytes()))
    assert estimate_rows([str(gz)]) is None and estimate_rows(["-"]) is None  # unknown: a spinner, counts only


def test_bar_mode_renders_the_live_counters():
    stream = FakeTty()
    reporter = Reporter("bar", stream=stream)
    counters = RunCounters(rows=5, encoded=3, committed=2, failed=2, manifests_read=True)
    reporter.start(counters)
    reporter.note("stopping: finishing the in-flight rows")
    reporter.stop(counters)
    out = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", stream.getvalue())  # without the terminal's colour codes
    assert "encoded 3 (2 committed)" in out and "failed 2" in out and "stopping" in out
    assert "5/5" in out and "100%" in out and "eta" in out  # a bar with count, percentage, elapsed and ETA


def test_none_mode_is_silent():
    stream = io.StringIO()
    reporter = Reporter("none", stream=stream)
    counters = RunCounters(rows=1)
    reporter.start(counters)
    reporter.note("x")
    reporter.stop(counters)
    assert stream.getvalue() == ""
