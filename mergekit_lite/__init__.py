"""mergekit-lite: task vectors, masks and model merging that stream one tensor at a time."""

from __future__ import annotations

__version__ = "0.1.0"

from .checkpoint import Checkpoint, TensorInfo, open_checkpoint
from .api import Plan, plan, run, run_chain
from .chain import Chain, load_recipe
from .errors import CheckpointError, CollectionError, MergeKitLiteError, MergeKitLiteWarning, OutputError, RecipeError
from .methods import METHODS, MergeMethod, get_method
from .products import Collection
from .recipe import Recipe
from .statedict import LazyStateDict
from .taskvector import TaskVector

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
