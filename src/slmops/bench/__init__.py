"""Benchmarks: hardware fingerprints and result files (JSON + markdown) that say where they came from."""

from slmops.bench.results import machine_fingerprint, machine_line, markdown_table, write_results

__all__ = ["machine_fingerprint", "machine_line", "markdown_table", "write_results"]
