"""Merge methods, each declared once (see ``base.MergeMethod``) and registered by name.

Importing this package registers every method: the task-arithmetic family, the weight-space
methods, our TALL/Consensus methods and the singular-basis merges (TSV-M, Iso-C, Iso-CTS, WUDI).
"""

from . import compress, model_stock, ram, sce, selection, spherical, svd_merge, tall, task_arithmetic, weights  # noqa: F401  (registration)
from .base import METHODS, MergeMethod, Param, TensorContext, get_method, register, suggest

__all__ = ["METHODS", "MergeMethod", "Param", "TensorContext", "get_method", "register", "suggest"]
