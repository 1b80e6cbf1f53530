"""Spherical methods beyond slerp: nuslerp, multislerp, karcher (mergekit 0.1.5's names and semantics).

All three are weight-space methods: ``compute`` sees every input's tensor, the base among them
(at ``ctx.base_index``) when the recipe has one. nuslerp and multislerp then work on task vectors
θ_i − θ_0 and add θ_0 back; karcher treats a base like any other input, as mergekit does.
The math is in ``ops/spherical.py``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import torch

from ..errors import RecipeError
from ..ops.spherical import add_gram_, assembled_rows, karcher_mean_by_rows, nuslerp, nuslerp_factors, nuslerp_t, spherical_weighted_mean
from .base import HeldWeightInputs, MergeMethod, Param, TensorContext, WeightInputs, register

WEIGHT = Param("weight", float, 1.0, "Per-model weight (the base's is not used); mergekit requires it, we default it to 1.", per_model=True)
NUSLERP_FLATTEN = Param("nuslerp_flatten", bool, True, "Interpolate each tensor as one vector; false: vector by vector (see nuslerp_row_wise).")
NUSLERP_ROW_WISE = Param(
    "nuslerp_row_wise", bool, False,
    "With nuslerp_flatten false: the vectors run along the first dimension (columns of a [out, in] matrix) "
    "instead of the last (rows).",
)
NORMALIZE_WEIGHTS = Param("normalize_weights", bool, True, "Divide the weights by their sum; false: the output norm is Σ w_i‖x_i‖ rather than a weighted mean of the norms.")
EPS = Param("eps", float, 1e-8, "Added to each norm before dividing; a weighted mean direction shorter than this has no direction.", minimum=0)
MAX_ITER = Param("max_iter", int, 10, "Most iterations of the Karcher mean (0: the normalised mean of the directions).", minimum=0)
TOL = Param("tol", float, 1e-5, "Stop when the tangent step is shorter than this (radians); norms up to it count as zero.", minimum=0)


def _split(tensors: list[torch.Tensor], ctx: TensorContext) -> tuple[torch.Tensor | None, list[torch.Tensor], list[float]]:
    """(base or None, the other inputs in model order, their weights)."""
    base = tensors[ctx.base_index] if ctx.base_index is not None else None
    keep = [i for i in range(len(tensors)) if i != ctx.base_index]
    others = [tensors[i] for i in keep]
    weights = [float(ctx.model_params[i]["weight"]) for i in keep]
    return base, others, weights


def _nuslerp(models: Iterator[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    return _nuslerp_inputs(HeldWeightInputs(models), ctx)


def _nuslerp_inputs(inputs: WeightInputs, ctx: TensorContext) -> torch.Tensor:
    """nuslerp over row chunks, no whole input held. Flattened (and any tensor of rank ≤ 1): the float64 Gram matrix
    of the two (task) vectors gives the two factors, then each chunk is c0·v0 + c1·v1 (+ θ_0); vector by vector
    along the last dimension: each chunk's rows on their own; along the first dimension (every vector crosses
    every chunk): whole tensors."""
    base_index = ctx.base_index
    others = [i for i in range(inputs.count) if i != base_index]
    if len(others) != 2:
        raise RecipeError(f"tensor {ctx.name}: nuslerp takes exactly 2 models besides the base, got {len(others)}")
    flatten = ctx.params["nuslerp_flatten"] or len(inputs.shape) <= 1
    if not flatten and ctx.params["nuslerp_row_wise"]:
        return _nuslerp_whole([inputs.read(i) for i in range(inputs.count)], ctx)
    t = nuslerp_t([float(ctx.model_params[i]["weight"]) for i in others])

    def vectors(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The two models' rows, less the base's rows where there is a base (then those too)."""
        a, b = inputs.rows(others[0], start, stop), inputs.rows(others[1], start, stop)
        base = None if base_index is None else inputs.rows(base_index, start, stop)
        return (a, b, None) if base is None else (a.sub_(base), b.sub_(base), base)

    chunks = inputs.chunks()
    factors: tuple[float, float] | None = None
    if flatten:
        gram = torch.zeros((2, 2), dtype=torch.float64)
        for start, stop in chunks:
            add_gram_(gram, vectors(start, stop)[:2])
        factors = nuslerp_factors(gram, t)

    def interpolated(start: int, stop: int) -> torch.Tensor:
        a, b, base = vectors(start, stop)
        merged = nuslerp(t, a, b, flatten=False) if factors is None else a.mul_(factors[0]).add_(b.mul_(factors[1]))
        return merged if base is None else merged.add_(base)

    return assembled_rows(interpolated, chunks, inputs.shape)


def _nuslerp_whole(tensors: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    """nuslerp on whole tensors (vectors along the first dimension, which cross every row chunk)."""
    base, others, weights = _split(tensors, ctx)
    t = nuslerp_t(weights)
    flatten, row_wise = ctx.params["nuslerp_flatten"], ctx.params["nuslerp_row_wise"]
    if base is None:
        return nuslerp(t, others[0], others[1], flatten=flatten, along_first=row_wise)
    merged = nuslerp(t, others[0].sub_(base), others[1].sub_(base), flatten=flatten, along_first=row_wise)
    return merged.add_(base)


def _multislerp(models: Iterator[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    count = len(ctx.model_params)
    base_index = ctx.base_index
    others = count - (1 if base_index is not None else 0)
    if others < 1:
        raise RecipeError(f"tensor {ctx.name}: multislerp needs at least 1 model besides the base")
    weights = [float(p["weight"]) for i, p in enumerate(ctx.model_params) if i != base_index]
    if base_index is None:
        if others == 1:
            return next(iter(models))
        return spherical_weighted_mean(models, weights, normalize_weights=ctx.params["normalize_weights"], eps=ctx.params["eps"])
    # The base is needed before any task vector can be formed: inputs read before it wait for it.
    waiting: list[torch.Tensor] = []
    base: torch.Tensor | None = None
    iterator = iter(models)
    for i in range(count):
        tensor = next(iterator)
        if i == base_index:
            base = tensor
            break
        waiting.append(tensor)
    assert base is not None
    if others == 1:  # one model: its tensor as it is (mergekit returns it without interpolating)
        return waiting[0] if waiting else next(iterator)

    def deltas(base: torch.Tensor = base) -> Iterator[torch.Tensor]:
        while waiting:  # released one by one as they are consumed
            yield waiting.pop(0).sub_(base)
        for tensor in iterator:
            yield tensor.sub_(base)

    merged = spherical_weighted_mean(deltas(), weights, normalize_weights=ctx.params["normalize_weights"], eps=ctx.params["eps"])
    return merged.add_(base)


def _karcher(models: Iterator[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    return _karcher_inputs(HeldWeightInputs(models), ctx)


def _karcher_inputs(inputs: WeightInputs, ctx: TensorContext) -> torch.Tensor:
    """The Karcher mean in two passes over row chunks (the Gram matrix, then the weighted sum), holding no whole input."""
    alphas = [1.0 / inputs.count] * inputs.count
    return karcher_mean_by_rows(inputs.rows, inputs.count, inputs.chunks(), inputs.shape, alphas, max_iter=ctx.params["max_iter"], tol=ctx.params["tol"])


def _multislerp_inputs(inputs: WeightInputs, ctx: TensorContext) -> torch.Tensor:
    """multislerp with the base read first, wherever the recipe lists it: no input waits for it."""
    order = list(range(inputs.count))
    if ctx.base_index is not None:
        order.remove(ctx.base_index)
        order.insert(0, ctx.base_index)
    return _multislerp((inputs.read(i) for i in order), replace(
        ctx, model_names=[ctx.model_names[i] for i in order], model_params=[ctx.model_params[i] for i in order],
        base_index=None if ctx.base_index is None else 0,
    ))


register(
    MergeMethod(
        name="nuslerp",
        summary="Spherical interpolation of two models (or of their task vectors, given a base), t = w_2/(w_1 + w_2); whole tensors or row/column-wise.",
        params=(WEIGHT, NUSLERP_FLATTEN, NUSLERP_ROW_WISE),
        inputs="weights",
        compute=_nuslerp,
        compute_inputs=_nuslerp_inputs,
        base="optional",
        min_models=2,
        max_models=3,
        paper="https://en.wikipedia.org/wiki/Slerp",
        # row chunks (flattened: two passes, the Gram matrix then the interpolation): the output only; vectors along
        # the first dimension (nuslerp_row_wise) hold the inputs whole, which this figure does not cover
        working_copies=lambda n: 0.1,
    )
)
register(
    MergeMethod(
        name="multislerp",
        summary="Weighted spherical mean of N models (or of their task vectors, given a base): mean direction × weighted mean norm.",
        params=(WEIGHT, NORMALIZE_WEIGHTS, EPS),
        inputs="weights",
        compute=_multislerp,
        compute_inputs=_multislerp_inputs,
        base="optional",
        min_models=1,
        paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        # streamed, the base read first: the running sum, the tensor read and one temporary (+ the base)
        working_copies=lambda n: 3.7,
    )
)
register(
    MergeMethod(
        name="karcher",
        summary="Karcher (Riemannian) mean of the models' directions on the unit sphere, times their mean norm; equal weights, a base is one more input.",
        params=(MAX_ITER, TOL),
        inputs="weights",
        compute=_karcher,
        compute_inputs=_karcher_inputs,
        base="optional",
        min_models=1,
        paper="https://arxiv.org/abs/2603.04972",
        # two passes over row chunks (the Gram matrix, then the sum): the output only; measured 1.00 / 1.07 with it at K = 2 / 8
        working_copies=lambda n: 0.1,
    )
)
