"""SCE (select, calculate, erase; FuseChat, Wan et al., 2024): mergekit 0.1.5's semantics."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

from ..ops.sce import SCE_ENERGY_FLOOR, energy_weights, mean_square, row_square_sums, sce_erase, task_variance, top_variance_mask
from ..ops.sparsify import apply_mask_
from .base import HeldTaskVectors, MergeMethod, by_row_chunks, chunk_rows, merged_by_row_chunks, Param, TaskVectorSource, TensorContext, register
from .task_arithmetic import INT8_MASK

SELECT_TOPK = Param(
    "select_topk", float, 1.0,
    "Fraction of the entries (of those whose variance across the task vectors is non-zero) kept by the select step, "
    "largest variance first; 1 keeps all (mergekit's default), 0 or less keeps none.",
)
ENERGY_FLOOR = Param(
    "energy_floor", float, SCE_ENERGY_FLOOR,
    "When a tensor's summed task-vector energy Σ_t mean(τ_t²) is below this, the weights are uniform "
    "(mergekit: 1e-6, which real fine-tunes with small deltas often fall under); 0 gives the paper's energy weights "
    "whenever any task vector is non-zero.",
    minimum=0,
)

SCE_MERGE = Param(
    "merge", str, "mean",
    "How the surviving entries combine: mean (mergekit: Σ η_t τ_t over the entries that agree with the elected sign, "
    "divided by the sum of their η_t) or sum (the paper: Σ η_t τ_t, η summing to 1 over the models).",
    choices=("mean", "sum"),
)


def sce_rows(source: TaskVectorSource, ctx: TensorContext) -> torch.Tensor:
    """SCE over a task-vector source, never holding the T task vectors of a tensor at once.

    select: the variance across tasks, row chunk by row chunk, then the top entries of the whole
    tensor; calculate: each τ_t's energy, row chunk by row chunk (a sparse selection's kept entries
    gathered on the way); erase: per row chunk, the T selected rows stacked (a chunk, not the tensor),
    or the gathered entries only (SCE K = 8, select_topk 0.2, 250M: 18.7/18.1 → 18.1/17.9 s).
    """
    fraction = ctx.params["select_topk"]
    keep: torch.Tensor | None = None
    if fraction <= 0:
        keep = torch.zeros(source.shape, dtype=torch.bool, device=source.device)
    elif fraction < 1:

        def variance_rows(start: int, stop: int, rows: slice | None) -> torch.Tensor:
            return task_variance(source.rows(t, start, stop) for t in range(source.count))

        keep = top_variance_mask(by_row_chunks(source, variance_rows), fraction)
    # a sparse selection's kept entries of every τ_t are gathered in the energy pass (per chunk's first row: their
    # flat positions and each τ_t's values there): the erase then reads nothing and works on those entries only
    gathered: Gathered | None = {} if keep is not None and _gathers(source, keep) else None
    weights = [float(w) for w in energy_weights(_energies(source, keep, gathered), ctx.params["energy_floor"], source.dtype)]

    def erase_rows(start: int, stop: int, rows: slice | None) -> torch.Tensor:
        if gathered is not None:  # the same erase on the kept entries' columns, + 0 as below; the rest +0
            positions, values = gathered.pop(start)
            out = torch.zeros((stop - start, *source.shape[1:]), dtype=source.dtype)
            if positions.size:
                merged = sce_erase(torch.from_numpy(np.stack(values)), weights, ctx.params["merge"]).add_(0.0)
                out.numpy().reshape(-1)[positions] = merged.numpy()
            return out
        stacked = source.stacked_rows(start, stop, reuse=True)  # this thread's buffer: the erase makes a new tensor
        merged = sce_erase(stacked, weights, ctx.params["merge"])
        if keep is None:
            return merged
        # each entry is erased on its own, so the selection can mask the result instead of every τ_t: an entry
        # left out has every τ_t zeroed, which erases to +0 (−0 · 0 + 0 too); numpy's product with a bool mask
        return apply_mask_(merged, keep if rows is None else keep[rows]).add_(0.0)

    return merged_by_row_chunks(source, erase_rows)


#: the kept entries of every τ_t are held (gathered) when they take at most this many copies of the tensor
GATHER_COPIES = 2.0


def _gathers(source: TaskVectorSource, keep: torch.Tensor) -> bool:
    """Whether the energy pass gathers the kept entries: a CPU matrix in float32/64 whose kept entries of all
    T task vectors fit in GATHER_COPIES copies of it (select_topk 0.2 at K = 8: 1.6)."""
    return (
        len(source.shape) >= 2 and keep.device.type == "cpu" and source.dtype in (torch.float32, torch.float64)
        and int(torch.count_nonzero(keep)) * source.count <= GATHER_COPIES * math.prod(source.shape)
    )


#: per row chunk (by its first row): the flat positions of its kept entries and each τ_t's values there
Gathered = dict[int, tuple[np.ndarray, list[np.ndarray]]]


def _energies(source: TaskVectorSource, keep: torch.Tensor | None, gathered: Gathered | None = None) -> list[float]:
    """mean(τ_t²) of each task's selected entries: a matrix's by row chunks (each row's float64 sum of squares,
    added up exactly: ``mean_square``'s number, with less memory than a whole τ_t), a vector's from the whole τ_t.
    With ``gathered``, each chunk's kept entries of every τ_t are gathered there too."""
    if len(source.shape) < 2:
        energy = []
        for delta in source.whole(reuse=True):
            energy.append(mean_square(delta if keep is None else apply_mask_(delta if source.hands_out_new else delta.clone(), keep)))
            del delta
        return energy
    sums: list[list[float]] = [[] for _ in range(source.count)]
    for start, stop in source.chunks():
        rows = chunk_rows(source, start, stop)
        kept = None if keep is None else (keep if rows is None else keep[rows])
        positions = np.flatnonzero(kept.numpy()) if gathered is not None and kept is not None else None
        values: list[np.ndarray] = []
        for t in range(source.count):
            delta = source.rows(t, start, stop)
            if positions is not None:
                values.append(np.take(delta.numpy().reshape(-1), positions))
            if kept is not None:
                delta = apply_mask_(delta if source.hands_out_new else delta.clone(), kept)
            sums[t].extend(row_square_sums(delta))
            del delta
        if gathered is not None and positions is not None:
            gathered[start] = (positions, values)
    n = math.prod(source.shape)
    return [math.fsum(s) / n if n else 0.0 for s in sums]


def sce_combine(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    return sce_rows(HeldTaskVectors(deltas), ctx)


register(
    MergeMethod(
        name="sce",
        summary="SCE: keep the entries of largest variance across models, weight each model by its energy, erase minority signs (Wan et al., 2024).",
        params=(SELECT_TOPK, ENERGY_FLOOR, SCE_MERGE, INT8_MASK),
        combine=sce_combine,
        combine_rows=sce_rows,
        paper="https://arxiv.org/abs/2408.07990",
        # measured with row chunks: the base, the variance and its selection, one whole task vector
        # output by row chunks; measured 3.16 / 2.78 with the stored copy at K = 2 / 8 (select_topk 1); a sparse
        # selection's gathered entries add at most GATHER_COPIES
        working_copies=lambda n: 2.2 + GATHER_COPIES,
    )
)
