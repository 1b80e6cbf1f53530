"""mergekit-lite: task vectors, masks and model merging that stream one tensor at a time."""

from __future__ import annotations

__version__ = "0.2.0"

import sys
from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING, Any

#: public name → the module that defines it; imported on first use (PEP 562), so that
#: ``mergekit-lite --version`` or ``--help`` does not pay for torch, pydantic and transformers.
_EXPORTS = {
    "Checkpoint": ".checkpoint",
    "TensorInfo": ".checkpoint",
    "open_checkpoint": ".checkpoint",
    "Plan": ".api",
    "run": ".api",
    "run_chain": ".api",
    "Chain": ".chain",
    "load_recipe": ".chain",
    "MergeKitLiteWarning": ".errors",
    "CheckpointError": ".errors",
    "CollectionError": ".errors",
    "MergeKitLiteError": ".errors",
    "OutputError": ".errors",
    "RecipeError": ".errors",
    "METHODS": ".methods",
    "MergeMethod": ".methods",
    "get_method": ".methods",
    "Collection": ".products",
    "Recipe": ".recipe",
    "LazyStateDict": ".statedict",
    "TaskVector": ".taskvector",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .api import Plan, plan, run, run_chain
    from .chain import Chain, load_recipe
    from .checkpoint import Checkpoint, TensorInfo, open_checkpoint
    from .errors import CheckpointError, CollectionError, MergeKitLiteError, MergeKitLiteWarning, OutputError, RecipeError
    from .methods import METHODS, MergeMethod, get_method
    from .products import Collection
    from .recipe import Recipe
    from .statedict import LazyStateDict
    from .taskvector import TaskVector


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mergekit_lite' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, "plan"])


class _Package(ModuleType):
    """``mergekit_lite.plan`` stays the function even after the submodule of that name is imported
    (the import system binds a submodule to its parent's attribute; eager imports used to rebind it)."""

    @property
    def plan(self) -> Any:
        return import_module(".api", __name__).plan

    @plan.setter
    def plan(self, value: Any) -> None:
        pass  # the submodule mergekit_lite.plan stays reachable as sys.modules["mergekit_lite.plan"]


sys.modules[__name__].__class__ = _Package


__all__ = [
    "__version__",
    "Chain",
    "Checkpoint",
    "CheckpointError",
    "Collection",
    "CollectionError",
    "LazyStateDict",
    "METHODS",
    "MergeKitLiteError",
    "MergeKitLiteWarning",
    "MergeMethod",
    "OutputError",
    "Plan",
    "Recipe",
    "RecipeError",
    "TaskVector",
    "TensorInfo",
    "get_method",
    "load_recipe",
    "open_checkpoint",
    "plan",
    "run",
    "run_chain",
]
