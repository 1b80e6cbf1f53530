"""Model Stock (Jang et al., 2024): the interpolation ratio from the angle between task vectors.

θ = θ_0 + t · mean(τ_1..τ_K), t = K·cos θ / (1 + (K−1)·cos θ), cos θ the mean pairwise cosine
between the task vectors of this tensor (or of each row, ``filter_wise``). mergekit 0.1.5's
name, parameter, contract (a base and at least two other models) and edge cases.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..ops.selection import model_stock_ratio_from_gram, pairwise_gram, scale_mean
from .base import HeldTaskVectors, MergeMethod, Param, TaskVectorSource, TensorContext, by_row_chunks, register

FILTER_WISE = Param(
    "filter_wise", bool, False,
    "Measure the angle (and so t) per row along the last dimension instead of over the whole tensor (mergekit's option; the paper uses one t per layer tensor).",
)


def model_stock_rows(source: TaskVectorSource, ctx: TensorContext) -> torch.Tensor:
    """Model Stock in one pass over row chunks: each chunk's Gram matrix (the pairwise dot products and
    norms add up over chunks) and the sum of the task vectors; t once every chunk is seen. Never holds
    the K task vectors of a tensor at once (only K chunks of them)."""
    count = source.count
    if count < 2:
        raise ValueError(f"model_stock needs at least 2 models besides the base for {ctx.name}, got {count}")
    filter_wise = ctx.params["filter_wise"]
    per_row = filter_wise and len(source.shape) > 1
    grams: list[torch.Tensor] = []

    def summed_rows(start: int, stop: int, rows: slice | None) -> torch.Tensor:
        chunk = [source.rows(t, start, stop) for t in range(count)]
        grams.append(pairwise_gram(chunk, per_row))
        total = chunk[0] if source.hands_out_new else chunk[0].clone()
        for other in chunk[1:]:
            total.add_(other)
        return total

    total = by_row_chunks(source, summed_rows)
    gram = torch.cat(grams) if per_row else torch.stack(grams).sum(dim=0)
    return scale_mean(total, count, model_stock_ratio_from_gram(gram, total.dtype), filter_wise)


def _combine(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    return model_stock_rows(HeldTaskVectors(deltas), ctx)


register(
    MergeMethod(
        name="model_stock",
        summary="Model Stock: θ_0 + t·mean(τ), t = K·cos θ / (1 + (K−1)·cos θ) from the mean angle between task vectors (Jang et al., 2024).",
        params=(FILTER_WISE,),
        inputs="task_vectors",
        combine=_combine,
        combine_rows=model_stock_rows,
        base="required",
        min_models=2,  # besides the base: mergekit's contract is 3 inputs, the base included
        paper="https://arxiv.org/abs/2403.19522",
        # measured with row chunks: the base and the running sum (K chunks of rows besides; the K task
        # vectors are held only for small tensors and adapters)
        working_copies=lambda n: 2.1,
    )
)
