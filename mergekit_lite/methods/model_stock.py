"""Model Stock (Jang et al., 2024): the interpolation ratio from the angle between task vectors."""

from __future__ import annotations
