"""SCE (select, calculate, erase; FuseChat, Wan et al., 2024): mergekit 0.1.5's semantics."""

from __future__ import annotations
