"""Task-singular-vector compression (TSV-C, Gargiulo et al., CVPR 2025): each task's update of a
2-D tensor kept as its top-k singular triplets, τ_t ≈ U_k diag(S_k) V_kᵀ (the best rank-k
approximation in the Frobenius norm, Eckart–Young)."""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor


def rank_budget(shape: Sequence[int], tasks: int, rank_fraction: float | None = None, rank: int | None = None) -> int:
    """The rank k kept per task for a matrix of ``shape``: ``rank`` (capped at the full rank), else
    ⌊rank_fraction · full rank⌋, else ⌊full rank / T⌋ (the paper's budget); at least 1."""
    if len(shape) != 2:
        raise ValueError(f"a rank budget is for 2-D tensors, got shape {list(shape)}")
    if tasks < 1:
        raise ValueError(f"tasks must be >= 1, got {tasks!r}")
    full = min(int(shape[0]), int(shape[1]))
    if rank is not None:
        k = min(int(rank), full)
    elif rank_fraction is not None:
        if not 0 <= rank_fraction <= 1:
            raise ValueError(f"rank_fraction must be in [0, 1], got {rank_fraction!r}")
        k = math.floor(full * rank_fraction)
    else:
        k = full // tasks
    return max(1, min(k, full))


class LowRank(NamedTuple):
    """The top-k singular triplets of a matrix and the squared Frobenius norm of what they leave out."""

    u: Tensor  # [m, k]
    s: Tensor  # [k]
    vh: Tensor  # [k, n]
    dropped: float  # Σ_{i>k} σ_i²


def truncated_svd(matrix: Tensor, k: int) -> LowRank:
    """The top-k singular triplets of a 2-D tensor (computed in its dtype: float32 or float64)."""
    if matrix.dim() != 2:
        raise ValueError(f"truncated_svd needs a 2-D tensor, got shape {list(matrix.shape)}")
    full = min(matrix.shape)
    if not 1 <= k <= full:
        raise ValueError(f"rank k must be between 1 and {full} for shape {list(matrix.shape)}, got {k!r}")
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    dropped = float(s[k:].double().square().sum())
    return LowRank(u[:, :k].contiguous(), s[:k].contiguous(), vh[:k].contiguous(), dropped)


def low_rank_product(u: Tensor, s: Tensor, vh: Tensor) -> Tensor:
    """U diag(S) Vᴴ, computed as (U · S) @ Vᴴ."""
    if u.dim() != 2 or s.dim() != 1 or vh.dim() != 2 or u.shape[1] != s.shape[0] or vh.shape[0] != s.shape[0]:
        raise ValueError(f"factors do not fit: U {list(u.shape)}, S {list(s.shape)}, Vh {list(vh.shape)}")
    return (u * s) @ vh
