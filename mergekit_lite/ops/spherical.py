"""Spherical combinations of tensors: NuSLERP (whole tensors or their rows/columns), the weighted
spherical mean of Multi-SLERP, and the Karcher (Riemannian) mean on the unit sphere.

Pure math on tensors, mergekit 0.1.5's arithmetic (Karcher: the same iteration, run on a float64 Gram
matrix; see docs/methods.md). The functions work in place on the tensors they are given wherever that
saves a copy; each one says which.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from .threads import map_strided, scratch

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


#: the Gram matrix of row chunks is taken over blocks of this many entries (float64 copies of K blocks)
GRAM_BLOCK = 1 << 16


def add_gram_(gram: Tensor, rows: Sequence[Tensor]) -> Tensor:
    """gram[i, j] += ⟨rows_i, rows_j⟩ in float64 (same-shaped tensors, any dtype), over blocks of GRAM_BLOCK entries."""
    flat = [r.reshape(-1) for r in rows]
    n = flat[0].numel()
    on_cpu = flat[0].device.type == "cpu"
    for a in range(0, n, GRAM_BLOCK):
        size = min(GRAM_BLOCK, n - a)
        if on_cpu:  # each block converted straight into this thread's float64 buffer (no stack, no fresh memory)
            block = scratch("gram block", len(flat) * size, torch.float64).view(len(flat), size)
            for i, f in enumerate(flat):
                block[i].copy_(f[a : a + size])
        else:
            block = torch.stack([f[a : a + size] for f in flat]).to(torch.float64)
        gram.add_((block @ block.T).to(gram.device))
        del block
    return gram


def karcher_coefficients(gram: Tensor, alphas: Sequence[float], *, max_iter: int = 10, tol: float = 1e-5) -> list[float]:
    """c with Σ_j c_j x_j = the weighted Karcher (Fréchet) mean of the directions u_i = x_i/‖x_i‖ on the unit
    sphere, times Σ α_i ‖x_i‖, from the Gram matrix G_ij = ⟨x_i, x_j⟩ alone (float64).

    Tensors with ‖x_i‖ ≤ tol are left out of the direction (their α still counts in the scale); the
    others' α are renormalised to sum to 1. Start: the normalised weighted mean of the unit vectors
    (the first unit vector if that mean has norm < tol). Each of at most ``max_iter`` steps: the
    tangent vector T = Σ α_i θ_i/sin θ_i · (u_i − cos θ_i · m) (θ_i = arccos⟨m, u_i⟩, terms with
    θ_i < tol skipped); stop when ‖T‖ < tol, else m ← cos‖T‖ · m + sin‖T‖ · T/‖T‖, renormalised.
    m and T stay in the span of the u_i, so the iteration runs on their coefficients: ⟨m, u_i⟩ = (Uβ)_i
    and ‖m‖² = βᵀUβ with U the Gram matrix of the unit vectors — no pass over the tensors per step, and
    the angles from float64 dot products (arccos near 1 magnifies a float32 dot's error a thousandfold).
    """
    g = gram.detach().to("cpu", torch.float64)
    count = g.shape[0]
    norms = g.diagonal().clamp(min=0).sqrt()
    valid = [i for i in range(count) if float(norms[i]) > tol]
    coefficients = [0.0] * count
    if not valid:
        return coefficients
    nv = norms[valid]
    units = g[valid][:, valid] / torch.outer(nv, nv)
    alpha_sum = sum(alphas[i] for i in valid)
    weights = torch.tensor([alphas[i] / alpha_sum for i in valid], dtype=torch.float64)

    def norm_of(beta: Tensor) -> float:
        return float(torch.clamp(beta @ units @ beta, min=0.0).sqrt())

    beta = weights.clone()
    mean_norm = norm_of(beta)
    if mean_norm < tol:
        beta = torch.zeros_like(weights)
        beta[0] = 1.0
    else:
        beta /= mean_norm
    for _ in range(max_iter):
        dots = torch.clamp(units @ beta, -1.0, 1.0)
        theta = torch.arccos(dots)
        step = torch.where(theta < tol, torch.zeros_like(theta), weights * theta / torch.sin(theta))
        tangent = step - float(step @ dots) * beta  # T = Σ c_i u_i − (Σ c_i cos θ_i) m
        tangent_norm = norm_of(tangent)
        if tangent_norm < tol:
            break
        beta = math.cos(tangent_norm) * beta + (math.sin(tangent_norm) / tangent_norm) * tangent
        unit_norm = norm_of(beta)
        if unit_norm > tol:
            beta /= unit_norm
    scale = sum(a * float(n) for a, n in zip(alphas, norms))
    for k, i in enumerate(valid):
        coefficients[i] = scale * float(beta[k]) / float(norms[i])
    return coefficients


Rows = Callable[[int, int, int], Tensor]  # rows(i, start, stop): rows [start, stop) of input i, a new tensor


def gram_by_rows(rows: Rows, count: int, chunks: Sequence[tuple[int, int]], parallel: bool = False) -> Tensor:
    """The float64 Gram matrix G_ij = ⟨x_i, x_j⟩ of ``count`` inputs, one row chunk of each at a time; ``parallel``
    (CPU rows): the chunks on the threads in turn (``gram_by_chunks``)."""
    return gram_by_chunks(lambda chunk: [rows(i, *chunk) for i in range(count)], count, chunks, parallel)


def gram_by_chunks(vectors_of: Callable[[tuple[int, int]], Sequence[Tensor]], count: int, chunks: Sequence[tuple[int, int]],
                   parallel: bool = False) -> Tensor:
    """The float64 Gram matrix of the ``count`` vectors whose row chunks ``vectors_of(chunk)`` makes: each chunk's
    matrix from zero, added up in chunk order; ``parallel`` (CPU rows): the chunks on the threads in turn, the same sum."""
    partial: dict[int, Tensor] = {}

    def chunk_gram(chunk: tuple[int, int]) -> None:
        partial[chunk[0]] = add_gram_(torch.zeros((count, count), dtype=torch.float64), vectors_of(chunk))

    _each(chunk_gram, chunks, parallel)
    total = partial.pop(chunks[0][0])
    for start, _ in chunks[1:]:  # in chunk order: the same sum whichever thread made which
        total.add_(partial.pop(start))
    return total


def _each(work: Callable[[tuple[int, int]], None], chunks: Sequence[tuple[int, int]], parallel: bool) -> None:
    """``work`` for every chunk: on the threads in turn where ``parallel``, else one after another."""
    if parallel:
        map_strided(work, chunks)
    else:
        for chunk in chunks:
            work(chunk)


def assembled_rows(part: Callable[[int, int], Tensor], chunks: Sequence[tuple[int, int]], shape: Sequence[int],
                   parallel: bool = False, dtype: torch.dtype | None = None, device: torch.device | None = None) -> Tensor:
    """The tensor whose rows [start, stop) ``part(start, stop)`` makes, chunk by chunk (one chunk: its result as it
    is); ``parallel``: the chunks of CPU rows on the threads in turn (``part`` must allow it); ``dtype``: stored in
    that dtype as they come (the rounding of converting the whole tensor, without holding it). With ``dtype`` and
    ``device`` both given, the whole tensor is made first and every chunk runs on the threads; else the first
    chunk, alone, tells its dtype and device."""
    if len(chunks) == 1:
        return part(*chunks[0])

    def store(chunk: tuple[int, int]) -> None:
        whole[chunk[0] : chunk[1]] = part(*chunk)

    if dtype is not None and device is not None:
        whole = torch.empty(tuple(shape), dtype=dtype, device=device)
        _each(store, chunks, parallel and whole.device.type == "cpu")
        return whole
    first = part(*chunks[0])  # its dtype and device make the whole tensor's
    whole = torch.empty(tuple(shape), dtype=dtype or first.dtype, device=first.device)
    whole[chunks[0][0] : chunks[0][1]] = first
    del first
    _each(store, chunks[1:], parallel and whole.device.type == "cpu")
    return whole


def karcher_mean_by_rows(rows: Rows, count: int, chunks: Sequence[tuple[int, int]], shape: Sequence[int],
                         alphas: Sequence[float], *, max_iter: int = 10, tol: float = 1e-5, parallel: bool = False,
                         dtype: torch.dtype | None = None, device: torch.device | None = None) -> Tensor:
    """``karcher_coefficients`` applied: one pass over row chunks for the Gram matrix, then one for Σ_j c_j x_j
    (``parallel``, CPU rows: each pass's chunks on the threads in turn). Holds the output and a chunk of each input.
    ``dtype``, ``device``: as ``assembled_rows``'s."""
    if count == 1:
        return assembled_rows(lambda start, stop: rows(0, start, stop), chunks, shape)
    coefficients = karcher_coefficients(gram_by_rows(rows, count, chunks, parallel), alphas, max_iter=max_iter, tol=tol)

    def combined(start: int, stop: int) -> Tensor:
        total: Tensor | None = None
        for i, c in enumerate(coefficients):
            x = rows(i, start, stop)
            total = x.mul_(c) if total is None else total.add_(x, alpha=c)
            del x
        assert total is not None
        return total

    return assembled_rows(combined, chunks, shape, parallel, dtype, device)


def multislerp_terms(norms: Sequence[float], weights: Sequence[float], *, normalize_weights: bool = True, eps: float = 1e-8) -> tuple[list[float], list[float], float]:
    """(w, a, scale) of Multi-SLERP's barycentre of x_1..x_K, from their norms ‖x_i‖ alone: the result is
    Σ a_i x_i · scale / ‖Σ a_i x_i‖, with w the weights (divided by their sum if ``normalize_weights``),
    a_i = w_i / (‖x_i‖ + eps) (so Σ a_i x_i = Σ w_i u_i for the unit vectors u_i = x_i / (‖x_i‖ + eps)) and
    scale = Σ w_i ‖x_i‖. (mergekit then projects the u_i onto the tangent space at the mean direction m and maps
    their weighted sum back with the exponential map; that sum is Σ w_i u_i − ⟨Σ w_i u_i, m⟩ m = 0, so the step
    leaves m unchanged up to rounding.) Where ‖Σ a_i x_i‖ < eps, ``multislerp_degenerate`` says what to do."""
    w = [float(x) for x in weights]
    if normalize_weights:
        total = sum(w)
        if total == 0:
            raise ValueError("the models' weights sum to zero, so they cannot be normalised; change a weight or set normalize_weights: false")
        w = [x / total for x in w]
    a = [wi / (ni + eps) for wi, ni in zip(w, norms)]
    return w, a, sum(wi * ni for wi, ni in zip(w, norms))


def multislerp_degenerate(w: Sequence[float], norms: Sequence[float]) -> list[float]:
    """c with Σ c_i x_i = Multi-SLERP's result when the weighted directions sum to (nearly) zero: two tensors give
    w_1 x_1 + w_2 x_2, tensors that are all zero give zero; otherwise ValueError (the directions cancel out)."""
    if len(w) == 2:
        return list(w)
    if all(n == 0.0 for n in norms):
        return [0.0] * len(w)
    raise ValueError(
        "the weighted directions of the models cancel out (their weighted sum is zero), e.g. a and −a with "
        "equal weights; use different weights"
    )


def nuslerp_factors(gram: Tensor, t: float, eps: float = NUSLERP_EPS) -> tuple[float, float]:
    """(c0, c1) with ``nuslerp(t, v0, v1, flatten=True)`` = c0·v0 + c1·v1, from the Gram matrix of (v0, v1) (float64:
    ‖v0‖², ⟨v0, v1⟩, ‖v1‖²), so the interpolation needs no whole tensor: norms floored at 1e-7, cos clamped to
    [−1, 1], colinear (1 − cos² ≤ eps²) → (1 − t, t)."""
    n0 = max(math.sqrt(max(float(gram[0, 0]), 0.0)), NUSLERP_NORM_FLOOR)
    n1 = max(math.sqrt(max(float(gram[1, 1]), 0.0)), NUSLERP_NORM_FLOOR)
    cos = min(max(float(gram[0, 1]) / (n0 * n1), -1.0), 1.0)
    if 1 - cos * cos <= eps**2:
        return 1 - t, t
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta
