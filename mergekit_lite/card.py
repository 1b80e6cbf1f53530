"""The model card (README.md) written beside a merged checkpoint: front matter for the hub, and the recipe."""

from __future__ import annotations

import yaml

from . import __version__
from .recipe import Recipe


def front_matter(base_model: str | None, tags: list[str]) -> str:
    """The hub's YAML front matter (base_model when there is one, tags, library_name), safely quoted."""
    data = {**({"base_model": base_model} if base_model else {}), "tags": tags, "library_name": "transformers"}
    return "---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True) + "---\n\n"


def model_card(recipe: Recipe, notes: str = "") -> str:
    """A README.md with YAML front matter (base_model, tags, library_name) and the recipe that made the model."""
    params, model_params = recipe.resolved_parameters()
    if recipe.models is not None:
        rows = "\n".join(
            f"| {name} | `{entry.model}` | " + ", ".join(f"{k}={v}" for k, v in own.items()) + " |"
            for name, entry, own in zip(recipe.model_names, recipe.models, model_params)
        )
        table = "| task | model | parameters |\n|---|---|---|\n" + rows
    else:
        rows = "\n".join(
            f"| {i} | `{s.model}` | {s.layer_range[0]}–{s.layer_range[1] - 1} |" for i, sl in enumerate(recipe.slices or []) for s in sl.sources
        )
        table = "| slice | model | layers |\n|---|---|---|\n" + rows
    settings = ", ".join(f"{k}={v}" for k, v in params.items() if recipe.method.param(k) and not recipe.method.param(k).per_model)
    base = recipe.base_model or "none"
    return (
        front_matter(recipe.base_model, ["merge", "mergekit-lite", recipe.merge_method])
        + "# Merged model\n\n"
        + f"Made with mergekit-lite {__version__} using **{recipe.merge_method}**: {recipe.method.summary}\n"
        + (f"Method reference: {recipe.method.paper}\n" if recipe.method.paper else "")
        + f"\nBase model: `{base}`. Method parameters: {settings or 'defaults'}.\n\n"
        + (f"{notes}\n\n" if notes else "")
        + table
        + "\n\n## Recipe\n\n```yaml\n"
        + recipe.to_yaml()
        + "```\n"
    )
