"""Merge-quality benchmark on a real pretrained transformer (all-MiniLM-L6-v2) with generated text tasks."""
