"""Progress output: a live line on a terminal, plain periodic log lines under cron."""

from __future__ import annotations

import io
import time

from mmprep.pipeline.core import RunCounters
from mmprep.report import Reporter


class FakeTty(io.StringIO):
    """A text stream that says it is a terminal (rich then renders a live display)."""

    def isatty(self) -> bool:
        return True


def test_auto_mode_picks_bar_on_a_terminal_and_log_elsewhere():
    assert Reporter("auto", stream=FakeTty()).mode == "bar"
    assert Reporter("auto", stream=io.StringIO()).mode == "log"


def test_log_mode_prints_periodic_plain_lines():
    stream = io.StringIO()
    reporter = Reporter("log", every=0.05, stream=stream)
    counters = RunCounters(rows=10, encoded=7, cached=2, failed=1)
    reporter.start(counters)
    time.sleep(0.2)
    reporter.stop(counters)
    lines = [line for line in stream.getvalue().splitlines() if line]
    assert len(lines) >= 3  # periodic lines plus the final one
    assert all(" mmprep: rows=10 done=10 encoded=7 cached=2 " in line for line in lines)


def test_bar_mode_renders_the_live_counters():
    stream = FakeTty()
    reporter = Reporter("bar", stream=stream)
    counters = RunCounters(rows=5, encoded=3, failed=2)
    reporter.start(counters)
    reporter.note("stopping: finishing the in-flight rows")
    reporter.stop(counters)
    out = stream.getvalue()
    assert "encoded 3" in out and "failed 2" in out and "stopping" in out


def test_none_mode_is_silent():
    stream = io.StringIO()
    reporter = Reporter("none", stream=stream)
    counters = RunCounters(rows=1)
    reporter.start(counters)
    reporter.note("x")
    reporter.stop(counters)
    assert stream.getvalue() == ""
