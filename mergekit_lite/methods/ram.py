"""RAM and RAM+ (ram, ramplus_tl): mergekit 0.1.5's reinforced-agent merging methods.

Both stream the task vectors of a tensor (``ops/ram.py``): memory does not grow with the number
of models. RAM is entrywise, so large tensors go row chunk by row chunk off disk (as task arithmetic); RAM+
reads large tensors' task vectors by row chunks once, in parallel, into a whole running sum, count and owner
map, then finishes each chunk with the tensor's boosts (``ramplus_rows``; a form that read every task vector
twice measured 11.8 → 13.5 s at K = 4 on a 250M model, and was not adopted). ``ramplus_tl`` counts
shared/unique entries per tensor, as mergekit does; ``scope: model`` counts them over the whole model in one
extra pass, as the authors' code does.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from ..ops.ram import RamState, ram_accumulate, ram_finish, ramplus_finish, ramplus_scales, unique_counts
from .base import MergeMethod, Param, TaskVectorSource, TensorContext, chunk_rows, each_chunk, reduce_passes, register

PAPER = "https://arxiv.org/abs/2601.13572"

EPSILON = Param("epsilon", float, 1e-5, "An entry of τ_t counts as changed when |τ_t| > epsilon (mergekit's default 1e-5, as the authors' code).")
R = Param("r", float, 0.1, "RAM+ boost: each model's unique entries are multiplied by 1 + r · clamp(ρ, 0, alpha) (mergekit: 0.1; the authors' README: 0.2).")
ALPHA = Param("alpha", float, 0.2, "Cap on ρ = shared/unique entries of a model in the RAM+ boost (mergekit: 0.2; the authors' code: 1).")
SCOPE = Param(
    "scope", str, "tensor",
    "Where ρ (a model's shared/unique entries) is counted: tensor (mergekit's ramplus_tl) or model (the authors' code: once over the whole model, one extra pass).",
    choices=("tensor", "model"), per_tensor=False,
)


def ram_combine(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    return ram_finish(ram_accumulate(deltas, ctx.params["epsilon"]))


def ramplus_combine(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    p = ctx.params
    state = ram_accumulate(deltas, p["epsilon"], track_owner=True)
    unique = unique_counts(state)
    if p.get("scope") == "model":
        stats = ctx.model_statistics
        shared, unique = stats["ram_shared"], stats["ram_unique"]
    else:
        shared = [a - u for a, u in zip(state.active, unique)]
    return ramplus_finish(state, ramplus_scales(shared, unique, p["r"], p["alpha"], p["epsilon"]))


def ramplus_rows(source: TaskVectorSource, ctx: TensorContext) -> torch.Tensor | None:
    """RAM+ over row chunks of re-read task vectors: each chunk's running sum, count and owner map go into whole-tensor
    buffers (chunks in parallel on the CPU threads) while the chunks' active and unique counts add up; then each
    chunk is scaled and averaged with the tensor's λ_t. Every entry sees ``ramplus_combine``'s operations: the same
    bytes, without holding whole task vectors (the only whole tensors: the sum, and the int16 count and owner map)."""
    p = ctx.params
    total = torch.empty(source.shape, dtype=source.dtype, device=source.device)
    count = torch.empty(source.shape, dtype=torch.int16, device=source.device)
    owner = torch.empty(source.shape, dtype=torch.int16, device=source.device)
    chunks = source.chunks()
    counted: dict[int, tuple[list[int], list[int]]] = {}

    def state_of(start: int, stop: int) -> RamState:
        rows = chunk_rows(source, start, stop)
        return RamState(total, count, owner) if rows is None else RamState(total[rows], count[rows], owner[rows])

    def deltas(start: int, stop: int) -> Iterator[torch.Tensor]:
        for t in range(source.count):
            delta = source.rows(t, start, stop)
            yield delta if source.hands_out_new else delta.clone()

    def accumulate(chunk: tuple[int, int]) -> None:
        state = ram_accumulate(deltas(*chunk), p["epsilon"], into=state_of(*chunk))
        counted[chunk[0]] = (state.active, unique_counts(state))

    each_chunk(accumulate, chunks, source.device)
    active = [sum(c[0][t] for c in counted.values()) for t in range(source.count)]
    unique = [sum(c[1][t] for c in counted.values()) for t in range(source.count)]
    if p.get("scope") == "model":
        shared, unique = ctx.model_statistics["ram_shared"], ctx.model_statistics["ram_unique"]
    else:
        shared = [a - u for a, u in zip(active, unique)]
    scales = ramplus_scales(shared, unique, p["r"], p["alpha"], p["epsilon"])
    keep = source.keep_merged_rows
    if keep is None:
        return ramplus_finish(state_of(0, source.shape[0] if source.shape else 1), scales)

    def finish(chunk: tuple[int, int]) -> None:
        keep(chunk_rows(source, *chunk), ramplus_finish(state_of(*chunk), scales))

    each_chunk(finish, chunks, source.device)
    return None


def ramplus_statistics(source: Any, params: dict[str, Any], model_params: list[dict[str, Any]]) -> dict[str, Any]:
    """scope: model — each model's shared and unique entries over every merged tensor (one pass)."""
    if params.get("scope") != "model":
        return {}
    shared, unique = reduce_passes(source, "RAM+ shared/unique counts", ramplus_counts, _add_counts, len(model_params))
    return {"ram_shared": shared, "ram_unique": unique}


def ramplus_counts(source: Any, description: str, tasks: int) -> tuple[list[int], list[int]]:
    """Each model's (shared, unique) changed-entry counts over the source's tensors."""
    epsilon = {job.name: job.params["epsilon"] for job in source.jobs}
    shared = [0] * tasks
    unique = [0] * tasks
    for name, deltas in source.tensors(description):
        state = ram_accumulate((d for _, d in deltas), epsilon[name], track_owner=True)
        for t, (a, u) in enumerate(zip(state.active, unique_counts(state))):
            shared[t] += a - u
            unique[t] += u
    return shared, unique


def _add_counts(parts: list[tuple[list[int], list[int]]]) -> tuple[list[int], list[int]]:
    return [sum(p[0][t] for p in parts) for t in range(len(parts[0][0]))], [sum(p[1][t] for p in parts) for t in range(len(parts[0][1]))]


register(
    MergeMethod(
        name="ram",
        summary="RAM: keep the entries only one model changed, average the ones several changed (Yuan et al., 2026).",
        params=(EPSILON,),
        combine=ram_combine,
        paper=PAPER,
        # row chunks (entrywise): the stored output and a few chunks (250M bfloat16, K = 4: peak 408–416 MiB,
        # ~1.4 copies of the largest tensor with the output); held, it was 4.75 (base, running sum, task vector,
        # int16 count, bool masks, a conversion temporary)
        working_copies=lambda n: 1.25,  # two threads' row chunks at once: measured 2.18–2.41 / 1.27 with the stored copy at K = 2 / 8
        # each entry's merge reads only that entry of every task vector: large tensors by row chunks off disk
        entrywise=lambda params: True,
    )
)
register(
    MergeMethod(
        name="ramplus_tl",
        summary="RAM+: RAM with each model's unique entries boosted by its shared/unique ratio, counted per tensor (mergekit) or per model.",
        params=(R, ALPHA, EPSILON, SCOPE),
        combine=ramplus_combine,
        combine_rows=ramplus_rows,
        paper=PAPER,
        # large tensors by row chunks (ramplus_rows): the whole sum, int16 count and owner map, two threads' chunks;
        # measured 4.32 / 3.79 / 3.90 with the stored copy at K = 2 / 4 / 8 (held whole, as before: 5.25 + 0.3 K)
        working_copies=lambda n: 3.4,
        statistics=ramplus_statistics,
        passes=lambda params, dtype: 2 if params.get("scope") == "model" else 1,
        inputs_in_turn=True,  # ram_accumulate overwrites each task vector and lets it go before the next
    )
)
