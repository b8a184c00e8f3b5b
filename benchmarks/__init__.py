"""Benchmarks: scripts that write benchmarks/results/*.json and feed benchmarks/REPORT.md."""
