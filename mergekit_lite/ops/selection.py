"""Pure math for Model Stock, NearSwap and Arcee Fusion (the numbers mergekit 0.1.5 computes).

Every function takes tensors in the compute dtype and may reuse (overwrite) the tensors it is
given, to keep the number of full-size copies low; the docstrings say which. No file I/O, no
recipes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ARCEE_EPS",
    "MODEL_STOCK_NORM_FLOOR",
    "MODEL_STOCK_SINGULAR",
    "NEARSWAP_DIFF_FLOOR",
    "arcee_fusion",
    "arcee_importance",
    "iqr_threshold",
    "model_stock_ratio",
    "model_stock_task_vector",
    "nearswap",
    "order_statistics",
    "quartile_positions",
]

#: Model Stock: the product of two task-vector norms is floored at this before dividing.
MODEL_STOCK_NORM_FLOOR = 1e-6
#: Model Stock: |1 + (K−1)·cos θ| below this has no finite ratio; t = 0 keeps the base there.
MODEL_STOCK_SINGULAR = 1e-6
#: NearSwap: |θ_base − θ_model| is floored at this before t is divided by it.
NEARSWAP_DIFF_FLOOR = 1e-6
#: Arcee Fusion: added to both softmax distributions before the KL divergence.
ARCEE_EPS = 1e-8


# -- Model Stock --------------------------------------------------------------------------------
def _rows(x: Tensor, filter_wise: bool) -> Tensor:
    """The view the angle is measured on: the whole tensor as one row, or (filter-wise) each row
    along the last dimension (a 1-D tensor is one row either way)."""
    return x.reshape(1, -1) if not filter_wise or x.dim() <= 1 else x


def model_stock_ratio(deltas: Sequence[Tensor], filter_wise: bool = False) -> Tensor:
    """Model Stock's interpolation ratio t = K·cos θ / (1 + (K−1)·cos θ) for K ≥ 2 task vectors.

    cos θ is the mean over the K(K−1)/2 pairs of ⟨τ_i, τ_j⟩ / max(‖τ_i‖·‖τ_j‖, 1e-6), each
    clamped to [−1, 1] — over the whole tensor, or per row along the last dimension when
    ``filter_wise``. Where |1 + (K−1)·cos θ| < 1e-6 the ratio is 0 (the base is kept).

    Returns t with a trailing dimension of 1, broadcastable against ``_rows(τ, filter_wise)``
    (shape [1, 1] for the whole tensor). ``deltas`` are read, not modified; one product of the
    tensor's size is held at a time.
    """
    k = len(deltas)
    if k < 2:
        raise ValueError(f"model_stock needs at least 2 models besides the base, got {k}")
    rows = [_rows(d, filter_wise) for d in deltas]
    norms = [torch.linalg.vector_norm(r, dim=-1) for r in rows]
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            # one vector per tensor: a BLAS dot (no product tensor of the tensor's size); per row: row-wise sums
            dot = torch.dot(rows[i][0], rows[j][0]).reshape(1) if rows[i].dim() == 2 and rows[i].shape[0] == 1 else (rows[i] * rows[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=MODEL_STOCK_NORM_FLOOR)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < MODEL_STOCK_SINGULAR
    ratio = (k * cos) / torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(ratio), ratio)


def model_stock_task_vector(deltas: list[Tensor], filter_wise: bool = False) -> Tensor:
    """t · mean(τ_1..τ_K): what Model Stock adds to θ_0 (θ = t·mean(θ_i) + (1 − t)·θ_0 = θ_0 + t·mean(τ_i)).

    The list's tensors are consumed: the first one is overwritten with the result and the list
    is emptied, so the caller holds no extra copy.
    """
    ratio = model_stock_ratio(deltas, filter_wise)
    count = len(deltas)
    total = deltas[0]
    shape = total.shape
    for other in deltas[1:]:
        total.add_(other)
    deltas.clear()
    total.div_(count)
    rows = _rows(total, filter_wise)
    rows.mul_(ratio)
    return rows.reshape(shape)


# -- NearSwap -----------------------------------------------------------------------------------
def nearswap(base: Tensor, other: Tensor, t: float) -> Tensor:
    """w = clamp(t / max(|θ_base − θ_other|, 1e-6), 0, 1); θ = w·θ_other + (1 − w)·θ_base, per entry.

    Entries where the two models are within t of each other take the other model's value; farther
    apart, the other model's pull falls off as t / |difference|. Computed in mergekit's operation
    order (bit-identical in float32). ``base`` and ``other`` are overwritten; the result is
    ``other``'s storage.
    """
    weight = torch.sub(base, other).abs_().clamp_(min=NEARSWAP_DIFF_FLOOR)
    weight.reciprocal_().mul_(t).clamp_(0, 1)  # t / x, as torch computes a scalar over a tensor
    other.mul_(weight)
    weight.neg_().add_(1)  # 1 − w
    base.mul_(weight)
    del weight
    return other.add_(base)


# -- Arcee Fusion -------------------------------------------------------------------------------
def arcee_importance(base: Tensor, other: Tensor) -> Tensor:
    """|θ_other − θ_base| · KL(p ‖ q) per entry, p = softmax(θ_other) + 1e-8, q = softmax(θ_base) + 1e-8
    along the last dimension (the KL divergence of each row, broadcast over its entries).

    ``other`` is overwritten with θ_other − θ_base (the task vector the caller keeps); ``base``
    is left as it is. Returns a new tensor.
    """
    p = F.softmax(other, dim=-1).add_(ARCEE_EPS)
    q = F.softmax(base, dim=-1).add_(ARCEE_EPS)
    torch.div(p, q, out=q)
    kl = q.log_().mul_(p).sum(dim=-1, keepdim=True)
    del p, q
    delta = other.sub_(base)
    return delta.abs().mul_(kl)


def quartile_positions(n: int) -> tuple[int, int, int]:
    """0-based ranks of the lower quartile, median and upper quartile among n sorted values:
    ⌊q·(n − 1)⌋ for q = 0.25, 0.5, 0.75 (no interpolation, as mergekit indexes its sorted copy)."""
    m = n - 1
    return m // 4, m // 2, (3 * m) // 4


def order_statistics(x: Tensor, ranks: Sequence[int]) -> list[Tensor]:
    """The values at 0-based ``ranks`` of ``x`` sorted ascending (flattened), as 0-d tensors of x's dtype.

    A selection, not a full sort: one partitioned copy on the CPU (numpy), ``kthvalue`` elsewhere.
    """
    flat = x.detach().reshape(-1)
    if flat.device.type == "cpu":
        part = np.partition(flat.numpy(), list(ranks))
        return [torch.from_numpy(part[r : r + 1].copy()).reshape(()) for r in ranks]
    return [torch.kthvalue(flat, r + 1).values for r in ranks]


def iqr_threshold(importance: Tensor) -> Tensor:
    """median + 1.5 · (Q3 − Q1) of the entries (quartiles at ⌊q·(n − 1)⌋ of the sorted values), 0-d."""
    q1, median, q3 = order_statistics(importance, quartile_positions(importance.numel()))
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base: Tensor, other: Tensor) -> Tensor:
    """θ_base + mask ⊙ (θ_other − θ_base), mask = importance ≥ median + 1.5·IQR of the importance.

    The importance is :func:`arcee_importance`. Exact quartiles over the whole tensor (mergekit
    sorts a random sample of 1,000,000 entries, drawn with replacement, for larger tensors; for
    tensors up to that size the two agree exactly). ``base`` and ``other`` are overwritten; the
    result is ``base``'s storage.
    """
    importance = arcee_importance(base, other)
    delta = other  # θ_other − θ_base now
    keep = importance >= iqr_threshold(importance).to(importance.device)
    del importance
    delta.mul_(keep)
    return base.add_(delta)
