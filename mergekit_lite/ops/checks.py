"""Argument checks shared by the tensor kernels: one message per misuse, naming the argument."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

MERGE_MODES = ("mean", "sum", "max")

def _check_fraction(name: str, value: float) -> float:
    """Return `value` as a float if it lies in [0, 1]; raise ValueError naming `name` otherwise."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= f <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return f


def _check_stacked(name: str, x: Tensor) -> None:
    """Require a stacked [T, ...] tensor with T >= 1."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor stacked as [T, ...], got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must be stacked as [T, ...] with T >= 1, got shape {tuple(x.shape)}")


def _task_weights(weights: Tensor | Sequence[float] | None, deltas: Tensor) -> Tensor:
    """Weights [T] in the dtype/device of `deltas`, shaped [T, 1, ..., 1] to broadcast over entries."""
    t = deltas.shape[0]
    if weights is None:
        w = torch.ones(t, dtype=deltas.dtype, device=deltas.device)
    else:
        w = torch.as_tensor(weights, dtype=deltas.dtype, device=deltas.device)
        if w.shape != (t,):
            raise ValueError(
                f"weights must have shape [T] = [{t}] (one weight per task), got {tuple(w.shape)}"
            )
    return w.reshape((t,) + (1,) * (deltas.dim() - 1))


def _check_mode(mode: str) -> None:
    if mode not in MERGE_MODES:
        raise ValueError(f"mode must be one of {{mean, sum, max}}, got {mode!r}")
