"""EMR-Merging (Huang et al., NeurIPS 2024): elect one unified task vector, then a mask and a rescaler per task.

Task t comes back as λ_t · (m_t ⊙ τ_uni). The election follows the authors' reference code: the
sign of an entry is that of Σ_t τ_t, with a sum of exactly 0 counted as negative, and the
magnitude is the largest |τ_t| among the tasks with that sign.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def _check_same_shape(deltas: Sequence[Tensor]) -> None:
    if len(deltas) == 0:
        raise ValueError("EMR needs at least one task vector")
    shape = deltas[0].shape
    for i, d in enumerate(deltas):
        if d.shape != shape:
            raise ValueError(f"task vector {i} has shape {tuple(d.shape)}, expected {tuple(shape)}")


def emr_elect(deltas: Sequence[Tensor]) -> Tensor:
    """The unified task vector τ_uni: sign(Σ_t τ_t) (+1 where the sum > 0, else −1) times the largest
    |τ_t| among the tasks of that sign (0 where none has it). The inputs are left unchanged."""
    _check_same_shape(deltas)
    total = torch.zeros_like(deltas[0])
    for delta in deltas:
        total.add_(delta)
    positive = total > 0
    del total
    largest = torch.zeros_like(deltas[0])
    for delta in deltas:
        # a non-zero entry agrees when (τ_t > 0) is the elected sign; a zero entry adds nothing either way
        torch.maximum(largest, delta.abs().masked_fill_((delta > 0) != positive, 0), out=largest)
    return largest.mul_(positive.to(largest.dtype).mul_(2).sub_(1))


def emr_mask(tau_t: Tensor, tau_uni: Tensor) -> Tensor:
    """Task t's mask: where τ_t has the (non-zero) sign of τ_uni.

    The reference compares τ_t with the elected sign, not with τ_uni; the two agree wherever they
    could differ, since τ_uni is 0 only where no task has the elected sign (so no mask holds it).
    Signs are compared, never multiplied, so tiny values cannot underflow to a false "disagree".
    """
    if tau_t.shape != tau_uni.shape:
        raise ValueError(f"tau_t and tau_uni must have the same shape, got {tuple(tau_t.shape)} and {tuple(tau_uni.shape)}")
    return ((tau_t > 0) & (tau_uni > 0)) | ((tau_t < 0) & (tau_uni < 0))


def emr_rescaler(task_magnitude: float, masked_magnitude: float) -> float:
    """λ_t = (Σ|τ_t|) / (Σ|m_t ⊙ τ_uni|) from the two sums over the model; 1.0 when the masked
    vector is all zero (the task then comes back as the base, whatever λ_t is)."""
    if not (task_magnitude >= 0 and masked_magnitude >= 0):
        raise ValueError(f"magnitudes must be >= 0, got {task_magnitude!r} and {masked_magnitude!r}")
    return task_magnitude / masked_magnitude if masked_magnitude > 0 else 1.0
