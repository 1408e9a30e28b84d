"""Benchmarks run by ``fovea-vla bench <name>``: they print a table and append it to docs/BENCHMARKS.md."""
