"""Model Stock (Jang et al., 2024): the interpolation ratio from the angle between task vectors.

θ = θ_0 + t · mean(τ_1..τ_K), t = K·cos θ / (1 + (K−1)·cos θ), cos θ the mean pairwise cosine
between the task vectors of this tensor (or of each row, ``filter_wise``). mergekit 0.1.5's
name, parameter, contract (a base and at least two other models) and edge cases.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..ops.selection import model_stock_task_vector
from .base import MergeMethod, Param, TensorContext, register

FILTER_WISE = Param(
    "filter_wise", bool, False,
    "Measure the angle (and so t) per row along the last dimension instead of over the whole tensor (mergekit's option; the paper uses one t per layer tensor).",
)


def _combine(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    held = list(deltas)  # the K task vectors of this tensor: every pairwise angle needs them all
    if len(held) < 2:
        raise ValueError(f"model_stock needs at least 2 models besides the base for {ctx.name}, got {len(held)}")
    return model_stock_task_vector(held, ctx.params["filter_wise"])


register(
    MergeMethod(
        name="model_stock",
        summary="Model Stock: θ_0 + t·mean(τ), t = K·cos θ / (1 + (K−1)·cos θ) from the mean angle between task vectors (Jang et al., 2024).",
        params=(FILTER_WISE,),
        inputs="task_vectors",
        combine=_combine,
        base="required",
        min_models=2,  # besides the base: mergekit's contract is 3 inputs, the base included
        paper="https://arxiv.org/abs/2403.19522",
        # the K task vectors (every pairwise angle needs them all; dot products need no temporary), measured
        working_copies=lambda n: n + 0.25,
    )
)
