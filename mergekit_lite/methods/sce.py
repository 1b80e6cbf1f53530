"""SCE (select, calculate, erase; FuseChat, Wan et al., 2024): mergekit 0.1.5's semantics."""

from __future__ import annotations

from typing import Iterable

import torch

from ..ops.sce import SCE_ENERGY_FLOOR, sce_merge
from .base import MergeMethod, Param, TensorContext, register
from .task_arithmetic import INT8_MASK, stack_deltas

SELECT_TOPK = Param(
    "select_topk", float, 1.0,
    "Fraction of the entries (of those whose variance across the task vectors is non-zero) kept by the select step, "
    "largest variance first; 1 keeps all (mergekit's default), 0 or less keeps none.",
)
ENERGY_FLOOR = Param(
    "energy_floor", float, SCE_ENERGY_FLOOR,
    "When a tensor's summed task-vector energy Σ_t mean(τ_t²) is below this, the weights are uniform "
    "(mergekit: 1e-6, which real fine-tunes with small deltas often fall under); 0 gives the paper's energy weights "
    "whenever any task vector is non-zero.",
    minimum=0,
)

SCE_MERGE = Param(
    "merge", str, "mean",
    "How the surviving entries combine: mean (mergekit: Σ η_t τ_t over the entries that agree with the elected sign, "
    "divided by the sum of their η_t) or sum (the paper: Σ η_t τ_t, η summing to 1 over the models).",
    choices=("mean", "sum"),
)


def sce_combine(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    stacked = stack_deltas(deltas, len(ctx.model_params))
    return sce_merge(stacked, ctx.params["select_topk"], ctx.params["energy_floor"], ctx.params["merge"])


register(
    MergeMethod(
        name="sce",
        summary="SCE: keep the entries of largest variance across models, weight each model by its energy, erase minority signs (Wan et al., 2024).",
        params=(SELECT_TOPK, ENERGY_FLOOR, SCE_MERGE, INT8_MASK),
        combine=sce_combine,
        paper="https://arxiv.org/abs/2408.07990",
        # base + the T stacked task vectors + the select step (variance, |variance| twice, kthvalue's
        # copy and int64 indices): K + 6.5 measured; the erase step needs less (sum, merged, divisor)
        working_copies=lambda n: n + 5.5,
    )
)
