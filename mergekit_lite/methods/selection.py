"""Per-entry selection between a base and a model: nearswap and arcee_fusion (mergekit 0.1.5's semantics)."""

from __future__ import annotations
