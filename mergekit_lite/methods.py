"""Merge methods: each declared once, with its parameters and defaults, in a registry by name.

The recipe schema, the CLI help and the model card all read these declarations. A method's
``merge`` turns the task vectors of one tensor into one merged task vector (before ``lambda``);
the engine does the I/O, the dtype handling and ``θ = θ_0 + λ · merged``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from .errors import RecipeError


@dataclass(frozen=True)
class Param:
    """One parameter a method accepts, with its type, default and help text."""

    name: str
    kind: type
    default: Any
    doc: str
    per_model: bool = False  # may be given per model (models[i].parameters); top-level value is then the default
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None

    def check(self, value: Any, where: str) -> Any:
        """Validate and normalise one value; raise RecipeError naming ``where`` otherwise."""
        if isinstance(value, (list, dict)):
            raise RecipeError(
                f"{where}: lists and filtered values (mergekit 'gradients') are not supported yet; give a single value"
            )
        if self.kind is bool:
            if not isinstance(value, bool):
                raise RecipeError(f"{where}: expected true or false, got {value!r}")
            return value
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RecipeError(f"{where}: expected a number, got {value!r}")
            if self.kind is int and not float(value).is_integer():
                raise RecipeError(f"{where}: expected a whole number, got {value!r}")
            if value != value or value in (float("inf"), float("-inf")):
                raise RecipeError(f"{where}: expected a finite number, got {value!r}")
            if self.minimum is not None and value < self.minimum:
                raise RecipeError(f"{where}: must be >= {self.minimum}, got {value!r}")
            if self.maximum is not None and value > self.maximum:
                raise RecipeError(f"{where}: must be <= {self.maximum}, got {value!r}")
            return self.kind(value)
        if self.kind is str:
            if not isinstance(value, str):
                raise RecipeError(f"{where}: expected text, got {value!r}")
            if self.choices and value not in self.choices:
                raise RecipeError(f"{where}: {value!r} is not one of {', '.join(self.choices)}{suggest(value, self.choices)}")
            return value
        return value


@dataclass
class TensorContext:
    """What a method may know about the tensor it merges, beyond the task vectors themselves."""

    name: str
    model_names: list[str]
    params: dict[str, Any]  # the method's global parameters, with defaults filled in
    model_params: list[dict[str, Any]]  # per model, with the global values and defaults filled in
    stats: dict[str, Any] = field(default_factory=dict)  # model-wide statistics from pass 0, if any

    def weights(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor([p["weight"] for p in self.model_params], dtype=dtype, device=device)


MergeFn = Callable[[Iterable[torch.Tensor], TensorContext], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: its name, help text, parameters, and the function that merges one tensor."""

    name: str
    summary: str
    params: tuple[Param, ...]
    merge: MergeFn
    paper: str = ""
    #: working copies of the largest tensor (in the compute dtype) held at once, for K models
    working_copies: Callable[[int], int] = lambda k: 4

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def resolve(
        self, global_params: dict[str, Any], per_model: Sequence[dict[str, Any]], where: str = "parameters"
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Check the recipe's parameters against this declaration and fill in the defaults."""
        names = [p.name for p in self.params]
        resolved: dict[str, Any] = {}
        for key, value in global_params.items():
            param = self.param(key)
            if param is None:
                raise RecipeError(f"{where}.{key}: {self.name} has no parameter {key!r}{suggest(key, names)}")
            resolved[key] = param.check(value, f"{where}.{key}")
        for param in self.params:
            resolved.setdefault(param.name, param.default)
        models: list[dict[str, Any]] = []
        for i, params in enumerate(per_model):
            own: dict[str, Any] = {}
            for key, value in params.items():
                param = self.param(key)
                at = f"models[{i}].parameters.{key}"
                if param is None:
                    raise RecipeError(f"{at}: {self.name} has no parameter {key!r}{suggest(key, names)}")
                if not param.per_model:
                    raise RecipeError(f"{at}: {key!r} applies to the whole merge; move it to the top-level parameters")
                own[key] = param.check(value, at)
            models.append({p.name: own.get(p.name, resolved[p.name]) for p in self.params if p.per_model})
        return resolved, models


def suggest(word: str, options: Iterable[str]) -> str:
    """'; did you mean X?' for the closest option, or ''."""
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise RecipeError(f"merge_method: unknown method {name!r}{suggest(name, METHODS)} (available: {', '.join(sorted(METHODS))})")
    return METHODS[name]


# -- shared parameters ---------------------------------------------------------------------------
WEIGHT = Param("weight", float, 1.0, "Per-model weight w_t multiplying its task vector (negative forgets a task).", per_model=True)
LAMBDA = Param("lambda", float, 1.0, "Scaling coefficient λ of the combined task vector: θ = θ_0 + λ·merged.")
INT8_MASK = Param(
    "int8_mask", bool, False, "Accepted for mergekit compatibility: a memory flag there; masks here are always bool, so it changes nothing."
)
COMMON = (WEIGHT, LAMBDA, INT8_MASK)


# -- task arithmetic ------------------------------------------------------------------------------
def _merge_task_arithmetic(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    """Σ_t w_t τ_t, accumulated one task vector at a time so only one is held at once."""
    total: torch.Tensor | None = None
    for params, delta in zip(ctx.model_params, deltas):
        term = delta.mul_(params["weight"])
        total = term if total is None else total.add_(term)
    assert total is not None, "at least one model is required"
    return total


register(
    MergeMethod(
        name="task_arithmetic",
        summary="θ = θ_0 + λ · Σ_t w_t τ_t (Ilharco et al., 2023).",
        params=COMMON,
        merge=_merge_task_arithmetic,
        paper="https://arxiv.org/abs/2212.04089",
        working_copies=lambda k: 3,
    )
)
