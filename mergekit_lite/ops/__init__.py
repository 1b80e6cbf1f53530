"""Pure tensor math: sparsifiers, combiners, TALL/consensus masks, EMR election, truncated SVD, streaming k-th selection, bit packing.

No file I/O and no knowledge of recipes: everything here takes tensors and numbers.
"""

from .combine import (
    SLERP_DOT_THRESHOLD,
    disjoint_merge,
    disjoint_sum,
    elect_and_merge,
    elected_positive,
    elect_sign,
    majority_sign_count,
    slerp,
    task_arithmetic,
    ties_merge,
    weighted_average,
)
from .sparsify import (
    apply_mask_,
    breadcrumbs,
    breadcrumbs_mask,
    dare,
    dare_mask,
    della_keep_probabilities,
    della_keep_probabilities_as,
    della_mask,
    generator_for,
    keep_count,
    kth_largest_magnitude,
    magnitude_mask,
    rescale_l1,
    rescale_to_l1,
    topk_count_mask,
    topk_mask,
)
from .emr import emr_elect, emr_mask, emr_rescaler
from .tall import consensus_mask, tall_mask
from .tsv import LowRank, low_rank_product, rank_budget, truncated_svd

__all__ = [
    "LowRank",
    "SLERP_DOT_THRESHOLD",
    "apply_mask_",
    "breadcrumbs",
    "breadcrumbs_mask",
    "consensus_mask",
    "dare",
    "dare_mask",
    "della_keep_probabilities",
    "della_keep_probabilities_as",
    "della_mask",
    "disjoint_merge",
    "disjoint_sum",
    "elected_positive",
    "elect_and_merge",
    "elect_sign",
    "emr_elect",
    "emr_mask",
    "emr_rescaler",
    "generator_for",
    "keep_count",
    "low_rank_product",
    "kth_largest_magnitude",
    "magnitude_mask",
    "majority_sign_count",
    "rank_budget",
    "slerp",
    "tall_mask",
    "task_arithmetic",
    "ties_merge",
    "rescale_l1",
    "rescale_to_l1",
    "topk_count_mask",
    "topk_mask",
    "truncated_svd",
    "weighted_average",
]
