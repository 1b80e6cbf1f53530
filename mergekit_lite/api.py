"""The Python entry points: recipe (or chain of recipes) in, output folder out. The CLI is a thin layer over these."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from . import products  # noqa: F401  (registers the products with the executor)
from .chain import Chain, Step, default_intermediate_dir, load_recipe, output_state, write_stamp
from .errors import MergeKitLiteError, MergeKitLiteWarning, OutputError
from .execute import execute, resolve_device
from .plan import Plan, plan
from .recipe import Recipe
from .writer import AtomicFolder


def prepare_output(out_dir: str | os.PathLike[str], force: bool) -> None:
    """Refuse an unusable OUT_DIR before any work (exists without --force, parent not creatable, not writable).

    A missing parent folder is created when the output is written (as mergekit does), not before.
    """
    AtomicFolder(out_dir, force=force).check()


def run(
    recipe: Recipe | Chain | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    device: str = "cpu",
    progress: bool = True,
    intermediate_dir: str | os.PathLike[str] | None = None,
    executor: Any = "local",
    ray_address: str | None = None,
) -> Path:
    """Merge as the recipe says and write the result (a Hugging Face checkpoint or a collection) to ``out_dir``.

    A chain (a file of several YAML documents, or a ``Chain``) runs its steps in order: see ``run_chain``.
    ``executor``: "local", or "ray" to spread the jobs over a Ray cluster (``ray_address``; without one a
    local Ray instance is started and stopped) with the same output, byte for byte; a ``RayExecutor`` is used as given."""
    if not isinstance(recipe, (Recipe, Chain)):
        recipe = load_recipe(recipe)
    resolve_device(device)
    with executor_for(executor, ray_address) as chosen:
        if isinstance(recipe, Chain):
            return run_chain(recipe, out_dir, intermediate_dir=intermediate_dir, force=force, device=device, progress=progress, executor=chosen)
        prepare_output(out_dir, force)
        the_plan = plan(recipe)
        try:
            return execute(the_plan, out_dir, force=force, device=device, progress=progress, executor=chosen)
        finally:
            the_plan.close()


@contextlib.contextmanager
def executor_for(executor: Any, ray_address: str | None = None) -> Iterator[Any]:
    """The executor object for a name ("local" → None, "ray" → a RayExecutor, stopped afterwards if it started Ray)."""
    if executor is None or not isinstance(executor, str):
        if ray_address is not None:
            raise MergeKitLiteError("ray_address: give it to the RayExecutor you pass, or pass executor='ray'")
        yield executor
        return
    from .ray_executor import make_executor

    made = make_executor(executor, ray_address)
    try:
        yield made
    finally:
        if made is not None:
            made.shutdown()


# -- chains ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepRun:
    """What a chain run does with one step: where its output goes, and whether it is (re)built."""

    step: Step
    folder: Path
    state: str  # output_state(): absent | foreign | changed | incomplete | current
    final: bool

    @property
    def skip(self) -> bool:
        return self.state == "current"

    def reason(self) -> str:
        """Why the step runs or not, for the progress lines and --dry-run."""
        return {
            "current": "same recipe, every file present",
            "absent": "",
            "changed": "its recipe, or an earlier step's, changed since its output was written",
            "incomplete": "a file of its earlier output is missing or has another size",
            "foreign": "replacing a folder that is not a step's output (--force)",
        }[self.state]


def plan_chain(
    chain: Chain,
    out_dir: str | os.PathLike[str],
    *,
    intermediate_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    check: bool = True,
) -> list[StepRun]:
    """Each step in run order with its output folder and what will happen to it; with ``check``, refuse (before
    any work) an output that cannot be written: OUT_DIR holding something else without ``force``, an
    intermediate folder that is not a step's output without ``force``."""
    out = Path(out_dir).absolute()
    inter = Path(intermediate_dir).absolute() if intermediate_dir is not None else default_intermediate_dir(out)
    if inter == out or inter.is_relative_to(out):
        raise OutputError(f"--intermediate-dir {inter}: must not be OUT_DIR or inside it (OUT_DIR is replaced as a whole)")
    runs = []
    for step in chain.steps:
        final = step is chain.final
        folder = out if final else inter / step.name  # type: ignore[operator]  (only the final step may be unnamed)
        state = output_state(folder, chain.digest(step))
        if check and state != "current":
            if state == "foreign" and not force:
                what = "already exists" if final else "exists and is not the output of this step (it has no stamp file)"
                raise OutputError(f"{folder}: {what}; pass --force to replace it (or choose another folder)")
            if final and state in ("changed", "incomplete") and not force:
                raise OutputError(f"{folder}: holds an earlier output of this chain that is out of date ({StepRun(step, folder, state, final).reason()}); "
                                  "pass --force to replace it")
            AtomicFolder(folder, force=state != "absent").check()
        runs.append(StepRun(step, folder, state, final))
    return runs


def run_chain(
    chain: Chain,
    out_dir: str | os.PathLike[str],
    *,
    intermediate_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    device: str = "cpu",
    progress: bool = True,
    report: Callable[[str], None] | None = None,
    executor: Any = None,
) -> Path:
    """Run a chain's steps in order into OUT_DIR (the final merge) and ``intermediate_dir`` (each named step,
    default ``<OUT_DIR>-intermediate``). A step whose output is complete and was made by the same recipe is
    skipped; each output is written atomically with a stamp of its recipe. ``report`` gets one line per step
    (default: stderr when ``progress``)."""
    resolve_device(device)
    runs = plan_chain(chain, out_dir, intermediate_dir=intermediate_dir, force=force)
    say = report if report is not None else (_to_stderr if progress else (lambda _line: None))
    folders = {r.step.name: r.folder for r in runs if r.step.name is not None}
    for number, r in enumerate(runs, 1):
        head = f"step {number}/{len(runs)} {r.step.label}"
        if r.skip:
            say(f"{head}: up to date in {r.folder}, skipped ({r.reason()})")
            continue
        say(f"{head}: running {r.step.recipe.merge_method} into {r.folder}" + (f" ({r.reason()})" if r.reason() else ""))
        recipe = chain.resolved(r.step, folders)
        step_plan = plan(recipe)
        try:
            _write_step(step_plan, r, chain.digest(r.step), device=device, progress=progress, executor=executor)
        finally:
            step_plan.close()
    return runs[-1].folder


def _write_step(step_plan: Plan, r: StepRun, digest: str, *, device: str, progress: bool, executor: Any = None) -> None:
    """Write one step's output and its stamp, all or nothing: the product writes into a folder inside a
    temporary one, its files move up, the stamp goes last, and the whole replaces the step's folder."""
    with AtomicFolder(r.folder, force=r.state != "absent") as tmp:
        inner = tmp / ".mergekit-lite-step" / r.folder.name  # the product's own folder name (its model card uses it)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", MergeKitLiteWarning)
                execute(step_plan, inner, device=device, progress=progress, executor=executor)
        finally:  # what the product says about its output, naming the step's folder rather than the temporary one
            for w in caught:
                if issubclass(w.category, MergeKitLiteWarning):
                    warnings.warn(str(w.message).replace(str(inner), str(r.folder)), MergeKitLiteWarning, stacklevel=4)
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        for entry in list(inner.iterdir()):
            os.rename(entry, tmp / entry.name)
        inner.rmdir()
        inner.parent.rmdir()
        write_stamp(tmp, r.step, digest)


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


__all__ = ["Chain", "Plan", "StepRun", "execute", "executor_for", "plan", "plan_chain", "prepare_output", "run", "run_chain"]
