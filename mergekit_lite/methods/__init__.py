"""Merge methods, each declared once (see ``base.MergeMethod``) and registered by name.

Importing this package registers every method: the task-arithmetic family, the weight-space
methods and our TALL/Consensus methods.
"""

from . import compress, model_stock, ram, sce, selection, spherical, tall, task_arithmetic, weights  # noqa: F401  (registration)
from .base import METHODS, MergeMethod, Param, TensorContext, get_method, register, suggest

__all__ = ["METHODS", "MergeMethod", "Param", "TensorContext", "get_method", "register", "suggest"]
