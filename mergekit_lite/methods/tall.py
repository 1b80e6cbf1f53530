"""TALL masks and Consensus merging (Wang et al., ICML 2024): our own methods, following the paper.

consensus keeps the entries of τ_MTL that at least k tasks' TALL masks use; tall_masks writes a
compressed collection (base + τ_MTL + one bit per weight per task) instead of a merged model.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable, Sequence

import torch

from ..errors import RecipeError
from ..ops import elect_and_merge, magnitude_mask, tall_mask
from .base import HeldTaskVectors, MergeMethod, merged_by_row_chunks, Param, TaskVectorSource, TensorContext, register, weighted_task_vector
from .task_arithmetic import INT8_MASK, LAMBDA, WEIGHT, ties_model_statistics, ties_passes

AGGREGATE = Param(
    "aggregate", str, "task_arithmetic", "How τ_MTL is built: task_arithmetic (Σ τ_t) or ties (density 0.2, sum, model scope).",
    choices=("task_arithmetic", "ties"), per_tensor=False,
)
TALL_LAMBDA = Param(
    "tall_lambda", float, 0.4, "λ_t of the TALL mask |τ_t| > λ_t·|τ_MTL − τ_t|; {search: [...]} searches a grid per task with the evaluator (the paper: 0.2…0.6).",
    per_model=True, minimum=0, searchable=True, default_grid=(0.2, 0.3, 0.4, 0.5, 0.6), per_tensor=False,
)
CONSENSUS_K = Param("consensus_k", int, 2, "Keep weights used by at least k tasks (1 drops catastrophic, 2 also selfish ones).", minimum=0)
TALL_TIES_DENSITY = 0.2


def multitask_vector(deltas: Sequence[torch.Tensor] | torch.Tensor, ctx: TensorContext) -> torch.Tensor:
    """τ_MTL for TALL masks: Σ_t τ_t, or TIES with density 0.2 and sum over model-scope thresholds.

    Running sums over the (already weighted) task vectors, which are left unchanged.
    """
    if ctx.params["aggregate"] == "task_arithmetic":
        total = torch.zeros_like(deltas[0])
        for delta in deltas:
            total.add_(delta)
        return total
    thresholds = ctx.model_statistics["thresholds"]

    def trim(t: int, delta: torch.Tensor) -> torch.Tensor:  # made when needed, never kept beside the inputs
        return delta.masked_fill(~magnitude_mask(delta, thresholds[t]), 0)

    kept = list(deltas)
    return elect_and_merge(kept, [1.0] * len(kept), "sum", ctx.model_statistics["majority"], consume=False, trim=trim)


def tall_masks_for(stacked: torch.Tensor, tau_mtl: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
    """The T TALL masks of one tensor, [T, ...] bool."""
    return torch.stack([tall_mask(stacked[t], tau_mtl, p["tall_lambda"]) for t, p in enumerate(ctx.model_params)])


def _consensus_rows(source: TaskVectorSource, ctx: TensorContext) -> torch.Tensor:
    """τ_MTL where at least k tasks' TALL masks agree, one row chunk of every task at a time.

    Every step is element-wise once the model-wide TIES thresholds are known, so one pass over
    row chunks does it: τ_MTL of the chunk, then each task's TALL mask counted, never stacked.
    """
    def consensus_rows(start: int, stop: int, rows: slice | None) -> torch.Tensor:
        kept = [weighted_task_vector(source.rows(t, start, stop), p, source.hands_out_new) for t, p in enumerate(ctx.model_params)]
        tau_mtl = multitask_vector(kept, ctx)
        votes = torch.zeros(tau_mtl.shape, dtype=torch.uint8 if len(kept) < 256 else torch.int32, device=tau_mtl.device)
        for delta, p in zip(kept, ctx.model_params):
            votes.add_(tall_mask(delta, tau_mtl, p["tall_lambda"]))
        kept.clear()
        return tau_mtl.masked_fill_(votes < ctx.params["consensus_k"], 0)

    return merged_by_row_chunks(source, consensus_rows)


def _combine_consensus(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    """Consensus over task vectors already read (the λ search, re-mapped vocabularies, small tensors)."""
    return _consensus_rows(HeldTaskVectors(deltas), ctx)


def aggregate_statistics(source: Any, params: dict[str, Any], model_params: list[dict[str, Any]]) -> dict[str, Any]:
    """Model-wide TIES thresholds when τ_MTL is built with TIES (density 0.2 for every task)."""
    if params["aggregate"] != "ties":
        return {}
    weights = [p.get("weight", 1.0) for p in model_params]
    return ties_model_statistics(source, [TALL_TIES_DENSITY] * len(model_params), weights)


def aggregate_passes(params: dict[str, Any], dtype: torch.dtype) -> int:
    return ties_passes({"scope": "model" if params.get("aggregate") == "ties" else "tensor"}, dtype)


CONSENSUS = register(
    MergeMethod(
        name="consensus",
        summary="Consensus merging: keep the weights of τ_MTL that ≥ k tasks' TALL masks use (Wang et al., 2024).",
        params=(AGGREGATE, CONSENSUS_K, TALL_LAMBDA, WEIGHT, LAMBDA, INT8_MASK),
        combine=_combine_consensus,
        combine_rows=_consensus_rows,
        paper="https://arxiv.org/abs/2405.07813",
        working_copies=lambda n: 0.15,  # row chunks, output stored by them; measured 1.08 / 1.00 with the stored copy at K = 2 / 8
        statistics=aggregate_statistics,
        passes=aggregate_passes,
    )
)
# the names of mergekit's proposal for this method: the same method with τ_MTL from task arithmetic or TIES by default
for _name, _aggregate in (("consensus_ta", "task_arithmetic"), ("consensus_ties", "ties")):
    register(
        replace(
            CONSENSUS,
            name=_name,
            summary=f"Consensus merging over {'task arithmetic' if _aggregate == 'task_arithmetic' else 'TIES'} (consensus with aggregate: {_aggregate}).",
            params=tuple(replace(p, default=_aggregate) if p is AGGREGATE else p for p in CONSENSUS.params),
            # measured: the TIES aggregate holds one trimmed copy and the election's sums beside the inputs
            # (consensus with aggregate: ties is the same method and holds the same)
            working_copies=(lambda n: 0.1 * n + 2.5) if _aggregate == "ties" else CONSENSUS.working_copies,
        )
    )

MTL_DTYPE = Param(
    "mtl_dtype", str, "auto", "Stored dtype of τ_MTL: auto (float32, or float64 for float64 models; see docs/collection-format.md) or a dtype.",
    choices=("auto", "float32", "float64", "bfloat16", "float16"), per_tensor=False,
)
EMBED_BASE = Param("embed_base", bool, False, "Store the base weights inside the collection instead of a reference (path/hub id + SHA-256).", per_tensor=False)


def _no_merge(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    raise RecipeError("merge_method: tall_masks writes a collection; it has no merged model")


register(
    MergeMethod(
        name="tall_masks",
        summary="TALL-masks compression: base + τ_MTL + one bit per weight per task; extract any fine-tune again (Wang et al., 2024).",
        params=(AGGREGATE, TALL_LAMBDA, MTL_DTYPE, EMBED_BASE, INT8_MASK),
        combine=_no_merge,
        paper="https://arxiv.org/abs/2405.07813",
        # measured as EMR's (8.78 and 12.38 copies with the stored one at K = 2 and 4): each task's
        # vector and its mask, packed bits and statistics beside the base, τ_MTL and the error's temporary
        working_copies=lambda n: 2 * n + 4,
        statistics=aggregate_statistics,
        passes=aggregate_passes,
        output="collection",
    )
)
