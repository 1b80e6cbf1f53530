"""Per-entry selection between a base and one model: nearswap and arcee_fusion (mergekit 0.1.5's semantics).

Both take exactly two inputs, the base among them (with ``models:``, the base is appended when it
is not listed, as mergekit does), and decide entry by entry how much of the other model to take:

* nearswap: w = clamp(t / |θ_base − θ_other|, 0, 1), θ = w·θ_other + (1 − w)·θ_base;
* arcee_fusion: take θ_other where |θ_other − θ_base| · KL(softmax rows) reaches median + 1.5·IQR.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..errors import RecipeError
from ..ops.selection import arcee_fusion, nearswap
from .base import MergeMethod, Param, TensorContext, register

NEARSWAP_T = Param(
    "t", float, None,
    "the distance scale; entries closer than t take the other model's value, farther ones the fraction "
    "t / |θ_base − θ_other| of the way to it; 0 keeps the base",
    required=True,
)


def _pair(models: Iterator[torch.Tensor], ctx: TensorContext, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ_base, θ_other) of this tensor: exactly two inputs, one of them the base."""
    tensors = list(models)
    if ctx.base_index is None or len(tensors) != 2:
        raise RecipeError(f"tensor {ctx.name}: {method} needs the base model and exactly one other model as its inputs")
    return tensors[ctx.base_index], tensors[1 - ctx.base_index]


def _nearswap(models: Iterator[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    t = ctx.params.get("t")
    if t is None:
        raise RecipeError(f"parameters.t: nearswap needs t (no default, as in mergekit); tensor {ctx.name} has none")
    base, other = _pair(models, ctx, "nearswap")
    return nearswap(base, other, t)


def _arcee_fusion(models: Iterator[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    base, other = _pair(models, ctx, "arcee_fusion")
    return arcee_fusion(base, other)


register(
    MergeMethod(
        name="nearswap",
        summary="NearSwap: per entry, move the base toward the other model by t / |difference| (all the way where they are within t).",
        params=(NEARSWAP_T,),
        inputs="weights",
        compute=_nearswap,
        base="required",
        min_models=2,
        max_models=2,
        paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        # each entry on its own: large tensors go by row chunks off disk, only the stored output is whole
        working_copies=lambda n: 0,
        entrywise=lambda params: True,
    )
)
register(
    MergeMethod(
        name="arcee_fusion",
        summary="Arcee Fusion: take the other model's entries whose |Δ|·KL importance is an outlier (≥ median + 1.5·IQR), keep the base elsewhere.",
        params=(),
        inputs="weights",
        compute=_arcee_fusion,
        base="required",
        min_models=2,
        max_models=2,
        paper="https://arcee.ai",
        # θ_base, θ_other and the two softmax distributions; then θ_base, Δ, the importance and its
        # partitioned copy (CPU; kthvalue on CUDA holds a value copy and int64 indices: one more)
        working_copies=lambda n: 3.5,
    )
)
