"""RAM and RAM+ (ram, ramplus_tl): mergekit 0.1.5's reinforced-agent merging methods."""

from __future__ import annotations
