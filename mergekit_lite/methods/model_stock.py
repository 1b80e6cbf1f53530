"""Model Stock (Jang et al., 2024): the interpolation ratio from the angle between task vectors.

θ = θ_0 + t · mean(τ_1..τ_K), t = K·cos θ / (1 + (K−1)·cos θ), cos θ the mean pairwise cosine
between the task vectors of this tensor (or of each row, ``filter_wise``). mergekit 0.1.5's
name, parameter, contract (a base and at least two other models) and edge cases.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..ops.selection import model_stock_ratio_from_gram, pairwise_gram, scale_mean, stacked_gram
from .base import HeldTaskVectors, MergeMethod, Param, TaskVectorSource, TensorContext, chunk_rows, each_chunk, register

FILTER_WISE = Param(
    "filter_wise", bool, False,
    "Measure the angle (and so t) per row along the last dimension instead of over the whole tensor (mergekit's option; the paper uses one t per layer tensor).",
)


def model_stock_rows(source: TaskVectorSource, ctx: TensorContext) -> torch.Tensor | None:
    """Model Stock in one pass over row chunks (on the threads in turn): each chunk's Gram matrix (the pairwise dot
    products and norms add up over chunks, in chunk order) and the sum of the task vectors; t once every chunk is
    seen. Never holds the K task vectors of a tensor at once (only K chunks of them per thread). None where the native
    kernel made the output itself (``native_scaled_sum``)."""
    count = source.count
    if count < 2:
        raise ValueError(f"model_stock needs at least 2 models besides the base for {ctx.name}, got {count}")
    filter_wise = ctx.params["filter_wise"]
    per_row = filter_wise and len(source.shape) > 1
    native = None if per_row else source.native_sum_gram()
    if native is not None:  # the same sum; the Gram matrix in float64 (torch's below: float32): t moves by float32's dot error
        total, gram = native
        ratio = model_stock_ratio_from_gram(gram, total.dtype)
        if source.native_scaled_sum(total, count, float(ratio), lambda summed: scale_mean(summed, count, ratio, filter_wise)):
            return None  # θ_0 + λ·t·Σ/K made in the kernel's pass (θ_0 read again), the output already handed over
        return scale_mean(total, count, ratio, filter_wise)
    chunks = source.chunks()
    grams: dict[int, torch.Tensor] = {}  # chunk start → its Gram matrix, added up (or concatenated) in chunk order
    total = torch.empty(source.shape, dtype=source.dtype, device=source.device)

    def sum_chunk(chunk: tuple[int, int]) -> None:
        start, stop = chunk
        rows = chunk_rows(source, start, stop)
        stacked = source.stacked_rows(start, stop, reuse=True)  # this thread's buffer: used up before its next chunk
        grams[start] = pairwise_gram(list(stacked), per_row) if per_row else stacked_gram(stacked)
        summed = total if rows is None else total[rows]
        summed.copy_(stacked[0])
        for other in stacked[1:]:
            summed.add_(other)

    each_chunk(sum_chunk, chunks, source.device)
    ordered = [grams[start] for start, _ in chunks]
    gram = torch.cat(ordered) if per_row else torch.stack(ordered).sum(dim=0)
    # t from the Gram matrix on the CPU, whichever device made it: the same float64 steps as the native path's
    ratio = model_stock_ratio_from_gram(gram.cpu(), total.dtype).to(total.device)
    return scale_mean(total, count, ratio, filter_wise)


def _combine(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    merged = model_stock_rows(HeldTaskVectors(deltas), ctx)
    assert merged is not None, "held task vectors have no native pass"
    return merged


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
        # measured with row chunks: the base and the running sum (K chunks of rows per thread besides; the K task
        # vectors are held only for small tensors and adapters): 2.53–3.88 with the output (K = 2 / 4 / 8, run to run)
        working_copies=lambda n: 2.9,
        # each thread's chunk holds the K task vectors' rows stacked (the Gram matrix's operand): 2^20 entries of
        # them at most, so that both threads' stacks stay in the shared cache. At 250M, K = 8, against 2^19 rows per
        # chunk (interleaved): 3.69–4.70 → 3.24–3.27 s; K = 4 (2^18) unchanged
        chunk_entries=lambda n: max(1 << 16, min(1 << 19, (1 << 20) // max(n, 1))),
    )
)
