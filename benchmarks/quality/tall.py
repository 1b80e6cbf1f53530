"""TALL-mask reconstruction of each fine-tune from θ_0, τ_MTL and one binary mask per task.

    m_t   = |τ_t| > λ_t · |τ_MTL − τ_t|        (strict >; Wang et al., ICML 2024, eq. 3)
    θ̂_t  = θ_0 + m_t ⊙ τ_MTL

λ_t is chosen per task from the paper's grid by that task's validation accuracy.

Two interchangeable sources of θ̂_t (both are ``Reconstructor``s):

* ``ReferenceTall``: the formula above in this file, in memory, from the checkpoints and the
  τ_MTL that ``mergekit-lite run`` wrote (task arithmetic or TIES at λ = 1). A reference
  implementation for the benchmark, used until the tool can extract reconstructions itself.
* ``CliTall``: the tool's own path, ``mergekit-lite run tall.yml COLLECTION`` (``merge_method:
  tall_masks``, one collection per λ) then ``mergekit-lite extract COLLECTION --all OUT``
  (equivalently ``extract COLLECTION TASK OUT`` per task).

``run.py --tall auto`` uses ``CliTall`` when ``mergekit-lite --help`` lists ``extract``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import json

import torch

from . import merge
from .model import read_state
from .suite import SUITE_ENV, Suite

#: the recipe evaluator hook of this benchmark (see suite.validation_accuracy)
EVALUATOR = "benchmarks.quality.suite:validation_accuracy"

State = dict[str, torch.Tensor]


class Reconstructor(Protocol):
    """Gives θ̂_t for (task, λ_t) pairs."""

    label: str

    def reconstruct(self, pairs: Iterable[tuple[str, float]]) -> Iterable[tuple[str, float, State]]: ...


def tall_mask(tau_t: torch.Tensor, tau_mtl: torch.Tensor, lam: float) -> torch.Tensor:
    """m_t = |τ_t| > λ·|τ_MTL − τ_t| (an entry with τ_t = 0 is never in the mask)."""
    return tau_t.abs() > lam * (tau_mtl - tau_t).abs()


class ReferenceTall:
    """θ̂_t = θ_0 + m_t ⊙ τ_MTL computed here, in memory (the backbone is small)."""

    def __init__(self, base: State, finetuned: Mapping[str, State], mtl: State, aggregate: str):
        self.label = f"reference ({aggregate})"
        self.base = base
        self.tau = {task: {k: state[k] - base[k] for k in base} for task, state in finetuned.items()}
        self.tau_mtl = {k: mtl[k] - base[k] for k in base}

    def masks(self, task: str, lam: float) -> dict[str, torch.Tensor]:
        return {k: tall_mask(self.tau[task][k], self.tau_mtl[k], lam) for k in self.base}

    def reconstruct(self, pairs: Iterable[tuple[str, float]]) -> Iterable[tuple[str, float, State]]:
        for task, lam in pairs:
            masks = self.masks(task, lam)
            yield task, lam, {k: self.base[k] + masks[k] * self.tau_mtl[k] for k in self.base}


class CliTall:
    """θ̂_t from the tool: one ``tall_masks`` collection per λ, then ``extract`` per task."""

    def __init__(self, suite: Suite, aggregate: str, work: Path, workers: int = 2):
        self.label = f"mergekit-lite extract ({aggregate})"
        self.suite, self.aggregate, self.work, self.workers = suite, aggregate, work, workers

    def collection(self, lam: float) -> Path:
        path = self.work / f"collection-{self.aggregate}-{lam:g}"
        if not path.exists():
            models = {t: self.suite.model_dir(t) for t in self.suite.tasks}
            params = {"aggregate": self.aggregate, "tall_lambda": lam}
            recipe = merge.write_recipe(self.work / "recipes" / f"tall-{self.aggregate}-{lam:g}.yml", merge.recipe("tall_masks", self.suite.base_dir, models, params))
            merge.merge(recipe, path)
        return path

    def _extract_all(self, lam: float) -> list[tuple[str, float, State]]:
        out = self.work / f"extract-{self.aggregate}-{lam:g}"
        merge.remove(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        merge.cli("extract", self.collection(lam), "--all", out, "--force", "-q")
        states = [(task, lam, read_state(_task_folder(out, task))) for task in self.suite.tasks]
        merge.remove(out)
        return states

    def reconstruct(self, pairs: Iterable[tuple[str, float]]) -> Iterable[tuple[str, float, State]]:
        wanted = set(pairs)
        extracted = merge.parallel(self._extract_all, sorted({lam for _, lam in wanted}), self.workers)
        return [item for batch in extracted for item in batch if item[:2] in wanted]


def _task_folder(out: Path, task: str) -> Path:
    """The folder ``extract --all`` wrote for ``task``: ``OUT/<task>`` or ``OUT/<index>-<task>``."""
    if (out / task).is_dir():
        return out / task
    found = [p for p in out.iterdir() if p.is_dir() and p.name.split("-", 1)[-1] == task]
    if len(found) != 1:
        raise FileNotFoundError(f"{out}: no single folder for task {task!r} among {sorted(p.name for p in out.iterdir())}")
    return found[0]


@dataclass
class TallResult:
    """The per-task λ_t search of one reconstructor."""

    label: str
    lambdas: dict[str, float]  #: chosen λ_t per task
    val: dict[str, dict[float, float]]  #: validation accuracy per task and λ
    test: dict[str, float]  #: test accuracy at the chosen λ_t
    #: against a second reconstructor (the reference code): largest |Δθ̂| and entries that differ
    max_abs_diff: float | None = None
    entries_differing: int | None = None


def search(recon: Reconstructor, suite: Suite, grid: Iterable[float], check: ReferenceTall | None = None) -> TallResult:
    """Pick each task's λ_t by validation accuracy (the smallest λ among ties) and score it on test.

    With ``check``, every reconstruction is also compared with the reference code's.
    """
    grid = sorted(grid)
    val: dict[str, dict[float, float]] = {t: {} for t in suite.tasks}
    test_at: dict[tuple[str, float], float] = {}
    worst, differing = 0.0, 0
    for task, lam, state in recon.reconstruct((t, lam) for t in suite.tasks for lam in grid):
        val[task][lam] = suite.accuracy(state, task, "val")
        test_at[task, lam] = suite.accuracy(state, task, "test")
        if check is not None:
            (_, _, expected), = check.reconstruct([(task, lam)])
            for name, tensor in expected.items():
                delta = (state[name].to(tensor.dtype) - tensor).abs()
                worst, differing = max(worst, float(delta.max())), differing + int((delta > 0).sum())
    chosen = {t: max(grid, key=lambda lam: (val[t][lam], -lam)) for t in suite.tasks}
    result = TallResult(recon.label, chosen, val, {t: test_at[t, chosen[t]] for t in suite.tasks})
    if check is not None:
        result.max_abs_diff, result.entries_differing = worst, differing
    return result


def evaluator_search(suite: Suite, aggregate: str, work: Path) -> dict[str, dict]:
    """Let the tool search λ_t itself: one ``tall_masks`` recipe with the λ grid and ``evaluator:`` set to our hook.

    Returns, per task, the λ_t the tool chose and its validation score per λ (from the collection's manifest).
    """
    models = {t: suite.model_dir(t) for t in suite.tasks}
    params = {"aggregate": aggregate, "tall_lambda": {"search": list(suite.profile.tall_lambdas)}}
    recipe = merge.write_recipe(work / "recipes" / f"tall-{aggregate}-search.yml",
                                merge.recipe("tall_masks", suite.base_dir, models, params, evaluator=EVALUATOR),
                                "TALL masks with the tool's own λ_t search through the benchmark's evaluator hook")
    out = work / f"collection-{aggregate}-search"
    merge.cli("run", merge._portable(recipe), merge._portable(out), "--force", "-q", env={SUITE_ENV: str(suite.root)})
    manifest = json.loads((out / "manifest.json").read_text())
    return {t["name"]: {"lambda": t["tall_lambda"], "scores": {float(k): v for k, v in t["lambda_scores"].items()}} for t in manifest["tasks"]}
