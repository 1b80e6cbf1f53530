"""LoRA math: the scaling of an adapter, its ΔW added in place, and the best rank-r factors of a ΔW.

PEFT's convention: lora_A is [r, in], lora_B is [out, r] and ΔW = s · B @ A with s = α / r
(α / √r with rank-stabilised scaling). A weight stored transposed (``fan_in_fan_out``, GPT-2's
Conv1D) and an embedding (lora_embedding_A [r, vocab], lora_embedding_B [dim, r]) take ΔWᵀ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """s = α / r, or α / √r with rank-stabilised LoRA (Kalajdzievski 2023), as PEFT scales ΔW."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def add_lora_(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float, transposed: bool = False) -> Tensor:
    """weight += s · B @ A (or s · (B @ A)ᵀ when ``transposed``) in place, without a temporary of weight's size."""
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"lora_A {list(lora_a.shape)} and lora_B {list(lora_b.shape)} are not [r, in] and [out, r]")
    shape = (lora_a.shape[1], lora_b.shape[0]) if transposed else (lora_b.shape[0], lora_a.shape[1])
    if tuple(weight.shape) != shape:
        raise ValueError(f"lora_B @ lora_A gives {list(shape)}, the weight is {list(weight.shape)}")
    a, b = lora_a.to(weight.dtype), lora_b.to(weight.dtype)
    if transposed:
        return weight.addmm_(a.T, b.T, alpha=scaling)
    return weight.addmm_(b, a, alpha=scaling)


@dataclass(frozen=True)
class LowRank:
    """Factors of a truncated SVD: ΔW ≈ B @ A, with the relative Frobenius error of the approximation."""

    lora_a: Tensor  # [rank, in]
    lora_b: Tensor  # [out, rank]
    rank: int
    relative_error: float  # ‖ΔW − B A‖_F / ‖ΔW‖_F (0 for ΔW = 0)


def low_rank(delta: Tensor, max_rank: int, sv_epsilon: float = 0.0) -> LowRank:
    """The best rank-≤``max_rank`` factors of ``delta`` (Eckart–Young), √σ given to each side.

    Singular values ≤ ``sv_epsilon`` are dropped too (an adaptive rank, mergekit's absolute threshold;
    rank 0 when none is left or ΔW = 0). Computed in float32 at least (float64 input stays float64).
    """
    if delta.dim() != 2:
        raise ValueError(f"delta must be 2-D, got shape {list(delta.shape)}")
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank must be an integer >= 1, got {max_rank!r}")
    if not sv_epsilon >= 0.0 or math.isinf(sv_epsilon):
        raise ValueError(f"sv_epsilon must be a finite number >= 0, got {sv_epsilon!r}")
    work = delta.to(torch.promote_types(delta.dtype, torch.float32))
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    total = float((s * s).sum())
    rank = min(max_rank, s.numel())
    if total == 0.0:
        rank = 0
    elif sv_epsilon > 0.0:
        rank = min(rank, int((s > sv_epsilon).sum()))
    root = s[:rank].sqrt()
    lora_b = u[:, :rank] * root
    lora_a = root[:, None] * vh[:rank]
    dropped = float((s[rank:] * s[rank:]).sum())
    error = math.sqrt(dropped / total) if total > 0.0 else 0.0
    return LowRank(lora_a, lora_b, rank, error)
