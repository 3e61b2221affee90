"""Benchmarks: `python -m bench` runs them all and regenerates docs/PERFORMANCE.md."""
