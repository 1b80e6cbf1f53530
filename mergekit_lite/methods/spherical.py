"""Spherical methods beyond slerp: nuslerp, multislerp, karcher (mergekit 0.1.5's names and semantics)."""

from __future__ import annotations
