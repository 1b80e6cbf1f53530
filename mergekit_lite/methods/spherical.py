"""Spherical methods beyond slerp: nuslerp, multislerp, karcher (mergekit 0.1.5's names and semantics).

All three are weight-space methods: ``compute`` sees every input's tensor, the base among them
(at ``ctx.base_index``) when the recipe has one. nuslerp and multislerp then work on task vectors
θ_i − θ_0 and add θ_0 back; karcher treats a base like any other input, as mergekit does.
The math is in ``ops/spherical.py``.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Sequence

import torch

from ..errors import RecipeError
from ..ops.fused import LinearForm
from ..ops.spherical import assembled_rows, gram_by_chunks, karcher_mean_by_rows, multislerp_degenerate, multislerp_terms, nuslerp, nuslerp_factors, nuslerp_t
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
    on_cpu = inputs.device.type == "cpu"  # both passes' chunks on the threads in turn
    factors: tuple[float, float] | None = None
    if flatten:
        factors = nuslerp_factors(gram_by_chunks(lambda chunk: vectors(*chunk)[:2], 2, chunks, on_cpu), t)

    def interpolated(start: int, stop: int) -> torch.Tensor:
        a, b, base = vectors(start, stop)
        merged = nuslerp(t, a, b, flatten=False) if factors is None else a.mul_(factors[0]).add_(b.mul_(factors[1]))
        return merged if base is None else merged.add_(base)

    return assembled_rows(interpolated, chunks, inputs.shape, on_cpu, inputs.out_dtype, inputs.device)


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
    return _multislerp_inputs(HeldWeightInputs(models), ctx)


def _karcher(models: Iterator[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    return _karcher_inputs(HeldWeightInputs(models), ctx)


def _karcher_inputs(inputs: WeightInputs, ctx: TensorContext) -> torch.Tensor:
    """The Karcher mean in two passes over row chunks (the Gram matrix, then the weighted sum), holding no whole input."""
    alphas = [1.0 / inputs.count] * inputs.count
    return karcher_mean_by_rows(inputs.rows, inputs.count, inputs.chunks(), inputs.shape, alphas, max_iter=ctx.params["max_iter"], tol=ctx.params["tol"],
                                parallel=inputs.device.type == "cpu", dtype=inputs.out_dtype, device=inputs.device)


def _multislerp_inputs(inputs: WeightInputs, ctx: TensorContext) -> torch.Tensor:
    """multislerp in two passes over row chunks, holding no whole input: the float64 Gram matrix G of the (task)
    vectors x_i (by the native kernel where it reads the inputs, else by row chunks on the threads), which gives their
    norms, the coefficients a_i and the direction's norm ‖Σ a_i x_i‖ = √(aᵀGa); then each chunk's
    Σ a_i x_i · (scale / ‖Σ a_i x_i‖) (+ θ_0), stored in the output dtype as it is made (by the kernel where it gives
    this torch code's bytes) (``multislerp_terms``)."""
    base_index = ctx.base_index
    others = [i for i in range(inputs.count) if i != base_index]
    if not others:
        raise RecipeError(f"tensor {ctx.name}: multislerp needs at least 1 model besides the base")
    if len(others) == 1:  # one model: its tensor as it is (mergekit returns it without interpolating)
        return inputs.read(others[0])
    chunks = inputs.chunks()
    on_cpu = inputs.device.type == "cpu"

    def base_rows(start: int, stop: int) -> torch.Tensor | None:
        return None if base_index is None else inputs.rows(base_index, start, stop)

    def combined(coefficients: Sequence[float], rows: Iterable[torch.Tensor], base: torch.Tensor | None, factor: float | None = None) -> torch.Tensor:
        """Σ_i c_i x_i of the rows of the (task) vectors x_i (each model's rows less the base's, given a base), in
        place; times ``factor`` and plus the base's rows, given those."""
        total: torch.Tensor | None = None
        for c, x in zip(coefficients, rows):
            if base is not None:
                x.sub_(base)
            total = x.mul_(c) if total is None else total.add_(x, alpha=c)
        assert total is not None
        if factor is not None:
            total.mul_(factor)
            if base is not None:
                total.add_(base)
        return total

    def vectors_of(chunk: tuple[int, int]) -> list[torch.Tensor]:
        base = base_rows(*chunk)
        rows = [inputs.rows(i, *chunk) for i in others]
        return rows if base is None else [x.sub_(base) for x in rows]

    gram = inputs.native_gram(others, base=base_index)
    if gram is None:
        gram = gram_by_chunks(vectors_of, len(others), chunks, parallel=on_cpu)
    norms = [math.sqrt(max(float(gram[i, i]), 0.0)) for i in range(len(others))]
    w, a, scale = multislerp_terms(norms, [float(ctx.model_params[i]["weight"]) for i in others],
                                   normalize_weights=ctx.params["normalize_weights"], eps=ctx.params["eps"])
    coefficients = torch.tensor(a, dtype=torch.float64)
    mean_norm = math.sqrt(max(float(coefficients @ gram @ coefficients), 0.0))
    if mean_norm < ctx.params["eps"]:  # the directions (nearly) cancel: a linear fallback, or an error
        fallback = multislerp_degenerate(w, norms)

        def fallback_chunk(start: int, stop: int) -> torch.Tensor:
            base = base_rows(start, stop)
            rows = combined(fallback, (inputs.rows(i, start, stop) for i in others), base)
            return rows if base is None else rows.add_(base)

        return assembled_rows(fallback_chunk, chunks, inputs.shape, parallel=on_cpu, dtype=inputs.out_dtype, device=inputs.device)
    factor = scale / mean_norm
    form = LinearForm(tuple(a), None, 1.0 if base_index is not None else None, post_scale=factor)
    native = inputs.native_combination(others, form, "multislerp", lambda base, rows: combined(a, rows, base, factor), base=base_index)
    if native is not None:
        return native

    def scaled_chunk(start: int, stop: int) -> torch.Tensor:
        return combined(a, (inputs.rows(i, start, stop) for i in others), base_rows(start, stop), factor)

    return assembled_rows(scaled_chunk, chunks, inputs.shape, parallel=on_cpu, dtype=inputs.out_dtype, device=inputs.device)


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
        # the first dimension (nuslerp_row_wise) hold the inputs whole, which this figure does not cover; both
        # threads' chunks at once: measured 2.26 with the output copies at K = 2
        working_copies=lambda n: 0.4,
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
        # two passes over row chunks: each thread's chunks and the output; measured on the torch path 1.70 / 1.20 / 1.50
        # with the stored copies at K = 2 / 4 / 8 (the native kernel's: 0.33 / 0.00 / -0.87)
        working_copies=lambda n: 0.8,
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
        # two passes over row chunks (the Gram matrix, then the sum) on both threads: the output and two threads'
        # chunks; measured 2.34 / 1.38 / 2.07 with the output copies at K = 2 / 4 / 8
        working_copies=lambda n: 0.4,
    )
)
