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

import numpy as np
import torch
from torch import Tensor

from .threads import map_parts, split_evenly, thread_count


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
    #: Σ_t t·[τ_t active] (int16, modulo 2^16: exact where one task is active, the only entries read), None unless
    #: asked for; ``unique_counts`` turns it into the owner map (the one active task, -1 wherever c ≠ 1). A sum, not
    #: a masked fill per task: torch's int16 masked_fill is a scalar loop (1.27 vs 0.08 ns per entry, measured)
    owner: Tensor | None
    #: per task, how many of its entries are active (counted with the owner map only: RAM+ needs them, RAM not)
    active: list[int] = field(default_factory=list)


def nonzero_mask(x: Tensor, out: Tensor | None = None) -> Tensor:
    """Bool mask x != 0 (into ``out`` when it is a CPU bool tensor of x's shape). On the CPU through numpy's
    vectorized comparison: torch's runs a scalar loop (2^20 float32 entries: 0.35 ns per entry on two torch
    threads, numpy 0.17 on one, measured)."""
    if x.device.type != "cpu" or not x.is_contiguous() or x.dtype not in (torch.float32, torch.float64):
        return x != 0
    if out is None or out.shape != x.shape or out.dtype != torch.bool or out.device.type != "cpu" or not out.is_contiguous():
        out = torch.empty(x.shape, dtype=torch.bool)
    np.not_equal(x.numpy(), 0, out=out.numpy())
    return out


def count_true(mask: Tensor) -> int:
    """How many entries of a bool mask are True; numpy's count on the CPU (32M entries: 0.04 vs torch's 0.16 ns each)."""
    if mask.device.type == "cpu" and mask.is_contiguous():
        return int(np.count_nonzero(mask.numpy()))
    return int(torch.count_nonzero(mask))


def ram_accumulate(deltas: Iterable[Tensor], epsilon: float, track_owner: bool = False, into: RamState | None = None) -> RamState:
    """Read the task vectors of one tensor in order, keeping only RamState (each delta is overwritten). ``into``: a
    state whose tensors (the deltas' shape and dtype, int16 count and owner) are zeroed and used instead of new ones
    (a row chunk's views of whole-tensor buffers); its owner, if any, decides ``track_owner``."""
    state: RamState | None = None
    active: Tensor | None = None  # the mask of the last task vector, written over by the next (no fresh pages)
    for t, delta in enumerate(deltas):
        if state is None and into is not None:
            state = into
            for part in (state.total, state.count, state.owner):
                if part is not None:
                    part.zero_()
            state.active = []
        if state is None:
            owner = torch.zeros(delta.shape, dtype=torch.int16, device=delta.device) if track_owner else None
            state = RamState(torch.zeros_like(delta), torch.zeros(delta.shape, dtype=torch.int16, device=delta.device), owner)
        if t >= 32767:
            raise ValueError("RAM counts at most 32767 task vectors")
        if epsilon >= 0 and delta.is_floating_point():  # hardshrink keeps |τ| > ε, the rest +0 (as the mask): 1 pass for 4
            kept = torch.hardshrink(delta, epsilon, out=delta)
            active = nonzero_mask(kept, out=active)  # an active entry is never 0 (|τ| > ε ≥ 0)
        else:
            active = active_mask(delta, epsilon)
            kept = delta.masked_fill_(~active, 0)
        if state.owner is not None:
            state.active.append(count_true(active))
        state.total.add_(kept)
        state.count.add_(active)
        if state.owner is not None and t > 0:
            state.owner.add_(active, alpha=t)
        del delta, kept
    if state is None:
        raise ValueError("RAM needs at least one task vector")
    return state


def unique_counts(state: RamState) -> list[int]:
    """Per task, how many entries only it changed (c = 1). Makes ``state.owner`` the owner map: -1 wherever c ≠ 1."""
    assert state.owner is not None, "ram_accumulate(track_owner=True) is needed for unique counts"
    state.owner.masked_fill_(state.count != 1, -1)
    # one pass over the owner map (-1 → bin 0) instead of a comparison and a count per task (K = 8: 1.2 vs 7.1 ns per entry)
    counts = torch.bincount((state.owner + 1).reshape(-1), minlength=len(state.active) + 1)
    return [int(c) for c in counts[1:]]


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
    if all(lam == 1.0 for lam in scales):
        return ram_finish(state)
    total, owner = state.total, state.owner
    if total.device.type == "cpu" and total.is_contiguous() and owner.is_contiguous() and total.dtype in (torch.float32, torch.float64):
        _scale_by_owner_(total.numpy().reshape(-1), owner.numpy().reshape(-1), np.array([1.0, *scales], dtype=total.numpy().dtype))
    else:
        scale = torch.ones_like(total)
        for t, lam in enumerate(scales):
            if lam != 1.0:
                scale.masked_fill_(owner == t, lam)
        total.mul_(scale)
        del scale
    return ram_finish(state)


#: entries per block of ``_scale_by_owner_`` (its int64 index temporary: 512 KiB)
SCALE_BLOCK = 1 << 16


def _scale_by_owner_(total: np.ndarray, owner: np.ndarray, table: np.ndarray) -> None:
    """total *= table[owner + 1] (table[0] = 1 for entries no single task owns), a block at a time over the threads:
    one gather instead of a comparison and a fill per task (32M entries, K = 8: 5.8 vs 11.6 ns per entry, measured)."""

    def scale(part: tuple[int, int]) -> None:
        for start in range(part[0], part[1], SCALE_BLOCK):
            stop = min(start + SCALE_BLOCK, part[1])
            index = owner[start:stop].astype(np.intp)
            index += 1
            total[start:stop] *= table[index]

    map_parts(scale, split_evenly(total.size, thread_count(), SCALE_BLOCK))


def ram(deltas: Tensor, epsilon: float = 1e-5) -> Tensor:
    """RAM on stacked task vectors [T, ...] (a convenience over the streaming functions; deltas are kept)."""
    return ram_finish(ram_accumulate((d.clone() for d in deltas), epsilon))


def ramplus(deltas: Tensor, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5) -> Tensor:
    """RAM+ with ρ counted over this tensor (mergekit's ``ramplus_tl``) on stacked task vectors [T, ...]."""
    state = ram_accumulate((d.clone() for d in deltas), epsilon, track_owner=True)
    unique = unique_counts(state)
    shared = [a - u for a, u in zip(state.active, unique)]
    return ramplus_finish(state, ramplus_scales(shared, unique, r, alpha, epsilon))
