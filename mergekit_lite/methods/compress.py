"""Two more compression schemes for collections, beside TALL masks: EMR-Merging and TSV-C.

Like ``tall_masks`` they write a collection (base + shared parts + per-task parts) instead of a
merged model; the maths is in ``ops/emr.py`` and ``ops/tsv.py``, the format in
docs/collection-format.md.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable

import torch

from ..errors import RecipeError
from .base import MergeMethod, Param, TensorContext, register
from .tall import EMBED_BASE, MTL_DTYPE, TALL_LAMBDA

RESCALER = Param(
    "rescaler", str, "l1",
    "How λ_t is measured: l1 = Σ|τ_t| / Σ|m_t ⊙ τ_uni| over the whole model (the paper's formula), or "
    "tensor_mean = the same with each tensor's mean instead of its sum (the authors' code).",
    choices=("l1", "tensor_mean"), per_tensor=False,
)
RANK_FRACTION = Param(
    "rank_fraction", float, None,
    "Rank kept per task for each 2-D tensor, as a fraction of its full rank min(m, n) (rounded down, at least 1); "
    "unset: 1/T, the paper's budget.",
    minimum=0, maximum=1, per_tensor=False,
)
RANK = Param("rank", int, None, "Rank kept per task for each 2-D tensor (capped at its full rank); instead of rank_fraction.", minimum=1, per_tensor=False)


def _no_merge(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    raise RecipeError("this method writes a collection; it has no merged model")


register(
    MergeMethod(
        name="emr",
        summary="EMR-Merging compression: base + unified task vector + one bit per weight and one scalar per task; tuning-free (Huang et al., 2024).",
        params=(replace(MTL_DTYPE, doc="Stored dtype of τ_uni: auto (float32, or float64 for float64 models) or a dtype."), EMBED_BASE, RESCALER),
        combine=_no_merge,
        paper="https://arxiv.org/abs/2405.17461",
        # measured (bench_memory's models, K = 2 and 4: 10.67 and 14.11 copies with the stored one): the T task vectors
        # and each task's mask, packed bits and statistics beside the base, τ_uni, the election's and the error's temporaries
        working_copies=lambda n: 2 * n + 6,
        output="collection",
    )
)

register(
    MergeMethod(
        name="tsv_compress",
        summary="TSV-C compression: each task's 2-D updates as their top singular vectors (rank 1/T by default), other tensors as in TALL masks (Gargiulo et al., 2025).",
        params=(replace(TALL_LAMBDA, searchable=False, default_grid=None, doc="λ_t of the TALL mask of the tensors that are not 2-D."),
                replace(MTL_DTYPE, doc="Stored dtype of the singular factors and τ_MTL: auto (float32, or float64 for float64 models) or a dtype."), EMBED_BASE, RANK_FRACTION, RANK),
        combine=_no_merge,
        paper="https://arxiv.org/abs/2412.00081",
        # the largest tensor is a matrix, compressed one task at a time: the base, one task vector, the SVD's
        # factors and workspace, the rank-k reconstruction; measured 4.79 copies with the stored one (K = 2, a
        # [32768, 512] matrix), and a square matrix adds a full Vᴴ. Matrices hold no more with more tasks.
        working_copies=lambda n: 5,
        output="collection",
        exclusive=(("rank", "rank_fraction"),),
    )
)
