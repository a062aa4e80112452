"""Benchmarks: each prints ratios measured side by side in one run (``fedpersona bench WHAT``, docs/performance.md)."""
