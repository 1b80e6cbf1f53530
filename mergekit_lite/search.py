"""The evaluator hook: a user's ``module:function`` scores reconstructed or merged models, and
the tool picks, per task, the TALL-mask λ (or, for consensus and task arithmetic, the merge λ)
from a grid, as the papers do on validation data.

The function is called as ``function(task_name, state)`` where ``state`` is a read-only mapping
of tensor names to tensors computed on access (with ``state.save_pretrained(folder)`` for
evaluators that want a checkpoint folder); it returns a number, higher is better.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import Checkpoint, TensorInfo
from .errors import MergeKitLiteError, RecipeError
from .progress import progress_bar
from .statedict import LazyStateDict

Evaluator = Callable[[str, Mapping], float]


def load_evaluator(spec: str) -> Evaluator:
    """Import ``module:function`` (the current folder is searched first)."""
    module_name, _, function_name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RecipeError(f"evaluator: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH or in the current folder?") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise RecipeError(f"evaluator: module {module_name!r} has no function {function_name!r}")
    return function


def score(evaluator: Evaluator, task: str, state: Mapping) -> float:
    """Call the evaluator and insist on a finite number."""
    try:
        value = evaluator(task, state)
    except MergeKitLiteError:
        raise
    except Exception as exc:  # the user's code: report it as one line naming the evaluator
        raise MergeKitLiteError(f"evaluator failed on task {task!r}: {type(exc).__name__}: {exc}") from exc
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MergeKitLiteError(f"evaluator returned {value!r} for task {task!r}; it must return a number (higher is better)") from None
    if math.isnan(number):
        raise MergeKitLiteError(f"evaluator returned NaN for task {task!r}")
    return number


def best(grid: list[float], scores: list[float]) -> float:
    """The grid value with the highest score (the first, i.e. the earliest listed, among equals)."""
    return grid[max(range(len(grid)), key=lambda i: (scores[i], -i))]


def tall_lambda_score(evaluator: Evaluator, plan: Any, tau: Checkpoint, t: int, lam: float, device: torch.device) -> float:
    """The evaluator's score of task t reconstructed as θ_0 + m_t(λ) ⊙ τ_MTL (one candidate of the search)."""
    from .ops import tall_mask

    jobs = {job.name: job for job in plan.jobs}
    model = plan.models[t]
    infos = [TensorInfo(j.name, model.info(j.name).dtype if j.merge else plan.base.info(j.name).dtype, j.out.shape) for j in plan.jobs]

    def compute(name: str) -> torch.Tensor:
        stored = plan.base.get(name)
        if not jobs[name].merge:
            return stored
        dtype = plan.compute_dtype
        base = stored.to(device=device, dtype=dtype)
        tau_t = model.get(name).to(device=device, dtype=dtype).sub_(base)
        mtl = tau.get(name).to(device=device, dtype=dtype)
        out = base.add_(torch.where(tall_mask(tau_t, mtl, lam), mtl, 0))
        return out.to(device="cpu", dtype=model.info(name).dtype)

    return score(evaluator, plan.model_names[t], LazyStateDict(infos, compute, support=model))


def search_tall_lambdas(
    evaluator: Evaluator,
    plan: Any,
    tau: Checkpoint,
    grids: list[list[float] | None],
    lambdas: list[Any],
    device: torch.device,
    progress: bool,
    scored: dict[tuple[int, float], float] | None = None,
) -> tuple[list[float], list[dict[str, float] | None]]:
    """Per task with a grid, score θ_0 + m_t(λ) ⊙ τ_MTL for each λ and keep the best (``scored``: the
    scores of every (task, λ) computed elsewhere, by a distributed executor's tasks)."""
    names = plan.model_names
    chosen = list(lambdas)
    all_scores: list[dict[str, float] | None] = [None] * len(names)
    todo = [(t, lam) for t, grid in enumerate(grids) if grid is not None for lam in grid]
    with progress_bar(0 if scored is not None else len(todo), "λ search", progress and scored is None, unit="eval") as bar:
        for t, grid in enumerate(grids):
            if grid is None:
                continue
            results = []
            for lam in grid:
                if scored is not None:
                    results.append(scored[(t, lam)])
                    continue
                bar.set_postfix_str(f"{names[t]} λ={lam}")
                results.append(tall_lambda_score(evaluator, plan, tau, t, lam, device))
                bar.update(1)
            chosen[t] = best(grid, results)
            all_scores[t] = {str(lam): s for lam, s in zip(grid, results)}
    return chosen, all_scores


def lambda_grid(plan: Any) -> list[float] | None:
    """The merge λ grid to search, or None: a list in the recipe, or the default grid when an evaluator is set and λ is not."""
    param = plan.method.param("lambda")
    if param is None or not param.searchable:
        return None
    value = plan.params["lambda"]
    if isinstance(value, list):
        return value
    if plan.recipe.evaluator and "lambda" not in plan.recipe.parameters:
        return list(param.default_grid)
    return None


def merge_lambda_score(evaluator: Evaluator, plan: Any, delta: Checkpoint, lam: float, bar: Any = None) -> float:
    """The mean evaluator score over the recipe's tasks of θ_0 + λ·merged (one candidate of the search)."""
    names = plan.model_names
    jobs = {job.name: job for job in plan.jobs}
    infos = [job.out for job in plan.jobs]

    def compute(name: str) -> torch.Tensor:
        stored = plan.base.get(name)
        if not jobs[name].merge:
            return stored.to(jobs[name].out.dtype)
        out = stored.to(plan.compute_dtype).add_(delta.get(name).to(plan.compute_dtype), alpha=lam)
        return out.to(jobs[name].out.dtype)

    state = LazyStateDict(infos, compute, support=plan.base)
    total = 0.0
    for name in names:
        if bar is not None:
            bar.set_postfix_str(f"λ={lam} {name}")
        total += score(evaluator, name, state)
        if bar is not None:
            bar.update(1)
    return total / len(names)


def search_merge_lambda(
    evaluator: Evaluator, plan: Any, delta: Checkpoint, grid: list[float], progress: bool, scored: list[list[float]] | None = None
) -> tuple[float, dict[str, float]]:
    """Score θ_0 + λ·merged for each λ (mean of the evaluator over the recipe's tasks); keep the best.
    ``scored``: each λ's score already computed elsewhere (a distributed executor's tasks), as [score]."""
    if scored is not None:
        results = [r[0] for r in scored]
    else:
        results = []
        with progress_bar(len(grid) * len(plan.model_names), "λ search", progress, unit="eval") as bar:
            for lam in grid:
                results.append(merge_lambda_score(evaluator, plan, delta, lam, bar))
    return best(grid, results), {str(lam): s for lam, s in zip(grid, results)}


def temporary_folder(beside: str | os.PathLike[str]) -> tempfile.TemporaryDirectory:
    """A scratch folder next to the output (same disk), removed afterwards."""
    from .writer import AtomicFolder

    dest = Path(beside).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)  # as the output's own folder would be (a missing parent is created)
    # named like AtomicFolder's work folders (with our pid), so a later run removes it if we are killed
    return tempfile.TemporaryDirectory(prefix=f"{AtomicFolder.PREFIX}{dest.name}.{os.getpid()}.scratch.", dir=dest.parent)
