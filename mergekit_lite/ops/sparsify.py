"""Sparsifiers: which entries of a task vector survive (TIES top-k, DARE, Model Breadcrumbs).

Pure functions on tensors; arithmetic in the input dtype. METHODS.md gives the formulas and the
reference quirks each function follows or departs from.
"""

from __future__ import annotations

import functools
import hashlib
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .checks import _check_fraction
from .devices import divide_
from .draws import UNIFORM_SCALE, tie_key, tie_words
from .fused import abs_sums, available as native_available, bracket_counts
from .threads import generator_at, map_parts, scratch, split_evenly, thread_count

BREADCRUMBS_SCOPES = ("row", "tensor")


def kth_largest_magnitude(x: Tensor, k: int) -> Tensor:
    """The k-th largest |x| over all entries, as a 0-d tensor (1 <= k <= numel).

    A selection (introselect), never a full sort.
    """
    n = x.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, numel] = [1, {n}], got {k!r}")
    return _kth_smallest(x.detach().reshape(-1).abs(), n - k + 1)


def _kth_smallest(values: Tensor, rank: int) -> Tensor:
    """The rank-th smallest (1-based) of a flat tensor that the caller no longer needs, as a 0-d tensor.

    On the CPU numpy's in-place partition: one copy fewer than torch.kthvalue's copy plus int64 indices, and
    measured 6× faster on 16.8M float32 entries; elsewhere (or for dtypes numpy lacks) torch.kthvalue.
    """
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        array = values.contiguous().numpy()
        array.partition(rank - 1)
        return torch.tensor(array[rank - 1], dtype=values.dtype)
    return torch.kthvalue(values, rank).values


def _abs_above(x: Tensor, threshold: Tensor) -> Tensor:
    """|x| > threshold (threshold ≥ 0) without a copy of |x|: two comparisons into bool tensors."""
    return _compare(x, threshold, np.greater, torch.gt).logical_or_(_compare(x, -threshold, np.less, torch.lt))


def _abs_at_least(x: Tensor, threshold: Tensor) -> Tensor:
    """|x| >= threshold (threshold ≥ 0) without a copy of |x|."""
    return _compare(x, threshold, np.greater_equal, torch.ge).logical_or_(_compare(x, -threshold, np.less_equal, torch.le))


def _compare(x: Tensor, value: Tensor, numpy_op: np.ufunc, torch_op: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """A comparison of x with one value into a bool tensor: numpy's on the CPU (3× faster than torch's
    there, measured on 16.8M float32 entries), torch's elsewhere."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(numpy_op(x.detach().numpy(), value.to(x.dtype).cpu().numpy()))
    return torch_op(x, value)


def keep_count(n: int, density: float) -> int:
    """Number of entries to keep out of n: floor(density * n), clamped to [0, n].

    The product is the float product `density * n` floored exactly (as the TIES reference's
    `int(n * K)` and mergekit's `int(density * n)` do), with no epsilon: 0.29 * 100 == 28.999...
    gives 28, the same count the reference tools keep.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    d = _check_fraction("density", density)
    return min(max(math.floor(d * n), 0), n)


def topk_mask(x: Tensor, density: float) -> Tensor:
    """Bool mask of exactly k = keep_count(numel, density) entries of largest |x| (see ``topk_count_mask``)."""
    return topk_count_mask(x, keep_count(x.numel(), density))


def topk_count_mask(x: Tensor, k: int) -> Tensor:
    """Bool mask of exactly k entries of largest |x| (mergekit's TIES trim keeps exactly k).

    Entries tied at the threshold are taken in index order (lowest flat index first), so the
    result is deterministic; k <= 0 keeps nothing. A selection (kthvalue), never a full sort.
    """
    n = x.numel()
    if k <= 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if k >= n:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    return cut_mask(x, topk_cut(x, k))


@dataclass(frozen=True)
class TopCut:
    """The k entries of largest |x| without a mask: every |x| > ``threshold``, and the entries equal to it at
    flat indices below ``ties_before`` (ties are taken lowest index first). Re-appliable to any flat range."""

    threshold: float
    ties_before: int


def topk_cut(x: Tensor, k: int) -> TopCut:
    """The cut keeping exactly k (1 <= k < numel) entries of largest |x|, ties by lowest flat index.

    On the CPU the k-th largest comes from the entries between two quantiles of a sample (``_bracketed``:
    one counting pass split over the threads), else from numpy's partition of all of |x|; elsewhere from
    torch.kthvalue. The tied entries' cut-off index is searched only when some tied entries fall outside
    the k (bfloat16-derived task vectors tie often).
    """
    return topk_cuts(x, [k])[0]


def topk_cuts(x: Tensor, ks: Sequence[int]) -> list[TopCut]:
    """``topk_cut`` of x for each of several k, their brackets counted in one pass over x."""
    flat = x.detach().reshape(-1)
    n = flat.numel()
    if flat.device.type != "cpu" or flat.dtype not in (torch.float32, torch.float64):
        return [_cut_at(flat, torch.kthvalue(flat.abs(), n - k + 1).values, k) for k in ks]
    bracketed = _bracketed(flat, ks) if n >= BRACKET_MIN else [None] * len(ks)
    return [_cut_from(flat, k, found) for k, found in zip(ks, bracketed)]


@dataclass
class _Bracket:
    """What the counting pass found for one k: the magnitudes within the bracket (in flat order, block by block:
    ``pieces``, each with its block's first flat index), and how many magnitudes are above it."""

    pieces: list[tuple[int, np.ndarray]]
    above: int

    def values(self) -> np.ndarray:
        return np.concatenate([piece for _, piece in self.pieces])


def _cut_from(flat: Tensor, k: int, found: _Bracket | None) -> TopCut:
    """The cut of k from the magnitudes that may hold the k-th largest and how many are above them (None: all of |x|)."""
    n = flat.numel()
    if found is None:  # the whole of |x| partitioned (small tensors, or a sample that missed the k-th)
        values = torch.abs(flat, out=scratch("topk_cut", n, flat.dtype)).numpy()
        above = 0
    else:
        values, above = found.values(), found.above
    need = k - above  # how many of ``values`` are among the k
    pos = values.size - need
    values.partition(pos)
    threshold = values[pos]
    if pos == 0 or values[:pos].max() != threshold:  # no tied entry outside the k: all of them are kept
        return TopCut(float(threshold), n)
    missing = need - int(np.count_nonzero(values[pos + 1 :] > threshold))  # ≥ 1: the k-th entry itself ties
    if found is None:
        return TopCut(float(threshold), _index_after_ties(flat, float(threshold), missing))
    return TopCut(float(threshold), _index_after_ties_in(found, flat, threshold, missing))


def _index_after_ties_in(found: _Bracket, flat: Tensor, threshold: np.floating, count: int) -> int:
    """``_index_after_ties`` from the bracket's pieces: every tied magnitude is inside the bracket, so the pieces
    (in flat order) tell which block holds the count-th tie, and only that block of x is searched."""
    for start, piece in found.pieces:
        here = int(np.count_nonzero(piece == threshold))
        if here >= count:
            return start + _index_after_ties(flat[start : start + BRACKET_BLOCK], float(threshold), count)
        count -= here
    raise AssertionError("fewer tied entries than the selection counted")


#: tensors of at least this many entries select their k-th largest magnitude (and ``ops.selection`` its order
#: statistics) between two sample quantiles; one call at 2^18 / 2^19 entries: the 20 % largest magnitudes 2.43 / 3.78
#: ms whole against 1.68 / 2.13 bracketed, three quartiles 4.77 / 8.74 against 2.23 / 2.61 (at 2^17 the whole
#: partition is faster: 1.00 against 1.66 ms)
BRACKET_MIN = 1 << 18
#: entries sampled for the bracket, and the bracket's margin on each side in standard deviations of a quantile
BRACKET_SAMPLE = 1 << 16
BRACKET_SIGMAS = 5.0
#: entries per block of the counting pass (its temporaries stay in the cache)
BRACKET_BLOCK = 1 << 16


@functools.lru_cache(maxsize=8)
def _sample_positions(n: int) -> np.ndarray:
    """BRACKET_SAMPLE fixed-seed positions in [0, n), ascending (read-only): made once per tensor size (0.25 ms each;
    a model has a few sizes, each many times). Ascending, the gather walks the values forward (the sample's order
    does not change its quantiles)."""
    positions = np.sort(torch.randint(n, (BRACKET_SAMPLE,), generator=torch.Generator().manual_seed(0)).numpy())
    positions.flags.writeable = False
    return positions


def sample_brackets(values: np.ndarray, fractions: Sequence[float], magnitudes: bool = False) -> list[tuple[float, float]]:
    """For each fraction q: [lo, hi] around the value with a fraction q of ``values`` below it (of |values| with
    ``magnitudes``), from a fixed-seed sample of BRACKET_SAMPLE entries, BRACKET_SIGMAS standard deviations of the
    sample quantile wide on each side; open (±inf) past the sample's ends. The true value falls inside almost always;
    callers check and fall back."""
    n = values.size
    sample = values[_sample_positions(n)]
    sample = np.abs(sample) if magnitudes else sample.copy()
    ends = []
    for q in fractions:
        margin = int(BRACKET_SIGMAS * math.sqrt(BRACKET_SAMPLE * q * (1 - q))) + 16
        at = q * (BRACKET_SAMPLE - 1)
        ends.append((math.floor(at) - margin, math.ceil(at) + margin))
    # only the sample's values at these ranks are read: partitioned there, each holds what a full sort would put
    # there (a sort of the 2^16 entries took ~1.3 ms per tensor, on the main thread)
    wanted = sorted({min(low, BRACKET_SAMPLE - 1) for low, _ in ends if low > 0} | {max(high, 0) for _, high in ends if high < BRACKET_SAMPLE - 1})
    at = dict(zip(wanted, _order_values(sample, wanted)))
    return [(-math.inf if low <= 0 else float(at[min(low, BRACKET_SAMPLE - 1)]),
             math.inf if high >= BRACKET_SAMPLE - 1 else float(at[max(high, 0)])) for low, high in ends]


#: ``_order_values``: every this-many-th entry of the sample is sorted for its brackets
SAMPLE_SUB_STEP = 16
#: ``_order_values``: half-width of a bracket in standard deviations of the sub-sample's quantile (a bracket that
#: misses costs a partition of the whole sample, no more)
SAMPLE_SUB_SIGMAS = 4.0


def _order_values(sample: np.ndarray, ranks: Sequence[int]) -> list[float]:
    """The values at 0-based ``ranks`` of ``sample`` sorted ascending (``sample``'s order is changed): each among
    the few entries inside a bracket from a sorted sub-sample (every SAMPLE_SUB_STEP-th entry of a random sample
    is one), counted and gathered in one native pass, then sorted. The same values as a partition of all of
    it, which is the fallback (no kernel, NaN, a missed or crowded bracket). 2^16 entries at 7 ranks: 1.3 ms
    partitioned, 0.35 ms this way."""
    n = sample.size
    if not ranks:
        return []
    found = None
    if n >= 16 * SAMPLE_SUB_STEP and sample.dtype in (np.float32, np.float64) and native_available():
        sub = np.sort(sample[::SAMPLE_SUB_STEP])
        m = sub.size
        brackets = []
        for rank in ranks:
            q = rank / (n - 1)
            margin = int(SAMPLE_SUB_SIGMAS * math.sqrt(m * q * (1 - q))) + 2
            low, high = math.floor(q * (m - 1)) - margin, math.ceil(q * (m - 1)) + margin
            brackets.append((-math.inf if low <= 0 else sub[low], math.inf if high >= m - 1 else sub[high]))
        counted = bracket_counts(np.ascontiguousarray(sample), brackets, n)
        if counted is not None and all(below + inside.size + above == n and 0 <= rank - below < inside.size
                                       for rank, (below, above, inside) in zip(ranks, counted)):
            # sorted, not partitioned: numpy's partition slows down ~50× on many equal values (an importance's
            # zeros: 1.3 ms against a sort's 0.08 ms for 16,711 entries), and each bracket holds a few thousand
            found = [np.sort(inside)[rank - below] for rank, (below, _, inside) in zip(ranks, counted)]
    if found is None:
        sample.partition(list(ranks))
        found = [sample[rank] for rank in ranks]
    return found


def _bracketed(flat: Tensor, ks: Sequence[int]) -> list[_Bracket | None]:
    """For each k: the magnitudes within [lo, hi] and how many are above hi, for a bracket [lo, hi] around the k-th
    largest |x| from quantiles of a fixed-seed sample; None when the k-th largest is not inside it (the caller
    then partitions everything). Exact either way: the bracket only narrows what is partitioned. One pass over
    x counts for every k."""
    n = flat.numel()
    values = flat.numpy()
    brackets = sample_brackets(values, [(n - k) / n for k in ks], magnitudes=True)  # the fraction below the k-th largest

    def count(part: tuple[int, int]) -> tuple[list[int], list[list[tuple[int, np.ndarray]]]]:
        magnitudes = scratch("bracket", BRACKET_BLOCK, flat.dtype).numpy()
        inside = scratch("bracket_in", BRACKET_BLOCK, torch.bool).numpy()
        upper = scratch("bracket_up", BRACKET_BLOCK, torch.bool).numpy()
        above = [0] * len(brackets)
        kept: list[list[tuple[int, np.ndarray]]] = [[] for _ in brackets]
        for start in range(part[0], part[1], BRACKET_BLOCK):
            block = values[start : min(start + BRACKET_BLOCK, part[1])]
            size = block.size
            a = np.abs(block, out=magnitudes[:size])
            for i, (lo, hi) in enumerate(brackets):  # np.compress: 1.7× faster than a[mask] at ~2 % kept
                not_above = np.less_equal(a, hi, out=upper[:size])
                above[i] += size - int(np.count_nonzero(not_above))
                np.logical_and(np.greater_equal(a, lo, out=inside[:size]), not_above, out=inside[:size])
                kept[i].append((start, np.compress(inside[:size], a)))
        return above, kept

    counted = map_parts(count, split_evenly(n, thread_count(), BRACKET_BLOCK))
    found: list[_Bracket | None] = []
    for i, k in enumerate(ks):
        bracket = _Bracket([piece for _, part_kept in counted for piece in part_kept[i]], sum(part_above[i] for part_above, _ in counted))
        inside = sum(piece.size for _, piece in bracket.pieces)
        found.append(bracket if 1 <= k - bracket.above <= inside else None)
    return found


def _cut_at(flat: Tensor, threshold: Tensor, k: int) -> TopCut:
    """The cut keeping k entries of a flat tensor given its k-th largest |x| (a selection made elsewhere)."""
    above = int(torch.count_nonzero(_abs_above(flat, threshold)))
    tied = int(torch.count_nonzero(flat.abs() == threshold))
    if tied == k - above:
        return TopCut(float(threshold), flat.numel())
    return TopCut(float(threshold), _index_after_ties(flat, float(threshold), k - above))


def _index_after_ties(flat: Tensor, threshold: float, count: int, chunk: int = 1 << 20) -> int:
    """One past the flat index of the ``count``-th entry with |x| == threshold (count ≥ 1 such entries
    exist), counted chunk by chunk so only the chunks up to it are searched."""
    on_cpu = flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64)
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        if on_cpu:  # numpy's comparisons and index search: 3× faster than torch's abs, eq and nonzero here
            values = part.numpy()
            tied_np = np.equal(values, threshold) | np.equal(values, -threshold)
            here = int(np.count_nonzero(tied_np))
            if here >= count:
                return start + int(np.flatnonzero(tied_np)[count - 1]) + 1
        else:
            tied = part.abs() == threshold
            here = int(torch.count_nonzero(tied))
            if here >= count:
                return start + int(torch.nonzero(tied).reshape(-1)[count - 1]) + 1
        count -= here
    raise AssertionError("fewer tied entries than the selection counted")


def _at_least(threshold: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` below ``threshold``: |x| > it exactly when |x| >= threshold."""
    return float(torch.nextafter(torch.tensor(threshold, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)))


def _cut_split(cut: TopCut, first: int, n: int) -> int:
    """How many of the n entries from flat index ``first`` on keep their ties (a prefix of them)."""
    return min(max(cut.ties_before - first, 0), n)


def apply_cut_(x: Tensor, cut: TopCut, first: int = 0) -> Tensor:
    """x (contiguous; the entries from flat index ``first`` of the cut tensor on) with the entries outside the
    cut zeroed, in place: ``hardshrink`` (|x| > λ kept) with λ just below the threshold where ties are kept."""
    flat = x.view(-1)
    split = _cut_split(cut, first, flat.numel())
    if split:
        torch.hardshrink(flat[:split], _at_least(cut.threshold, x.dtype), out=flat[:split])
    if split < flat.numel():
        torch.hardshrink(flat[split:], cut.threshold, out=flat[split:])
    return x


def cut_mask(x: Tensor, cut: TopCut, first: int = 0) -> Tensor:
    """The bool keep-mask of ``apply_cut_`` (same entries)."""
    flat = x.detach().reshape(-1)
    split = _cut_split(cut, first, flat.numel())
    threshold = torch.tensor(cut.threshold, dtype=x.dtype, device=x.device)
    keep = torch.empty(flat.shape, dtype=torch.bool, device=x.device)
    if split:
        keep[:split] = _abs_at_least(flat[:split], threshold)
    if split < flat.numel():
        keep[split:] = _abs_above(flat[split:], threshold)
    return keep.reshape(x.shape)


def apply_mask_(x: Tensor, keep: Tensor) -> Tensor:
    """x ⊙ keep in place for a bool keep-mask of x's shape (dropped entries become ±0). On the CPU
    numpy's product: 3× faster than torch's product with a bool tensor (measured on 16.8M entries)."""
    if x.device.type == "cpu" and keep.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.shape == keep.shape and x.is_contiguous() and keep.is_contiguous():
        array = x.numpy()
        np.multiply(array, keep.numpy(), out=array)
        return x
    return x.mul_(keep)


#: entries per block of ``l1_norm`` (a block's |x| is its only temporary)
L1_BLOCK = 1 << 20
#: entries per partial sum of ``l1_norm``: torch gives each output of a reduction to one thread, so sums of
#: rows of this length come out the same whatever the thread count
L1_ROW = 1 << 15


def l1_norms(x: Tensor, keep: Tensor) -> tuple[float, float]:
    """(‖x‖₁, ‖x ⊙ keep‖₁) in one pass over x: the two numbers of ``l1_norm(x)`` and ``l1_norm(x, keep)``
    (the same blocks and sums; each block's |x| made once)."""
    flat, kept = x.reshape(-1), keep.reshape(-1)
    native = _native_l1(flat, kept)
    if native is not None:
        return native
    before = after = 0.0
    for start in range(0, flat.numel(), L1_BLOCK):
        block = _magnitudes(flat[start : start + L1_BLOCK])
        before += _block_l1(block)
        after += _block_l1(apply_mask_(block, kept[start : start + L1_BLOCK]))
    return before, after


def _magnitudes(block: Tensor) -> Tensor:
    """|block| in this thread's reused buffer (CPU): a fresh block per call was mapped and faulted in anew."""
    if block.device.type != "cpu":
        return block.abs()
    return torch.abs(block, out=scratch("l1 block", block.numel(), block.dtype))


def _block_l1(block: Tensor) -> float:
    """The sum of a block of magnitudes as ``l1_norm`` adds it: widened to float64, summed by rows of L1_ROW entries,
    the rows' sums added. The same float on any thread count, and within float64's rounding of the native pass's
    norms (``fused.dare_norms``) and of a GPU's: the L1 rescale's float32 factor comes out the same on every path
    (from float32 sums, it was one bit apart in 30 of 60 tensors between the CPU and the GPU)."""
    wide = block.to(torch.float64) if block.device.type != "cpu" else scratch("l1 wide", block.numel(), torch.float64).copy_(block)
    whole = block.numel() - block.numel() % L1_ROW
    total = 0.0
    if whole:
        total += float(wide[:whole].view(-1, L1_ROW).sum(dim=1).sum())
    if whole < block.numel():
        total += float(wide[whole:].sum())
    return total


def _native_l1(flat: Tensor, kept: Tensor | None) -> tuple[float, float] | None:
    """(Σ|x|, Σ|x|·keep) of a flat CPU float32 tensor by the native kernel (float64, in its native DARE pass's
    order: 0.05 ms per 2^20 entries against 0.15 ms for ``_block_l1``'s float64 rows); None where it does not apply."""
    if (flat.device.type != "cpu" or flat.dtype != torch.float32 or not flat.is_contiguous() or not native_available()
            or (kept is not None and (kept.dtype != torch.bool or not kept.is_contiguous() or kept.device.type != "cpu"))):
        return None
    return abs_sums(flat, kept)


def l1_norm(x: Tensor, keep: Tensor | None = None) -> float:
    """‖x‖₁ (with a bool ``keep`` of x's shape: ‖x ⊙ keep‖₁, the same float, without a masked copy of x):
    in float64: by the native kernel (``_native_l1``), else float64 sums of rows of L1_ROW entries, added up
    (``_block_l1``); the two agree to float64's rounding.

    torch's float32 ``vector_norm(x, 1)`` drifts on large tensors and with the thread count (measured on
    32.8M entries: 1.5 % low on 2 threads, 6 % on one); the L1 rescale's factor must not (mergekit's
    ``abs().sum()`` does not either). Per 2^20 entries: 0.05 ms native, 0.15 ms by float64 rows (float32 rows took
    0.05 ms, but the factor from them differed between devices and from the native pass's)."""
    flat = x.reshape(-1)
    kept = None if keep is None else keep.reshape(-1)
    native = _native_l1(flat, kept)
    if native is not None:
        return native[0] if kept is None else native[1]
    total = 0.0
    for start in range(0, flat.numel(), L1_BLOCK):
        block = _magnitudes(flat[start : start + L1_BLOCK])
        if kept is not None:
            apply_mask_(block, kept[start : start + L1_BLOCK])  # |x|·keep = |x·keep|, exactly
        total += _block_l1(block)
    return total


def rescale_l1(original: Tensor, masked: Tensor, eps: float = 1e-7) -> Tensor:
    """``masked`` scaled so its L1 norm equals ``original``'s (mergekit's ``rescale``); unchanged when either norm < eps."""
    return rescale_to_l1(masked, l1_norm(original), eps)


def rescale_to_l1(masked: Tensor, l1_before: float, eps: float = 1e-7) -> Tensor:
    """``masked`` scaled in place so its L1 norm equals ``l1_before`` (the norm before masking); unchanged when either < eps."""
    after = l1_norm(masked)
    if l1_before < eps or after < eps:
        return masked
    return masked.mul_(l1_before / after)


def magnitude_mask(x: Tensor, threshold: float | Tensor) -> Tensor:
    """Bool mask |x| >= threshold, for a threshold computed elsewhere (e.g. model-wide TIES scope).

    The threshold is converted to x's dtype (a threshold selected from values of that dtype is
    exactly representable). threshold = +inf keeps nothing, even entries that are themselves inf.
    """
    thr = torch.as_tensor(threshold, dtype=x.dtype, device=x.device)
    if thr == math.inf:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    return _abs_at_least(x, thr)


#: uniforms (or DARE's 16-bit words) are drawn this many at a time, whatever the tensor's size
DRAW_BLOCK = 1 << 20
#: draws longer than this are split over the threads: a thread hand-off costs ~90 µs on this project's VM, so
#: 2^19 entries (0.5 ms) drawn on two threads took as long as on one; 2^21 entries 2.2× less
SPLIT_DRAWS = 1 << 21


def dare_mask(shape: torch.Size | tuple[int, ...], density: float, generator: np.random.Generator, first: int = 0, split: bool = True) -> Tensor:
    """Bool keep-mask, each entry kept with probability `density` (drop probability p = 1 - density).

    Entry j (flat order, counted from ``first``: where a few rows of a larger tensor start in its draws) is
    kept iff U_j = 2^16·H_j + L_j < ⌈density·2^32⌉: a 32-bit uniform whose high half H_j is the generator's j-th
    16-bit word (each 64-bit output of its stream gives four, its lowest first) and whose low half L_j
    (``tie_words``) is needed only where H_j is the threshold's high half (once in 65,536 entries): half the
    generator's outputs of one 32-bit uniform per entry, the same keep probability, exactly. The mask depends
    only on the generator, not on the device, dtype, thread count or block size. The generator is left after
    the outputs drawn. density 0 and 1 return all-False / all-True without drawing (each generator serves one
    tensor). ``split=False`` draws on this thread only (the caller splits its work over the threads itself).
    """
    d = _check_fraction("density", density)
    _check_generator(generator)
    shape = torch.Size(shape)
    if d == 0.0:
        return torch.zeros(shape, dtype=torch.bool)
    if d == 1.0:
        return torch.ones(shape, dtype=torch.bool)
    mask = torch.empty(shape, dtype=torch.bool)
    ceiling = math.ceil(d * UNIFORM_SCALE)  # U < d·2^32 ⟺ U < ⌈d·2^32⌉ for an integer U
    key = tie_key(generator)
    out = mask.numpy().reshape(-1)
    if not split or out.size <= SPLIT_DRAWS or thread_count() < 2:
        _draw_kept_in_order(generator, ceiling, key, out, first)
    else:

        def draw(part: tuple[int, int]) -> None:
            start, stop = part
            _draw_kept_in_order(generator, ceiling, key, out[start:stop], first + start)

        map_parts(draw, split_evenly(out.size, thread_count(), SPLIT_DRAWS // 4))
    _skip_words(generator, first + mask.numel(), WORDS_PER_OUTPUT)
    return mask


#: DARE's 16-bit words per 64-bit output of the generator (DELLA's 32-bit uniforms: two)
WORDS_PER_OUTPUT = 4


def _draw_kept_in_order(generator: np.random.Generator, ceiling: int, key: int, out: np.ndarray, first: int) -> None:
    """``dare_mask``'s draws on this thread, DRAW_BLOCK entries at a time: out[i] = U_{first+i} < ceiling (the
    generator itself is not moved). 0.86 against 1.39 ns per entry for one 32-bit uniform each (measured, one core)."""
    if ceiling > 0xFFFFFFFF:
        out[:] = True
        return
    high, low = np.uint16(ceiling >> 16), ceiling & 0xFFFF
    words = UniformStream(generator, first, WORDS_PER_OUTPUT)
    for done in range(0, out.size, DRAW_BLOCK):
        count = min(DRAW_BLOCK, out.size - done)
        h = words.take(count)
        np.less(h, high, out=out[done : done + count])  # H < the high half: below, whatever L
        if low:  # H equal to it: below iff L < the low half
            ties = np.flatnonzero(h == high)
            if ties.size:
                out[done + ties] = tie_words(key, first + done + ties) < low


def _skip_words(generator: np.random.Generator, entries: int, per_output: int = 2) -> None:
    """Advance the generator past the 64-bit outputs that ``entries`` words (``per_output`` to an output) take."""
    generator.bit_generator.advance(-(-entries // per_output))


def _draw_below(generator: np.random.Generator, threshold: np.ndarray, out: np.ndarray, first: int = 0) -> None:
    """out[i] = U_{first+i} < threshold[i] (DELLA's per-entry thresholds), U_j the generator's j-th 32-bit uniform
    as an integer (thresholds in units of 2^-32; each 64-bit output gives two, its low half first), counted from
    where the generator is now, which it is left at. 4–5× faster than torch.bernoulli's draws and 2.3× than
    float64 uniforms (measured). Long fills are split over the CPU threads, each part from the generator advanced
    to its first word: the same uniforms."""
    if out.size <= SPLIT_DRAWS or thread_count() < 2:
        _draw_below_in_order(generator, threshold, out, first)
        return

    def draw(part: tuple[int, int]) -> None:
        start, stop = part
        _draw_below_in_order(generator, threshold[start:stop], out[start:stop], first + start)

    map_parts(draw, split_evenly(out.size, thread_count(), SPLIT_DRAWS // 4))


def _draw_below_in_order(generator: np.random.Generator, threshold: np.ndarray, out: np.ndarray, first: int) -> None:
    """``_draw_below`` on this thread, DRAW_BLOCK uniforms at a time (the generator itself is not moved)."""
    uniforms = UniformStream(generator, first)
    for done in range(0, out.size, DRAW_BLOCK):
        count = min(DRAW_BLOCK, out.size - done)
        np.less(uniforms.take(count), threshold[done : done + count], out=out[done : done + count])


class UniformStream:
    """The generator's 32-bit uniforms U_first, U_first+1, … (or, ``per_output=4``, its 16-bit words) handed out in
    consecutive runs, from a copy of the generator advanced to the 64-bit output that holds U_first (each output
    gives two uniforms or four words, its lowest first; the generator itself is not moved)."""

    def __init__(self, generator: np.random.Generator, first: int, per_output: int = 2) -> None:
        self._per = per_output  # 2: 32-bit uniforms; 4: 16-bit words
        self._dtype = np.uint32 if per_output == 2 else np.uint16
        self._bits = generator_at(generator, first // per_output).bit_generator
        skip = first % per_output  # U_first is not the lowest word of its output
        self._left = self._halves(1)[skip:] if skip else None

    def _halves(self, outputs: int) -> np.ndarray:
        uniforms = self._bits.random_raw(outputs).view(self._dtype)
        if _BIG_ENDIAN:  # the lowest word of each output first, as on a little-endian machine
            uniforms = uniforms.reshape(-1, self._per)[:, ::-1].reshape(-1)
        return uniforms

    def take(self, count: int) -> np.ndarray:
        """The next ``count`` uniforms (uint32, or uint16 words)."""
        left = self._left
        if left is not None and left.size >= count:  # the rest of the last output is enough
            self._left = left[count:] if left.size > count else None
            return left[:count]
        need = count - (0 if left is None else left.size)
        fresh = self._halves(-(-need // self._per))
        self._left = fresh[need:] if fresh.size > need else None
        return fresh[:need] if left is None else np.concatenate((left, fresh[:need]))


_BIG_ENDIAN = sys.byteorder == "big"


def _check_generator(generator: object) -> None:
    if not isinstance(generator, np.random.Generator) or not hasattr(generator.bit_generator, "advance"):
        got = type(generator.bit_generator if isinstance(generator, np.random.Generator) else generator).__name__
        raise ValueError(f"generator must be a numpy.random.Generator whose bit generator can jump ahead (PCG64DXSM: see generator_for), got {got}")


def dare(x: Tensor, density: float, generator: np.random.Generator, rescale: bool = True) -> Tensor:
    """DARE: drop entries of x with probability 1 - density, rescale survivors by 1 / density.

    density == 0 (p = 1) drops everything with no division; density == 1 returns a copy of x and
    draws nothing. rescale=False only masks.
    """
    d = _check_fraction("density", density)
    if d == 0.0:
        return torch.zeros_like(x)
    if d == 1.0:
        return x.clone()
    mask = dare_mask(x.shape, d, generator).to(x.device)
    kept = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept / d if rescale else kept


def generator_for(seed: int, model: str, tensor_name: str) -> np.random.Generator:
    """numpy generator (PCG64DXSM) seeded from sha256(f"{seed}\\0{model}\\0{tensor_name}") (first 8
    bytes, 63 bits).

    One stream per (seed, model, tensor), so draws do not depend on processing order, threads
    or device.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    digest = hashlib.sha256(f"{seed}\0{model}\0{tensor_name}".encode("utf-8")).digest()
    value = int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)
    return np.random.Generator(np.random.PCG64DXSM(value))


# ----------------------------------------------------------------------------- Model Breadcrumbs


def _band_mask(mag: Tensor, start: int, stop: int) -> Tensor:
    """Bool mask of the entries ranked [start, stop) along the last dim by magnitude, descending.

    Stable sort: among equal magnitudes the lower index ranks first.
    """
    n = mag.shape[-1]
    order = torch.sort(mag, dim=-1, descending=True, stable=True).indices
    band = torch.zeros(n, dtype=torch.bool, device=mag.device)
    band[start:stop] = True
    out = torch.zeros(mag.shape, dtype=torch.bool, device=mag.device)
    return out.scatter_(-1, order, band.expand(mag.shape))


def breadcrumbs_mask(x: Tensor, density: float, gamma: float, scope: str = "row") -> Tensor:
    """Model Breadcrumbs keep-mask: drop the floor(n*gamma) largest |x|, keep the floor(n*density) next.

    scope "row" (the reference): per row along the last dim, n = row length; if the two counts
    exceed n, keep what remains below the dropped top. scope "tensor" (mergekit): one ranking over
    the flattened tensor; density >= 1 keeps all; if n_top + target > n, n_top is cut to
    n - target, as mergekit does; but where floor(gamma*n) == 0 we keep the floor(n*density)
    largest (mergekit's slice indices[n_bot:-0] zeroes the whole tensor). 0-d tensors are left
    unmasked (all True) in both scopes. Ties rank by lower index first (stable sort).
    """
    d = _check_fraction("density", density)
    g = _check_fraction("gamma", gamma)
    if scope not in BREADCRUMBS_SCOPES:
        raise ValueError(f"scope must be one of {{row, tensor}}, got {scope!r}")
    if x.dim() == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    if x.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if scope == "row":
        n = x.shape[-1]
        n_top = keep_count(n, g)
        target = keep_count(n, d)
        return _band_mask(x.detach().abs(), n_top, min(n_top + target, n))
    if d >= 1.0:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    top, outliers = breadcrumbs_cuts(x, d, g)
    keep = _as_mask(x, top)
    if outliers is not False:
        keep &= ~_as_mask(x, outliers)
    return keep


def _as_mask(x: Tensor, cut: TopCut | bool) -> Tensor:
    return torch.full(x.shape, cut, dtype=torch.bool, device=x.device) if isinstance(cut, bool) else cut_mask(x, cut)


def breadcrumbs_cuts(x: Tensor, density: float, gamma: float) -> tuple[TopCut | bool, TopCut | bool]:
    """Model Breadcrumbs at tensor scope (density < 1) as two cuts: the top (n_top + target) entries, and the
    top n_top outliers taken out of them; True/False in place of a cut: every entry / none.

    The band [n_top, n_top + target) of the stable descending order, from two selections instead of a sort
    (both take ties by lower index first); n_top is cut to n − target as mergekit does.
    """
    n = x.numel()
    target = keep_count(n, density)
    n_top = min(keep_count(n, gamma), n - target)

    ks = [n_top + target, n_top]
    cuts = iter(topk_cuts(x, [k for k in ks if 0 < k < n]))
    top, outliers = (k > 0 if k <= 0 or k >= n else next(cuts) for k in ks)
    return top, outliers


def drop_cut_(x: Tensor, cut: TopCut, first: int = 0) -> Tensor:
    """x (contiguous; from flat index ``first`` of the cut tensor on) with the entries inside the cut zeroed, in
    place: x − hardshrink(x) (x − x = +0 inside, x − 0 = x outside, −0 kept), two passes and no bool mask."""
    flat = x.view(-1)
    split = _cut_split(cut, first, flat.numel())
    if split:
        flat[:split].sub_(torch.hardshrink(flat[:split], _at_least(cut.threshold, x.dtype)))
    if split < flat.numel():
        flat[split:].sub_(torch.hardshrink(flat[split:], cut.threshold))
    return x


def breadcrumbs(x: Tensor, density: float, gamma: float, scope: str = "row") -> Tensor:
    """x with everything outside breadcrumbs_mask zeroed (no rescaling, as the reference)."""
    mask = breadcrumbs_mask(x, density, gamma, scope)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def della_keep_probabilities(x: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's per-entry keep probabilities: within each row (a 1-D tensor is one row), rank |x| from
    smallest (rank 0) to largest (rank n−1) and map linearly onto [density − ε, density + ε].

    Ties rank by position (stable sort). A row of one entry gets density − ε. Requires
    0 < density − ε and density + ε < 1 (ValueError otherwise, as mergekit).
    """
    if not (density - epsilon > 0 and density + epsilon < 1):
        raise ValueError(f"epsilon must keep density ± epsilon inside (0, 1); got density {density}, epsilon {epsilon}")
    if x.dim() > 2:  # ranked along dim 1, as mergekit's argsort of such a tensor ranks it
        moved = x.detach().movedim(1, -1)
        return della_keep_probabilities(moved.reshape(-1, moved.shape[-1]), density, epsilon).reshape(moved.shape).movedim(-1, 1)
    rows = x.detach().reshape(1, -1) if x.dim() < 2 else x.detach()
    out = torch.empty(rows.shape, dtype=torch.float64, device=x.device)
    return _keep_probabilities_into(rows, density, epsilon, out).reshape(x.shape)


_BITS_DTYPES = {torch.float32: np.int32, torch.bfloat16: np.int16, torch.float16: np.int16}
_INFINITY_BITS = {torch.float32: 0x7F800000, torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
DELLA_SPLIT_MIN = 1 << 16  # entries: a block of rows at least twice this is sorted on several threads


def _keep_probabilities_into(rows: Tensor, density: float, epsilon: float, out: Tensor, keys: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """``della_keep_probabilities`` of a 2-D ``rows`` written into ``out`` (float64, rows' shape), times ``scale``
    (a power of two: exact); ``keys`` an optional int64 buffer of rows' size for the CPU sort. Large blocks of rows
    are sorted on the CPU threads (numpy's sorts run on one), the probabilities scattered here (torch's on all)."""
    n = rows.shape[1]
    by_rank = _probabilities_by_rank(n, density, epsilon, scale, rows.device)
    splits = rows.device.type == "cpu" and rows.dtype in _BITS_DTYPES and rows.numel() >= 2 * DELLA_SPLIT_MIN
    parts = split_evenly(rows.shape[0], thread_count() if splits else 1)
    keys = keys.view(rows.shape) if keys is not None else None
    orders = map_parts(lambda part: _stable_magnitude_order(rows[part[0] : part[1]], None if keys is None else keys[part[0] : part[1]]), parts)
    for (start, stop), order in zip(parts, orders):
        out[start:stop].scatter_(1, order, by_rank.expand(stop - start, n))
    return out


def _probabilities_by_rank(n: int, density: float, epsilon: float, scale: float = 1.0, device: torch.device | str = "cpu") -> Tensor:
    """(density − ε) + rank/(n−1)·2ε for each rank 0 … n−1, in float64, times ``scale`` (a power of two: exact)."""
    by_rank = torch.arange(n, dtype=torch.float64, device=device)
    if n > 1:
        divide_(by_rank, n - 1)
    else:
        by_rank.zero_()
    by_rank.mul_(2 * epsilon).add_(density - epsilon)
    if scale != 1.0:
        by_rank.mul_(scale)
    return by_rank


#: entries of the rows one thread ranks at a time: their int64 keys (1 MiB) stay in its core's L2 cache
RANK_BLOCK = 1 << 17
_POSITIONS = np.arange(0, dtype=np.int64)


def _positions(count: int) -> np.ndarray:
    """0 … count − 1 (int64), shared and never written: made once for the largest count asked."""
    global _POSITIONS
    if _POSITIONS.size < count:
        _POSITIONS = np.arange(count, dtype=np.int64)
    return _POSITIONS[:count]


def _draw_ranked_rows(rows: Tensor, density: float, epsilon: float, generator: np.random.Generator, out: np.ndarray, first: int) -> bool:
    """``della_mask`` of a 2-D ``rows`` into ``out`` (bool, rows' entries in order), U from U_first on; False
    where this path does not apply (``out`` then partly written): not a CPU float32/bfloat16/float16 tensor,
    a NaN, or a probability within 2^-32 of 1.

    Each thread takes whole rows and ranks them RANK_BLOCK entries at a time, all in numpy (no torch kernel
    starts a team of threads of its own): int64 keys |bits| · 2^b + position (the position breaks ties),
    sorted by row; each rank's threshold ⌈p_r·2^32⌉ put at its entry (an integer u is below p_r·2^32 iff below
    its ceiling); the draws compared with them. (Against float64 probabilities scattered by torch, DELLA at
    K = 4 on the 250M benchmark model went from 17.9 to 15.8 s.)
    """
    bits_dtype = _BITS_DTYPES.get(rows.dtype)
    if rows.device.type != "cpu" or bits_dtype is None:
        return False
    n = rows.shape[1]
    if n == 0 or rows.shape[0] == 0:
        return True
    ceilings = _probabilities_by_rank(n, density, epsilon, UNIFORM_SCALE).ceil_().numpy()
    if ceilings.max() > 0xFFFFFFFF:
        return False
    step = max(1, RANK_BLOCK // n)
    by_rank = np.tile(ceilings.astype(np.uint32), min(step, rows.shape[0]))  # a block's rows: 1.4× faster than broadcast
    raw = rows.contiguous()
    bits = (raw.view(torch.int16) if raw.dtype == torch.bfloat16 else raw).numpy().view(bits_dtype)
    magnitude = np.iinfo(bits_dtype).max  # clears the sign bit
    infinity = _INFINITY_BITS[rows.dtype]  # a larger magnitude is a NaN, whose payload bits would order it

    def draw(part: tuple[int, int]) -> bool:
        size = min(step, part[1] - part[0]) * n
        index_bits = (size - 1).bit_length()
        keys = scratch("della keys", size, torch.int64).numpy()  # this thread's own
        thresholds = scratch("della thresholds", size, torch.int32).numpy().view(np.uint32)
        uniforms = UniformStream(generator, first + part[0] * n)
        for start in range(part[0], part[1], step):
            stop = min(start + step, part[1])
            count = (stop - start) * n
            block = keys[:count].reshape(stop - start, n)
            np.bitwise_and(bits[start:stop], magnitude, out=block)
            block <<= index_bits
            block |= _positions(count).reshape(stop - start, n)
            block.sort(axis=1)
            if block[:, -1].max() >> index_bits > infinity:  # each row's largest key is last
                return False
            block &= (1 << index_bits) - 1  # each row's positions, its smallest magnitude first
            thresholds[block.reshape(-1)] = by_rank[:count]
            np.less(uniforms.take(count), thresholds[:count], out=out[start * n : stop * n])
        return True

    return all(map_parts(draw, split_evenly(rows.shape[0], thread_count() if rows.numel() >= 2 * DELLA_SPLIT_MIN else 1)))


def _stable_magnitude_order(rows: Tensor, keys_buffer: Tensor | None = None) -> Tensor:
    """Per row of a 2-D tensor, the indices that sort |row| ascending, ties by lower index (a stable argsort).

    On the CPU, for 16- and 32-bit floats without NaN, the magnitudes' bits are sorted as integers (the bits of
    a non-negative float order as it does): 16-bit ones by numpy's stable argsort, a radix sort (5× faster than
    torch's stable argsort, 1.3× than the keys below); 32-bit ones as int64 keys |bits| · 2^b + index (the index
    breaks ties), 2–3× faster than a stable argsort. ``keys_buffer``: int64, rows' size, to sort in.
    """
    n = rows.shape[1]
    bits_dtype = _BITS_DTYPES.get(rows.dtype)
    if rows.device.type != "cpu" or bits_dtype is None or n == 0 or rows.shape[0] == 0:
        return torch.argsort(rows.abs(), dim=1, stable=True)
    raw = rows.contiguous()
    if raw.dtype == torch.bfloat16:
        raw = raw.view(torch.int16)  # numpy has no bfloat16; only the bits are read
    infinity_bits = _INFINITY_BITS[rows.dtype]
    if bits_dtype is np.int16:
        magnitude_bits = raw.numpy().view(np.int16) & np.int16(0x7FFF)
        if magnitude_bits.max() > infinity_bits:  # a NaN: its payload would order it; torch's sort treats NaNs as equal
            return torch.argsort(rows.abs(), dim=1, stable=True)
        return torch.from_numpy(np.argsort(magnitude_bits, axis=1, kind="stable"))
    keys_tensor = torch.empty(rows.shape, dtype=torch.int64) if keys_buffer is None else keys_buffer.view(rows.shape)
    keys = keys_tensor.numpy()
    np.copyto(keys, raw.numpy().view(bits_dtype))
    keys &= np.iinfo(bits_dtype).max  # |x|: the sign bit cleared (the sign-extended high bits too)
    if keys.max() > infinity_bits:
        return torch.argsort(rows.abs(), dim=1, stable=True)
    index_bits = (n - 1).bit_length()
    keys <<= index_bits
    keys |= np.arange(n, dtype=np.int64)
    keys.sort(axis=1)
    keys &= (1 << index_bits) - 1
    return keys_tensor


def della_mask(x: Tensor, density: float, epsilon: float, generator: np.random.Generator, chunk_entries: int = 1 << 20, first: int = 0) -> Tensor:
    """Bool keep-mask drawn with DELLA's magnitude-ranked probabilities: entry i (flat order) kept iff
    U_{first+i} < p_i, U_j the generator's j-th 32-bit uniform (as ``dare_mask``; the generator is left
    after the entries drawn).

    Rows are ranked on their own and one uniform is drawn per entry in order, so the probabilities
    are made a few rows at a time (bounded memory) with the same draws as all at once; each block's
    sort and draws are split over the CPU threads.
    """
    _check_generator(generator)
    mask = torch.empty(x.shape, dtype=torch.bool)
    if x.numel() == 0:
        return mask.to(x.device)
    flat_mask = mask.view(-1).numpy()
    for rows, part in _row_blocks(x, chunk_entries):
        start = _block_offset(x, part)
        if rows.dim() > 2:
            thresholds = della_keep_probabilities(rows.cpu(), density, epsilon).mul_(UNIFORM_SCALE)
        else:
            rows = rows.cpu().reshape(1, -1) if rows.dim() < 2 else rows.cpu()
            if _draw_ranked_rows(rows, density, epsilon, generator, flat_mask[start : start + rows.numel()], first + start):
                continue
            out = scratch("della probabilities", rows.numel(), torch.float64).view(rows.shape)
            thresholds = _keep_probabilities_into(rows, density, epsilon, out, scratch("della keys", rows.numel(), torch.int64), UNIFORM_SCALE)
        _draw_below(generator, thresholds.reshape(-1).numpy(), flat_mask[start : start + rows.numel()], first + start)
    _skip_words(generator, first + x.numel())
    return mask.to(x.device)


def _block_offset(x: Tensor, rows: slice) -> int:
    """Flat index of the first entry of a ``_row_blocks`` block."""
    return 0 if x.dim() != 2 else rows.start * x.shape[1]


def della_keep_probabilities_as(x: Tensor, density: float, epsilon: float, chunk_entries: int = 1 << 20) -> Tensor:
    """``della_keep_probabilities`` in x's dtype, made a few rows at a time (no whole float64 copy)."""
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    for rows, part in _row_blocks(x, chunk_entries):
        block = out.view(1, -1) if x.dim() != 2 else out[part]
        block.copy_(della_keep_probabilities(rows, density, epsilon).reshape(block.shape))
    return out


def _row_blocks(x: Tensor, chunk_entries: int) -> Iterator[tuple[Tensor, slice]]:
    """(rows, their slice) of x seen as [rows, entries ranked together], about ``chunk_entries`` at a time: the
    rows of a matrix; a tensor of another rank is one block (ranked as ``della_keep_probabilities`` ranks it)."""
    if x.dim() != 2:
        yield x.detach(), slice(0, 1)
        return
    flat = x.detach()
    step = max(1, chunk_entries // max(1, flat.shape[1]))
    for start in range(0, flat.shape[0], step):
        part = slice(start, min(start + step, flat.shape[0]))
        yield flat[part], part
