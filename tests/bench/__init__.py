"""Benchmarks (`nox -s bench`): this daemon beside the original `qwen serve`, printed, never asserted."""
