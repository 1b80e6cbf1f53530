"""The merged model: every output tensor of the plan streamed into a Hugging Face checkpoint folder.

With an evaluator and a λ grid (task-vector methods), the merged task vector is written once to
a scratch file, λ is chosen by the evaluator, and θ_0 + λ·merged is written.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..card import model_card, output_name
from ..checkpoint import Checkpoint, TensorInfo
from ..errors import MergeKitLiteWarning, RecipeError
from ..execute import (
    compute_statistics,
    compute_tensor,
    merged_task_vector,
    producer,
    register_product,
    resolve_device,
    write_jobs,
    write_task_vectors,
)
from ..plan import Plan, dtype_from_name
from ..progress import progress_bar
from ..search import lambda_grid, load_evaluator, merge_lambda_score, search_merge_lambda, temporary_folder
from ..writer import AtomicFolder, ShardedSafetensorsWriter, write_at, write_checkpoint
from .tokenizer import tokenizer_plan, write_tokenizer


def write_merged(plan: Plan, out_dir: str | os.PathLike[str], *, force: bool = False, device: str = "cpu", progress: bool = True,
                 executor: Any = None) -> Path:
    """Stream every output tensor of the plan through its method into a new checkpoint folder (here, or
    spread over a distributed ``executor``'s workers, each writing its tensors at their offsets)."""
    dev = resolve_device(device)
    tokenizer = tokenizer_plan(plan)  # a bad tokenizer_source or chat template fails before any weight is read
    compute_statistics(plan, dev, progress, executor)
    grid = lambda_grid(plan)
    if grid is not None and any(job.vocab is not None for job in plan.jobs):
        raise RecipeError("evaluator: a λ search scores models with the base's tokenizer, but this recipe re-maps the vocabulary "
                          f"({plan.vocabulary.shown if plan.vocabulary is not None else 'tokenizer'}); give lambda a value, or remove tokenizer_source/tokenizer")
    if grid is not None:
        path = _write_with_lambda_search(plan, out_dir, grid, force=force, device=dev, progress=progress, executor=executor)
    else:
        fill = _distributed_fill(executor, plan, dev, progress, write_jobs, ()) if executor is not None else None
        path = _write(plan, out_dir, producer(plan, dev), _card(plan, out_dir), force, progress, fill)
    for note in tokenizer.notes:  # found while planning (a vocabulary larger than the embeddings) or writing (module weights not merged)
        warnings.warn(note, MergeKitLiteWarning, stacklevel=2)
    if tokenizer.missing:
        warnings.warn(f"{path}: no tokenizer: {tokenizer.missing}", MergeKitLiteWarning, stacklevel=2)
    return path


def _card(plan: Plan, out_dir: str | os.PathLike[str], notes: str = "") -> str:
    config = plan.config_source.config if plan.config_source is not None else None
    return model_card(plan.recipe, notes, config=config, tokenizer=tokenizer_plan(plan), name=output_name(out_dir))


def _distributed_fill(executor: Any, plan: Plan, device: torch.device, progress: bool, part: Callable[..., Any], args: tuple[Any, ...],
                      names: Sequence[str] | None = None) -> Callable[[ShardedSafetensorsWriter], None]:
    """A writer filler for ``write_checkpoint``: the shards reserved, the jobs run by the executor's workers
    (``part(plan, device, share, places, *args)`` writes each share's tensors at their places)."""
    jobs = {job.name: job for job in plan.jobs}
    chosen = list(names) if names is not None else list(jobs)

    def fill(writer: ShardedSafetensorsWriter) -> None:
        places = writer.reserve()
        sizes = [sum(plan.info(r).nbytes for r in jobs[n].reads) or jobs[n].out.nbytes for n in chosen]
        executor.run(plan, device, part, chosen, sizes, (places, *args), progress=progress,
                     on_done=lambda share, _result: [writer.written_elsewhere(n) for n in share])

    return fill


def _write(plan: Plan, out_dir: str | os.PathLike[str], produce: Callable[[TensorInfo], torch.Tensor], card: str, force: bool, progress: bool,
           fill: Callable[[ShardedSafetensorsWriter], None] | None = None) -> Path:
    recipe = plan.recipe
    tokenizer = tokenizer_plan(plan)  # resolved before any weight is read: a bad tokenizer_source fails first
    return write_checkpoint(
        out_dir,
        [job.out for job in plan.jobs],
        produce,
        support_from=plan.config_source,
        tokenizer_from=None,
        finish=lambda folder: write_tokenizer(tokenizer, folder),
        card=card,
        out_dtype=dtype_from_name(recipe.output_dtype) if recipe.output_dtype else None,
        shard_size=recipe.output.shard_size,
        force=force,
        progress=progress,
        config_updates=plan.config_updates,
        fill=fill,
    )


def _write_with_lambda_search(
    plan: Plan, out_dir: str | os.PathLike[str], grid: list[float], *, force: bool, device: torch.device, progress: bool, executor: Any = None
) -> Path:
    """Merge once into a scratch file, pick λ with the evaluator, then write θ_0 + λ·merged (with a distributed
    executor: the scratch file and the output written by its workers, each λ candidate scored as its own task)."""
    assert plan.recipe.evaluator is not None and plan.base is not None
    evaluator = load_evaluator(plan.recipe.evaluator)
    AtomicFolder(out_dir, force=force).check()
    merged_jobs = [job for job in plan.jobs if job.merge]
    with temporary_folder(out_dir) as scratch:
        folder = Path(scratch)
        writer = ShardedSafetensorsWriter(folder, [TensorInfo(j.name, plan.compute_dtype, j.out.shape) for j in merged_jobs], 2**62, prefix="merged")
        try:
            if executor is not None:
                _distributed_fill(executor, plan, device, progress, write_task_vectors, (), [j.name for j in merged_jobs])(writer)
            else:
                with progress_bar(sum(j.out.nbytes for j in merged_jobs), "merging", progress) as bar:
                    for job in merged_jobs:
                        writer.write(job.name, merged_task_vector(plan, job, device)[1].cpu())
                        bar.update(job.out.nbytes)
            writer.close()
        finally:
            writer.abort()
        delta = Checkpoint("merged task vector", folder, {n: folder / f for n, f in writer.shard_of.items()}, None)
        try:
            if executor is not None:
                shards = {n: str(folder / f) for n, f in writer.shard_of.items()}
                results = executor.map(plan, device, score_lambdas, grid, (str(folder), shards, plan.recipe.evaluator), progress=progress)
                lam, scores = search_merge_lambda(evaluator, plan, delta, grid, progress, scored=results)
            else:
                lam, scores = search_merge_lambda(evaluator, plan, delta, grid, progress)
            jobs = {job.name: job for job in plan.jobs}
            base = plan.base

            def produce(info: TensorInfo) -> torch.Tensor:
                job = jobs[info.name]
                if not job.merge:
                    return compute_tensor(plan, job, device)
                out = base.get(job.name).to(plan.compute_dtype).add_(delta.get(job.name), alpha=lam)
                return out.to(job.out.dtype)

            table = ", ".join(f"λ={k}: {v:.4g}" for k, v in scores.items())
            notes = f"λ = {lam} was chosen by the evaluator `{plan.recipe.evaluator}` (mean score over the tasks; {table})."
            fill = None
            if executor is not None:
                shards = {n: str(folder / f) for n, f in writer.shard_of.items()}
                fill = _distributed_fill(executor, plan, device, progress, write_with_lambda, (str(folder), shards, lam))
            return _write(plan, out_dir, produce, _card(plan, out_dir, notes), force, progress, fill)
        finally:
            delta.close()


def _scratch(folder: str, shards: dict[str, str]) -> Checkpoint:
    """The scratch file of merged task vectors, opened where a worker runs (the folder beside the output)."""
    return Checkpoint("merged task vector", Path(folder), {n: Path(f) for n, f in shards.items()}, None)


def write_with_lambda(plan: Plan, device: torch.device, names: Sequence[str], places: dict[str, Any], folder: str, shards: dict[str, str], lam: float) -> int:
    """On a worker: θ_0 + λ·merged (merged tensors) or the copied tensor, for a share of the output, at its places."""
    jobs = {job.name: job for job in plan.jobs}
    delta = _scratch(folder, shards)
    try:
        for name in names:
            job = jobs[name]
            if job.merge:
                out = plan.base.get(name).to(plan.compute_dtype).add_(delta.get(name), alpha=lam).to(job.out.dtype)
            else:
                out = compute_tensor(plan, job, device)
            write_at(places[name], out)
    finally:
        delta.close()
    return len(names)


def score_lambdas(plan: Plan, device: torch.device, lambdas: Sequence[float], folder: str, shards: dict[str, str], evaluator: str) -> list[float]:
    """On a worker: the mean evaluator score of θ_0 + λ·merged for each λ (a λ candidate of the search)."""
    delta = _scratch(folder, shards)
    try:
        return [merge_lambda_score(load_evaluator(evaluator), plan, delta, lam) for lam in lambdas]
    finally:
        delta.close()


register_product("model", write_merged)
