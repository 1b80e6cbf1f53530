"""SCE (Select, Calculate, Erase; FuseChat, Wan et al., 2024) on one tensor's stacked task vectors.

Pure functions on tensors; arithmetic in the input dtype. ``sce_merge`` works in place on the
stack it is given (the caller's [T, ...] buffer) so a tensor costs T copies plus a few.
"""

from __future__ import annotations

from collections.abc import Iterable
import math

import torch
from torch import Tensor

from .checks import _check_stacked
from .combine import agreeing_magnitudes_, elected_sign, with_sign_
from .devices import divide_
from .fused import available as native_available, task_variance_into
from .sparsify import topk_count_mask
from .threads import map_parts, split_evenly, thread_count

#: mergekit 0.1.5's rule: below this summed energy, SCE weights fall back to uniform.
SCE_ENERGY_FLOOR = 1e-6
#: mergekit 0.1.5's guard on the per-entry divisor of the erase step.
SCE_DIVISOR_FLOOR = 1e-6


def variance_select_count(nonzero: int, fraction: float) -> int:
    """How many entries the select step keeps: ⌊nonzero · fraction⌋, the product taken in float32.

    mergekit multiplies a 0-d int64 count by the Python float, which torch does in float32; the
    float32 product can round up to the next integer where the exact product sits just below it
    (0.29 · 100 → 29, not 28), so this repeats that product to keep the same count.
    """
    return int(torch.tensor(nonzero, dtype=torch.int64) * float(fraction))


def variance_select_mask(deltas: Tensor, fraction: float) -> Tensor:
    """SCE's select step: bool mask (shape of one task vector) of the entries of largest variance across tasks.

    The variance is the population variance over the T task vectors; k = ⌊fraction · #(variance ≠ 0)⌋
    entries are kept (exactly k; ties at the threshold go to the lower flat index). fraction ≥ 1
    keeps everything, fraction ≤ 0 nothing. With one task every variance is 0, so nothing is kept.
    """
    _check_stacked("deltas", deltas)
    shape = deltas.shape[1:]
    if fraction >= 1:
        return torch.ones(shape, dtype=torch.bool, device=deltas.device)
    if fraction <= 0:
        return torch.zeros(shape, dtype=torch.bool, device=deltas.device)
    return top_variance_mask(task_variance(deltas), fraction)


#: entries whose variance is updated task by task at a time on the CPU: the four float64 buffers (4 MiB) stay
#: in the cores' L2 caches (task_variance of K = 8 tasks: 1.26 ns per entry and task against 1.83 at 2^19)
VARIANCE_BLOCK = 1 << 17


def task_variance(deltas: Tensor | Iterable[Tensor]) -> Tensor:
    """Population variance of each entry across the T task vectors (stacked, or handed out one at a time and
    held; any slice of entries), in their dtype.

    The arithmetic of ``torch.var(stack, dim=0, unbiased=False)`` on the CPU (Welford's update in float64,
    then the division and one rounding to the dtype), so the numbers, and the entries the select step
    keeps, are torch.var's bit for bit, without a stack and 2–13× faster than its reduction over dim 0.
    Each entry's update is its own, so VARIANCE_BLOCK entries are taken through every task at a time. Float32 on
    the CPU goes through the native kernel (``_native_variance``): the same operations, one pass per block.
    """
    tasks = list(deltas)  # a stacked tensor hands out its rows
    if not tasks:
        raise ValueError("task_variance needs at least one task vector")
    first = tasks[0]
    if first.dtype == torch.float64:  # torch rounds float64 reductions otherwise: use it
        return torch.var(torch.stack(tasks), dim=0, unbiased=False)
    out = torch.empty(first.shape, dtype=first.dtype, device=first.device)
    flats = [t.reshape(-1) for t in tasks]
    n = out.numel()
    if _native_variance(flats, out.view(-1)):
        return out
    block = max(1, min(n, VARIANCE_BLOCK) if first.device.type == "cpu" else n)
    buffers = [torch.empty(block, dtype=torch.float64, device=first.device) for _ in range(4)]
    counts = [torch.tensor(float(count), dtype=torch.float64, device=first.device) for count in range(2, len(tasks) + 1)]
    for start in range(0, n, block):
        stop = min(start + block, n)
        mean, m2, data, step = (buffer[: stop - start] for buffer in buffers)
        # the first update from zeros leaves mean = τ_1 and m2 = +0 exactly. addcdiv (mean + 1·(step / count))
        # and addcmul (m2 + 1·step·data) round as the separate division or product and sum do (no fused
        # multiply-add on the CPU; the test against torch.var checks it): 7 → 5 passes, 18 % faster
        mean.copy_(flats[0][start:stop])
        m2.zero_()
        for count, delta in zip(counts, flats[1:]):
            data.copy_(delta[start:stop])
            torch.sub(data, mean, out=step)
            mean.addcdiv_(step, count)
            data.sub_(mean)
            m2.addcmul_(step, data)
        out.view(-1)[start:stop].copy_(divide_(m2, len(tasks)))
    return out


#: entries below which the native variance runs on one thread (a hand-off costs more than it saves)
VARIANCE_SPLIT_MIN = 1 << 16


def _native_variance(flats: list[Tensor], out: Tensor) -> bool:
    """``task_variance`` of float32 CPU task vectors by the native kernel (the same float64 operations in the same
    order: the same numbers), parts of the entries on the CPU threads; False where it does not apply."""
    if not native_available() or out.dtype != torch.float32 or out.device.type != "cpu" or any(f.dtype != torch.float32 or f.device.type != "cpu" for f in flats):
        return False
    inputs = [f.contiguous() for f in flats]
    n = out.numel()
    parts = split_evenly(n, thread_count() if n >= 2 * VARIANCE_SPLIT_MIN else 1)
    map_parts(lambda part: task_variance_into(out[part[0] : part[1]], [x[part[0] : part[1]] for x in inputs]), parts)
    return True


def top_variance_mask(variance: Tensor, fraction: float) -> Tensor:
    """The select step's mask from a whole tensor's variances (0 < fraction < 1), consuming ``variance``."""
    k = variance_select_count(int(torch.count_nonzero(variance)), fraction)
    return topk_count_mask(variance, k)


def mean_square(x: Tensor, chunk: int = 1 << 20) -> float:
    """mean(x²) in float64 (a float32 dot of 50M entries is off by ~1e-3): for a matrix or more, each row's sum
    of squares (``row_square_sums``) added up exactly, so sums made a few rows at a time give the same number;
    a vector's chunk dot products added in order."""
    n = x.numel()
    if n == 0:
        return 0.0
    if x.dim() >= 2:
        return math.fsum(row_square_sums(x)) / n
    flat = x.reshape(-1)
    total = 0.0
    for start in range(0, n, chunk):
        part = flat[start : start + chunk].double()
        total += float(torch.dot(part, part))
    return total / n


def row_square_sums(x: Tensor, block_entries: int = 1 << 17) -> list[float]:
    """Σ x² of each row of x (its first dimension; at least 2 dimensions), squares and sums in float64 (exact
    squares of float32 entries): a row's number does not depend on which rows it is taken with, so they are taken
    ``block_entries`` at a time (2^17: their float64 copy stays in the core's L2 cache, 25 % faster than 2^19)."""
    rows = x.reshape(x.shape[0], -1)
    step = max(1, block_entries // max(1, rows.shape[1]))
    sums: list[float] = []
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step].to(torch.float64)
        sums.extend(block.mul_(block).sum(dim=1).tolist())
    return sums


def sce_weights(deltas: Tensor, energy_floor: float = SCE_ENERGY_FLOOR) -> Tensor:
    """SCE's calculate step: η_t = mean(τ_t²) / Σ_s mean(τ_s²), a [T] tensor in the deltas' dtype.

    When Σ_s mean(τ_s²) < ``energy_floor`` (mergekit: 1e-6) or is 0, the weights are uniform 1/T.
    """
    _check_stacked("deltas", deltas)
    energy = [mean_square(deltas[i]) for i in range(deltas.shape[0])]
    return energy_weights(energy, energy_floor, deltas.dtype, deltas.device)


def energy_weights(energy: list[float], energy_floor: float, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """η from each task's mean(τ_t²): normalised to sum 1, or uniform when their sum is 0 or below the floor."""
    t, total = len(energy), sum(energy)
    if total == 0 or abs(total) < energy_floor:
        return torch.full((t,), 1.0 / t, dtype=dtype, device=device)
    return torch.tensor([e / total for e in energy], dtype=dtype, device=device)


def sce_merge(deltas: Tensor, select_topk: float = 1.0, energy_floor: float = SCE_ENERGY_FLOOR, mode: str = "mean") -> Tensor:
    """SCE on one tensor: select by variance, weight by energy, erase minority signs; the merged task vector.

    1. select: if select_topk < 1, every τ_t keeps only the entries of ``variance_select_mask``;
    2. calculate: η = ``sce_weights`` of the selected task vectors;
    3. erase: γ = sign(Σ_t τ_t) per entry (a zero sum counts as +); entry (t, i) takes part iff τ_t,i
       is non-zero with the sign γ_i;
    4. mode "mean" (mergekit): merged_i = Σ_t η_t τ_t,i [takes part] / max(Σ_t η_t [takes part], 1e-6);
       mode "sum" (the paper): merged_i = Σ_t η_t τ_t,i [takes part].

    ``deltas`` [T, ...] is overwritten (the selected, erased task vectors); returns a new tensor.
    """
    _check_stacked("deltas", deltas)
    if mode not in ("mean", "sum"):
        raise ValueError(f"mode must be mean or sum, got {mode!r}")
    if select_topk < 1:
        keep = variance_select_mask(deltas, select_topk)
        deltas.mul_(keep)  # [T, ...] by a broadcast mask
        del keep
    weights = [float(w) for w in sce_weights(deltas, energy_floor)]
    return sce_erase(deltas, weights, mode)


def sce_erase(deltas: Tensor, weights: list[float], mode: str = "mean") -> Tensor:
    """SCE's erase step on the selected task vectors [T, ...] (any slice of entries; overwritten):
    γ = sign(Σ_t τ_t) (zero counts as +), then the η-weighted mean (or sum) of the entries agreeing with γ."""
    if mode not in ("mean", "sum"):
        raise ValueError(f"mode must be mean or sum, got {mode!r}")
    sign = elected_sign(deltas.sum(dim=0))
    merged = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0]) if mode == "mean" else None
    for t, w in enumerate(weights):  # the agreeing magnitudes added, the sign put back once (the same bits)
        merged.add_(agreeing_magnitudes_(deltas[t], sign, divisor, w), alpha=w)
    return with_sign_(merged if divisor is None else merged.div_(divisor.clamp_(min=SCE_DIVISOR_FLOOR)), sign)
