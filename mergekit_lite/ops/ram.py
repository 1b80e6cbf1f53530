"""RAM and RAM+ (Reinforced Agent Merging, Yuan et al., 2026) on one tensor, streamed over the task vectors.

An entry of τ_t is *active* when |τ_t| > ε. Per entry, c = the number of tasks active there:
c = 1 is a *unique* entry (one task changed it), c ≥ 2 a *shared* one. RAM keeps unique entries
as they are and averages shared ones over the tasks active there; RAM+ also multiplies each
task's unique entries by λ_t = 1 + r · clamp(ρ_t, 0, α), ρ_t = (its shared entries) / (its unique
entries), counted over one tensor (mergekit's ``ramplus_tl``) or over the whole model (the
authors' code).

Pure functions on tensors; arithmetic in the input dtype. ``ram_accumulate`` reads the task
vectors one at a time: whatever T, one tensor costs the running sum, the count, the owner map
and the task vector being read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


def active_mask(delta: Tensor, epsilon: float) -> Tensor:
    """Bool mask |delta| > epsilon (computed without a float temporary)."""
    return (delta > epsilon) | (delta < -epsilon)


@dataclass
class RamState:
    """What RAM needs of one tensor after reading its task vectors once."""

    #: Σ_t τ_t · [τ_t active]
    total: Tensor
    #: number of tasks active at each entry (int16)
    count: Tensor
    #: the last task active at each entry (int16; -1 where none), None unless asked for
    owner: Tensor | None
    #: per task, how many of its entries are active
    active: list[int] = field(default_factory=list)


def ram_accumulate(deltas: Iterable[Tensor], epsilon: float, track_owner: bool = False) -> RamState:
    """Read the task vectors of one tensor in order, keeping only RamState (each delta is overwritten)."""
    state: RamState | None = None
    for t, delta in enumerate(deltas):
        if state is None:
            owner = torch.full(delta.shape, -1, dtype=torch.int16, device=delta.device) if track_owner else None
            state = RamState(torch.zeros_like(delta), torch.zeros(delta.shape, dtype=torch.int16, device=delta.device), owner)
        if t >= 32767:
            raise ValueError("RAM counts at most 32767 task vectors")
        if epsilon >= 0 and delta.is_floating_point():  # hardshrink keeps |τ| > ε, the rest +0 (as the mask): 1 pass for 4
            kept = torch.hardshrink(delta, epsilon, out=delta)
            active = kept != 0  # an active entry is never 0 (|τ| > ε ≥ 0)
        else:
            active = active_mask(delta, epsilon)
            kept = delta.masked_fill_(~active, 0)
        state.active.append(int(torch.count_nonzero(active)))
        state.total.add_(kept)
        state.count.add_(active)
        if state.owner is not None:
            state.owner.masked_fill_(active, t)
        del active, delta, kept
    if state is None:
        raise ValueError("RAM needs at least one task vector")
    return state


def unique_counts(state: RamState) -> list[int]:
    """Per task, how many entries only it changed (c = 1). Marks the owner map -1 wherever c ≠ 1."""
    assert state.owner is not None, "ram_accumulate(track_owner=True) is needed for unique counts"
    state.owner.masked_fill_(state.count != 1, -1)
    return [int(torch.count_nonzero(state.owner == t)) for t in range(len(state.active))]


def ram_finish(state: RamState) -> Tensor:
    """RAM's merged task vector: unique entries kept, shared ones averaged over the active tasks, the rest 0."""
    return state.total.div_(state.count.clamp_(min=1))


def ramplus_scales(shared: Sequence[int], unique: Sequence[int], r: float, alpha: float, epsilon: float) -> list[float]:
    """λ_t = 1 + r · clamp(ρ_t, 0, α) with ρ_t = shared_t / max(unique_t, ε) (mergekit's formula).

    A task with no shared entries has ρ = 0 (mergekit computes 0/ε, or NaN when ε ≤ 0 and the task
    changed nothing; we say 0). A task with shared entries and no unique ones gets ρ = +inf (clamped
    to α): it has no unique entries to scale anyway.
    """
    scales = []
    for s, u in zip(shared, unique):
        if s == 0:
            rho = 0.0
        else:
            d = max(float(u), epsilon)
            rho = s / d if d > 0 else math.inf
        scales.append(1.0 + r * min(max(rho, 0.0), alpha))
    return scales


def ramplus_finish(state: RamState, scales: Sequence[float]) -> Tensor:
    """RAM+'s merged task vector: task t's unique entries times scales[t], shared ones averaged.

    Needs the owner map marked by ``unique_counts`` (-1 wherever c ≠ 1).
    """
    assert state.owner is not None, "ram_accumulate(track_owner=True) is needed for RAM+"
    scale = torch.ones_like(state.total)
    for t, lam in enumerate(scales):
        if lam != 1.0:
            scale.masked_fill_(state.owner == t, lam)
    state.total.mul_(scale)
    del scale
    return ram_finish(state)


def ram(deltas: Tensor, epsilon: float = 1e-5) -> Tensor:
    """RAM on stacked task vectors [T, ...] (a convenience over the streaming functions; deltas are kept)."""
    return ram_finish(ram_accumulate((d.clone() for d in deltas), epsilon))


def ramplus(deltas: Tensor, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5) -> Tensor:
    """RAM+ with ρ counted over this tensor (mergekit's ``ramplus_tl``) on stacked task vectors [T, ...]."""
    state = ram_accumulate((d.clone() for d in deltas), epsilon, track_owner=True)
    unique = unique_counts(state)
    shared = [a - u for a, u in zip(state.active, unique)]
    return ramplus_finish(state, ramplus_scales(shared, unique, r, alpha, epsilon))
