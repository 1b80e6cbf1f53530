"""TSV-M, Iso-C, Iso-CTS and WUDI: data-free merges per weight matrix in its singular-vector basis (our own methods).

Each is a task-vector method: θ = θ_0 + λ·merged. A 2-D weight that is a linear map gets the
method's merge (``ops/svd_merge.py``); every other tensor (1-D, embeddings, output heads, position
tables, convolutions) gets the mean of the task vectors, as the reference code does, so that λ
scales the whole update the same way. One tensor at a time, as every other method.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterable, Iterator

import torch

from ..ops.svd_merge import is_spectral, iso_c, iso_cts, tsv_merge, wudi_merge
from ..ops.devices import divide_
from .base import HeldTaskVectors, MergeMethod, Param, TaskVectorSource, TensorContext, register, weighted_task_vector
from .task_arithmetic import LAMBDA, WEIGHT

RANK_FRACTION = Param(
    "rank_fraction", float, 1.0,
    "TSV-M: fraction of each matrix's rank r shared by the tasks; each keeps its top ⌊rank_fraction·r/T⌋ singular "
    "triplets, at least 1 (1: the paper's r/T each).",
    minimum=0, maximum=1,
)
COMMON_SPACE_FRACTION = Param(
    "common_space_fraction", float, 0.8,
    "Iso-CTS: fraction of each matrix's rank given to the common subspace of Σ_t τ_t; the rest is split evenly among "
    "the tasks' own subspaces (the paper: 0.8; 1 is Iso-C).",
    minimum=0, maximum=1,
)
STEPS = Param("steps", int, 300, "WUDI: Adam steps on the interference loss (the paper's code: 300; FusionBench's config: 400).", minimum=0)
LR = Param("lr", float, 1e-5, "WUDI: Adam's learning rate (the paper: 1e-5, an absolute step of about lr per entry per step).", minimum=0)
#: the papers choose α on validation, and Iso's best α is often above 1 (its flat spectrum shrinks the update)
ISO_LAMBDA = replace(LAMBDA, default_grid=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0))

Kernel = Callable[[Iterator[torch.Tensor], TensorContext], torch.Tensor]

#: TSV-M, Iso-C and Iso-CTS run on the CPU whatever --device says: the GPU's float32 SVDs put the merged weights up to
#: 4.6e-6 (Iso-C), 3.0e-5 (TSV-M) and 6.7e-5 (Iso-CTS) away from the CPU's (H200, 40M, K = 4); float64 SVDs on both
#: devices would double the CPU's time. WUDI (no SVD) runs where it is sent, within 1e-6 of the CPU.
ON_THE_CPU = True


def _weighted(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> Iterator[torch.Tensor]:
    """w_t·τ_t in place, one at a time."""
    for p, delta in zip(ctx.model_params, deltas):
        yield weighted_task_vector(delta, p, owned=True)
        del delta


def mean_update(deltas: Iterable[torch.Tensor]) -> torch.Tensor:
    """(1/T)·Σ_t τ_t, one task vector held at a time: the update of the tensors merged outside the singular basis."""
    total: torch.Tensor | None = None
    count = 0
    for delta in deltas:
        total = delta if total is None else total.add_(delta)
        count += 1
        del delta
    if total is None:
        raise ValueError("at least one task vector is required")
    return divide_(total, count)


def spectral(kernel: Kernel) -> Callable[[Iterable[torch.Tensor], TensorContext], torch.Tensor]:
    """A combine function: the kernel on 2-D linear weights, the mean of the task vectors on every other tensor."""

    def combine(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
        weighted = _weighted(deltas, ctx)
        first = next(weighted)
        spectral_tensor = is_spectral(ctx.name, first)
        held = [first]
        del first  # from here on only the consumer holds the first task vector
        again = _prepended(held, weighted)
        return kernel(again, ctx) if spectral_tensor else mean_update(again)

    return combine


def _prepended(held: list[torch.Tensor], rest: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The task vector peeked at, then the rest, keeping no reference to it once handed out."""
    yield held.pop()
    yield from rest


def _tsv(deltas: Iterator[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    return tsv_merge(deltas, len(ctx.model_params), ctx.params["rank_fraction"])


def _iso_c(deltas: Iterator[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    total = next(deltas)
    for delta in deltas:
        total.add_(delta)
        del delta
    return iso_c(total)


def iso_cts_rows(source: TaskVectorSource, ctx: TensorContext) -> torch.Tensor:
    """Iso-CTS reading each task vector twice from the source (for the sum, then projected off the
    common subspace) instead of holding the K of them; other tensors take the mean update."""

    def weighted() -> Iterator[torch.Tensor]:
        for delta, p in zip(source.whole(), ctx.model_params):
            yield weighted_task_vector(delta, p, source.hands_out_new)
            del delta

    if not is_spectral(ctx.name, torch.empty(source.shape, device="meta")):
        return mean_update(delta if source.hands_out_new else delta.clone() for delta in weighted())
    return iso_cts(weighted, ctx.params["common_space_fraction"])


def _iso_cts(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    return iso_cts_rows(HeldTaskVectors(deltas), ctx)


def _wudi(deltas: Iterator[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    return wudi_merge(deltas, ctx.params["steps"], ctx.params["lr"], len(ctx.model_params))


register(
    MergeMethod(
        name="tsv_m",
        summary="TSV-M: each task's top singular vectors, orthogonalised across tasks (Procrustes), per weight matrix (Gargiulo et al., 2025).",
        params=(RANK_FRACTION, WEIGHT, LAMBDA),
        combine=spectral(_tsv),
        paper="https://arxiv.org/abs/2412.00081",
        # θ_0, the task vector being decomposed and its SVD (U, Vᵀ), the gathered U and Vᵀ, the polar
        # factors and the product, not all at once: none of it grows with K (6.15 / 6.97 / 7.06 with the output measured at
        # K = 2 / 4 / 8 in the fourteenth session; 5.5 failed bench_memory at K = 4 and 8 before that session's changes too)
        cpu_only=ON_THE_CPU,
        working_copies=lambda n: 6,
    )
)
register(
    MergeMethod(
        name="iso_c",
        summary="Iso-C: the sum of the task vectors with its singular spectrum flattened to the mean, per weight matrix (Marczak et al., 2025).",
        params=(WEIGHT, ISO_LAMBDA),
        combine=spectral(_iso_c),
        paper="https://arxiv.org/abs/2502.04959",
        # θ_0, the running sum and the task vector being read, its SVD (U, Vᵀ) and the product: 5.51
        # and 5.44 measured with the output at K = 2 and 4
        cpu_only=ON_THE_CPU,
        working_copies=lambda n: 5.5,
    )
)
register(
    MergeMethod(
        name="iso_cts",
        summary="Iso-CTS: Iso-C's common subspace plus each task's own subspace orthogonal to it, flat spectrum (Marczak et al., 2025).",
        params=(COMMON_SPACE_FRACTION, WEIGHT, ISO_LAMBDA),
        combine=_iso_cts,
        combine_rows=iso_cts_rows,
        paper="https://arxiv.org/abs/2502.04959",
        # large tensors: θ_0, the sum, one task vector at a time (each read twice: for the sum, then
        # projected), the SVDs and the gathered singular vectors; small ones hold the K task vectors
        cpu_only=ON_THE_CPU,
        working_copies=lambda n: 5.5,
    )
)
register(
    MergeMethod(
        name="wudi",
        summary="WUDI: Adam steps minimising each linear layer's interference Σ_t ‖(τ − τ_t)τ_tᵀ‖²/‖τ_t‖² (Cheng et al., 2025).",
        params=(STEPS, LR, WEIGHT, LAMBDA),
        combine=spectral(_wudi),
        paper="https://arxiv.org/abs/2503.08099",
        # θ_0, τ, B, the gradient, Adam's two moments and a temporary, the task vector being read;
        # plus G: n × n (one copy for a square matrix, up to K for a wide one) or, wider than K·m,
        # the K stacked task vectors (bench_memory's wide down-projection): 10.11 and 12.09 measured with
        # the output at K = 2 and 4
        working_copies=lambda n: n + 8,
    )
)
