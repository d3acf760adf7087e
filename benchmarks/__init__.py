"""mmprep's benchmark suite: `python -m benchmarks.run [--quick]` (see BENCHMARKS.md)."""
