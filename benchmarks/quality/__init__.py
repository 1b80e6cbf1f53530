"""Merge-quality benchmark of mergekit-lite (TALL-masks protocol); run with benchmarks/quality/run.py."""
