"""mergekit-lite: task vectors, masks and model merging that stream one tensor at a time."""

from __future__ import annotations

__version__ = "0.1.0"

from .checkpoint import Checkpoint, TensorInfo, open_checkpoint
from .api import Plan, plan, run
from .errors import CheckpointError, CollectionError, MergeKitLiteError, OutputError, RecipeError
from .methods import METHODS, MergeMethod, get_method
from .products import Collection
from .recipe import Recipe
from .statedict import LazyStateDict
from .taskvector import TaskVector

__all__ = [
    "__version__",
    "Checkpoint",
    "CheckpointError",
    "Collection",
    "CollectionError",
    "LazyStateDict",
    "METHODS",
    "MergeKitLiteError",
    "MergeMethod",
    "OutputError",
    "Plan",
    "Recipe",
    "RecipeError",
    "TaskVector",
    "TensorInfo",
    "get_method",
    "open_checkpoint",
    "plan",
    "run",
]
