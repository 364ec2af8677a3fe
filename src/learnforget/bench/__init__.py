"""Bench: side-by-side speed and memory benchmarks (learnforget bench)."""
