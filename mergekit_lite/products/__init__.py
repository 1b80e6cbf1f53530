"""Products: what a run writes. Each registers itself with the executor under the output kind it makes.

merged (a Hugging Face checkpoint), collection (a TALL-masks collection); mask statistics are a
report over the same task vectors.
"""

from . import collection, merged  # noqa: F401  (registration)
from .collection import Collection
from .mask_stats import MaskStats, mask_statistics

__all__ = ["Collection", "MaskStats", "mask_statistics"]
