"""The engine: plans a recipe against the checkpoints' headers, then streams tensors through its method.

The only module that knows about both the math (methods) and the I/O (checkpoint, writer).
Everything that can be checked from headers is checked before any tensor data is read.
"""

from __future__ import annotations

import fnmatch
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from tqdm import tqdm

from .card import model_card
from .checkpoint import Checkpoint, TensorInfo, open_checkpoint
from .errors import CheckpointError, MergeKitLiteError, OutputError
from .methods import MergeMethod, TaskVectorSource, TensorContext
from .recipe import Recipe
from .writer import TOKENIZER_FILES, AtomicFolder, ShardedSafetensorsWriter, copy_support_files, write_config

if TYPE_CHECKING:
    from .stats import MaskStats

#: Rough resident size of the interpreter with torch imported, for the dry-run estimate.
INTERPRETER_BYTES = 450 * 2**20


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: merged from every model, or copied from the base."""

    out: TensorInfo
    merge: bool

    @property
    def name(self) -> str:
        return self.out.name


@dataclass
class Plan:
    """What a run will do, known from headers alone: which tensors, bytes to read and write, memory."""

    recipe: Recipe
    base: Checkpoint
    models: list[Checkpoint]
    jobs: list[TensorJob]
    params: dict[str, Any]
    model_params: list[dict[str, Any]]
    compute_dtype: torch.dtype
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> MergeMethod:
        return self.recipe.method

    @property
    def bytes_to_write(self) -> int:
        """The merged checkpoint's tensor bytes; for a collection, τ_MTL (float32) plus one bit per weight per task."""
        if self.method.output == "collection":
            merged = [j.out.numel for j in self.jobs if j.merge]
            return sum(4 * n + len(self.models) * ((n + 7) // 8) for n in merged)
        return sum(job.out.nbytes for job in self.jobs)

    @property
    def passes(self) -> int:
        """How many times the inputs are read: 1, plus the passes of model-wide statistics."""
        return self.method.passes(self.params, self.compute_dtype)

    @property
    def bytes_to_read(self) -> int:
        """Bytes read from the inputs over all passes (statistics passes read the merged tensors again)."""
        merged = sum(self.base.info(j.name).nbytes + sum(m.info(j.name).nbytes for m in self.models) for j in self.jobs if j.merge)
        return self.bytes_per_pass + (self.passes - 1) * merged

    @property
    def bytes_per_pass(self) -> int:
        total = 0
        for job in self.jobs:
            total += self.base.info(job.name).nbytes
            if job.merge:
                total += sum(m.info(job.name).nbytes for m in self.models)
        return total

    @property
    def largest_merged(self) -> TensorInfo | None:
        merged = [job.out for job in self.jobs if job.merge]
        return max(merged, key=lambda i: i.numel, default=None)

    @property
    def peak_memory_estimate(self) -> int:
        """Interpreter + working copies of the largest merged tensor in the compute dtype + one stored copy."""
        largest = self.largest_merged
        if largest is None:
            return INTERPRETER_BYTES + max((j.out.nbytes for j in self.jobs), default=0)
        copies = self.method.working_copies(len(self.models))
        return INTERPRETER_BYTES + largest.numel * (copies * self.compute_dtype.itemsize + 4)

    def summary(self) -> str:
        merged = sum(1 for j in self.jobs if j.merge)
        copied = len(self.jobs) - merged
        largest = self.largest_merged
        lines = [
            f"method:        {self.method.name} ({self.method.summary})",
            f"base:          {self.base.ref}",
            f"models:        {len(self.models)} ({', '.join(self.recipe.model_names)})",
            f"tensors:       {len(self.jobs)} ({merged} merged, {copied} copied from the base)",
            f"bytes to read: {_human(self.bytes_to_read)}" + (f" ({self.passes} passes over the inputs)" if self.passes > 1 else ""),
            f"bytes to write: {_human(self.bytes_to_write)} in {len(_shard_groups(self))} shard(s)",
            f"largest merged tensor: {largest.name} {list(largest.shape)}" if largest else "largest merged tensor: none",
            f"peak memory (estimate): {_human(self.peak_memory_estimate)}",
            f"compute dtype: {str(self.compute_dtype).removeprefix('torch.')}",
        ]
        return "\n".join(lines)

    def close(self) -> None:
        self.base.close()
        for m in self.models:
            m.close()


def _shard_groups(plan: Plan) -> list[Any]:
    from .writer import plan_shards

    return plan_shards((j.out for j in plan.jobs), plan.recipe.output.shard_size)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def dtype_from_name(name: str) -> torch.dtype:
    return getattr(torch, name)


def selected(name: str, include: list[str] | None, exclude: list[str]) -> bool:
    """Whether the recipe's include/exclude globs select this tensor for merging."""
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def plan(recipe: Recipe) -> Plan:
    """Open every checkpoint's header and check them against each other; read no tensor data."""
    params, model_params = recipe.resolved_parameters()
    with ExitStack() as stack:
        base = open_checkpoint(recipe.base_model)
        stack.callback(base.close)
        models = []
        for entry in recipe.models:
            ckpt = open_checkpoint(entry.model)
            stack.callback(ckpt.close)
            models.append(ckpt)
        out_dtype = dtype_from_name(recipe.output_dtype) if recipe.output_dtype else None
        jobs = build_jobs(recipe, base, models, out_dtype)
        stack.pop_all()
    return Plan(recipe, base, models, jobs, params, model_params, dtype_from_name(recipe.compute_dtype))


def build_jobs(recipe: Recipe, base: Checkpoint, models: list[Checkpoint], out_dtype: torch.dtype | None) -> list[TensorJob]:
    """Decide, per base tensor, whether it is merged or copied, and check every model has it with the same shape."""
    jobs = []
    for name in base.names:
        info = base.info(name)
        merge = info.is_float and selected(name, recipe.include, recipe.exclude)
        if merge:
            for entry, ckpt in zip(recipe.models, models):
                if name not in ckpt:
                    raise CheckpointError(
                        f"{entry.model}: has no tensor {name} (the base has it); use 'exclude' to copy it from the base instead"
                    )
                other = ckpt.info(name)
                if other.shape != info.shape:
                    raise CheckpointError(
                        f"{entry.model}: tensor {name} has shape {list(other.shape)}, the base has {list(info.shape)}; "
                        "the models are not fine-tunes of the same architecture"
                    )
                if not other.is_float:
                    raise CheckpointError(f"{entry.model}: tensor {name} is {other.dtype}, the base's is {info.dtype}")
        dtype = out_dtype if (out_dtype is not None and info.is_float) else info.dtype
        jobs.append(TensorJob(TensorInfo(name, dtype, info.shape), merge))
    base_names = set(base.names)
    for entry, ckpt in zip(recipe.models, models):
        extra = [
            n
            for n in ckpt.names
            if n not in base_names and selected(n, recipe.include, recipe.exclude) and not (n == "lm_head.weight" and base.ties_embeddings)
        ]
        if extra:
            raise CheckpointError(
                f"{entry.model}: has {len(extra)} tensor(s) the base lacks (e.g. {extra[0]}); "
                "check the base model, or list them under 'exclude' to drop them"
            )
    return jobs


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N', refusing CUDA when it is not available."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MergeKitLiteError(f"--device: {device!r} is not a device; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeKitLiteError("--device cuda: no CUDA device is available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise MergeKitLiteError(f"--device: {device!r} is not supported; use cpu or cuda")
    return dev


def read_for_merge(ckpt: Checkpoint, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Read one input tensor in the compute dtype, refusing NaN/Inf (they would poison every merged weight)."""
    tensor = ckpt.get(name).to(device=device, dtype=dtype)
    # one reduction, no temporary: any NaN/Inf makes the sum non-finite (finite sums are confirmed exactly)
    if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(
            f"{ckpt.file_of(name)}: tensor {name} has {bad} NaN/Inf value(s); refusing to merge it "
            "(fix the checkpoint, or list the tensor under 'exclude' to copy it from the base)"
        )
    return tensor


def merged_delta(plan: Plan, job: TensorJob, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The base tensor (compute dtype, on ``device``) and the method's merged task vector for it, before λ."""
    base = read_for_merge(plan.base, job.name, device, plan.compute_dtype)

    def deltas() -> Iterator[torch.Tensor]:
        for ckpt in plan.models:
            yield read_for_merge(ckpt, job.name, device, plan.compute_dtype).sub_(base)

    ctx = TensorContext(job.name, plan.recipe.model_names, plan.params, plan.model_params, plan.stats)
    return base, plan.method.merge(deltas(), ctx)


def merge_tensor(plan: Plan, job: TensorJob, device: torch.device, lam: float | None = None) -> torch.Tensor:
    """Compute one output tensor: θ_0 + λ · method(τ_1..τ_T), in the compute dtype, cast to the output dtype."""
    if not job.merge:
        stored = plan.base.get(job.name)
        return stored.to(job.out.dtype) if stored.dtype != job.out.dtype else stored
    base, merged = merged_delta(plan, job, device)
    out = base.add_(merged, alpha=plan.params["lambda"] if lam is None else lam)
    return out.to(device="cpu", dtype=job.out.dtype)


class EngineSource(TaskVectorSource):
    """Passes over the merged tensors' task vectors, for methods that need model-wide statistics."""

    def __init__(self, plan: Plan, device: torch.device, progress: bool = True):
        self.plan = plan
        self.device = device
        self.progress = progress
        self.compute_dtype = plan.compute_dtype
        self.jobs = [job for job in plan.jobs if job.merge]
        self.total_numel = sum(job.out.numel for job in self.jobs)

    def tensors(self, description: str, tasks: Any = None) -> Iterator[tuple[str, Iterator[tuple[int, torch.Tensor]]]]:
        plan, device, dtype = self.plan, self.device, self.compute_dtype
        chosen = list(range(len(plan.models))) if tasks is None else list(tasks)
        total = sum(plan.base.info(j.name).nbytes + sum(plan.models[t].info(j.name).nbytes for t in chosen) for j in self.jobs)
        with tqdm(total=total, unit="B", unit_scale=True, desc=description, file=sys.stderr, disable=not self.progress, leave=False) as bar:
            for job in self.jobs:
                base = read_for_merge(plan.base, job.name, device, dtype)

                def deltas(name: str = job.name, base: torch.Tensor = base) -> Iterator[tuple[int, torch.Tensor]]:
                    for t in chosen:
                        yield t, read_for_merge(plan.models[t], name, device, dtype).sub_(base)

                yield job.name, deltas()
                bar.update(plan.base.info(job.name).nbytes + sum(plan.models[t].info(job.name).nbytes for t in chosen))


def compute_statistics(plan: Plan, device: torch.device, progress: bool = True) -> dict[str, Any]:
    """Run the method's model-wide statistics passes (if any) and keep the result on the plan."""
    if plan.method.statistics is not None and not plan.stats:
        plan.stats = plan.method.statistics(EngineSource(plan, device, progress), plan.params, plan.model_params) or {}
    return plan.stats


def write_checkpoint(
    out_dir: str | os.PathLike[str],
    jobs: list[TensorInfo],
    produce: Callable[[TensorInfo], torch.Tensor],
    *,
    support_from: Checkpoint | None,
    tokenizer_from: Checkpoint | None,
    card: str | None,
    out_dtype: torch.dtype | None,
    shard_size: int,
    force: bool = False,
    progress: bool = True,
    description: str = "merging",
    extra_files: Path | None = None,
) -> Path:
    """Write a Hugging Face checkpoint atomically, producing tensors one at a time in ``jobs`` order."""
    folder = AtomicFolder(out_dir, force=force)
    total = sum(j.nbytes for j in jobs)
    with folder as tmp:
        writer = ShardedSafetensorsWriter(tmp, jobs, shard_size)
        try:
            with tqdm(total=total, unit="B", unit_scale=True, desc=description, file=sys.stderr, disable=not progress, leave=False) as bar:
                for info in jobs:
                    writer.write(info.name, produce(info))
                    bar.update(info.nbytes)
            writer.close()
        except OSError as exc:
            raise OutputError(f"{out_dir}: failed while writing: {exc.strerror or exc}; nothing was written") from exc
        finally:
            writer.abort()
        try:
            if support_from is not None:
                write_config(support_from.config, tmp, out_dtype)
                copy_support_files(support_from.folder, tmp, ["generation_config.json"])
            if tokenizer_from is not None:
                copy_support_files(tokenizer_from.folder, tmp, TOKENIZER_FILES)
            if extra_files is not None:
                copy_support_files(extra_files, tmp, sorted(p.name for p in extra_files.iterdir() if p.is_file()))
            if card is not None:
                (tmp / "README.md").write_text(card, encoding="utf-8", errors="backslashreplace")
        except OSError as exc:
            raise OutputError(f"{out_dir}: could not write support files: {exc}") from exc
    return folder.destination


def execute(plan: Plan, out_dir: str | os.PathLike[str], *, force: bool = False, device: str = "cpu", progress: bool = True) -> Path:
    """Run a plan: stream every tensor through the method into a new checkpoint (or collection) folder."""
    from .evaluate import lambda_grid

    dev = resolve_device(device)
    if plan.method.output == "collection":
        from .collection import compress

        return compress(plan, out_dir, force=force, device=device, progress=progress)
    compute_statistics(plan, dev, progress)
    grid = lambda_grid(plan)
    if grid is not None:
        return _execute_with_lambda_search(plan, out_dir, grid, force=force, device=dev, progress=progress)
    jobs = {job.name: job for job in plan.jobs}
    return _write_merged(plan, out_dir, lambda info: merge_tensor(plan, jobs[info.name], dev), model_card(plan.recipe), force, progress)


def _write_merged(plan: Plan, out_dir: str | os.PathLike[str], produce: Callable[[TensorInfo], torch.Tensor], card: str, force: bool, progress: bool) -> Path:
    recipe = plan.recipe
    if recipe.tokenizer_source == "none":
        tokenizer_from = None
    elif recipe.tokenizer_source == "base":
        tokenizer_from = plan.base
    else:
        tokenizer_from = plan.models[recipe.model_names.index(recipe.tokenizer_source)]
    out_dtype = dtype_from_name(recipe.output_dtype) if recipe.output_dtype else None
    return write_checkpoint(
        out_dir,
        [job.out for job in plan.jobs],
        produce,
        support_from=plan.base,
        tokenizer_from=tokenizer_from,
        card=card,
        out_dtype=out_dtype,
        shard_size=recipe.output.shard_size,
        force=force,
        progress=progress,
    )


def _execute_with_lambda_search(
    plan: Plan, out_dir: str | os.PathLike[str], grid: list[float], *, force: bool, device: torch.device, progress: bool
) -> Path:
    """Merge once into a scratch file, pick λ with the evaluator, then write θ_0 + λ·merged."""
    from .evaluate import load_evaluator, search_merge_lambda, temporary_folder

    assert plan.recipe.evaluator is not None
    evaluator = load_evaluator(plan.recipe.evaluator)
    AtomicFolder(out_dir, force=force).check()
    merged_jobs = [job for job in plan.jobs if job.merge]
    with temporary_folder(out_dir) as scratch:
        folder = Path(scratch)
        writer = ShardedSafetensorsWriter(folder, [TensorInfo(j.name, plan.compute_dtype, j.out.shape) for j in merged_jobs], 2**62, prefix="merged")
        try:
            total = sum(j.out.nbytes for j in merged_jobs)
            with tqdm(total=total, unit="B", unit_scale=True, desc="merging", file=sys.stderr, disable=not progress, leave=False) as bar:
                for job in merged_jobs:
                    writer.write(job.name, merged_delta(plan, job, device)[1].cpu())
                    bar.update(job.out.nbytes)
            writer.close()
        finally:
            writer.abort()
        delta = Checkpoint("merged task vector", folder, {n: folder / f for n, f in writer.shard_of.items()}, None)
        try:
            lam, scores = search_merge_lambda(evaluator, plan, delta, grid, progress)
            jobs = {job.name: job for job in plan.jobs}

            def produce(info: TensorInfo) -> torch.Tensor:
                job = jobs[info.name]
                if not job.merge:
                    return merge_tensor(plan, job, device)
                out = plan.base.get(job.name).to(plan.compute_dtype).add_(delta.get(job.name), alpha=lam)
                return out.to(job.out.dtype)

            table = ", ".join(f"λ={k}: {v:.4g}" for k, v in scores.items())
            notes = f"λ = {lam} was chosen by the evaluator `{plan.recipe.evaluator}` (mean score over the tasks; {table})."
            return _write_merged(plan, out_dir, produce, model_card(plan.recipe, notes), force, progress)
        finally:
            delta.close()


def run(
    recipe: Recipe | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Merge as the recipe says and write a Hugging Face checkpoint to ``out_dir``; returns its path."""
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_yaml(recipe)
    AtomicFolder(out_dir, force=force).check()
    resolve_device(device)
    the_plan = plan(recipe)
    try:
        return execute(the_plan, out_dir, force=force, device=device, progress=progress)
    finally:
        the_plan.close()


def mask_statistics(
    recipe: Recipe,
    *,
    device: str = "cpu",
    progress: bool = True,
    aggregate: str | None = None,
    tall_lambda: float | None = None,
) -> "MaskStats":
    """TALL-mask statistics for the recipe's models, streamed one tensor at a time.

    Uses the recipe's ``aggregate`` and ``tall_lambda`` when its method has them (consensus),
    else task arithmetic and λ = 0.4; the arguments override both.
    """
    from .methods import multitask_vector, stack_deltas, tall_masks_for, ties_model_statistics
    from .stats import MaskStats

    dev = resolve_device(device)
    the_plan = plan(recipe)
    try:
        count = len(the_plan.models)
        params = {"aggregate": aggregate or the_plan.params.get("aggregate", "task_arithmetic")}
        if params["aggregate"] not in ("task_arithmetic", "ties"):
            raise MergeKitLiteError(f"--aggregate: {params['aggregate']!r} is not task_arithmetic or ties")
        model_params = [{"tall_lambda": tall_lambda if tall_lambda is not None else p.get("tall_lambda", 0.4)} for p in the_plan.model_params]
        source = EngineSource(the_plan, dev, progress)
        stats = ties_model_statistics(source, 0.2, [1.0] * count) if params["aggregate"] == "ties" else {}
        result = MaskStats(recipe.model_names)
        for name, deltas in source.tensors("TALL masks"):
            stacked = stack_deltas((d for _, d in deltas), count)
            ctx = TensorContext(name, recipe.model_names, params, model_params, stats)
            result.add(name, tall_masks_for(stacked, multitask_vector(stacked, ctx), ctx).cpu())
        return result
    finally:
        the_plan.close()
