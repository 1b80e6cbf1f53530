"""Per-entry selection between a base and one model: nearswap and arcee_fusion (mergekit 0.1.5's semantics).

Both take exactly two inputs, the base among them (with ``models:``, the base is appended when it
is not listed, as mergekit does), and decide entry by entry how much of the other model to take:

* nearswap: w = clamp(t / |θ_base − θ_other|, 0, 1), θ = w·θ_other + (1 − w)·θ_base;
* arcee_fusion: take θ_other where |θ_other − θ_base| · KL(softmax rows) reaches median + 1.5·IQR.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from ..errors import RecipeError
from ..ops.selection import arcee_fusion, arcee_importance, iqr_threshold, nearswap
from ..ops.fused import Keep, LinearForm
from ..ops.spherical import assembled_rows
from ..ops.threads import scratch
from .base import MergeMethod, Param, TensorContext, WeightInputs, each_chunk, register

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


def _arcee_fusion_inputs(inputs: WeightInputs, ctx: TensorContext) -> torch.Tensor:
    """Arcee Fusion in two passes over row chunks (each row's softmax and KL need that row alone), on both threads:
    the importance of every row, stored whole (its quartiles need all of it); then each chunk's rows re-read and
    θ_base + keep ⊙ (θ_other − θ_base) made. The operations of ``arcee_fusion`` entry by entry: the same numbers,
    holding the importance and the output instead of both inputs, their two softmax distributions and a copy."""
    if ctx.base_index is None or inputs.count != 2:
        raise RecipeError(f"tensor {ctx.name}: arcee_fusion needs the base model and exactly one other model as its inputs")
    base_at, other_at = ctx.base_index, 1 - ctx.base_index
    chunks = inputs.chunks()
    if len(inputs.shape) < 2 or len(chunks) == 1:  # a vector's softmax spans all of it: whole tensors
        return arcee_fusion(inputs.read(base_at), inputs.read(other_at))
    on_cpu = inputs.device.type == "cpu"
    # each chunk's importance written in place, in this thread's reused buffer: a fresh whole tensor per tensor was
    # page-faulted anew, and each chunk copied into it (250M, in one process, medians of 7: 2.22 → 2.08 s)
    numel = math.prod(inputs.shape)
    whole = scratch("arcee importance", numel, inputs.dtype) if on_cpu else torch.empty(numel, dtype=inputs.dtype, device=inputs.device)
    importance = whole.view(inputs.shape)

    def store_importance(chunk: tuple[int, int]) -> None:
        arcee_importance(inputs.rows(base_at, *chunk), inputs.rows(other_at, *chunk), out=importance[chunk[0] : chunk[1]])

    each_chunk(store_importance, chunks, inputs.device)
    threshold = iqr_threshold(importance).to(importance.device)

    def taken(base: torch.Tensor, other: torch.Tensor, importance_rows: torch.Tensor) -> torch.Tensor:
        """θ_base + [importance ≥ threshold]·(θ_other − θ_base) of some rows, in place on ``base``."""
        return base.add_(other.sub_(base).mul_(importance_rows >= threshold))

    # the fused rows by the native kernel where it reads the inputs and gives this code's bytes: its keep compares the
    # importance with the threshold (the same float32 comparison)
    form = LinearForm((1.0,), None, 1.0, keeps=(Keep(None, gate_min=float(threshold)),))
    native = inputs.native_combination([other_at], form, "arcee_fusion", lambda base, rows, gate: taken(base, rows[0], gate), base=base_at,
                                       gate=importance)
    if native is not None:
        return native

    def fused(start: int, stop: int) -> torch.Tensor:
        return taken(inputs.rows(base_at, start, stop), inputs.rows(other_at, start, stop), importance[start:stop])

    return assembled_rows(fused, chunks, inputs.shape, parallel=on_cpu, dtype=inputs.out_dtype, device=inputs.device)


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
        compute_inputs=_arcee_fusion_inputs,
        base="required",
        min_models=2,
        max_models=2,
        paper="https://arcee.ai",
        # by row chunks (matrices): the importance whole, the output, two threads' chunks; vectors whole: θ_base,
        # θ_other and the two softmax distributions
        working_copies=lambda n: 3.5,
        # the KL term is the small difference of nearly equal float32 logs, mostly rounding error: the GPU's exp and
        # log moved the selection of 711,126 of 40M entries (an H200 against the CPU); on the CPU it is mergekit's
        cpu_only=True,
    )
)
