"""The task-arithmetic family as one implementation: a sparsifier × a combiner, as data.

task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs and breadcrumbs_ties differ only in
which entries of each τ_t survive (none | magnitude | random | magnitude_outliers) and whether a
sign election picks the entries that are combined. Under mergekit's names the defaults and
rules are mergekit 0.1.5's; the papers' variants are one key away (``scope``, ``rescale_rule``).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..ops import (
    apply_cut_,
    apply_mask_,
    breadcrumbs_cuts,
    breadcrumbs_mask,
    dare_mask,
    della_keep_probabilities_as,
    della_mask,
    disjoint_sum,
    drop_cut_,
    elected_sign,
    generator_for,
    keep_count,
    l1_norm,
    majority_sign_count,
    TopCut,
    topk_cut,
)
from ..ops.bitpack import pack_bits, unpack_bit_range
from ..ops.combine import weight_sum_divisor
from ..ops.devices import divide_
from ..ops.fused import DareDraws, Keep, LinearForm
from ..ops.sparsify import l1_norms
from ..ops.threads import map_parts, split_evenly, thread_count
from .base import CombineFn, CombineRowsFn, HeldTaskVectors, each_chunk, merged_by_row_chunks, MergeMethod, Param, TaskVectorSource, TensorContext, reduce_passes, register

# -- parameters (names and defaults as mergekit 0.1.5 declares them) -------------------------------
WEIGHT = Param("weight", float, 1.0, "Per-model weight w_t multiplying its task vector (negative forgets a task).", per_model=True)
LAMBDA = Param(
    "lambda", float, 1.0, "Scaling coefficient λ of the combined task vector: θ = θ_0 + λ·merged. {search: [...]} searches a grid with the evaluator.",
    searchable=True, default_grid=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
)
INT8_MASK = Param("int8_mask", bool, False, "Accepted for mergekit configs: a memory flag there; masks here are always bool, so it changes nothing.")
DENSITY = Param("density", float, 1.0, "Fraction of each task vector kept (mergekit's default 1.0 keeps everything).", per_model=True, minimum=0, maximum=1)
GAMMA = Param("gamma", float, 0.01, "Fraction of the largest magnitudes (outliers) removed before the density is kept.", per_model=True, minimum=0, maximum=1)
SEED = Param("seed", int, 0, "Seed; each (seed, model, tensor) has its own generator, so results do not depend on order or device.", per_tensor=False)
MERGE_MODE = Param(
    "merge", str, "auto", "Disjoint merge of the entries that agree with the elected sign: auto (mean when normalize is true, else sum: mergekit), mean, sum, or max (the paper's variant).",
    choices=("auto", "mean", "sum", "max"),
)
RESCALE_RULE = Param(
    "rescale_rule", str, "l1", "How survivors are rescaled when rescale is true: l1 (mergekit: match the task vector's L1 norm) or density (the papers: divide by the keep probability).",
    choices=("l1", "density"),
)
EPSILON = Param(
    "epsilon", float, 0.15, "DELLA: keep probabilities span density ± epsilon by magnitude rank (density ± epsilon must stay inside (0, 1)).",
    per_model=True, minimum=0, maximum=1,
)
TIES_SCOPE = Param(
    "scope", str, "tensor", "Where the trim keeps its top-density entries: tensor (mergekit, exactly ⌊density·n⌋ per tensor) or model (the paper: one threshold per task over the whole model).",
    choices=("tensor", "model"), per_tensor=False,
)
BREADCRUMBS_SCOPE = Param(
    "scope", str, "tensor", "Ranking over the whole tensor (tensor, mergekit) or per row along the last dimension (row, the paper's code).",
    choices=("tensor", "row"),
)


def normalize_param(default: bool) -> Param:
    return Param("normalize", bool, default, "Divide by the sum of the weights that contribute to each entry (mergekit's flag).")


def rescale_param(default: bool) -> Param:
    return Param("rescale", bool, default, "Rescale the survivors of the sparsifier (see rescale_rule).")


# -- sparsifiers: (τ_t, its resolved parameters, context, model index) → what of τ_t is kept ------
@dataclass
class Kept:
    """What a sparsifier keeps of one τ_t, re-appliable to any row chunk of it: a keep mask and a rescale.

    Applying it to the whole τ_t first fixes the L1 rescale factor (it needs the masked norm); row
    chunks then get exactly the operations, and so the numbers, of the whole tensor's rows.
    """

    mask: torch.Tensor | None = None  # bool keep-mask; None keeps every entry
    cut: TopCut | None = None  # in place of a mask: the entries of largest |τ| by a threshold (magnitude trims)
    drop: TopCut | None = None  # in place of a mask too: the entries of largest |τ| taken out (Breadcrumbs' outliers)
    packed: torch.Tensor | None = None  # the keep-mask packed 8 entries per byte (``pack``), in place of ``mask``
    little: bool = False  # ``packed`` least significant bit first (the native kernel's masks), not ``pack_bits``'s order
    shape: tuple[int, ...] = ()
    nothing: bool = False  # no entry kept
    l1_before: float | None = None  # ‖τ‖₁ before masking, for the L1 rescale (factor set on the whole tensor)
    l1_after: float | None = None  # ‖τ ⊙ mask‖₁, when made with l1_before (one pass for both)
    factor: float | None = None  # survivors multiplied by this (L1 rescale)
    divisor: float | torch.Tensor | None = None  # survivors divided by this (density rule; DELLA: per entry)

    def apply(self, delta: torch.Tensor, rows: slice | None = None, in_place: bool = False) -> torch.Tensor:
        """The kept, rescaled entries of ``delta`` (the whole τ_t, or its ``rows``), in place or as a new tensor."""
        if self.nothing:
            return delta.zero_() if in_place else torch.zeros_like(delta)
        if self.cut is not None or self.drop is not None:
            out = delta if in_place else delta.clone()
            if self.cut is not None:
                apply_cut_(out, self.cut, self._first(rows))
            if self.drop is not None:
                drop_cut_(out, self.drop, self._first(rows))
        elif self.mask is not None or self.packed is not None:
            # a product with the bool mask (faster than masked_fill on the CPU); dropped entries become ±0
            keep = self._mask(rows, delta.shape)
            out = apply_mask_(delta if in_place else delta.clone(), keep)
            del keep
        else:
            out = delta if in_place else delta.clone()
        if self.l1_before is not None and self.factor is None:
            assert rows is None, "the L1 factor is fixed on the whole tensor first"
            after = self.l1_after if self.l1_after is not None else l1_norm(out)
            self.l1_before, self.factor = None, l1_factor(self.l1_before, after)
        if self.factor is not None:
            out.mul_(self.factor)
        if isinstance(self.divisor, torch.Tensor):
            out.div_(self.divisor if rows is None else self.divisor[rows])
        elif self.divisor is not None:
            divide_(out, self.divisor)
        return out

    def pack(self) -> "Kept":
        """Keep the mask at one bit per entry (a CPU mask: 1/32 of a float32 copy instead of 1/4)."""
        if self.mask is not None and self.mask.device.type == "cpu":
            self.shape = tuple(self.mask.shape)
            self.packed, self.mask = pack_bits(self.mask), None
        return self

    def _first(self, rows: slice | None) -> int:
        """The flat index of the first entry of ``rows`` (0 for the whole tensor)."""
        return 0 if rows is None else rows.start * math.prod(self.shape[1:])

    def _mask(self, rows: slice | None, shape: torch.Size) -> torch.Tensor:
        if self.packed is None:
            assert self.mask is not None
            return self.mask if rows is None else self.mask[rows]
        if rows is None or not self.shape:
            return unpack_bit_range(self.packed, 0, math.prod(self.shape), self.little).reshape(self.shape)
        per_row = math.prod(self.shape[1:])
        return unpack_bit_range(self.packed, rows.start * per_row, rows.stop * per_row, self.little).reshape(shape)


#: below this L1 norm (before or after masking) the L1 rescale leaves τ unchanged (as ``rescale_to_l1``)
L1_EPS = 1e-7


def l1_factor(before: float, after: float) -> float | None:
    """The L1 rescale's factor ‖τ‖₁ / ‖τ ⊙ keep‖₁ from a whole tensor's two norms; None (τ left as it is) where
    either is below L1_EPS."""
    return before / after if before >= L1_EPS and after >= L1_EPS else None
Sparsifier = Callable[[torch.Tensor, dict[str, Any], TensorContext, int], Kept]


def _rescale(mask: torch.Tensor | None, delta: torch.Tensor, density: float, ctx: TensorContext) -> Kept:
    """The keep-mask with the rescale the parameters ask for (none, L1 norm, or 1/density)."""
    if not ctx.params.get("rescale", False):
        return Kept(mask)
    if ctx.params.get("rescale_rule", "l1") == "density":
        return Kept(mask, divisor=density)
    if mask is None:
        return Kept(mask, l1_before=l1_norm(delta))
    before, after = l1_norms(delta, mask)
    return Kept(mask, l1_before=before, l1_after=after)


def sparsify_magnitude(delta: torch.Tensor, p: dict[str, Any], ctx: TensorContext, t: int) -> Kept:
    """TIES trim: per tensor, exactly max(1, ⌊density·n⌋) largest |τ| (mergekit); model scope: |τ| ≥ the task's
    model-wide threshold. Kept as a threshold cut, re-applied to row chunks without a mask."""
    density = p["density"]
    shape = tuple(delta.shape)
    if ctx.params.get("scope") == "model":
        threshold = float(torch.as_tensor(ctx.model_statistics["thresholds"][t], dtype=delta.dtype))
        if threshold == math.inf:
            return Kept(nothing=True)
        return Kept(cut=TopCut(threshold, delta.numel()), shape=shape)  # every tie kept: |τ| ≥ threshold
    if density >= 1:
        return Kept()
    if density <= 0 or delta.numel() == 0:
        return Kept(nothing=True)
    k = max(1, keep_count(delta.numel(), density))
    if k >= delta.numel():
        return Kept()
    kept = _rescale(None, delta, density, ctx)
    kept.cut, kept.shape = topk_cut(delta, k), shape
    return kept


def sparsify_random(delta: torch.Tensor, p: dict[str, Any], ctx: TensorContext, t: int) -> Kept:
    """DARE: keep each entry with probability density, from a generator per (seed, model, tensor)."""
    density = p["density"]
    if density >= 1:
        return Kept()
    if density <= 0:
        return Kept(nothing=True)
    generator = generator_for(ctx.params["seed"], ctx.model_names[t], ctx.name)
    return _rescale(dare_mask(delta.shape, density, generator).to(delta.device), delta, density, ctx)


def sparsify_outliers(delta: torch.Tensor, p: dict[str, Any], ctx: TensorContext, t: int) -> Kept:
    """Model Breadcrumbs: drop the top-γ magnitudes, keep the next ⌊density·n⌋ (per tensor, or per row)."""
    density = p["density"]
    scope = ctx.params.get("scope", "tensor")
    if density >= 1 and scope == "tensor":
        return Kept()  # mergekit keeps the whole tensor at density 1, outliers included
    if scope == "tensor" and delta.dim() > 0 and delta.numel() > 0:  # kept as cuts, re-applied to row chunks without a mask
        top, outliers = breadcrumbs_cuts(delta, density, p["gamma"])
        if top is False or outliers is True:
            return Kept(nothing=True)
        kept = _rescale(None, delta, density, ctx)
        kept.cut, kept.drop, kept.shape = (None if top is True else top), (None if outliers is False else outliers), tuple(delta.shape)
        return kept
    return _rescale(breadcrumbs_mask(delta, density, p["gamma"], scope), delta, density, ctx)


def sparsify_della(delta: torch.Tensor, p: dict[str, Any], ctx: TensorContext, t: int) -> Kept:
    """DELLA's MagPrune: keep each entry with a probability that grows with its magnitude's rank in its row."""
    density = p["density"]
    if density >= 1:
        return Kept()
    if density <= 0:
        return Kept(nothing=True)
    return _della_kept(delta, p, generator_for(ctx.params["seed"], ctx.model_names[t], ctx.name), ctx)


def _della_kept(x: torch.Tensor, p: dict[str, Any], generator: np.random.Generator, ctx: TensorContext, first: int = 0) -> Kept:
    """DELLA's keep-mask of ``x`` (a whole τ_t, or whole rows of it) with its rescale: L1 (mergekit), or each
    survivor divided by its own keep probability (the paper, ``rescale_rule: density``)."""
    keep = della_mask(x, p["density"], p["epsilon"], generator, first=first)
    if ctx.params.get("rescale", False) and ctx.params.get("rescale_rule", "l1") == "density":
        return Kept(keep, divisor=della_keep_probabilities_as(x, p["density"], p["epsilon"]))
    return _rescale(keep, x, p["density"], ctx)


def no_sparsify(delta: torch.Tensor, p: dict[str, Any], ctx: TensorContext, t: int) -> Kept:
    return Kept()


# -- the same sparsifiers a few rows of τ_t at a time: (τ_t's shape, context) → a rule (rows of τ_t, t, flat
# index of the rows' first entry) → what of those rows is kept (an L1 rescale's ``l1_before`` is the rows'
# share of the norm); None when this tensor's masks cannot be made by rows
RowRule = Callable[[torch.Tensor, int, int], Kept]
RowSparsifier = Callable[[tuple[int, ...], TensorContext], "RowRule | None"]


def _without_draws(density: float) -> Kept | None:
    """What a random sparsifier keeps when it needs no draws: everything at density ≥ 1, nothing at ≤ 0."""
    if density >= 1:
        return Kept()
    if density <= 0:
        return Kept(nothing=True)
    return None


def _drawn_rows(kept_of: Callable[[torch.Tensor, dict[str, Any], np.random.Generator, int], Kept], ctx: TensorContext) -> RowRule:
    """A row rule from ``kept_of(rows, parameters, generator, first)``: the tensor's generator and the flat index of
    the rows' first entry (where their draws start in the tensor's)."""

    def rule(rows: torch.Tensor, t: int, first: int) -> Kept:
        p = ctx.model_params[t]
        trivial = _without_draws(p["density"])
        if trivial is not None:
            return trivial
        return kept_of(rows, p, generator_for(ctx.params["seed"], ctx.model_names[t], ctx.name), first)

    return rule


def random_rows(shape: tuple[int, ...], ctx: TensorContext) -> RowRule | None:
    """DARE by rows: each entry's uniform is the one the whole tensor's draw gives it. The first task's call for
    a row chunk draws every task's mask of it, the tasks split over the CPU threads (one hand-off per chunk; a
    single chunk's draw is too short to split: a thread hand-off costs ~90 µs on this project's VM)."""
    #: per thread (chunks may be worked on by several): (its current chunk's first entry, each task's mask)
    drawn: dict[int, tuple[int, list[torch.Tensor | None]]] = {}

    def masks(rows_shape: torch.Size, first: int) -> list[torch.Tensor | None]:
        def draw(tasks: tuple[int, int]) -> list[torch.Tensor | None]:
            return [task_mask(t, rows_shape, first) for t in range(*tasks)]

        return [mask for part in map_parts(draw, split_evenly(len(ctx.model_params), thread_count())) for mask in part]

    def task_mask(t: int, rows_shape: torch.Size, first: int) -> torch.Tensor | None:
        density = ctx.model_params[t]["density"]
        if not 0 < density < 1:
            return None
        return dare_mask(rows_shape, density, generator_for(ctx.params["seed"], ctx.model_names[t], ctx.name), first, split=False)

    def rule(rows: torch.Tensor, t: int, first: int) -> Kept:
        p = ctx.model_params[t]
        trivial = _without_draws(p["density"])
        if trivial is not None:
            return trivial
        thread = threading.get_ident()
        if thread not in drawn or drawn[thread][0] != first:
            drawn.pop(thread, None)  # the last chunk's masks go before the next ones are drawn
            drawn[thread] = (first, masks(rows.shape, first))
        mask = drawn[thread][1][t]
        assert mask is not None and mask.shape == rows.shape
        return _rescale(mask.to(rows.device), rows, p["density"], ctx)

    return rule


def della_rows(shape: tuple[int, ...], ctx: TensorContext) -> RowRule | None:
    """DELLA by whole rows of a matrix (each row is ranked on its own, so its probabilities and draws are the
    whole tensor's); tensors of other ranks are ranked whole."""
    if len(shape) != 2:
        return None
    return _drawn_rows(lambda rows, p, g, first: _della_kept(rows, p, g, ctx, first), ctx)


# -- combiners --------------------------------------------------------------------------------
def _weights(ctx: TensorContext) -> list[float]:
    return [p.get("weight", 1.0) for p in ctx.model_params]


def combine_sum(sparsified: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    """Σ_t w_t τ̂_t, one task vector held at a time; with normalize, divided by Σ_t w_t (|Σw| < 1e-8: by 1)."""
    weights = _weights(ctx)
    total: torch.Tensor | None = None
    for w, delta in zip(weights, sparsified):
        total = delta.mul_(w) if total is None else total.add_(delta, alpha=w)
        del delta
    assert total is not None, "at least one model is required"
    divisor = weight_sum_divisor(weights, ctx.params.get("normalize", False))
    if divisor is not None:
        divide_(total, divisor)
    return total


def task_arithmetic_form(ctx: TensorContext) -> LinearForm:
    """Task arithmetic (nothing sparsified) as the native kernel's form: ``combine_sum`` then θ_0 + λ·merged."""
    weights = _weights(ctx)
    return LinearForm(tuple(weights), weight_sum_divisor(weights, ctx.params.get("normalize", False)), float(ctx.params.get("lambda", 1.0)))


def dare_linear_form(ctx: TensorContext) -> LinearForm | None:
    """DARE-linear as the native kernel's form: each τ_t's draws and rescale (``sparsify_random``), then task
    arithmetic's sum. None where a model keeps nothing (the torch path's zeros are +0, a dropped entry's ±0)."""
    keeps = []
    rescale = ctx.params.get("rescale", False)
    rule = ctx.params.get("rescale_rule", "l1")
    for t, p in enumerate(ctx.model_params):
        density = p["density"]
        if density <= 0:
            return None
        if density >= 1:  # as ``_without_draws``: no draws, no rescale
            keeps.append(Keep(None))
            continue
        draws = DareDraws.of(generator_for(ctx.params["seed"], ctx.model_names[t], ctx.name), density)
        if not rescale:
            keeps.append(Keep(draws))
        elif rule == "density":
            keeps.append(Keep(draws, "div", density))
        else:
            keeps.append(Keep(draws, "l1", l1_eps=L1_EPS))
    return replace(task_arithmetic_form(ctx), keeps=tuple(keeps))


def stack_deltas(deltas: Iterable[torch.Tensor], count: int) -> torch.Tensor:
    """Gather the task vectors of one tensor into one [T, ...] tensor without holding a second copy."""
    stacked: torch.Tensor | None = None
    for i, delta in enumerate(deltas):
        if stacked is None:
            stacked = torch.empty((count, *delta.shape), dtype=delta.dtype, device=delta.device)
        stacked[i] = delta
        del delta
    assert stacked is not None, "at least one model is required"
    return stacked


def merge_mode(ctx: TensorContext) -> str:
    """mean | sum | max: an explicit ``merge``, else mergekit's ``normalize`` (true: mean, false: sum)."""
    mode = ctx.params.get("merge", "auto")
    if mode != "auto":
        return mode
    return "mean" if ctx.params.get("normalize", True) else "sum"


TrimRows = Callable[[int, int, int, "slice | None"], torch.Tensor]


def fix_what_each_task_keeps(source: TaskVectorSource, sparsify_rows: RowSparsifier | None, sparsify: Sparsifier, ctx: TensorContext) -> TrimRows:
    """Phase 1 of the two-phase members: fix what each task keeps; returns trim(t, start, stop, rows), the kept,
    rescaled rows [start, stop) of τ_t (``rows``: their slice, None for the whole tensor), a new tensor.

    With a row rule (masks that can be made a few rows at a time), only the L1 rescale needs a pass here (each
    task's norm before and after masking, summed over row chunks, its masks kept packed); without one, each
    whole τ_t in turn gives its mask (packed: one bit per entry) and L1 factor. No whole task vector outlives
    its turn, and no sum of them is held: phase 2 works on row chunks only.
    """
    chunks = source.chunks()
    chunked = len(chunks) > 1
    in_place = source.hands_out_new
    rule = sparsify_rows(source.shape, ctx) if sparsify_rows is not None else None
    if rule is None:
        whole: list[Kept] = []
        for t, delta in enumerate(source.whole(reuse=True)):
            task_rule = sparsify(delta, ctx.model_params[t], ctx, t)
            if task_rule.l1_before is not None:
                task_rule.apply(delta, in_place=in_place)  # fixes the L1 factor on the whole τ_t
            whole.append(task_rule.pack() if chunked else task_rule)
            del delta

        def trim_whole(t: int, start: int, stop: int, rows: slice | None) -> torch.Tensor:
            return whole[t].apply(source.rows(t, start, stop), rows, in_place=in_place)

        return trim_whole

    native = _native_dare_keeps(source, sparsify_rows, ctx)
    if native is not None:
        return lambda t, start, stop, rows: native[t].apply(source.rows(t, start, stop), rows, in_place=in_place)
    per_row = math.prod(source.shape[1:]) if source.shape else 1
    kept: dict[tuple[int, int], Kept] = {}  # L1 rescale: (task, chunk start) → the chunk's rule, made in phase 1
    factors: list[float | None] = [None] * source.count
    if ctx.params.get("rescale", False) and ctx.params.get("rescale_rule", "l1") == "l1":
        norms: dict[int, list[tuple[float, float] | None]] = {}  # chunk start → per task (before, after) or None

        def norms_of_chunk(chunk: tuple[int, int]) -> None:  # every task's rows (the base's rows read once per chunk)
            start, stop = chunk
            part: list[tuple[float, float] | None] = []
            for t in range(source.count):
                delta = source.rows(t, start, stop, reuse=True)  # nothing of it is kept past this task
                rows_kept = rule(delta, t, start * per_row)
                pair = None
                if rows_kept.l1_before is not None:
                    pair = (rows_kept.l1_before, rows_kept.l1_after if rows_kept.l1_after is not None else l1_norm(delta, rows_kept.mask))
                    rows_kept.l1_before = rows_kept.l1_after = None
                part.append(pair)
                kept[t, start] = rows_kept.pack() if chunked else rows_kept
                del delta
            norms[start] = part

        # chunks on the threads in turn (each chunk's masks depend on its offset only: the same draws on any thread);
        # the norms added up in chunk order afterwards, as one thread would
        each_chunk(norms_of_chunk, chunks, source.device)
        before, after = [0.0] * source.count, [0.0] * source.count
        for start, _ in chunks:
            for t, pair in enumerate(norms[start]):
                if pair is not None:
                    before[t] += pair[0]
                    after[t] += pair[1]
        factors = [l1_factor(b, a) for b, a in zip(before, after)]

    def trim_by_rule(t: int, start: int, stop: int, rows: slice | None) -> torch.Tensor:
        delta = source.rows(t, start, stop)
        rows_kept = kept.pop((t, start), None) or rule(delta, t, start * per_row)
        rows_kept.l1_before, rows_kept.factor = None, factors[t]
        return rows_kept.apply(delta, in_place=in_place)

    return trim_by_rule


def _native_dare_keeps(source: TaskVectorSource, sparsify_rows: RowSparsifier | None, ctx: TensorContext) -> list[Kept] | None:
    """DARE's phase 1 with the L1 rescale by the native kernel, where it reads the inputs: each task's keep-mask
    (its draws: ``dare_mask``'s) and its norms before and after them in one pass over the stored bytes, on the
    kernel's threads. Each task's Kept: its whole mask packed (the kernel's bit order) and its L1 factor. None where
    the rule is not DARE's, the rescale not the L1 one, a task keeps all or nothing, or the kernel cannot read."""
    if sparsify_rows is not random_rows or not ctx.params.get("rescale", False) or ctx.params.get("rescale_rule", "l1") != "l1":
        return None
    form = dare_linear_form(ctx)
    if form is None or form.keeps is None or any(keep.draws is None for keep in form.keeps):
        return None
    found = source.native_dare_masks(form.keeps)
    if found is None:
        return None
    norms, masks = found
    return [Kept(packed=mask, little=True, shape=tuple(source.shape), factor=l1_factor(before, after))
            for (before, after), mask in zip(norms, masks)]


def elect_rows(source: TaskVectorSource, sparsify_rows: RowSparsifier | None, sparsify: Sparsifier, ctx: TensorContext) -> torch.Tensor | None:
    """TIES election and disjoint merge in two phases, holding masks instead of task vectors.

    Phase 1 fixes each task's keep-mask and rescale (``fix_what_each_task_keeps``). Phase 2, per row chunk:
    each τ_t's kept rows, their weighted sum Σ_t w_t τ̂_t whose sign is elected (a zero sum counts as
    positive, as mergekit, or takes the model-wide majority at model scope), and the disjoint merge of the
    entries agreeing with it. Every entry sees the operations of a whole-tensor merge, so the same bits.
    """
    weights = [float(w) for w in _weights(ctx)]
    fallback = ctx.model_statistics.get("majority", 1.0) if ctx.params.get("scope") == "model" else 1.0
    mode = merge_mode(ctx)
    trim = fix_what_each_task_keeps(source, sparsify_rows, sparsify, ctx)

    def merge_rows(start: int, stop: int, rows: slice | None) -> torch.Tensor:
        trimmed = [trim(t, start, stop, rows) for t in range(source.count)]
        total = trimmed[0] * weights[0]  # as 0 + w·τ̂ (a zero's sign aside, which the election reads as 0)
        for w, kept_rows in zip(weights[1:], trimmed[1:]):
            total.add_(kept_rows, alpha=w)
        sign = elected_sign(total, fallback)  # written over the sum
        return disjoint_sum((trimmed.pop(0) for _ in range(source.count)), sign, weights, mode)

    return merged_by_row_chunks(source, merge_rows)


def sum_rows(source: TaskVectorSource, sparsify_rows: RowSparsifier | None, sparsify: Sparsifier, ctx: TensorContext) -> torch.Tensor | None:
    """A summing member's Σ_t w_t τ̂_t (divided by Σ_t w_t with normalize) in two phases: what each task
    keeps (``fix_what_each_task_keeps``), then each task's rows added up chunk by chunk. The same masks and
    operations per entry as summing whole task vectors: the same bits (a row rule's L1 norms, added up chunk
    by chunk, may differ from the whole tensor's in their last float64 bit)."""
    weights = _weights(ctx)
    divisor = weight_sum_divisor(weights, ctx.params.get("normalize", False))
    trim = fix_what_each_task_keeps(source, sparsify_rows, sparsify, ctx)

    def merge_rows(start: int, stop: int, rows: slice | None) -> torch.Tensor:
        total: torch.Tensor | None = None
        for t in range(source.count):
            trimmed = trim(t, start, stop, rows)
            total = trimmed.mul_(weights[t]) if total is None else total.add_(trimmed, alpha=weights[t])
            del trimmed
        assert total is not None, "at least one model is required"
        return divide_(total, divisor) if divisor is not None else total

    return merged_by_row_chunks(source, merge_rows)


def family_combine(sparsify: Sparsifier, consensus: bool, sparsify_rows: RowSparsifier | None = None) -> tuple[CombineFn, CombineRowsFn | None]:
    """(combine, combine_rows) of one member of the family: sparsify each τ_t, then sum or elect signs.

    Both work in two phases over a TaskVectorSource for large tensors: electing members (``elect_rows``, also
    over held task vectors), summing members (``sum_rows``; held task vectors are summed one at a time, masks
    applied in place). ``sparsify_rows``: the sparsifier a few rows at a time, where its masks allow it.
    """
    if consensus:

        def combine_rows(source: TaskVectorSource, ctx: TensorContext) -> torch.Tensor:
            return elect_rows(source, sparsify_rows, sparsify, ctx)

        def combine_held(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
            return elect_rows(HeldTaskVectors(deltas), sparsify_rows, sparsify, ctx)

        return combine_held, combine_rows

    def sparsified(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> Iterator[torch.Tensor]:
        for t, (delta, p) in enumerate(zip(deltas, ctx.model_params)):
            kept = sparsify(delta, p, ctx, t).apply(delta, in_place=True)
            del delta  # no second reference while the next model is read
            yield kept
            del kept

    def combine(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
        return combine_sum(sparsified(deltas, ctx), ctx)

    def combine_summed_rows(source: TaskVectorSource, ctx: TensorContext) -> torch.Tensor:
        return sum_rows(source, sparsify_rows, sparsify, ctx)

    return combine, combine_summed_rows


# -- model-wide TIES statistics (scope: model) --------------------------------------------------
def ties_model_statistics(source: Any, densities: Sequence[float], weights: Sequence[float]) -> dict[str, Any]:
    """The paper's model-wide TIES quantities, exactly, in bounded memory.

    thresholds[t]: the k-th largest |τ_t| over the whole model, k = ⌊density_t·n⌋ (radix select,
    2 passes for float32, up to 4 for float64); majority: sign of Σ over the model of the elected
    signs γ (one more pass), the sign that entries with a zero sum take. Each pass is a reduction
    over the tensors (``reduce_passes``): a distributed source feeds parts of it to workers and
    merges their partial selectors and counts, with the same result.
    """
    from ..ops.select import KthLargestMagnitude, merge_partial_selectors

    selectors = [KthLargestMagnitude(keep_count(source.total_numel, d), source.compute_dtype) for d in densities]
    while not all(s.done for s in selectors):
        pending = [t for t, s in enumerate(selectors) if not s.done]
        observed = reduce_passes(source, "TIES thresholds", observe_thresholds, merge_partial_selectors, [selectors[t] for t in pending], pending)
        for t, sel in zip(pending, observed):
            sel.end_pass()
            selectors[t] = sel
    thresholds = [s.value for s in selectors]
    count = reduce_passes(source, "TIES majority sign", majority_sign_total, sum, thresholds, list(weights))
    return {"thresholds": thresholds, "majority": 1.0 if count > 0 else -1.0}


def observe_thresholds(source: Any, description: str, selectors: list[Any], tasks: list[int]) -> list[Any]:
    """One radix-select pass: feed selector i every |τ_tasks[i]| of the source's tensors."""
    position = {t: i for i, t in enumerate(tasks)}
    for _, deltas in source.tensors(description, tasks):
        for t, delta in deltas:
            selectors[position[t]].observe(delta)
    return selectors


def majority_sign_total(source: Any, description: str, thresholds: list[float], weights: list[float]) -> int:
    """Σ over the source's tensors of the elected signs of the trimmed, weighted task vectors' sum."""
    count = 0
    for _, deltas in source.tensors(description):
        total: torch.Tensor | None = None
        for t, delta in deltas:
            term = delta.masked_fill_(delta.abs() < thresholds[t], 0).mul_(weights[t])
            total = term if total is None else total.add_(term)
        if total is not None:
            count += int(majority_sign_count(total.unsqueeze(0)))
    return count


def _ties_stats(source: Any, params: dict[str, Any], model_params: list[dict[str, Any]]) -> dict[str, Any]:
    if params.get("scope") != "model":
        return {}
    return ties_model_statistics(source, [p["density"] for p in model_params], [p["weight"] for p in model_params])


def ties_passes(params: dict[str, Any], dtype: torch.dtype) -> int:
    if params.get("scope") != "model":
        return 1
    return 1 + (2 if dtype == torch.float32 else 4) + 1


def _family(sparsify: Sparsifier, consensus: bool, sparsify_rows: RowSparsifier | None = None) -> dict[str, Any]:
    combine, combine_rows = family_combine(sparsify, consensus, sparsify_rows)
    return {"combine": combine, "combine_rows": combine_rows}


# -- the family ----------------------------------------------------------------------------------
COMMON = (WEIGHT, LAMBDA, INT8_MASK)

register(
    MergeMethod(
        name="task_arithmetic",
        summary="θ = θ_0 + λ · Σ_t w_t τ_t (Ilharco et al., 2023).",
        params=(normalize_param(False), *COMMON),
        **_family(no_sparsify, consensus=False),
        linear_form=task_arithmetic_form,
        paper="https://arxiv.org/abs/2212.04089",
        working_copies=lambda n: 0.25,  # row chunks (entrywise), two threads' at once: only the stored output is whole; measured 1.15–1.38 / 0.63 with it at K = 2 / 8
        entrywise=lambda params: True,
    )
)
register(
    MergeMethod(
        name="ties",
        summary="TIES: trim each τ_t to its top-density magnitudes, elect signs by summed mass, disjoint mean (Yadav et al., 2023).",
        params=(DENSITY, TIES_SCOPE, normalize_param(True), rescale_param(False), MERGE_MODE, *COMMON),
        **_family(sparsify_magnitude, consensus=True),
        paper="https://arxiv.org/abs/2306.01708",
        working_copies=lambda n: 3.1,  # election by row chunks; measured 3.41–3.53 / 3.25–4.24 with the stored copy at K = 2 / 8 (heap reuse varies)
        statistics=_ties_stats,
        passes=ties_passes,
    )
)
register(
    MergeMethod(
        name="dare_linear",
        summary="DARE: drop each entry of τ_t with probability 1 − density and rescale, then task arithmetic (Yu et al., 2024).",
        params=(DENSITY, normalize_param(False), rescale_param(True), RESCALE_RULE, SEED, *COMMON),
        **_family(sparsify_random, consensus=False, sparsify_rows=random_rows),
        paper="https://arxiv.org/abs/2311.03099",
        linear_form=dare_linear_form,
        working_copies=lambda n: 0.05 * n + 0.6,  # 2^19-entry row chunks, both phases on both threads; measured 1.07 / 1.53 / 1.47 with the output copies at K = 2 / 4 / 8
    )
)
register(
    MergeMethod(
        name="dare_ties",
        summary="DARE drop-and-rescale, then TIES sign election and disjoint merge (mergekit's dare_ties).",
        params=(DENSITY, normalize_param(False), rescale_param(True), RESCALE_RULE, SEED, MERGE_MODE, *COMMON),
        **_family(sparsify_random, consensus=True, sparsify_rows=random_rows),
        paper="https://arxiv.org/abs/2311.03099",
        working_copies=lambda n: 0.05 * n + 0.8,  # masks by rows, election by 2^19-entry row chunks; measured 1.90 / 1.28 / 1.62 with the output copies at K = 2 / 4 / 8
    )
)
register(
    MergeMethod(
        name="breadcrumbs",
        summary="Model Breadcrumbs: drop the top-γ outliers and keep the next density fraction of τ_t, then sum (Davari & Belilovsky, 2023).",
        params=(DENSITY, GAMMA, BREADCRUMBS_SCOPE, normalize_param(False), rescale_param(False), *COMMON),
        **_family(sparsify_outliers, consensus=False),
        paper="https://arxiv.org/abs/2312.06795",
        working_copies=lambda n: 0.13 * n + 2.9,  # two phases; measured 4.11 / 4.90 with the stored copy at K = 2 / 8
    )
)
register(
    MergeMethod(
        name="breadcrumbs_ties",
        summary="Breadcrumbs masks, then TIES sign election and disjoint merge (mergekit's breadcrumbs_ties).",
        params=(DENSITY, GAMMA, BREADCRUMBS_SCOPE, normalize_param(False), rescale_param(False), MERGE_MODE, *COMMON),
        **_family(sparsify_outliers, consensus=True),
        paper="https://arxiv.org/abs/2312.06795",
        working_copies=lambda n: 3.2,  # election by row chunks; measured 3.81–4.03 / 3.79–4.29 with the stored copy at K = 2 / 8
    )
)
register(
    MergeMethod(
        name="della",
        summary="DELLA: drop entries with magnitude-ranked probabilities (MagPrune), rescale, then TIES sign election and disjoint mean (Deep et al., 2024).",
        params=(DENSITY, EPSILON, normalize_param(True), rescale_param(True), RESCALE_RULE, SEED, MERGE_MODE, *COMMON),
        **_family(sparsify_della, consensus=True, sparsify_rows=della_rows),
        paper="https://arxiv.org/abs/2406.11617",
        working_copies=lambda n: 0.05 * n + 0.6,  # masks by rows, election and output by 2^19-entry row chunks; measured 1.11 / 1.60 / 1.44 with the output copies at K = 2 / 4 / 8
    )
)
register(
    MergeMethod(
        name="della_linear",
        summary="DELLA's MagPrune drop and rescale, then a weighted sum (mergekit's della_linear).",
        params=(DENSITY, EPSILON, normalize_param(False), rescale_param(True), RESCALE_RULE, SEED, *COMMON),
        **_family(sparsify_della, consensus=False, sparsify_rows=della_rows),
        paper="https://arxiv.org/abs/2406.11617",
        working_copies=lambda n: 0.16 * n + 0.8,  # row chunks; measured 2.09 / 3.02 with the stored copy at K = 2 / 8
    )
)
