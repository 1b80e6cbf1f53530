"""Spherical methods beyond slerp: nuslerp, multislerp, karcher (mergekit 0.1.5's names and semantics).

All three are weight-space methods: ``compute`` sees every input's tensor, the base among them
(at ``ctx.base_index``) when the recipe has one. nuslerp and multislerp then work on task vectors
θ_i − θ_0 and add θ_0 back; karcher treats a base like any other input, as mergekit does.
The math is in ``ops/spherical.py``.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Iterator

import torch

from ..errors import RecipeError
from ..ops.spherical import assembled_rows, gram_by_chunks, karcher_mean_by_rows, multislerp_degenerate, multislerp_terms, nuslerp, nuslerp_factors, nuslerp_t
from .base import HeldWeightInputs, MergeMethod, Param, TensorContext, WeightInputs, each_chunk, register

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

    return assembled_rows(interpolated, chunks, inputs.shape, on_cpu, inputs.out_dtype)


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
                                parallel=inputs.device.type == "cpu", dtype=inputs.out_dtype)


def _multislerp_inputs(inputs: WeightInputs, ctx: TensorContext) -> torch.Tensor:
    """multislerp in three passes over row chunks, chunk i on thread i mod the thread count (``each_chunk``),
    holding one whole tensor (the result, in the compute dtype), never the inputs: each (task) vector's norm
    (float64 sums of the chunks' float64 squared norms, added up in chunk order; by the native kernel where it reads
    the inputs), then Σ a_i x_i stored with its
    own norm, then its scale to the weighted mean norm (+ θ_0) (``multislerp_terms``)."""
    base_index = ctx.base_index
    others = [i for i in range(inputs.count) if i != base_index]
    if not others:
        raise RecipeError(f"tensor {ctx.name}: multislerp needs at least 1 model besides the base")
    if len(others) == 1:  # one model: its tensor as it is (mergekit returns it without interpolating)
        return inputs.read(others[0])
    chunks = inputs.chunks()

    def base_rows(start: int, stop: int) -> torch.Tensor | None:
        return None if base_index is None else inputs.rows(base_index, start, stop)

    def combination(coefficients: list[float], start: int, stop: int, base: torch.Tensor | None) -> torch.Tensor:
        """Σ_i c_i x_i over the rows of the (task) vectors x_i (each model's rows less the base's, given a base)."""
        total: torch.Tensor | None = None
        for i, c in zip(others, coefficients):
            x = inputs.rows(i, start, stop)
            if base is not None:
                x.sub_(base)
            total = x.mul_(c) if total is None else total.add_(x, alpha=c)
        assert total is not None
        return total

    def summed_by_chunks(per_chunk: Callable[[tuple[int, int]], list[float]]) -> list[float]:
        """``per_chunk`` run on every chunk (on the threads in turn), its numbers added up in chunk order."""
        parts: dict[int, list[float]] = {}
        each_chunk(lambda chunk: parts.__setitem__(chunk[0], per_chunk(chunk)), chunks, inputs.device)
        sums = [0.0] * len(parts[chunks[0][0]])
        for start, _ in chunks:
            sums = [total + part for total, part in zip(sums, parts.pop(start))]
        return sums

    def squared_norms_of_chunk(chunk: tuple[int, int]) -> list[float]:
        base = base_rows(*chunk)
        squared = []
        for i in others:
            x = inputs.rows(i, *chunk)
            squared.append(float(torch.linalg.vector_norm(x if base is None else x.sub_(base), dtype=torch.float64)) ** 2)
        return squared

    gram = inputs.native_gram(others, base=base_index, diagonal=True)  # the same float64 squares, summed in its order
    squares = [float(gram[i, i]) for i in range(len(others))] if gram is not None else summed_by_chunks(squared_norms_of_chunk)
    norms = [math.sqrt(s) for s in squares]
    w, a, scale = multislerp_terms(norms, [float(ctx.model_params[i]["weight"]) for i in others],
                                   normalize_weights=ctx.params["normalize_weights"], eps=ctx.params["eps"])
    result = ChunkedTensor(inputs.shape)

    def direction_of_chunk(chunk: tuple[int, int]) -> list[float]:  # Σ a_i x_i stored, its squared norm returned
        return [float(torch.linalg.vector_norm(result.store(chunk, combination(a, *chunk, base_rows(*chunk))))) ** 2]

    mean_norm = math.sqrt(summed_by_chunks(direction_of_chunk)[0])
    if mean_norm < ctx.params["eps"]:  # the directions (nearly) cancel: a linear fallback, or an error
        fallback = multislerp_degenerate(w, norms)

        def fallback_chunk(chunk: tuple[int, int]) -> None:
            base = base_rows(*chunk)
            rows = combination(fallback, *chunk, base)
            result.store(chunk, rows if base is None else rows.add_(base))

        each_chunk(fallback_chunk, chunks, inputs.device)
        return result.whole()
    factor = scale / mean_norm
    stored = result.whole()
    # the scaled rows stored in the output dtype as they are made (the rounding of converting the whole result)
    out = stored if inputs.out_dtype in (None, stored.dtype) or stored.dim() == 0 else torch.empty(inputs.shape, dtype=inputs.out_dtype, device=stored.device)

    def scaled_chunk(chunk: tuple[int, int]) -> None:
        rows = result.rows(chunk).mul_(factor)
        base = base_rows(*chunk)
        if base is not None:
            rows.add_(base)
        if out is not stored:
            out[chunk[0] : chunk[1]] = rows

    each_chunk(scaled_chunk, chunks, inputs.device)
    return out


class ChunkedTensor:
    """A tensor made row chunk by row chunk, possibly on several threads: allocated when the first chunk comes (its
    dtype and device); a chunk that covers the whole tensor is kept as it is."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape
        self._whole: torch.Tensor | None = None
        self._allocating = threading.Lock()

    def store(self, chunk: tuple[int, int], rows: torch.Tensor) -> torch.Tensor:
        """Keep ``rows`` as rows [start, stop) (the whole of a 0-d tensor); returns the stored rows."""
        with self._allocating:
            if self._whole is None:
                if tuple(rows.shape) == tuple(self.shape):
                    self._whole = rows
                    return rows
                self._whole = torch.empty(self.shape, dtype=rows.dtype, device=rows.device)
        target = self.rows(chunk)
        target.copy_(rows)
        return target

    def rows(self, chunk: tuple[int, int]) -> torch.Tensor:
        assert self._whole is not None, "a chunk was stored"
        return self._whole if self._whole.dim() == 0 else self._whole[chunk[0]:chunk[1]]

    def whole(self) -> torch.Tensor:
        assert self._whole is not None, "a chunk was stored"
        return self._whole


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
        # three passes over row chunks: the result (compute dtype) and each thread's chunks; measured 1.15 / 1.82 / 1.18
        # with the stored copies at K = 2 / 4 / 8
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
