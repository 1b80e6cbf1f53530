"""Merging through the mergekit-lite CLI, exactly as a user would: write a recipe, run the command.

Every merge is ``mergekit-lite run RECIPE OUT --force -q`` in a child process; the benchmark only
reads the ``model.safetensors`` that the command writes. The methods and their fixed parameters are
declared once in ``METHODS``; ``lambda`` is searched on validation data by ``run.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / ".venv" / "bin" / "mergekit-lite"


@dataclass(frozen=True)
class MethodSpec:
    """One row of the results table: a merge method with its fixed parameters."""

    label: str  #: name in the table
    key: str  #: folder and file names
    merge_method: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    #: consensus: per-task tall_lambda taken from the TALL search of this aggregate
    tall_from: str | None = None
    #: whether λ is searched on validation; methods without a λ (linear, model_stock, ...) run once
    searched: bool = True
    #: whether the recipe names the pretrained backbone as base_model (a linear soup of the fine-tunes does not)
    with_base: bool = True


METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("Task arithmetic", "task_arithmetic", "task_arithmetic"),
    MethodSpec("TIES", "ties", "ties", {"density": 0.2, "scope": "model", "merge": "mean"}),
    MethodSpec("TIES (mergekit: per tensor)", "ties_tensor", "ties", {"density": 0.2}),
    MethodSpec("DARE-TIES", "dare_ties", "dare_ties", {"density": 0.5, "rescale": True, "rescale_rule": "density", "seed": 0, "merge": "mean"}),
    MethodSpec("DARE-linear", "dare_linear", "dare_linear", {"density": 0.5, "rescale_rule": "density", "seed": 0}),
    MethodSpec("Breadcrumbs", "breadcrumbs", "breadcrumbs", {"density": 0.15, "gamma": 0.006, "scope": "row"}),
    MethodSpec("Breadcrumbs-TIES", "breadcrumbs_ties", "breadcrumbs_ties", {"density": 0.15, "gamma": 0.006, "scope": "row", "merge": "mean"}),
    MethodSpec("DELLA", "della", "della", {"density": 0.5, "epsilon": 0.1, "rescale_rule": "density", "seed": 0}),
    MethodSpec("DELLA-linear", "della_linear", "della_linear", {"density": 0.5, "epsilon": 0.1, "rescale_rule": "density", "seed": 0}),
    MethodSpec("SCE", "sce", "sce", {"select_topk": 0.2}, searched=False),
    MethodSpec("RAM", "ram", "ram", searched=False),
    MethodSpec("RAM+ (authors' settings)", "ramplus_tl", "ramplus_tl", {"scope": "model", "r": 0.2, "alpha": 1.0}, searched=False),
    MethodSpec("Consensus-TA", "consensus_ta", "consensus", {"aggregate": "task_arithmetic", "consensus_k": 2}, tall_from="task_arithmetic"),
    MethodSpec("Consensus-TIES", "consensus_ties", "consensus", {"aggregate": "ties", "consensus_k": 2}, tall_from="ties"),
    MethodSpec("Linear (soup of the fine-tunes)", "linear", "linear", searched=False, with_base=False),
    MethodSpec("Model Stock", "model_stock", "model_stock", searched=False),
    MethodSpec("Multi-SLERP", "multislerp", "multislerp", searched=False, with_base=False),
    MethodSpec("Karcher mean", "karcher", "karcher", searched=False, with_base=False),
)

#: mergekit methods that take exactly two models, so they have no place in an 8-task merge
TWO_MODEL_METHODS = ("slerp", "nuslerp", "nearswap", "arcee_fusion")

#: recipes whose output θ_0 + τ_MTL gives the multi-task vector of the TALL masks (λ = 1)
AGGREGATES: dict[str, tuple[str, dict[str, Any]]] = {
    "task_arithmetic": ("task_arithmetic", {"lambda": 1.0}),
    "ties": ("ties", {"density": 0.2, "scope": "model", "merge": "sum", "lambda": 1.0}),
}


def _portable(path: Path) -> str:
    """Paths under the repository are written relative to it (the CLI runs from the repository root)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def recipe(
    merge_method: str,
    base: Path | None,
    models: Mapping[str, Path],
    parameters: Mapping[str, Any],
    per_model: Mapping[str, Mapping[str, Any]] | None = None,
    evaluator: str | None = None,
) -> dict[str, Any]:
    """A recipe as a dict (mergekit key names); ``models`` maps task names to checkpoint folders."""
    entries = []
    for name, path in models.items():
        entry: dict[str, Any] = {"model": _portable(path), "name": name}
        if per_model and per_model.get(name):
            entry["parameters"] = dict(per_model[name])
        entries.append(entry)
    out: dict[str, Any] = {
        "merge_method": merge_method,
        **({"base_model": _portable(base)} if base is not None else {}),
        "models": entries,
        "parameters": dict(parameters),
        "dtype": "float32",
        "tokenizer_source": "none",
    }
    if evaluator:
        out["evaluator"] = evaluator
    return out


def write_recipe(path: Path, data: Mapping[str, Any], comment: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    path.write_text(header + yaml.safe_dump(dict(data), sort_keys=False))
    return path


class CliError(RuntimeError):
    pass


def cli(*args: str | os.PathLike[str], threads: int = 1, env: Mapping[str, str] | None = None) -> str:
    """Run ``mergekit-lite ARGS`` from the repository root and return its stdout; raise CliError with its stderr on failure.

    The repository root is put on ``PYTHONPATH`` so that a recipe's ``evaluator`` can name this benchmark's hook.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           **(env or {})}
    done = subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise CliError(f"mergekit-lite {' '.join(map(str, args))} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def merge(recipe_path: Path, out_dir: Path, threads: int = 1) -> Path:
    """``mergekit-lite run RECIPE OUT --force -q``; returns OUT."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    cli("run", _portable(recipe_path), _portable(out_dir), "--force", "-q", threads=threads)
    return out_dir


def has_command(name: str) -> bool:
    """Whether the installed CLI offers a sub-command (e.g. ``extract``), from ``--help``."""
    try:
        return any(line.split()[:1] == [name] for line in cli("--help").splitlines())
    except CliError:
        return False


T = TypeVar("T")
R = TypeVar("R")


def parallel(fn: Callable[[T], R], items: Iterable[T], workers: int) -> list[R]:
    """``[fn(x) for x in items]`` with ``workers`` child processes of the CLI at a time, order kept."""
    items = list(items)
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
