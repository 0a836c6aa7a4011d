"""Benchmark suites: records (JSON lines with an environment header), Markdown reports, PNG plots."""
