"""Spherical combinations of tensors: NuSLERP (whole tensors or their rows/columns), the weighted
spherical mean of Multi-SLERP, and the Karcher (Riemannian) mean on the unit sphere.

Pure math on tensors, mergekit 0.1.5's arithmetic (see docs/methods.md). The functions work in
place on the tensors they are given wherever that saves a copy; each one says which.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

#: NuSLERP: vectors whose 1 − cos²θ is at most this squared are treated as colinear (lerp)
NUSLERP_EPS = 1e-8
#: NuSLERP: a vector norm is never taken below this when normalising
NUSLERP_NORM_FLOOR = 1e-7


def nuslerp_t(weights: Sequence[float]) -> float:
    """NuSLERP's interpolation factor from the two models' weights: w_2 / (w_1 + w_2); 0.5 when |w_1 + w_2| < 1e-6."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def nuslerp(t: float, v0: Tensor, v1: Tensor, *, flatten: bool = True, along_first: bool = False, eps: float = NUSLERP_EPS) -> Tensor:
    """Spherical interpolation from v0 (t = 0) to v1 (t = 1) — of the whole tensors (``flatten``), or of
    each vector along the last dimension, or along the first dimension (``along_first``).

    Per vector pair: cos θ = ⟨v0/‖v0‖, v1/‖v1‖⟩ (norms floored at 1e-7, cos clamped to [−1, 1]);
    where 1 − cos²θ ≤ eps² the pair is colinear and gets (1 − t)·v0 + t·v1, else
    sin((1 − t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1. There is no near-colinear threshold (unlike
    ``slerp``). Overwrites both inputs; the result has v0's shape.
    """
    shape = v0.shape
    if flatten or v0.dim() == 0:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif along_first:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    n0 = torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_(min=NUSLERP_NORM_FLOOR)
    n1 = torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp_(min=NUSLERP_NORM_FLOOR)
    cos = torch.mul(a, b).sum(-1, keepdim=True).div_(n0 * n1).clamp_(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.sin(theta)
    c0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin_theta)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin_theta)
    a.mul_(c0).add_(b.mul_(c1))
    if flatten or v0.dim() == 0:
        return a.reshape(shape)
    return a.transpose(0, -1) if along_first else a


def spherical_weighted_mean(tensors: Iterable[Tensor], weights: Sequence[float], *, normalize_weights: bool = True, eps: float = 1e-8) -> Tensor:
    """Multi-SLERP's barycentre of K ≥ 2 tensors, streamed: each tensor is read once and dropped.

    With u_i = x_i / (‖x_i‖ + eps) and w the weights (divided by their sum if ``normalize_weights``):
    m = Σ w_i u_i / ‖Σ w_i u_i‖ and the result is m · Σ w_i ‖x_i‖. (mergekit then projects the u_i
    onto the tangent space at m and maps their weighted sum back with the exponential map; that sum
    is Σ w_i u_i − ⟨Σ w_i u_i, m⟩ m = 0, so the step leaves m unchanged up to rounding.)

    When ‖Σ w_i u_i‖ < eps: two tensors give the linear combination w_1 x_1 + w_2 x_2; K tensors that
    are all zero give zero; otherwise ValueError (the weighted directions cancel out). Overwrites the
    inputs except when K = 2 (they are kept for the linear fallback).
    """
    w = torch.tensor(list(weights), dtype=torch.float64)
    count = len(w)
    kept: list[Tensor] = []
    acc: Tensor | None = None
    scale: Tensor | None = None
    all_zero = True
    for i, x in enumerate(tensors):
        if i == 0:
            w = w.to(device=x.device, dtype=x.dtype)
            if normalize_weights:
                w = w / w.sum()
        norm = torch.linalg.vector_norm(x)
        all_zero = all_zero and float(norm) == 0.0
        scale = norm * w[i] if scale is None else scale + norm * w[i]
        if count == 2:
            kept.append(x)
            unit = x / (norm + eps)
        else:
            unit = x.div_(norm + eps)
        if acc is None:
            acc = unit.mul_(w[i]) if count != 2 else unit.mul(w[i])
        else:
            acc.add_(unit.mul_(w[i]))
        del unit
    assert acc is not None and scale is not None, "spherical_weighted_mean needs at least one tensor"
    mean_norm = torch.linalg.vector_norm(acc)
    if float(mean_norm) < eps:
        if count == 2:
            return kept[0].mul(w[0]).add_(kept[1].mul(w[1]))
        if all_zero:
            return acc.zero_()
        raise ValueError(
            "the weighted directions of the models cancel out (their weighted sum is zero), e.g. a and −a with "
            "equal weights; use different weights"
        )
    return acc.div_(mean_norm).mul_(scale)


def karcher_mean(tensors: list[Tensor], alphas: Sequence[float], *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """Weighted Karcher (Fréchet) mean of the tensors' directions on the unit sphere, times Σ α_i ‖x_i‖.

    Tensors with ‖x_i‖ ≤ tol are left out of the direction (their α still counts in the scale); the
    others' α are renormalised to sum to 1. Start: the normalised weighted mean of the unit vectors
    (the first unit vector if that mean has norm < tol). Each of at most ``max_iter`` steps: the
    tangent vector T = Σ α_i θ_i/sin θ_i · (u_i − cos θ_i · m) (θ_i = arccos⟨m, u_i⟩, terms with
    θ_i < tol skipped); stop when ‖T‖ < tol, else m ← cos‖T‖ · m + sin‖T‖ · T/‖T‖, renormalised.
    Overwrites the tensors (they become the unit vectors).
    """
    if len(tensors) == 1:
        return tensors[0]
    norms = [torch.linalg.vector_norm(x) for x in tensors]
    for x, n in zip(tensors, norms):
        if float(n) == 0.0:
            x.zero_()
        else:
            x.div_(n)
    return _karcher_from_units(lambda i: tensors[i], norms, alphas, max_iter=max_iter, tol=tol)


def karcher_mean_reread(read: Callable[[int], Tensor], count: int, alphas: Sequence[float], *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """``karcher_mean`` of tensors read again at each step (``read(i)``: a new tensor) instead of held:
    about four copies of one tensor at any count, the same numbers (each unit vector is made the same way)."""
    if count == 1:
        return read(0)
    norms = []
    for i in range(count):
        x = read(i)
        norms.append(torch.linalg.vector_norm(x))
        del x

    def unit(i: int) -> Tensor:
        x = read(i)
        return x.zero_() if float(norms[i]) == 0.0 else x.div_(norms[i])

    return _karcher_from_units(unit, norms, alphas, max_iter=max_iter, tol=tol)


def _karcher_from_units(unit: Callable[[int], Tensor], norms: list[Tensor], alphas: Sequence[float], *, max_iter: int, tol: float) -> Tensor:
    """The Karcher iteration over unit vectors handed out by ``unit(i)`` (read-only for the caller's use here)."""
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(unit(0))
    alpha_sum = sum(alphas[i] for i in valid)
    weights = [alphas[i] / alpha_sum for i in valid]
    mean: Tensor | None = None
    tmp: Tensor | None = None
    for a, i in zip(weights, valid):
        u = unit(i)
        if mean is None:
            mean, tmp = torch.zeros_like(u), torch.empty_like(u)
        assert tmp is not None
        mean.add_(torch.mul(u, a, out=tmp))
        del u
    assert mean is not None and tmp is not None
    mean_norm = torch.linalg.vector_norm(mean)
    if float(mean_norm) < tol:
        mean.copy_(unit(valid[0]))
    else:
        mean.div_(mean_norm)
    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        tangent.zero_()
        for a, i in zip(weights, valid):
            u = unit(i)
            dot = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            coef = a * (theta / torch.sin(theta))
            torch.mul(mean, dot, out=tmp)
            torch.sub(u, tmp, out=tmp)
            del u
            tangent.add_(tmp.mul_(coef))
        tangent_norm = torch.linalg.vector_norm(tangent)
        if float(tangent_norm) < tol:
            break
        tangent.div_(tangent_norm).mul_(torch.sin(tangent_norm))
        mean.mul_(torch.cos(tangent_norm)).add_(tangent)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean.div_(unit_norm)
    del tmp, tangent
    scale = sum(a * n for a, n in zip(alphas, norms))
    return mean.mul_(scale)
