"""The benchmark suite's smallest pieces run end to end and produce a table of positive figures (no timing asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benchmark sections end to end
run = pytest.importorskip("benchmarks.run")


def test_quick_benchmark_table_has_positive_figures(tmp_path: Path) -> None:
    scale = run.Scale(
        check_rows=6, encode_rows=4, fast_rows=2, diff_images=2, cached_rows=(20, 60), clip_layers=1, batch_size=2
    )
    rows = run.run(["check", "encode", "fast", "cached"], scale, tmp_path)
    table = run.render(rows)
    assert table.startswith("| # | measured |") and len(rows) == 6
    for row in rows:
        assert row.values and all(value > 0 for value in row.values.values()), row
    fast_diff = next(r for r in rows if "max_abs" in r.values)
    assert fast_diff.values["min_cos"] <= 1.0 + 1e-6
