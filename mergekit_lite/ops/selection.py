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

from . import fused
from .devices import divide_
from .sparsify import BRACKET_BLOCK, BRACKET_MIN, sample_brackets
from .threads import map_parts, scratch, split_evenly, thread_count

__all__ = [
    "ARCEE_EPS",
    "MODEL_STOCK_NORM_FLOOR",
    "MODEL_STOCK_SINGULAR",
    "NEARSWAP_DIFF_FLOOR",
    "arcee_fusion",
    "arcee_importance",
    "iqr_threshold",
    "model_stock_ratio",
    "model_stock_ratio_from_gram",
    "model_stock_task_vector",
    "nearswap",
    "order_statistics",
    "pairwise_gram",
    "quartile_positions",
    "scale_mean",
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


def pairwise_gram(deltas: Sequence[Tensor], per_row: bool = False) -> Tensor:
    """⟨τ_i, τ_j⟩ for every pair of task vectors (squared norms on the diagonal), in float64: one
    [K, K] matrix over the whole tensors, or [R, K, K] for each row along the last dimension.

    Grams of row chunks add up to the whole tensor's (or, per row, concatenate), so the angle can be
    measured without holding the K task vectors at once. One matrix product: no product tensor of
    the tensors' size, only their stack.
    """
    if per_row:
        stacked = torch.stack([d.reshape(-1, d.shape[-1]) for d in deltas], dim=1)  # [R, K, n]
        return torch.bmm(stacked, stacked.transpose(1, 2)).double()
    return stacked_gram(torch.stack([d.reshape(-1) for d in deltas]))


def stacked_gram(stacked: Tensor) -> Tensor:
    """``pairwise_gram`` of task vectors already stacked [K, ...] (contiguous): the same product, no second stack.
    Off the CPU the products are added in float64, as the CPU's native pass adds them (``fused.gram``): float32 sums
    in the GPU's order moved Model Stock's t, and so its outputs, by ~1e-7."""
    flat = stacked.reshape(stacked.shape[0], -1)  # [K, n]
    if flat.device.type != "cpu":
        flat = flat.double()
    return (flat @ flat.T).double()


def model_stock_ratio_from_gram(gram: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Model Stock's t = K·cos θ / (1 + (K−1)·cos θ) from the task vectors' Gram matrix ([K, K], or
    [R, K, K] per row): cos θ is the mean over the K(K−1)/2 pairs of ⟨τ_i, τ_j⟩ / max(‖τ_i‖·‖τ_j‖,
    1e-6), each clamped to [−1, 1]; where |1 + (K−1)·cos θ| < 1e-6 the ratio is 0 (the base is
    kept). Returns [1, 1] (whole tensor) or [R, 1] (per row), in ``dtype``."""
    grams = gram.unsqueeze(0) if gram.dim() == 2 else gram
    k = grams.shape[-1]
    if k < 2:
        raise ValueError(f"model_stock needs at least 2 models besides the base, got {k}")
    norms = grams.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()  # [R, K]
    i, j = torch.triu_indices(k, k, 1)
    cosines = (grams[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=MODEL_STOCK_NORM_FLOOR)).clamp(-1, 1)
    cos = cosines.mean(dim=-1, keepdim=True)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < MODEL_STOCK_SINGULAR
    ratio = (k * cos) / torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(ratio), ratio).to(dtype)


def model_stock_ratio(deltas: Sequence[Tensor], filter_wise: bool = False) -> Tensor:
    """Model Stock's interpolation ratio for K ≥ 2 whole task vectors: over the whole tensor, or per
    row along the last dimension when ``filter_wise`` (a 1-D tensor is one row either way).
    Broadcastable against ``_rows(τ, filter_wise)``; ``deltas`` are read, not modified."""
    if len(deltas) < 2:
        raise ValueError(f"model_stock needs at least 2 models besides the base, got {len(deltas)}")
    per_row = filter_wise and deltas[0].dim() > 1
    return model_stock_ratio_from_gram(pairwise_gram(deltas, per_row), deltas[0].dtype)


def model_stock_task_vector(deltas: list[Tensor], filter_wise: bool = False) -> Tensor:
    """t · mean(τ_1..τ_K): what Model Stock adds to θ_0 (θ = t·mean(θ_i) + (1 − t)·θ_0 = θ_0 + t·mean(τ_i)).

    The list's tensors are consumed: the first one is overwritten with the result and the list
    is emptied, so the caller holds no extra copy.
    """
    ratio = model_stock_ratio(deltas, filter_wise)
    count = len(deltas)
    total = deltas[0]
    for other in deltas[1:]:
        total.add_(other)
    deltas.clear()
    return scale_mean(total, count, ratio, filter_wise)


def scale_mean(total: Tensor, count: int, ratio: Tensor, filter_wise: bool = False) -> Tensor:
    """t · (Σ τ_i) / K in place on ``total``, t one ratio or one per row (from ``model_stock_ratio``)."""
    shape = total.shape
    divide_(total, count)
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
def arcee_importance(base: Tensor, other: Tensor, out: Tensor | None = None) -> Tensor:
    """|θ_other − θ_base| · KL(p ‖ q) per entry, p = softmax(θ_other) + 1e-8, q = softmax(θ_base) + 1e-8
    along the last dimension (the KL divergence of each row, broadcast over its entries).

    ``other`` is overwritten with θ_other − θ_base (the task vector the caller keeps); ``base``
    is left as it is. Returns a new tensor, or ``out`` (the inputs' shape and dtype) written.
    """
    p = F.softmax(other, dim=-1).add_(ARCEE_EPS)
    q = F.softmax(base, dim=-1).add_(ARCEE_EPS)
    torch.div(p, q, out=q)
    kl = q.log_().mul_(p).sum(dim=-1, keepdim=True)
    del p, q
    delta = other.sub_(base)
    return torch.abs(delta, out=out).mul_(kl) if out is not None else delta.abs().mul_(kl)


def quartile_positions(n: int) -> tuple[int, int, int]:
    """0-based ranks of the lower quartile, median and upper quartile among n sorted values:
    ⌊q·(n − 1)⌋ for q = 0.25, 0.5, 0.75 (no interpolation, as mergekit indexes its sorted copy)."""
    m = n - 1
    return m // 4, m // 2, (3 * m) // 4


def order_statistics(x: Tensor, ranks: Sequence[int]) -> list[Tensor]:
    """The values at 0-based ``ranks`` of ``x`` sorted ascending (flattened), as 0-d tensors of x's dtype.

    A selection, not a full sort. On the CPU: for large float tensors each value from the few entries between two
    quantiles of a sample (``_ranked_in_brackets``: one counting pass split over the threads), else one partitioned
    copy of all of x (numpy); elsewhere ``kthvalue``.
    """
    flat = x.detach().reshape(-1)
    if flat.device.type == "cpu":
        values = flat.numpy()
        found = _ranked_in_brackets(values, ranks) if values.size >= BRACKET_MIN and flat.dtype in (torch.float32, torch.float64) else None
        if found is None:
            part = np.partition(values, list(ranks))
            found = [part[r] for r in ranks]
        return [torch.tensor(value, dtype=flat.dtype) for value in found]
    return [torch.kthvalue(flat, r + 1).values for r in ranks]


def _ranked_in_brackets(values: np.ndarray, ranks: Sequence[int]) -> list[np.floating] | None:
    """The values at 0-based ``ranks`` of ``values`` sorted ascending, each selected among the entries within a
    bracket [lo, hi] around its quantile in a fixed-seed sample (one counting pass over the values, split over the
    threads); None where a bracket misses its rank or the values hold NaN (the caller then partitions everything).
    Exact either way: a bracket only narrows what is partitioned. 3 quartiles of 33M float32: 3.4 s → ~0.3 s."""
    n = values.size
    brackets = sample_brackets(values, [rank / max(n - 1, 1) for rank in ranks])

    def count(part: tuple[int, int]) -> tuple[list[int], list[int], list[list[np.ndarray]]]:
        if fused.available():  # one pass for every bracket (numpy's: five per bracket and block); 3 quartiles of 11.5M
            # float32 on one core 12 ms, against numpy's 35–53 ms on two
            size = part[1] - part[0]
            native = fused.bracket_counts(values[part[0] : part[1]], brackets, size // 16 + 4096)
            if native is not None:
                return [b for b, _, _ in native], [a for _, a, _ in native], [[inside] for _, _, inside in native]
        inside = scratch("ranked_in", BRACKET_BLOCK, torch.bool).numpy()
        upper = scratch("ranked_up", BRACKET_BLOCK, torch.bool).numpy()
        below, above = [0] * len(brackets), [0] * len(brackets)
        kept: list[list[np.ndarray]] = [[] for _ in brackets]
        for start in range(part[0], part[1], BRACKET_BLOCK):
            block = values[start : min(start + BRACKET_BLOCK, part[1])]
            size = block.size
            for i, (lo, hi) in enumerate(brackets):
                not_above = np.less_equal(block, hi, out=upper[:size])
                at_least = np.greater_equal(block, lo, out=inside[:size])
                above[i] += size - int(np.count_nonzero(not_above))
                below[i] += size - int(np.count_nonzero(at_least))
                kept[i].append(np.compress(np.logical_and(at_least, not_above, out=inside[:size]), block))
        return below, above, kept

    counted = map_parts(count, split_evenly(n, thread_count(), BRACKET_BLOCK))
    selections = []
    for i, rank in enumerate(ranks):
        between = np.concatenate([piece for _, _, kept in counted for piece in kept[i]])
        below = sum(part_below[i] for part_below, _, _ in counted)
        above = sum(part_above[i] for _, part_above, _ in counted)
        if below + between.size + above != n or not 0 <= rank - below < between.size:  # NaN, or the bracket missed
            return None
        selections.append((between, rank - below))
    # each bracket's selection on a thread of its own (numpy's partition lets go of the interpreter lock): 3
    # quartiles, 311 partitions in an Arcee Fusion merge at 250M, 0.34 s on the main thread with the other core idle
    def select(selection: tuple[np.ndarray, int]) -> np.floating:
        values, k = selection
        values.partition(k)  # its own concatenated copy
        return values[k]

    return map_parts(select, selections)


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
