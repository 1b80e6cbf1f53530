"""TALL masks and the consensus mask (Wang et al., ICML 2024)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .checks import _check_stacked


def tall_mask(tau_t: Tensor, tau_mtl: Tensor, lam: float) -> Tensor:
    """TALL task mask |tau_t| > lam * |tau_mtl - tau_t| (strict), i.e. where task t dominates.

    Strict ">" means an entry with tau_t == 0 is never in the mask, whatever lam.
    """
    lam_f = float(lam)
    if not lam_f >= 0.0 or math.isinf(lam_f):  # rejects NaN, negatives and inf
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if tau_t.shape != tau_mtl.shape:
        raise ValueError(
            f"tau_t and tau_mtl must have the same shape, got {tuple(tau_t.shape)} and {tuple(tau_mtl.shape)}"
        )
    return tau_t.abs() > lam_f * (tau_mtl - tau_t).abs()


def consensus_mask(masks: Tensor, k: int) -> Tensor:
    """Consensus mask: entries used by at least k of the T task masks (count over T >= k).

    k = 0 keeps everything; k > T keeps nothing.
    """
    _check_stacked("masks", masks)
    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool tensor [T, ...], got dtype {masks.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    return masks.sum(dim=0, dtype=torch.int64) >= k
