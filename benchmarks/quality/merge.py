"""Merging through the mergekit-lite CLI, exactly as a user would: write a recipe, run the command.

Every merge is ``mergekit-lite run RECIPE OUT --force -q`` in a child process; the benchmark only
reads the ``model.safetensors`` that the command writes. The methods and their fixed parameters are
declared once in ``METHODS`` (8 tasks at once) and ``PAIR_METHODS`` (two tasks at a time), with the
grids of parameters that ``tuning.py`` searches on validation data.
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
    """One row of a results table: a merge method, its fixed parameters and the grid searched on validation."""

    label: str  #: name in the table
    key: str  #: folder and file names
    merge_method: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    #: parameters searched on validation (every combination); λ is searched too when ``scaled``
    grid: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    #: the output is θ_0 + λ·merged: λ is searched on the profile's λ grid
    scaled: bool = True
    #: consensus: per-task tall_lambda taken from the TALL search of this aggregate
    tall_from: str | None = None
    #: base_model of the recipe: "pretrained" (the backbone), "none", or "first" (the first model of a pair,
    #: for the two-model methods whose base is one of the two inputs); a ``with_base`` grid key overrides it
    base: str = "pretrained"
    #: the grid's ``t`` is written as per-model weights 1 - t and t (linear, nuslerp: t = w_2 / (w_1 + w_2))
    t_as_weights: bool = False
    #: why nothing is searched (methods whose parameters are numerical, or per-model weights we keep equal)
    untuned: str = ""


#: every method that merges all 8 tasks at once; grids are coarse on purpose (see README.md, "Choosing parameters")
METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("Task arithmetic", "task_arithmetic", "task_arithmetic"),
    MethodSpec("TIES", "ties", "ties", {"scope": "model", "merge": "mean"}, {"density": (0.1, 0.2, 0.4)}),
    MethodSpec("TIES (mergekit: per tensor)", "ties_tensor", "ties", {}, {"density": (0.1, 0.2, 0.4)}),
    MethodSpec("DARE-TIES", "dare_ties", "dare_ties", {"rescale": True, "rescale_rule": "density", "seed": 0, "merge": "mean"},
               {"density": (0.3, 0.5, 0.7)}),
    MethodSpec("DARE-linear", "dare_linear", "dare_linear", {"rescale_rule": "density", "seed": 0}, {"density": (0.3, 0.5, 0.7)}),
    MethodSpec("Breadcrumbs", "breadcrumbs", "breadcrumbs", {"scope": "row"}, {"density": (0.1, 0.2, 0.4), "gamma": (0.002, 0.01)}),
    MethodSpec("Breadcrumbs-TIES", "breadcrumbs_ties", "breadcrumbs_ties", {"scope": "row", "merge": "mean"},
               {"density": (0.1, 0.2, 0.4), "gamma": (0.002, 0.01)}),
    MethodSpec("DELLA", "della", "della", {"rescale_rule": "density", "seed": 0}, {"density": (0.3, 0.5, 0.7), "epsilon": (0.05, 0.15)}),
    MethodSpec("DELLA-linear", "della_linear", "della_linear", {"rescale_rule": "density", "seed": 0},
               {"density": (0.3, 0.5, 0.7), "epsilon": (0.05, 0.15)}),
    MethodSpec("SCE", "sce", "sce", {}, {"select_topk": (0.1, 0.2, 0.5, 1.0)}, scaled=False),
    MethodSpec("RAM", "ram", "ram", {}, {"epsilon": (1e-5, 1e-3, 3e-3, 6e-3)}, scaled=False),
    MethodSpec("RAM+", "ramplus_tl", "ramplus_tl", {"scope": "model"}, {"epsilon": (1e-3, 3e-3), "r": (0.2, 0.5), "alpha": (0.2, 1.0)},
               scaled=False),
    MethodSpec("TSV-M", "tsv_m", "tsv_m", {}, {"rank_fraction": (0.5, 1.0)}),
    MethodSpec("Iso-C", "iso_c", "iso_c"),
    MethodSpec("Iso-CTS", "iso_cts", "iso_cts", {}, {"common_space_fraction": (0.5, 0.8)}),
    MethodSpec("WUDI", "wudi", "wudi", {"steps": 300}, {"lr": (1e-5, 1e-4)}),
    MethodSpec("Consensus-TA", "consensus_ta", "consensus", {"aggregate": "task_arithmetic"}, {"consensus_k": (1, 2)}, tall_from="task_arithmetic"),
    MethodSpec("Consensus-TIES", "consensus_ties", "consensus", {"aggregate": "ties"}, {"consensus_k": (1, 2)}, tall_from="ties"),
    MethodSpec("Linear (soup of the fine-tunes)", "linear", "linear", scaled=False, base="none",
               untuned="equal weights"),
    MethodSpec("Model Stock", "model_stock", "model_stock", {}, {"filter_wise": (False, True)}, scaled=False),
    MethodSpec("Multi-SLERP", "multislerp", "multislerp", {}, {"with_base": (False, True)}, scaled=False, base="none"),
    MethodSpec("Karcher mean", "karcher", "karcher", scaled=False, base="none",
               untuned="equal weights; max_iter, tol are numerical"),
)

#: methods compared on pairs of tasks (two fine-tunes at a time): the four that take exactly two models,
#: and three 8-task methods beside them so that the numbers compare
PAIR_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("Linear (weights 1 - t, t)", "linear", "linear", {}, {"t": (0.3, 0.5, 0.7)}, scaled=False, base="none", t_as_weights=True),
    MethodSpec("Task arithmetic", "task_arithmetic", "task_arithmetic"),
    MethodSpec("TIES", "ties", "ties", {"scope": "model", "merge": "mean"}, {"density": (0.2, 0.5)}),
    MethodSpec("SLERP", "slerp", "slerp", {}, {"t": (0.3, 0.5, 0.7)}, scaled=False, base="first"),
    MethodSpec("NuSLERP (task vectors)", "nuslerp", "nuslerp", {}, {"t": (0.3, 0.5, 0.7)}, scaled=False, t_as_weights=True),
    MethodSpec("NearSwap", "nearswap", "nearswap", {}, {"t": (0.001, 0.003, 0.01)}, scaled=False, base="first"),
    MethodSpec("Arcee Fusion", "arcee_fusion", "arcee_fusion", scaled=False, base="first", untuned="it has no parameter"),
)

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


def method_recipe(
    spec: MethodSpec,
    base_dir: Path,
    model_dirs: Mapping[str, Path],
    point: Mapping[str, Any],
    lam: float | None,
    per_model: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The recipe of ``spec`` at one grid point (and λ when the method is scaled) over ``model_dirs``.

    Two grid keys are not recipe parameters: ``with_base`` (whether the recipe names the pretrained
    backbone) and, when ``spec.t_as_weights``, ``t``, written as the two models' weights 1 - t and t.
    """
    point = dict(point)
    names = list(model_dirs)
    entries = {name: dict((per_model or {}).get(name, {})) for name in names}
    if spec.t_as_weights and "t" in point:
        t = point.pop("t")
        entries[names[0]]["weight"], entries[names[1]]["weight"] = round(1.0 - t, 12), t
    base = {"pretrained": base_dir, "none": None, "first": model_dirs[names[0]]}[spec.base]
    if "with_base" in point:
        base = base_dir if point.pop("with_base") else None
    params = {**spec.parameters, **point, **({"lambda": lam} if spec.scaled else {})}
    return recipe(spec.merge_method, base, model_dirs, params, entries)


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
