"""Weight-space methods: they combine the models' weights themselves, not task vectors.

linear (a weighted average; no base needed), passthrough (one model's tensor, optionally
scaled; slices stack layers with it) and slerp (spherical interpolation between the base and
one other model). Names, parameters and defaults are mergekit 0.1.5's.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..errors import RecipeError
from ..ops import weighted_average
from ..ops.combine import slerp_factors, weight_sum_divisor
from ..ops.fused import LinearForm
from ..ops.spherical import assembled_rows, gram_by_rows
from .base import HeldWeightInputs, MergeMethod, Param, TensorContext, WeightInputs, register

LINEAR_WEIGHT = Param("weight", float, 1.0, "Per-model weight w_i of the average.", per_model=True)
LINEAR_NORMALIZE = Param("normalize", bool, True, "Divide by the sum of the weights (a weight sum of 0 divides by 1).")
SCALE = Param("scale", float, 1.0, "Multiplies the tensor passed through (per model; e.g. 0 to zero a layer's output projection).", per_model=True)
SLERP_T = Param("t", float, 0.5, "Interpolation factor: 0 gives the base model, 1 the other model.")


def _linear(models: Iterator[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    return weighted_average(models, [p["weight"] for p in ctx.model_params], ctx.params["normalize"])


def _linear_form(ctx: TensorContext) -> LinearForm:
    """linear as the native kernel's form: ``weighted_average``'s running sum and divisor."""
    weights = [p["weight"] for p in ctx.model_params]
    return LinearForm(tuple(weights), weight_sum_divisor(weights, ctx.params["normalize"]), None)


def _passthrough(models: Iterator[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    tensor = next(iter(models))
    scale = ctx.model_params[0]["scale"]
    return tensor if scale == 1.0 else tensor.mul_(scale)


def _slerp(models: Iterator[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    return _slerp_inputs(HeldWeightInputs(models), ctx)


def _slerp_inputs(inputs: WeightInputs, ctx: TensorContext) -> torch.Tensor:
    """slerp in two passes over row chunks, no whole input held: the float64 Gram matrix of (θ_base, θ_other)
    (their norms and inner product) gives the two factors, then each chunk is s0·θ_base + s1·θ_other. Both passes by
    the native kernel where it reads the inputs (the second only where it gives the torch code's bytes)."""
    if inputs.count == 1:  # only one model has this tensor: it passes through, as mergekit does
        return inputs.read(0)
    if ctx.base_index is None or inputs.count != 2:
        raise RecipeError(f"tensor {ctx.name}: slerp needs the base model and exactly one other model")
    pair = (ctx.base_index, 1 - ctx.base_index)
    t = float(ctx.params["t"])
    chunks = inputs.chunks()
    on_cpu = inputs.device.type == "cpu"  # both passes' chunks on the threads in turn
    gram = inputs.native_gram(pair)
    if gram is None:
        gram = gram_by_rows(lambda i, start, stop: inputs.rows(pair[i], start, stop), 2, chunks, parallel=on_cpu)
    factors = slerp_factors(gram, t)

    def combine(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
        if factors is None:  # nearly colinear: the linear interpolation
            return torch.lerp(v0, v1, t)
        return v0.mul_(factors[0]).add_(v1.mul_(factors[1]))

    if factors is not None:
        native = inputs.native_combination(pair, LinearForm(factors, None, None, rounded_products=True), "slerp", lambda _, rows: combine(*rows))
        if native is not None:
            return native

    def interpolated(start: int, stop: int) -> torch.Tensor:
        return combine(inputs.rows(pair[0], start, stop), inputs.rows(pair[1], start, stop))

    return assembled_rows(interpolated, chunks, inputs.shape, parallel=on_cpu, dtype=inputs.out_dtype, device=inputs.device)


register(
    MergeMethod(
        name="linear",
        summary="Weighted average of the models' weights, Σ w_i θ_i / Σ w_i (model soups; Wortsman et al., 2022).",
        params=(LINEAR_WEIGHT, LINEAR_NORMALIZE),
        inputs="weights",
        compute=_linear,
        linear_form=_linear_form,
        base="optional",
        paper="https://arxiv.org/abs/2203.05482",
        working_copies=lambda n: 1,  # row chunks (entrywise), two threads' at once, from one heap: only the stored output is whole; measured 0.66–2.17 with it
        entrywise=lambda params: True,
    )
)
register(
    MergeMethod(
        name="passthrough",
        summary="Copies one model's tensors unchanged (times scale); with slices, stacks layers of several models.",
        params=(SCALE,),
        inputs="weights",
        compute=_passthrough,
        base="unused",
        max_models=1,
        unchanged=lambda model_params: model_params[0]["scale"] == 1.0,
        working_copies=lambda n: 0.35,  # row chunks (entrywise), two threads' at once: only the stored output is whole; measured 1.55 with it
        entrywise=lambda params: True,
    )
)
register(
    MergeMethod(
        name="slerp",
        summary="Spherical interpolation between the base model (t = 0) and one other model (t = 1), per tensor.",
        params=(SLERP_T,),
        inputs="weights",
        compute=_slerp,
        compute_inputs=_slerp_inputs,
        base="required",
        min_models=2,
        max_models=2,
        paper="https://en.wikipedia.org/wiki/Slerp",
        # two passes over row chunks (the Gram matrix, then the interpolation) on both threads: the output and two
        # threads' chunks; measured 1.82 with the output copies
        working_copies=lambda n: 0.4,
    )
)
