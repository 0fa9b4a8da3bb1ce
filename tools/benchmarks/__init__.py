"""Benchmarks that write JSON results (not timed tests)."""
