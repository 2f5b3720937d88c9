"""Benchmark: datasets, interleaved side-by-side timing, metrics and reports."""
