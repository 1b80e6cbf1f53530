"""The Python entry points: recipe in, output folder out. The CLI is a thin layer over these."""

from __future__ import annotations

import os
from pathlib import Path

from . import products  # noqa: F401  (registers the products with the executor)
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
    recipe: Recipe | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Merge as the recipe says and write the result (a Hugging Face checkpoint or a collection) to ``out_dir``."""
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_yaml(recipe)
    resolve_device(device)
    prepare_output(out_dir, force)
    the_plan = plan(recipe)
    try:
        return execute(the_plan, out_dir, force=force, device=device, progress=progress)
    finally:
        the_plan.close()


__all__ = ["Plan", "execute", "plan", "prepare_output", "run"]
