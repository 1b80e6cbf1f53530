"""Merges in the singular-vector basis of each weight matrix: TSV-M, Iso-C, Iso-CTS, and WUDI.

Each function takes the task vectors τ_t of ONE 2-D weight (already weighted) and returns the merged
update of that matrix, before the scaling coefficient. Pure tensor code on whatever device and dtype
the inputs have: no files, no recipes. Formulas, choices and sources: docs/methods.md.

* TSV-M (Gargiulo et al., CVPR 2025): each τ_t truncated to its top ⌊r/T⌋ singular triplets; the
  concatenated left and right singular vectors replaced by their closest orthonormal matrices
  (orthogonal Procrustes: the polar factor P·Qᵀ of A = P·Σ·Qᵀ); recombined with the kept values.
* Iso-C (Marczak et al., ICML 2025): the spectrum of Σ_t τ_t replaced by its mean singular value.
* Iso-CTS (same paper): the top singular vectors of Σ_t τ_t (the common subspace) plus each task's
  top singular vectors of its component orthogonal to it, orthonormalised, with a flat spectrum.
* WUDI (Cheng et al., ICML 2025): τ minimising Σ_t ‖(τ − τ_t)·τ_tᵀ‖²_F / ‖τ_t‖²_F by Adam from Σ_t τ_t.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from .vocab import is_vocabulary_tensor
from .devices import divide_

#: Lookup tables indexed by position or segment (not linear maps), by the end of their name.
POSITION_TABLE_SUFFIXES = (
    "wpe.weight", "position_embeddings.weight", "token_type_embeddings.weight", "embed_positions.weight",
    "positional_embedding", "pos_embed",
)

#: Adam's constants as torch.optim.Adam's defaults (the WUDI reference code uses them).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def is_spectral(name: str, tensor: Tensor) -> bool:
    """Whether a tensor is merged in the singular-vector basis: a 2-D weight that is not an embedding table.

    Embeddings and output heads (one row per token) and position/segment tables are lookup tables,
    not linear maps of the layer's input; they, and every tensor that is not 2-D, are averaged.
    """
    if tensor.ndim != 2 or min(tensor.shape) == 0:
        return False
    return not is_vocabulary_tensor(name) and not any(name == s or name.endswith("." + s) for s in POSITION_TABLE_SUFFIXES)


def numerical_rank(s: Tensor, shape: Sequence[int], scale: float | None = None) -> int:
    """How many singular values (descending) exceed max(m, n)·ε·scale, scale the largest one by default
    (torch.linalg.matrix_rank's rule): the rest are rounding noise, and their singular vectors arbitrary."""
    if s.numel() == 0:
        return 0
    reference = float(s[0]) if scale is None else scale
    return int((s > max(shape) * torch.finfo(s.dtype).eps * reference).sum())


def polar_factor(a: Tensor) -> Tensor:
    """The orthogonal Procrustes factor of ``a``: P·Qᵀ from a = P·Σ·Qᵀ over its non-zero singular values.

    With full rank it is the matrix with orthonormal columns (rows, if a is wide) closest to ``a``; a
    rank-deficient ``a`` (two tasks sharing a direction) gets the partial isometry on its range, the
    one choice that does not depend on which null-space vectors an SVD backend returns.
    """
    p, s, qh = torch.linalg.svd(a, full_matrices=False)
    rank = numerical_rank(s, a.shape)
    return p[:, :rank] @ qh[:rank]


# -- TSV-M ------------------------------------------------------------------------------------------
def tsv_rank(rank: int, tasks: int, fraction: float = 1.0) -> int:
    """Singular triplets each task keeps: ⌊fraction·r/T⌋, at least 1 (the reference's int(r·(1/T)) is 0 when T > r)."""
    return max(1, math.floor(fraction * rank / tasks + 1e-9))


def tsv_merge(deltas: Iterable[Tensor], tasks: int, fraction: float = 1.0) -> Tensor:
    """TSV-M of one matrix: U⊥·diag(S)·V⊥ from the tasks' truncated SVDs, one task vector held at a time.

    ``deltas`` yields the T task vectors (m × n, each dropped once decomposed); ``tasks`` is T. A task
    keeps its top k triplets, fewer when its update has rank below k (zero singular values carry
    arbitrary vectors, which would change every other task's orthogonalised vectors).
    """
    u_cat: Tensor | None = None
    filled = 0
    for delta in deltas:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        del delta
        k = tsv_rank(s.shape[0], tasks, fraction)
        if u_cat is None:
            u_cat = u.new_zeros(u.shape[0], k * tasks)
            s_cat = s.new_zeros(k * tasks)
            vh_cat = vh.new_zeros(k * tasks, vh.shape[1])
        k = min(k, numerical_rank(s, u.shape[:1] + vh.shape[1:]))
        block = slice(filled, filled + k)
        u_cat[:, block], s_cat[block], vh_cat[block] = u[:, :k], s[:k], vh[:k]
        filled += k
        del u, s, vh
    if u_cat is None:
        raise ValueError("TSV-M needs at least one task vector")
    if filled == 0:
        return u_cat.new_zeros(u_cat.shape[0], vh_cat.shape[1])
    u_orth = polar_factor(u_cat[:, :filled]).mul_(s_cat[:filled])  # U⊥·diag(S): scales column j by S_j
    del u_cat
    return u_orth @ polar_factor(vh_cat[:filled])


# -- Iso-C and Iso-CTS ------------------------------------------------------------------------------
def iso_c(total: Tensor) -> Tensor:
    """Iso-C of one matrix from M = Σ_t τ_t: U·(mean σ)·Vᵀ, every singular value replaced by their mean.

    Over M's non-zero singular values: a rank-deficient M (low-rank fine-tunes) keeps its range
    instead of gaining arbitrary directions at the mean value.
    """
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    rank = numerical_rank(s, total.shape)
    if rank == 0:
        return torch.zeros_like(total)
    return u[:, :rank].mul_(s[:rank].mean()) @ vh[:rank]


def iso_cts_sizes(rank: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common dimensions c, dimensions per task d) with c + T·d = r, as the reference rounds them.

    c = ⌊r·f⌋ first; the rest is rounded (Python's round) to a multiple of T, which moves c, and never
    past r (the reference's c can go negative when T > r − c; we clamp d to ⌊r/T⌋).
    """
    common = int(rank * common_fraction)
    per_task = min(round((rank - common) / tasks), rank // tasks)
    return rank - per_task * tasks, per_task


def iso_cts(deltas: Sequence[Tensor] | Callable[[], Iterable[Tensor]], common_fraction: float = 0.8) -> Tensor:
    """Iso-CTS of one matrix: common subspace of Σ_t τ_t + task-specific subspaces, orthonormalised, flat spectrum.

    Needs every task vector twice (for the sum, then projected off the common subspace): ``deltas`` is
    the list of them, or a function handing them out again at each call (then one is held at a time).
    As in Iso-C, only non-zero singular values count: the common subspace stops at M's rank, and a
    task whose update lies in the common subspace adds nothing of its own.
    """
    read: Callable[[], Iterable[Tensor]] = deltas if callable(deltas) else (lambda: iter(deltas))
    total: Tensor | None = None
    tasks = 0
    for delta in read():
        total = torch.zeros_like(delta) if total is None else total
        total.add_(delta)
        tasks += 1
        del delta
    if total is None:
        raise ValueError("Iso-CTS needs at least one task vector")
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    del total
    rank = s.shape[0]
    common, per_task = iso_cts_sizes(rank, tasks, common_fraction)
    common = min(common, numerical_rank(s, u.shape[:1] + vh.shape[1:]))
    u_all = torch.empty_like(u)
    s_all = torch.empty_like(s)
    vh_all = torch.empty_like(vh)
    u_all[:, :common], s_all[:common], vh_all[:common] = u[:, :common], s[:common], vh[:common]
    u_common = u_all[:, :common]
    filled = common
    del u, s, vh
    for delta in read() if per_task > 0 else ():
        specific = delta - u_common @ (u_common.mT @ delta)  # τ_t without its common-subspace component
        ut, st, vht = torch.linalg.svd(specific, full_matrices=False)
        del specific
        # what is left of τ_t is noise when it is below rounding of τ_t itself (not of the remainder)
        d = min(per_task, numerical_rank(st, delta.shape, float(torch.linalg.matrix_norm(delta))))
        block = slice(filled, filled + d)
        u_all[:, block], s_all[block], vh_all[block] = ut[:, :d], st[:d], vht[:d]
        filled += d
        del ut, st, vht, delta
    if filled == 0:
        return torch.zeros(u_all.shape[0], vh_all.shape[1], dtype=u_all.dtype, device=u_all.device)
    u_orth = polar_factor(u_all[:, :filled]).mul_(s_all[:filled].mean())
    del u_all
    return u_orth @ polar_factor(vh_all[:filled])


# -- WUDI -------------------------------------------------------------------------------------------
def wudi_loss(merged: Tensor, deltas: Sequence[Tensor]) -> Tensor:
    """Σ_t ‖(τ − τ_t)·τ_tᵀ‖²_F / ‖τ_t‖²_F (a zero τ_t adds nothing), the interference WUDI minimises."""
    total = merged.new_zeros(())
    for delta in deltas:
        norm2 = delta.square().sum()
        if norm2 > 0:
            total = total + ((merged - delta) @ delta.mT).square().sum() / norm2
    return total


def wudi_merge(deltas: Iterable[Tensor], steps: int = 300, lr: float = 1e-5, tasks: int | None = None) -> Tensor:
    """WUDI of one matrix: ``steps`` Adam steps on the interference loss from τ = Σ_t τ_t.

    The loss is quadratic, so its gradient is 2·(τ·G − B) with G = Σ_t τ_tᵀτ_t / ‖τ_t‖² (n × n) and
    B = Σ_t τ_t·τ_tᵀ·τ_t / ‖τ_t‖² (m × n), both gathered in one pass over the task vectors: each step
    costs one m × n × n product whatever T, and no task vector is held during the steps. A wide
    matrix (n > T·m, ``tasks`` = T given) keeps G factored instead, as the stacked rows A of the
    τ_t / ‖τ_t‖ (T·m × n, G = AᵀA): T copies rather than n/m, and τ·G = (τ·Aᵀ)·A. Adam as
    torch.optim.Adam computes it (β = 0.9, 0.999; ε = 1e-8; no weight decay). No randomness.
    """
    merged: Tensor | None = None
    for t, delta in enumerate(deltas):
        if merged is None:
            m, n = delta.shape
            merged = torch.zeros_like(delta)
            target = torch.zeros_like(delta)
            factored = tasks is not None and n > tasks * m
            gram = delta.new_zeros(tasks * m, n) if factored else delta.new_zeros(n, n)
        merged.add_(delta)
        norm2 = float(delta.square().sum())
        if norm2 > 0:
            if n <= m:  # the n × n Gram of τ_t is the smaller product
                own = delta.mT @ delta
                target.addmm_(delta, own, alpha=1 / norm2)
                if not factored:
                    gram.add_(own, alpha=1 / norm2)
            else:
                target.addmm_(delta @ delta.mT, delta, alpha=1 / norm2)
                if not factored:
                    gram.addmm_(delta.mT, delta, alpha=1 / norm2)
            if factored:
                gram[t * m:(t + 1) * m] = delta / math.sqrt(norm2)
        del delta
    if merged is None:
        raise ValueError("WUDI needs at least one task vector")
    if steps == 0:
        return merged
    beta1, beta2 = ADAM_BETAS
    grad = torch.empty_like(merged)
    exp_avg = torch.zeros_like(merged)
    exp_avg_sq = torch.zeros_like(merged)
    denom = torch.empty_like(merged)
    for step in range(1, steps + 1):
        if factored:
            torch.mm(merged @ gram.mT, gram, out=grad)
        else:
            torch.mm(merged, gram, out=grad)
        grad.sub_(target).mul_(2)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1**step
        bias2 = 1 - beta2**step
        divide_(torch.sqrt(exp_avg_sq, out=denom), math.sqrt(bias2)).add_(ADAM_EPS)
        merged.addcdiv_(exp_avg, denom, value=-lr / bias1)
    return merged
