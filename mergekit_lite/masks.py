"""Masks and per-tensor merge kernels: TIES, DARE, Model Breadcrumbs, TALL-masks, Consensus.

Pure functions on torch tensors (no file I/O, no globals). All arithmetic happens in the dtype of
the inputs: callers pass float32 or float64 and cast the result back themselves. Formulas,
defaults and the reference code's quirks are described in METHODS.md; each function says
where it follows or departs from the reference.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "kth_largest_magnitude",
    "keep_count",
    "topk_mask",
    "magnitude_mask",
    "elect_sign",
    "majority_sign_count",
    "disjoint_merge",
    "ties_merge",
    "dare_mask",
    "dare",
    "generator_for",
    "breadcrumbs_mask",
    "breadcrumbs",
    "tall_mask",
    "consensus_mask",
    "task_arithmetic",
]

MERGE_MODES = ("mean", "sum", "max")
BREADCRUMBS_SCOPES = ("row", "tensor")


# ----------------------------------------------------------------------------- validation helpers


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


# ----------------------------------------------------------------------------- selection


def kth_largest_magnitude(x: Tensor, k: int) -> Tensor:
    """The k-th largest |x| over all entries, as a 0-d tensor (1 <= k <= numel).

    Uses torch.kthvalue on |x| (the (n-k+1)-th smallest), a selection, never a full sort.
    """
    n = x.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, numel] = [1, {n}], got {k!r}")
    return torch.kthvalue(x.detach().reshape(-1).abs(), n - k + 1).values


def keep_count(n: int, density: float) -> int:
    """Number of entries to keep out of n: floor(density * n), clamped to [0, n].

    The product is the float product `density * n` floored exactly (as the TIES reference's
    `int(n * K)` and mergekit's `int(density * n)` do), with no epsilon: 0.29 * 100 == 28.999...
    gives 28, the same count the reference tools keep.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    d = _check_fraction("density", density)
    return min(max(math.floor(d * n), 0), n)


def topk_mask(x: Tensor, density: float) -> Tensor:
    """Bool mask of entries with |x| >= the k-th largest magnitude, k = keep_count(numel, density).

    Per-tensor TIES trim. Ties at the threshold are kept (so more than k may survive); k == 0
    keeps nothing.
    """
    k = keep_count(x.numel(), density)
    if k == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    return x.abs() >= kth_largest_magnitude(x, k)


def magnitude_mask(x: Tensor, threshold: float | Tensor) -> Tensor:
    """Bool mask |x| >= threshold, for a threshold computed elsewhere (e.g. model-wide TIES scope).

    The threshold is converted to x's dtype (a threshold selected from values of that dtype is
    exactly representable). threshold = +inf keeps nothing, even entries that are themselves inf.
    """
    thr = torch.as_tensor(threshold, dtype=x.dtype, device=x.device)
    return (x.abs() >= thr) & (thr != math.inf)


# ----------------------------------------------------------------------------- TIES


def elect_sign(deltas: Tensor, fallback: float | None = None) -> Tensor:
    """TIES sign election: +1/-1 per entry, the sign of the summed values over tasks ("mass").

    deltas is [T, ...], already trimmed and weighted. Entries whose sum is exactly 0 take
    `fallback` (the model-wide majority sign, computed by the caller from majority_sign_count),
    or, if None, this tensor's majority sign(sum(gamma)). A fallback or majority of 0 becomes -1:
    the reference's torch.where(sign > 0, t > 0, t < 0) treats a 0 sign as negative. Any other
    fallback value is reduced to its sign. Returns a tensor of deltas' dtype, shape deltas[0].
    """
    _check_stacked("deltas", deltas)
    gamma = torch.sign(deltas.sum(dim=0))
    zero = gamma == 0
    if fallback is None:
        majority = int((gamma > 0).sum()) - int((gamma < 0).sum())
    else:
        majority = float(fallback)
        if math.isnan(majority):
            raise ValueError("fallback must be +1, -1 (or 0, read as -1) or None, got nan")
    fill = 1.0 if majority > 0 else -1.0
    return torch.where(zero, torch.full_like(gamma, fill), gamma)


def majority_sign_count(deltas: Tensor) -> Tensor:
    """sum over entries of sign(sum over T of deltas), exact, as an int64 0-d tensor.

    One tensor's contribution to the model-wide majority sign; a caller adds these over all
    tensors of a model and passes the sign of the total as elect_sign's fallback.
    """
    _check_stacked("deltas", deltas)
    s = deltas.sum(dim=0)
    return (s > 0).sum(dtype=torch.int64) - (s < 0).sum(dtype=torch.int64)


def disjoint_merge(
    deltas: Tensor,
    sign: Tensor,
    weights: Tensor | None = None,
    mode: str = "mean",
) -> Tensor:
    """TIES disjoint merge of trimmed, NOT yet weighted deltas [T, ...] given the elected sign.

    Entry (t, i) participates iff v = w_t*delta[t, i] != 0 and v agrees with sign[i] (sign read as
    the reference does: > 0 positive, anything else negative). mean: sum of participating v /
    sum of their w_t (mergekit's normalize: true; with unit weights the reference's mean over
    non-zero agreeing entries), 0 where none participate; where mixed-sign weights of the
    participants sum to exactly 0 the divisor is 1, as in mergekit. sum: sum of participating v.
    max: the participating v of largest |v| (abs max times sign, as the reference).
    """
    _check_stacked("deltas", deltas)
    _check_mode(mode)
    if sign.shape != deltas.shape[1:]:
        raise ValueError(
            f"sign must have the shape of one task's delta {tuple(deltas.shape[1:])}, got {tuple(sign.shape)}"
        )
    w = _task_weights(weights, deltas)
    v = w * deltas
    positive = (sign > 0).unsqueeze(0)
    part = torch.where(positive, v > 0, v < 0)
    selected = torch.where(part, v, torch.zeros((), dtype=v.dtype, device=v.device))
    if mode == "sum":
        return selected.sum(dim=0)
    if mode == "max":
        idx = selected.abs().argmax(dim=0, keepdim=True)
        return selected.gather(0, idx).squeeze(0)
    divisor = (w * part).sum(dim=0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return selected.sum(dim=0) / divisor


def ties_merge(
    deltas: Tensor,
    density: float,
    weights: Tensor | None = None,
    mode: str = "mean",
    fallback: float | None = None,
    thresholds: Tensor | None = None,
) -> Tensor:
    """TIES on one tensor: trim each task, weight, elect sign, disjoint merge; returns the merged delta.

    Trim is per tensor (topk_mask with `density`) unless `thresholds` [T] is given: then task t
    keeps |delta_t| >= thresholds[t] (model-scope thresholds; `density` is only validated).
    Weights multiply after trimming and before election, as mergekit does. No lambda applied.
    """
    _check_stacked("deltas", deltas)
    _check_fraction("density", density)
    _check_mode(mode)
    t = deltas.shape[0]
    if thresholds is not None:
        thr = torch.as_tensor(thresholds, dtype=deltas.dtype, device=deltas.device)
        if thr.shape != (t,):
            raise ValueError(f"thresholds must have shape [T] = [{t}], got {tuple(thr.shape)}")
        masks = [magnitude_mask(deltas[i], thr[i]) for i in range(t)]
    else:
        masks = [topk_mask(deltas[i], density) for i in range(t)]
    zero = torch.zeros((), dtype=deltas.dtype, device=deltas.device)
    trimmed = torch.stack([torch.where(m, deltas[i], zero) for i, m in enumerate(masks)])
    w = _task_weights(weights, deltas)
    sign = elect_sign(w * trimmed, fallback)
    return disjoint_merge(trimmed, sign, w.reshape(t), mode)


# ----------------------------------------------------------------------------- DARE


def dare_mask(shape: torch.Size | tuple[int, ...], density: float, generator: torch.Generator) -> Tensor:
    """Bool keep-mask, each entry kept with probability `density` (drop probability p = 1 - density).

    Drawn on CPU with torch.bernoulli (in place on a bool tensor, float64 probability), so the
    mask depends only on the generator state, not on the device, dtype or thread count; it equals
    torch.bernoulli(torch.full(shape, density, dtype=torch.float64), generator=generator).bool().
    density 0 and 1 return all-False / all-True without drawing (each generator serves one tensor).
    """
    d = _check_fraction("density", density)
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    shape = torch.Size(shape)
    if d == 0.0:
        return torch.zeros(shape, dtype=torch.bool)
    if d == 1.0:
        return torch.ones(shape, dtype=torch.bool)
    p = torch.tensor(d, dtype=torch.float64)
    return torch.empty(shape, dtype=torch.bool).bernoulli_(p, generator=generator)


def dare(x: Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> Tensor:
    """DARE: drop entries of x with probability 1 - density, rescale survivors by 1 / density.

    density == 0 (p = 1) drops everything with no division; density == 1 returns a copy of x and
    draws nothing. rescale=False only masks.
    """
    d = _check_fraction("density", density)
    if d == 0.0:
        return torch.zeros_like(x)
    if d == 1.0:
        return x.clone()
    mask = dare_mask(x.shape, d, generator).to(x.device)
    kept = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept / d if rescale else kept


def generator_for(seed: int, model: str, tensor_name: str) -> torch.Generator:
    """CPU generator seeded from sha256(f"{seed}\\0{model}\\0{tensor_name}") (first 8 bytes, 63 bits).

    One stream per (seed, model, tensor), so draws do not depend on processing order, threads
    or device.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    digest = hashlib.sha256(f"{seed}\0{model}\0{tensor_name}".encode("utf-8")).digest()
    value = int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)
    return torch.Generator(device="cpu").manual_seed(value)


# ----------------------------------------------------------------------------- Model Breadcrumbs


def _band_mask(mag: Tensor, start: int, stop: int) -> Tensor:
    """Bool mask of the entries ranked [start, stop) along the last dim by magnitude, descending.

    Stable sort: among equal magnitudes the lower index ranks first.
    """
    n = mag.shape[-1]
    order = torch.sort(mag, dim=-1, descending=True, stable=True).indices
    band = torch.zeros(n, dtype=torch.bool, device=mag.device)
    band[start:stop] = True
    out = torch.zeros(mag.shape, dtype=torch.bool, device=mag.device)
    return out.scatter_(-1, order, band.expand(mag.shape))


def breadcrumbs_mask(x: Tensor, density: float, gamma: float, scope: str = "row") -> Tensor:
    """Model Breadcrumbs keep-mask: drop the floor(n*gamma) largest |x|, keep the floor(n*density) next.

    scope "row" (the reference): per row along the last dim, n = row length; if the two counts
    exceed n, keep what remains below the dropped top. scope "tensor" (mergekit): one ranking over
    the flattened tensor; density >= 1 keeps all; if n_top + target > n, n_top is cut to
    n - target, as mergekit does; but where floor(gamma*n) == 0 we keep the floor(n*density)
    largest (mergekit's slice indices[n_bot:-0] zeroes the whole tensor). 0-d tensors are left
    unmasked (all True) in both scopes. Ties rank by lower index first (stable sort).
    """
    d = _check_fraction("density", density)
    g = _check_fraction("gamma", gamma)
    if scope not in BREADCRUMBS_SCOPES:
        raise ValueError(f"scope must be one of {{row, tensor}}, got {scope!r}")
    if x.dim() == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    if x.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    mag = x.detach().abs()
    if scope == "row":
        n = x.shape[-1]
        n_top = keep_count(n, g)
        target = keep_count(n, d)
        return _band_mask(mag, n_top, min(n_top + target, n))
    if d >= 1.0:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    n = x.numel()
    target = keep_count(n, d)
    n_top = min(keep_count(n, g), n - target)
    return _band_mask(mag.reshape(-1), n_top, n_top + target).reshape(x.shape)


def breadcrumbs(x: Tensor, density: float, gamma: float, scope: str = "row") -> Tensor:
    """x with everything outside breadcrumbs_mask zeroed (no rescaling, as the reference)."""
    mask = breadcrumbs_mask(x, density, gamma, scope)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


# ----------------------------------------------------------------------------- TALL-masks, Consensus


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


# ----------------------------------------------------------------------------- task arithmetic


def task_arithmetic(deltas: Tensor, weights: Tensor | None = None) -> Tensor:
    """Weighted sum of task vectors, sum_t w_t * delta_t (weights default to 1); no alpha applied."""
    _check_stacked("deltas", deltas)
    return (_task_weights(weights, deltas) * deltas).sum(dim=0)
