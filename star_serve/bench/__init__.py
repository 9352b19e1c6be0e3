"""Benchmarks: `star-serve bench NAME` measures side by side in one run and writes JSON, Markdown and PNG."""
