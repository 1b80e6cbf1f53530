"""Tests for mergekit_lite.ops (sparsifiers, combiners, masks) against plain references written from docs METHODS.md.

References here are deliberately naive (Python loops, full sorts) and share no code with the
module under test; hand-computed cases pin every edge rule the spec names.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mergekit_lite.ops import (
    elect_and_merge,
    breadcrumbs,
    breadcrumbs_mask,
    consensus_mask,
    dare,
    dare_mask,
    disjoint_merge,
    elect_sign,
    generator_for,
    keep_count,
    kth_largest_magnitude,
    magnitude_mask,
    majority_sign_count,
    tall_mask,
    task_arithmetic,
    ties_merge,
    topk_mask,
)
from helpers import plain_dare_keep, plain_tie_word

F64 = torch.float64
INF = math.inf
FAST = settings(max_examples=40, deadline=None)


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ----------------------------------------------------------------------------- plain references


def ref_kth_largest(values: list[float], k: int) -> float:
    return sorted((abs(v) for v in values), reverse=True)[k - 1]


def ref_top_k_positions(values: list[float], k: int) -> set[int]:
    """The k positions of largest |v| by a full sort on (-|v|, position): ties go to the lower position."""
    return set(sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))[:k])


def ref_trim(values: list[float], density: float | None, threshold: float | None = None) -> list[float]:
    """Per tensor: exactly k = floor(density * n) entries of largest |v| (mergekit's rule; ties by position).
    With a model-wide threshold: |v| >= threshold (the paper's rule; ties kept)."""
    if threshold is None:
        keep = ref_top_k_positions(values, math.floor(density * len(values)))
        return [v if i in keep else 0.0 for i, v in enumerate(values)]
    return [v if threshold != INF and abs(v) >= threshold else 0.0 for v in values]


def ref_ties(
    deltas: list[list[float]],
    density: float,
    weights: list[float],
    mode: str,
    fallback: float | None = None,
    thresholds: list[float] | None = None,
) -> list[float]:
    """TIES on flat lists, entry by entry, as METHODS.md states it."""
    T, n = len(deltas), len(deltas[0])
    trimmed = [ref_trim(deltas[t], density, None if thresholds is None else thresholds[t]) for t in range(T)]
    v = [[weights[t] * trimmed[t][i] for i in range(n)] for t in range(T)]
    sums = []
    for i in range(n):
        s = 0.0
        for t in range(T):
            s += v[t][i]
        sums.append(s)
    gamma = [(s > 0) - (s < 0) for s in sums]
    if fallback is None:
        majority = sum(gamma)
    else:
        majority = fallback
    fill = 1 if majority > 0 else -1
    gamma = [g if g != 0 else fill for g in gamma]
    out = []
    for i in range(n):
        part = [t for t in range(T) if v[t][i] != 0 and (v[t][i] > 0) == (gamma[i] > 0)]
        if not part:
            out.append(0.0)
        elif mode == "sum":
            out.append(sum(v[t][i] for t in part))
        elif mode == "max":
            best = max(part, key=lambda t: abs(v[t][i]))
            out.append(v[best][i])
        else:
            den = sum(weights[t] for t in part)
            out.append(sum(v[t][i] for t in part) / (den if den != 0 else 1.0))
    return out


def ref_band(values: list[float], start: int, stop: int) -> list[bool]:
    """Entries ranked [start, stop) by |v| descending, ties to the lower index first."""
    order = sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))
    keep = set(order[start:stop])
    return [i in keep for i in range(len(values))]


def ref_breadcrumbs_rows(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = x.shape[-1]
    n_top, target = math.floor(n * gamma), math.floor(n * density)
    rows = [ref_band(row, n_top, min(n_top + target, n)) for row in x.reshape(-1, n).tolist()]
    return torch.tensor(rows, dtype=torch.bool).reshape(x.shape)


def mergekit_outliers_mask(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Small reimplementation of mergekit's sparsify.magnitude_outliers (mask part, quirks included)."""
    if density >= 1:
        return torch.ones(x.shape, dtype=torch.bool)
    n = x.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    ascending = torch.sort(x.abs().reshape(-1), descending=False).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[ascending[n_bot:-n_top]] = True  # n_top == 0 -> [n_bot:-0] -> empty slice
    return mask.reshape(x.shape)


def ties_reference_code(trimmed: torch.Tensor, mode: str) -> torch.Tensor:
    """Reimplementation of the TIES paper's resolve_sign + disjoint_merge (unit weights)."""
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * keep
    if mode == "mean":
        return sel.sum(dim=0) / torch.clamp((sel != 0).sum(dim=0).to(sel.dtype), min=1)
    if mode == "sum":
        return sel.sum(dim=0)
    return sel.abs().max(dim=0)[0] * sign


# dyadic values make every sum exact, so sign elections cannot differ by rounding order
dyadic = st.integers(-12, 12).map(lambda i: i / 4)
mixed = st.one_of(dyadic, st.floats(-10, 10, allow_nan=False, width=64))


# ----------------------------------------------------------------------------- kth / keep_count / topk


@FAST
@given(st.lists(mixed, min_size=1, max_size=30), st.data())
def test_kth_largest_matches_descending_sort(values, data):
    k = data.draw(st.integers(1, len(values)))
    got = kth_largest_magnitude(t64(values), k)
    assert got.dim() == 0
    assert got.item() == ref_kth_largest(values, k)


def test_kth_largest_on_2d_and_0d():
    x = t64([[3.0, -9.0], [0.5, 4.0]])
    assert [kth_largest_magnitude(x, k).item() for k in (1, 2, 3, 4)] == [9.0, 4.0, 3.0, 0.5]
    assert kth_largest_magnitude(t64(-2.5), 1).item() == 2.5


@pytest.mark.parametrize("k", [0, 5, -1])
def test_kth_largest_rejects_k_out_of_range(k):
    with pytest.raises(ValueError, match="k must be"):
        kth_largest_magnitude(t64([1.0, 2.0, 3.0, 4.0]), k)


def test_keep_count_is_floor_of_float_product():
    assert keep_count(100, 0.29) == 28  # 0.29 * 100 == 28.999999999999996 in floats
    assert keep_count(10, 0.3) == 3
    assert keep_count(3, 1 / 3) == 1  # (1/3) * 3 rounds to exactly 1.0
    assert keep_count(7, 0.0) == 0
    assert keep_count(7, 1.0) == 7
    assert keep_count(0, 0.5) == 0


@FAST
@given(st.integers(0, 10_000), st.floats(0, 1))
def test_keep_count_matches_reference_int_product(n, density):
    # the TIES reference's int(n * K) and mergekit's int(density * n)
    assert keep_count(n, density) == int(density * n)
    assert 0 <= keep_count(n, density) <= n


@pytest.mark.parametrize("density", [-0.1, 1.5, float("nan")])
def test_keep_count_rejects_bad_density(density):
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
        keep_count(10, density)


def test_topk_mask_keeps_exactly_k_ties_by_position():
    x = t64([3.0, -2.0, 2.0, 1.0, 2.0, 0.0])
    # density 0.5 -> k = 3; the 3rd largest magnitude is 2, shared by three entries: the two first ones are kept
    assert topk_mask(x, 0.5).tolist() == [True, True, True, False, False, False]


def test_topk_mask_zero_k_keeps_nothing_and_full_density_keeps_all():
    x = t64([[1.0, -5.0], [0.0, 2.0]])
    assert not topk_mask(x, 0.2).any()  # floor(0.8) = 0
    assert not topk_mask(x, 0.0).any()
    assert topk_mask(x, 1.0).all()  # zeros included: threshold is the smallest magnitude
    assert topk_mask(x, 0.5).tolist() == [[False, True], [False, True]]


@FAST
@given(st.lists(mixed, min_size=1, max_size=40), st.floats(0, 1))
def test_topk_mask_matches_full_sort_reference(values, density):
    got = topk_mask(t64(values), density).tolist()
    k = math.floor(density * len(values))
    keep = ref_top_k_positions(values, k)
    assert got == [i in keep for i in range(len(values))]
    assert sum(got) == k


@FAST
@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=40, unique_by=abs), st.floats(0, 1))
def test_topk_mask_keeps_exactly_k_when_magnitudes_distinct(values, density):
    mask = topk_mask(t64(values), density)
    assert int(mask.sum()) == math.floor(density * len(values))


def test_magnitude_mask_threshold_rules():
    x = t64([1.0, -2.0, 3.0, INF, 0.0])
    assert magnitude_mask(x, 2.0).tolist() == [False, True, True, True, False]
    assert magnitude_mask(x, t64(3.0)).tolist() == [False, False, True, True, False]
    assert not magnitude_mask(x, INF).any()  # +inf keeps nothing, not even inf entries
    assert not magnitude_mask(x, t64(INF)).any()
    assert magnitude_mask(x, 0.0).all()


def test_magnitude_mask_equals_topk_with_its_threshold():
    x = randn(7, 9, seed=3)
    thr = kth_largest_magnitude(x, 13)
    assert torch.equal(magnitude_mask(x, thr), topk_mask(x, 13 / 63 + 1e-12))


# ----------------------------------------------------------------------------- sign election


def test_elect_sign_uses_mass_not_vote_count():
    # two small positives outvoted by one large negative: the sum decides
    d = t64([[1.0], [1.0], [-5.0]])
    assert elect_sign(d).tolist() == [-1.0]


def test_elect_sign_zero_sums_take_fallback_or_majority():
    d = t64([[1.0, -1.0, 2.0, 3.0], [-1.0, 1.0, 1.0, 0.0]])  # sums 0, 0, 3, 3
    assert elect_sign(d).tolist() == [1.0, 1.0, 1.0, 1.0]  # majority +1
    assert elect_sign(d, fallback=-1.0).tolist() == [-1.0, -1.0, 1.0, 1.0]
    assert elect_sign(d, fallback=1.0).tolist() == [1.0, 1.0, 1.0, 1.0]


def test_elect_sign_majority_zero_becomes_minus_one():
    d = t64([[2.0, -3.0, 1.0], [0.0, 0.0, -1.0]])  # sums 2, -3, 0 -> gammas +1, -1, 0 -> majority 0
    assert elect_sign(d).tolist() == [1.0, -1.0, -1.0]
    assert elect_sign(d, fallback=0.0).tolist() == [1.0, -1.0, -1.0]
    assert elect_sign(d, fallback=1.0).tolist() == [1.0, -1.0, 1.0]
    # the reference's where(sign > 0, t > 0, t < 0) with sign 0 selects the same (negative) entries
    assert elect_sign(torch.zeros(2, 3, dtype=F64)).tolist() == [-1.0, -1.0, -1.0]


def test_elect_sign_shape_and_dtype():
    d = randn(3, 4, 5, seed=1).float()
    s = elect_sign(d)
    assert s.shape == (4, 5) and s.dtype == torch.float32
    assert set(s.unique().tolist()) <= {-1.0, 1.0}


def test_majority_sign_count_is_exact_int64():
    d = t64([[2.0, -3.0, 1.0, 4.0], [0.0, 0.0, -1.0, 1.0]])  # signs +1, -1, 0, +1
    c = majority_sign_count(d)
    assert c.dtype == torch.int64 and c.dim() == 0 and c.item() == 1
    # model-wide majority: add per-tensor counts, the sign of the total is the fallback
    other = t64([[-1.0, -1.0], [-1.0, -2.0]])
    total = majority_sign_count(d) + majority_sign_count(other)
    assert total.item() == -1


# ----------------------------------------------------------------------------- disjoint merge / TIES


def test_disjoint_merge_hand_case():
    d = t64([[2.0, -1.0, 0.0, 3.0], [4.0, 2.0, -1.0, -3.0], [-1.0, -3.0, 0.0, 0.0]])
    sign = t64([1.0, -1.0, 1.0, -1.0])
    assert disjoint_merge(d, sign, mode="mean").tolist() == [3.0, -2.0, 0.0, -3.0]
    assert disjoint_merge(d, sign, mode="sum").tolist() == [6.0, -4.0, 0.0, -3.0]
    assert disjoint_merge(d, sign, mode="max").tolist() == [4.0, -3.0, 0.0, -3.0]


def test_disjoint_merge_weighted_mean_divides_by_participant_weights():
    d = t64([[1.0, 1.0], [3.0, -2.0]])
    w = t64([2.0, 0.5])
    sign = t64([1.0, 1.0])
    # entry 0: v = 2, 1.5 -> (3.5) / (2.5); entry 1: v = 2, -1 -> only task 0 agrees -> 2 / 2
    assert disjoint_merge(d, sign, w, "mean").tolist() == [3.5 / 2.5, 1.0]
    # a negative weight flips the task's sign before the agreement test
    w2 = t64([1.0, -1.0])
    assert disjoint_merge(d, t64([-1.0, 1.0]), w2, "sum").tolist() == [-3.0, 3.0]


@FAST
@given(st.integers(1, 4), st.integers(1, 12), st.data())
def test_disjoint_mean_unit_weights_is_mean_of_nonzero_agreeing(T, n, data):
    vals = data.draw(st.lists(st.lists(dyadic, min_size=n, max_size=n), min_size=T, max_size=T))
    sign = data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=n, max_size=n))
    got = disjoint_merge(t64(vals), t64(sign), mode="mean").tolist()
    for i in range(n):
        agree = [vals[t][i] for t in range(T) if vals[t][i] != 0 and (vals[t][i] > 0) == (sign[i] > 0)]
        assert got[i] == (sum(agree) / len(agree) if agree else 0.0)


@pytest.mark.parametrize("mode", ["mean", "sum"])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, -1.5, 2.0], [0.1, 0.3, 0.7]])  # the last: the clamped divisor
def test_disjoint_sum_is_the_signed_running_sum_bit_for_bit_zeros_signs_included(mode, weights):
    """disjoint_sum adds the agreeing magnitudes and puts the sign back once: the same bits as adding the agreeing
    signed values from +0 (a plain where-and-add here), the sign of every zero included."""
    from mergekit_lite.ops.combine import disjoint_sum

    torch.manual_seed(7)
    n = 5000
    trimmed = [torch.randn(n) for _ in weights]
    for t, d in enumerate(trimmed):
        d[t::5] = 0.0
        d[t + 1 :: 7] = -0.0
        d[::11] = trimmed[0][::11].abs()  # equal magnitudes across tasks
    positive = torch.rand(n) < 0.5
    merged, divisor = torch.zeros(n), torch.zeros(n)
    for d, w in zip(trimmed, weights):
        v = d * w
        agree = torch.where(positive, v > 0, v < 0)
        merged = merged + torch.where(agree, v, torch.zeros(()))
        divisor = divisor + agree.float() * w
    want = merged / torch.where(divisor == 0, 1.0, divisor) if mode == "mean" else merged
    got = disjoint_sum([d.clone() for d in trimmed], torch.where(positive, 1.0, -1.0), weights, mode)
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
    assert bool((got == 0).any()) and bool(((got == 0) & ~positive).any())  # zeros under a negative sign were made


@pytest.mark.parametrize("fallback", [1.0, 0.0, -1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_elected_sign_is_the_comparison_of_the_sum(fallback, dtype):
    """elected_sign (float passes) equals the plain reading: +1 where the sum is > 0, or ≥ 0 when the fallback is
    positive (−0 and +0 alike), −1 elsewhere; tiny and huge sums included."""
    from mergekit_lite.ops.combine import elected_sign

    torch.manual_seed(3)
    total = torch.randn(4000, dtype=dtype)
    total[::7], total[1::7] = 0.0, -0.0
    total[2::11] = torch.finfo(dtype).tiny / 4  # subnormal
    total[3::11] = -torch.finfo(dtype).max
    positive = total >= 0 if fallback > 0 else total > 0
    got = elected_sign(total.clone(), fallback)
    assert got.dtype == dtype and torch.equal(got, torch.where(positive, 1.0, -1.0).to(dtype))


@pytest.mark.parametrize("mode", ["mean", "sum", "max"])
def test_ties_merge_matches_loop_reference_random(mode):
    T, shape = 4, (5, 6)
    d = randn(T, *shape, seed=11)
    w = t64([1.0, 0.5, 2.0, 1.5])
    got = ties_merge(d, 0.3, w, mode)
    want = ref_ties(d.reshape(T, -1).tolist(), 0.3, w.tolist(), mode)
    torch.testing.assert_close(got.reshape(-1), t64(want), rtol=1e-12, atol=1e-12)


@FAST
@given(
    st.integers(1, 4),
    st.integers(1, 10),
    st.sampled_from(["mean", "sum", "max"]),
    st.floats(0, 1),
    st.sampled_from([None, 1.0, -1.0]),
    st.data(),
)
def test_ties_merge_matches_loop_reference_property(T, n, mode, density, fallback, data):
    vals = data.draw(st.lists(st.lists(dyadic, min_size=n, max_size=n), min_size=T, max_size=T))
    weights = data.draw(st.lists(st.sampled_from([1.0, 0.5, 2.0, -1.0, 0.0]), min_size=T, max_size=T))
    got = ties_merge(t64(vals), density, t64(weights), mode, fallback).tolist()
    assert got == ref_ties(vals, density, weights, mode, fallback)


@FAST
@given(
    st.integers(1, 5),
    st.integers(1, 10),
    st.sampled_from(["mean", "sum", "max"]),
    st.sampled_from([1.0, -1.0, 0.0]),
    st.data(),
)
def test_elect_and_merge_matches_loop_reference_property(T, n, mode, fallback, data):
    """The running-sum election/merge equals the entry-by-entry reference on already-trimmed task vectors."""
    vals = data.draw(st.lists(st.lists(dyadic, min_size=n, max_size=n), min_size=T, max_size=T))
    weights = data.draw(st.lists(st.sampled_from([1.0, 0.5, 2.0, -1.0, 0.0]), min_size=T, max_size=T))
    deltas = [t64(row) for row in vals]
    got = elect_and_merge(deltas, weights, mode, fallback).tolist()
    assert got == ref_ties(vals, 1.0, weights, mode, fallback)
    assert deltas == []  # consumed: each input is released once merged


@FAST
@given(st.integers(1, 4), st.integers(1, 8), st.sampled_from(["mean", "sum", "max"]), st.sampled_from([1.0, -1.0]), st.data())
def test_elect_and_merge_trimming_on_the_fly_matches_threshold_reference(T, n, mode, fallback, data):
    """With trim (model-scope thresholds applied when needed), the inputs stay untouched and the result is TIES's."""
    vals = data.draw(st.lists(st.lists(dyadic, min_size=n, max_size=n), min_size=T, max_size=T))
    thresholds = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, INF]), min_size=T, max_size=T))
    weights = data.draw(st.lists(st.sampled_from([1.0, 0.5, 2.0, -1.0]), min_size=T, max_size=T))
    deltas = [t64(row) for row in vals]
    trim = lambda t, d: d.masked_fill(~magnitude_mask(d, thresholds[t]), 0)  # noqa: E731
    got = elect_and_merge(deltas, weights, mode, fallback, consume=False, trim=trim).tolist()
    assert got == ref_ties(vals, 1.0, weights, mode, fallback, thresholds)
    assert [d.tolist() for d in deltas] == vals


def test_elect_and_merge_refuses_mismatched_weights():
    with pytest.raises(ValueError, match="one entry per task vector"):
        elect_and_merge([torch.ones(3)], [1.0, 2.0])


@pytest.mark.parametrize("mode", ["mean", "sum", "max"])
def test_ties_unit_weights_equals_reference_code(mode):
    d = randn(3, 40, seed=5)
    trimmed = torch.stack([torch.where(topk_mask(d[t], 0.2), d[t], 0.0) for t in range(3)])
    torch.testing.assert_close(ties_merge(d, 0.2, mode=mode), ties_reference_code(trimmed, mode))


def test_ties_model_scope_thresholds():
    d = randn(3, 4, 5, seed=7)
    thr = torch.stack([kth_largest_magnitude(d[t], 6) for t in range(3)])
    per_tensor = ties_merge(d, 6 / 20, mode="sum")
    assert torch.equal(ties_merge(d, 0.5, mode="sum", thresholds=thr), per_tensor)  # density ignored
    # a task whose model-wide threshold is +inf (k = 0) contributes nothing
    thr_inf = thr.clone()
    thr_inf[1] = INF
    want = ref_ties(d.reshape(3, -1).tolist(), 0.5, [1.0] * 3, "mean", 1.0, thr_inf.tolist())
    got = ties_merge(d, 0.5, mode="mean", fallback=1.0, thresholds=thr_inf)
    torch.testing.assert_close(got.reshape(-1), t64(want), rtol=1e-12, atol=1e-12)


@FAST
@given(st.integers(1, 4), st.integers(1, 10), st.booleans(), st.data())
def test_ties_density_one_sum_same_sign_is_task_arithmetic(T, n, negative, data):
    mag = st.floats(0, 50, allow_nan=False)
    vals = data.draw(st.lists(st.lists(mag, min_size=n, max_size=n), min_size=T, max_size=T))
    weights = data.draw(st.lists(st.floats(0.01, 3), min_size=T, max_size=T))
    d = -t64(vals) if negative else t64(vals)
    w = t64(weights)
    torch.testing.assert_close(ties_merge(d, 1.0, w, "sum"), task_arithmetic(d, w), rtol=1e-12, atol=1e-12)


def test_ties_and_disjoint_validate_arguments():
    d = randn(2, 3)
    with pytest.raises(ValueError, match="mode must be one of"):
        ties_merge(d, 0.5, mode="median")
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
        ties_merge(d, 1.2)
    with pytest.raises(ValueError, match="weights must have shape"):
        ties_merge(d, 0.5, weights=t64([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="thresholds must have shape"):
        ties_merge(d, 0.5, thresholds=t64([1.0]))
    with pytest.raises(ValueError, match="sign must have the shape"):
        disjoint_merge(d, t64([1.0, 1.0]))
    with pytest.raises(ValueError, match="deltas must be stacked"):
        elect_sign(t64(1.0))


# ----------------------------------------------------------------------------- DARE


def _uniforms_below(seed: int, shape: tuple[int, ...], density: float) -> torch.Tensor:
    """DARE's documented draw written plainly: a 32-bit uniform per entry of PCG64DXSM(seed), its high half a 16-bit
    word of the stream, kept where below the density."""
    return torch.from_numpy(plain_dare_keep(np.random.Generator(np.random.PCG64DXSM(seed)), int(np.prod(shape)), density)).reshape(shape)


def test_dare_mask_is_one_uniform_per_entry_and_thread_and_block_independent(monkeypatch):
    from mergekit_lite.ops import sparsify as sp

    want = _uniforms_below(1234, (64, 33), 0.3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dare_mask((64, 33), 0.3, np.random.Generator(np.random.PCG64DXSM(1234)))
        torch.set_num_threads(max(2, threads))
        many = dare_mask(torch.Size([64, 33]), 0.3, np.random.Generator(np.random.PCG64DXSM(1234)))
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(sp, "DRAW_BLOCK", 7)  # uneven blocks: the same uniforms
    blocked = dare_mask((64, 33), 0.3, np.random.Generator(np.random.PCG64DXSM(1234)))
    assert one.dtype == torch.bool
    assert torch.equal(one, want) and torch.equal(many, want) and torch.equal(blocked, want)
    assert 0.2 < want.double().mean() < 0.4


def test_dare_rescales_survivors_and_zeroes_the_rest():
    x = randn(50, 20, seed=2)
    mask = dare_mask(x.shape, 0.25, generator_for(0, "m", "w"))
    out = dare(x, 0.25, generator_for(0, "m", "w"))
    assert torch.equal(out[mask], x[mask] / 0.25)
    assert torch.equal(out[~mask], torch.zeros_like(x[~mask]))
    plain = dare(x, 0.25, generator_for(0, "m", "w"), rescale=False)
    assert torch.equal(plain, torch.where(mask, x, 0.0))


def test_dare_density_zero_drops_all_without_nan_and_one_is_identity():
    x = t64([[1.0, -1e300], [3.0, 0.0]])
    out = dare(x, 0.0, generator_for(0, "m", "t"))
    assert torch.equal(out, torch.zeros_like(x)) and not out.isnan().any()
    assert not dare_mask((3, 3), 0.0, generator_for(0, "m", "t")).any()
    same = dare(x, 1.0, generator_for(0, "m", "t"))
    assert torch.equal(same, x) and same is not x
    assert dare_mask((3, 3), 1.0, generator_for(0, "m", "t")).all()


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**40), st.text(max_size=8), st.text(max_size=8), st.text(max_size=8), st.floats(0.05, 0.95))
def test_dare_with_generator_for_is_reproducible_and_order_independent(seed, model, name_a, name_b, density):
    xa, xb = randn(30, seed=1), randn(4, 5, seed=2)
    first_a = dare(xa, density, generator_for(seed, model, name_a))
    first_b = dare(xb, density, generator_for(seed, model, name_b))
    # other order, and the same generator object is not shared: results identical
    second_b = dare(xb, density, generator_for(seed, model, name_b))
    second_a = dare(xa, density, generator_for(seed, model, name_a))
    assert torch.equal(first_a, second_a) and torch.equal(first_b, second_b)


def test_generator_for_seed_is_sha256_formula_and_distinct_per_tensor():
    digest = hashlib.sha256("7\0model-a\0layers.0.weight".encode()).digest()
    expected = int.from_bytes(digest[:8], "big") & (2**63 - 1)
    g = generator_for(7, "model-a", "layers.0.weight")
    assert torch.equal(dare_mask((300,), 0.5, g), _uniforms_below(expected, (300,), 0.5))
    masks = {
        key: dare_mask((256,), 0.5, generator_for(*key))
        for key in [(7, "model-a", "w"), (7, "model-b", "w"), (8, "model-a", "w"), (7, "model-a", "v")]
    }
    values = list(masks.values())
    assert all(not torch.equal(values[i], values[j]) for i in range(4) for j in range(i + 1, 4))


def test_dare_is_unbiased_statistically():
    x = randn(1_000_000, seed=9).float()
    density = 0.3
    mask = dare_mask(x.shape, density, generator_for(1, "m", "big"))
    out = dare(x, density, generator_for(1, "m", "big"))
    assert abs(mask.double().mean().item() - density) < 0.005  # sd ~ 0.0005
    # E[dare(x)] = x  <=>  sum(dare(x) * x) / sum(x^2) ~ 1 (sd ~ 0.0026 here)
    ratio = (out.double() * x.double()).sum() / (x.double() ** 2).sum()
    assert abs(ratio.item() - 1.0) < 0.02
    const = dare(torch.full((1_000_000,), 2.0), density, generator_for(2, "m", "c"))
    assert abs(const.double().mean().item() - 2.0) < 0.02


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dare_same_on_cuda_as_on_cpu():
    x = randn(100, 70, seed=4)
    cpu = dare(x, 0.4, generator_for(3, "m", "t"))
    gpu = dare(x.cuda(), 0.4, generator_for(3, "m", "t"))
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


def test_dare_validates_arguments():
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
        dare(randn(3), -0.5, generator_for(0, "m", "t"))
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
        dare_mask((3,), 2.0, generator_for(0, "m", "t"))
    with pytest.raises(ValueError, match="numpy.random.Generator"):
        dare_mask((3,), 0.5, torch.Generator())
    with pytest.raises(ValueError, match="can jump ahead.*SFC64"):  # parts of a long draw start mid-stream
        dare_mask((3,), 0.5, np.random.Generator(np.random.SFC64(1)))


@pytest.mark.parametrize("first", [0, 1, 2, 5, 64])
def test_dare_mask_of_rows_from_an_offset_is_that_slice_of_the_whole_tensors(first):
    """Rows of a larger tensor (``first``: their first entry's flat index, odd ones start mid-output) draw the
    uniforms the whole tensor's draw gives them."""
    whole = dare_mask((100,), 0.45, generator_for(5, "m", "t"))
    rows = dare_mask((30,), 0.45, generator_for(5, "m", "t"), first)
    assert torch.equal(rows, whole[first : first + 30])
    for count in (1, 2, 3):  # fewer entries than the rest of their first output (the last, short chunk of a tensor)
        assert torch.equal(dare_mask((count,), 0.45, generator_for(5, "m", "t"), first), whole[first : first + count])
    with pytest.raises(ValueError, match="seed must be an integer"):
        generator_for("7", "m", "t")  # type: ignore[arg-type]


@pytest.mark.parametrize("below", [0, 1])
def test_dare_entry_on_the_thresholds_high_half_is_decided_by_its_low_half(monkeypatch, below):
    """Where an entry's 16-bit word is the threshold's high half, its tie word decides (the 32-bit comparison),
    in a whole draw, in uneven blocks and in rows drawn from an offset."""
    from mergekit_lite.ops import sparsify as sp

    seed, n, j = 31, 5000, 4321
    words = [int(w) for w in np.random.Generator(np.random.PCG64DXSM(seed)).bit_generator.random_raw((n + 3) // 4)]
    high = (words[j // 4] >> (16 * (j % 4))) & 0xFFFF
    low = plain_tie_word(np.random.Generator(np.random.PCG64DXSM(seed)), j)
    density = (high * 2**16 + low + below) / 2**32  # entry j kept iff low < low + below
    whole = dare_mask((n,), density, np.random.Generator(np.random.PCG64DXSM(seed)))
    assert bool(whole[j]) == bool(below)
    assert torch.equal(whole, _uniforms_below(seed, (n,), density))
    rows = dare_mask((10,), density, np.random.Generator(np.random.PCG64DXSM(seed)), first=j - 3)
    assert torch.equal(rows, whole[j - 3 : j + 7])
    monkeypatch.setattr(sp, "DRAW_BLOCK", 13)
    assert torch.equal(dare_mask((n,), density, np.random.Generator(np.random.PCG64DXSM(seed))), whole)


# ----------------------------------------------------------------------------- Model Breadcrumbs


def test_breadcrumbs_row_hand_case():
    x = t64([5.0, -4.0, 3.0, 2.0, 1.0, 0.5, 0.1, 0.0, 6.0, -7.0])
    # n = 10: drop floor(2.0) = 2 largest (-7, 6), keep floor(3.0) = 3 next (5, -4, 3)
    assert breadcrumbs(x, 0.3, 0.2).tolist() == [5.0, -4.0, 3.0] + [0.0] * 7


def test_breadcrumbs_ties_rank_lower_index_first():
    x = t64([[1.0, -1.0, 1.0, 1.0], [2.0, 2.0, 2.0, -2.0]])
    # per row: drop 1 (index 0), keep 2 (indices 1, 2)
    want = [[False, True, True, False]] * 2
    assert breadcrumbs_mask(x, 0.5, 0.25).tolist() == want
    # whole tensor, n = 8: the four 2s outrank the 1s; drop 1 (index 4), keep 2 (indices 5, 6)
    assert breadcrumbs_mask(x, 0.25, 0.125, scope="tensor").tolist() == [[False] * 4, want[0]]


def test_breadcrumbs_tie_breaking_on_large_tie_heavy_tensors():
    # an unstable sort orders equal magnitudes arbitrarily at this size; the rule must still hold
    x = torch.randint(-2, 3, (3, 2000), generator=torch.Generator().manual_seed(0)).to(F64)
    assert torch.equal(breadcrumbs_mask(x, 0.3, 0.1), ref_breadcrumbs_rows(x, 0.3, 0.1))
    n = x.numel()
    want = ref_band(x.reshape(-1).tolist(), math.floor(0.1 * n), math.floor(0.1 * n) + math.floor(0.3 * n))
    assert breadcrumbs_mask(x, 0.3, 0.1, scope="tensor").reshape(-1).tolist() == want


def test_breadcrumbs_0d_unmasked_and_1d_is_one_row():
    s = t64(3.5)
    for scope in ("row", "tensor"):
        m = breadcrumbs_mask(s, 0.1, 0.5, scope)
        assert m.shape == () and bool(m)
        assert breadcrumbs(s, 0.0, 1.0, scope).item() == 3.5
    v = randn(40, seed=8)
    assert torch.equal(breadcrumbs_mask(v, 0.3, 0.05), ref_breadcrumbs_rows(v, 0.3, 0.05))
    assert torch.equal(breadcrumbs_mask(v, 0.3, 0.05), breadcrumbs_mask(v, 0.3, 0.05, "tensor"))
    assert int(breadcrumbs_mask(v, 0.3, 0.05).sum()) == 12


def test_breadcrumbs_row_is_per_last_dim_row():
    x = randn(3, 4, 50, seed=6)
    got = breadcrumbs_mask(x, 0.15, 0.04)
    assert torch.equal(got, ref_breadcrumbs_rows(x, 0.15, 0.04))
    assert got.sum(dim=-1).eq(7).all()  # floor(50 * 0.15) = 7 per row


def test_breadcrumbs_row_counts_exceeding_n_keep_what_remains():
    x = t64([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    # floor(10 * 0.5) = 5 dropped (10..6), floor(10 * 0.7) = 7 wanted, only 5 remain
    assert breadcrumbs_mask(x, 0.7, 0.5).tolist() == [True] * 5 + [False] * 5
    assert breadcrumbs_mask(x, 1.0, 0.0).all()
    assert breadcrumbs_mask(x, 1.0, 0.2).tolist() == [True] * 8 + [False] * 2


def test_breadcrumbs_tensor_scope_gamma_floor_zero_does_not_zero_tensor():
    x = randn(10, seed=12)
    # floor(10 * 0.05) = 0: mergekit's indices[n_bot:-0] keeps nothing
    assert not mergekit_outliers_mask(x, 0.3, 0.05).any()
    ours = breadcrumbs_mask(x, 0.3, 0.05, scope="tensor")
    assert ours.tolist() == ref_band(x.tolist(), 0, 3)
    assert int(ours.sum()) == 3


def test_breadcrumbs_tensor_scope_reduces_n_top_like_mergekit():
    x = t64([[1.0, 2.0, 3.0, 4.0, 5.0], [6.0, 7.0, 8.0, 9.0, 10.0]])
    # n = 10, target 7, n_top 5 -> n_top cut to 3: keep the 7 smallest
    ours = breadcrumbs_mask(x, 0.7, 0.5, scope="tensor")
    assert ours.reshape(-1).tolist() == [True] * 7 + [False] * 3
    assert torch.equal(ours, mergekit_outliers_mask(x, 0.7, 0.5))
    assert breadcrumbs_mask(x, 1.0, 0.5, scope="tensor").all()  # density >= 1: unchanged


@FAST
@given(st.integers(1, 6), st.integers(1, 30), st.floats(0, 0.99), st.floats(0.01, 0.5), st.integers(0, 10**6))
def test_breadcrumbs_tensor_scope_matches_mergekit_when_top_nonzero(rows, cols, density, gamma, seed):
    x = randn(rows, cols, seed=seed)  # continuous values: magnitudes distinct, sort order unambiguous
    assume(math.floor(gamma * x.numel()) > 0)  # the n_top == 0 case has its own test above
    assert torch.equal(breadcrumbs_mask(x, density, gamma, "tensor"), mergekit_outliers_mask(x, density, gamma))


@FAST
@given(st.integers(1, 4), st.integers(1, 25), st.floats(0, 1), st.floats(0, 1), st.data())
def test_breadcrumbs_row_keeps_exactly_floor_n_density(rows, n, density, gamma, data):
    vals = data.draw(st.lists(st.lists(mixed, min_size=n, max_size=n), min_size=rows, max_size=rows))
    x = t64(vals)
    mask = breadcrumbs_mask(x, density, gamma)
    assert torch.equal(mask, ref_breadcrumbs_rows(x, density, gamma))
    n_top, target = math.floor(n * gamma), math.floor(n * density)
    per_row = mask.sum(dim=-1).tolist()
    if n_top + target <= n:
        assert per_row == [target] * rows
    else:
        assert per_row == [n - n_top] * rows


def test_breadcrumbs_validates_arguments():
    x = randn(4, 4)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        breadcrumbs_mask(x, 0.5, 1.5)
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
        breadcrumbs(x, -0.1, 0.1)
    with pytest.raises(ValueError, match="scope must be one of"):
        breadcrumbs_mask(x, 0.5, 0.1, scope="column")


# ----------------------------------------------------------------------------- TALL-masks, Consensus, TA


def test_tall_mask_hand_case_is_strict():
    tau_t = t64([0.0, 1.0, -2.0, 0.5, 1.0])
    tau_mtl = t64([0.0, 1.0, 1.0, 3.0, 3.0])
    # |tau_t| = 0, 1, 2, .5, 1 ; lam * |mtl - t| = 0, 0, 1.5, 1.25, 1.0
    assert tall_mask(tau_t, tau_mtl, 0.5).tolist() == [False, True, True, False, False]
    assert tall_mask(tau_t, tau_mtl, 0.0).tolist() == [False, True, True, True, True]


@FAST
@given(st.integers(1, 20), st.floats(0, 2), st.data())
def test_tall_mask_never_includes_zeros_and_matches_loop(n, lam, data):
    a = data.draw(st.lists(st.one_of(st.just(0.0), mixed), min_size=n, max_size=n))
    m = data.draw(st.lists(st.one_of(st.just(0.0), mixed), min_size=n, max_size=n))
    got = tall_mask(t64(a), t64(m), lam).tolist()
    assert got == [abs(ai) > lam * abs(mi - ai) for ai, mi in zip(a, m)]
    assert not any(g for g, ai in zip(got, a) if ai == 0)


def test_tall_mask_validates():
    with pytest.raises(ValueError, match="lam must be"):
        tall_mask(randn(3), randn(3), -0.1)
    with pytest.raises(ValueError, match="same shape"):
        tall_mask(randn(3), randn(4), 0.3)


def test_consensus_mask_counts():
    masks = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)  # counts 3,1,1,0
    assert consensus_mask(masks, 2).tolist() == [True, False, False, False]
    assert consensus_mask(masks, 1).tolist() == [True, True, True, False]
    assert consensus_mask(masks, 0).all()
    assert not consensus_mask(masks, 4).any()
    with pytest.raises(ValueError, match="k must be an integer >= 0"):
        consensus_mask(masks, -1)
    with pytest.raises(ValueError, match="bool"):
        consensus_mask(masks.to(torch.int64), 1)


def test_task_arithmetic_matches_loop():
    d = randn(3, 4, 2, seed=13)
    w = t64([0.5, -1.0, 2.0])
    want = torch.zeros(4, 2, dtype=F64)
    for t in range(3):
        want += w[t] * d[t]
    torch.testing.assert_close(task_arithmetic(d, w), want)
    torch.testing.assert_close(task_arithmetic(d), d[0] + d[1] + d[2])
    assert task_arithmetic(d.float()).dtype == torch.float32


def tie_prone(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Test data for selections by magnitude: continuous, bfloat16-rounded (ties like real task vectors'), a few
    integers (ties everywhere), all zeros, or evenly spaced."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    flat = {
        "randn": lambda: torch.randn(n, generator=g),
        "quantized": lambda: torch.randn(n, generator=g).to(torch.bfloat16).float(),
        "few": lambda: torch.randint(-3, 4, (n,), generator=g).float(),
        "constant": lambda: torch.zeros(n),
        "sorted": lambda: torch.linspace(-1, 1, n),
    }[kind]()
    return flat.reshape(shape)


@pytest.mark.parametrize("kind", ["randn", "quantized", "few", "constant"])
def test_ties_at_the_threshold_go_to_the_lowest_indices_across_chunks(kind):
    """Tied entries are taken in flat-index order even when they span the search's chunks (forced small here)."""
    from mergekit_lite.ops import sparsify as sp

    n = 5003
    x = tie_prone(kind, (n,), seed=3)
    mag = x.abs()
    for k in (1, n // 5, n // 2, n - 1):
        want = torch.zeros(n, dtype=torch.bool)
        want[torch.sort(mag, descending=True, stable=True).indices[:k]] = True
        assert torch.equal(sp.topk_count_mask(x, k), want), k
        threshold = float(mag[torch.sort(mag, descending=True, stable=True).indices[k - 1]])
        tied_at = torch.nonzero(mag == threshold).reshape(-1)
        for count in (1, len(tied_at)):
            assert sp._index_after_ties(x, threshold, count, chunk=64) == int(tied_at[count - 1]) + 1


@pytest.mark.parametrize("kind", ["randn", "quantized", "few", "constant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_top_cut_applied_chunk_by_chunk_keeps_the_stable_top_k(kind, dtype):
    """TopCut (threshold + tie cut-off index) re-applied to flat chunks with their offsets keeps exactly the
    entries of the stable descending top k, as a mask would: the reference is a stable sort of |x|."""
    from mergekit_lite.ops import sparsify as sp

    n = 4099
    x = tie_prone(kind, (n,), seed=5).to(dtype)
    x[::97] = -0.0  # a negative zero outside the cut stays one
    order = torch.sort(x.abs(), descending=True, stable=True).indices
    for k in (1, 7, n // 5, n // 2, n - 1):
        want = torch.zeros(n, dtype=torch.bool)
        want[order[:k]] = True
        cut = sp.topk_cut(x, k)
        assert torch.equal(sp.cut_mask(x, cut), want), k
        pieces = [sp.apply_cut_(x[a : a + 1000].clone(), cut, first=a) for a in range(0, n, 1000)]
        assert torch.equal(torch.cat(pieces), torch.where(want, x, torch.zeros_like(x))), k
        assert int(torch.count_nonzero(sp.cut_mask(x[100:], cut, first=100))) == int(want[100:].sum())
        dropped = torch.cat([sp.drop_cut_(x[a : a + 1000].clone(), cut, first=a) for a in range(0, n, 1000)])
        kept_rest = torch.where(want, torch.zeros_like(x), x)
        assert torch.equal(dropped, kept_rest) and torch.equal(dropped.signbit(), kept_rest.signbit()), k


@pytest.mark.parametrize("kind", ["randn", "quantized", "few", "sorted"])
@pytest.mark.parametrize("sigmas", [5.0, 0.0, -1e9], ids=["bracket", "narrow", "always-missed"])
def test_the_bracketed_selection_is_exact_whether_the_sample_brackets_the_kth_or_not(monkeypatch, kind, sigmas):
    """topk_cut's k-th largest from a sample's bracket (small sizes forced here) keeps the stable top k; a bracket
    that misses the k-th (no margin, or none at all) falls back to partitioning everything, still exact."""
    from mergekit_lite.ops import sparsify as sp

    monkeypatch.setattr(sp, "BRACKET_MIN", 1000)
    monkeypatch.setattr(sp, "BRACKET_SAMPLE", 128)
    monkeypatch.setattr(sp, "BRACKET_BLOCK", 300)
    monkeypatch.setattr(sp, "BRACKET_SIGMAS", sigmas)
    calls = []
    bracketed = sp._bracketed
    monkeypatch.setattr(sp, "_bracketed", lambda flat, ks: calls.extend(bracketed(flat, ks)) or calls[-len(ks) :])
    n = 3001
    x = tie_prone(kind, (n,), seed=11)
    order = torch.sort(x.abs(), descending=True, stable=True).indices
    for k in (1, 5, n // 5, n // 2, n - 2):
        want = torch.zeros(n, dtype=torch.bool)
        want[order[:k]] = True
        assert torch.equal(sp.cut_mask(x, sp.topk_cut(x, k)), want), k
    ks = (1, 5, n // 5, n // 2, n - 2)
    for k, cut in zip(ks, sp.topk_cuts(x, ks)):  # one counting pass for all of them
        want = torch.zeros(n, dtype=torch.bool)
        want[order[:k]] = True
        assert torch.equal(sp.cut_mask(x, cut), want), k
    found = [c is not None for c in calls]
    assert len(found) == 10
    if sigmas < 0:
        assert not any(found)
    if sigmas == 5.0 and kind in ("randn", "sorted"):
        assert all(found)  # the bracket, not the fallback, made these


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_dare_draws_split_over_threads_are_the_one_sequential_stream(monkeypatch, threads):
    from mergekit_lite.ops import sparsify as sp

    monkeypatch.setattr(sp, "DRAW_BLOCK", 64)  # 2112 entries: 33 blocks, split over the threads
    monkeypatch.setattr(sp, "SPLIT_DRAWS", 16)
    plain = np.random.Generator(np.random.PCG64DXSM(77))
    want = torch.from_numpy(plain_dare_keep(plain, 64 * 33, 0.6)).reshape(64, 33)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        generator = np.random.Generator(np.random.PCG64DXSM(77))
        got = dare_mask((64, 33), 0.6, generator)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, want)
    assert generator.random() == plain.random()


def test_l1_norm_is_accurate_on_a_large_tensor_whatever_the_thread_count():
    """torch's float32 vector_norm(x, 1) drifts by percents at this size; the L1 rescale's norm must not."""
    from mergekit_lite.ops import l1_norm

    torch.manual_seed(0)
    x = torch.randn((8 << 20) + 1234) * 0.01  # blocks, rows of partial sums, and a remainder
    exact = float(x.double().abs().sum())
    strided = x[: 8 << 20].view(2048, -1)[:, :4000]  # not contiguous: read through a copy
    threads = torch.get_num_threads()
    got = {}
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got[n] = (l1_norm(x), l1_norm(strided))
    finally:
        torch.set_num_threads(threads)
    assert got[1] == got[2] == got[3]  # the same bits whatever the thread count
    assert abs(got[1][0] - exact) <= 1e-6 * exact
    assert abs(got[1][1] - float(strided.double().abs().sum())) <= 1e-6 * exact


def test_l1_norm_with_a_keep_mask_is_the_norm_of_the_masked_copy_bit_for_bit():
    from mergekit_lite.ops import l1_norm
    from mergekit_lite.ops.sparsify import l1_norms

    torch.manual_seed(1)
    x = torch.randn((2 << 20) + 777) * 0.01
    x[::5] = -0.0
    keep = torch.rand(x.shape) < 0.4
    masked = torch.where(keep, x, torch.zeros(()))
    assert l1_norm(x, keep) == l1_norm(masked) != l1_norm(x)
    assert abs(l1_norm(x, keep) - float(masked.double().abs().sum())) <= 1e-6 * float(masked.double().abs().sum())
    y = x.clone()
    l1_norm(y, keep)
    assert torch.equal(y, x) and torch.equal(y.signbit(), x.signbit())  # x itself is left as it was
    both = l1_norms(y, keep)  # the two norms in one pass: the same two numbers
    assert both == (l1_norm(x), l1_norm(masked))
    assert torch.equal(y, x) and torch.equal(y.signbit(), x.signbit())


@pytest.mark.parametrize("kind", ["randn", "quantized", "few"])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_the_methods_cuts_applied_by_row_chunks_keep_the_stable_reference_entries(kind, method):
    """TIES's and Breadcrumbs' trims are kept as threshold cuts (no mask) and re-applied to row chunks: the
    entries kept are those of a plain stable descending sort of |τ| (top k; Breadcrumbs: the band after the
    top γ·n), whatever rows the chunk starts at, bfloat16-like ties included."""
    from mergekit_lite.methods.base import TensorContext
    from mergekit_lite.methods.task_arithmetic import sparsify_magnitude, sparsify_outliers

    x = tie_prone(kind, (37, 53), seed=21)
    n = x.numel()
    order = torch.sort(x.abs().reshape(-1), descending=True, stable=True).indices
    density, gamma = 0.3, 0.05
    ctx = TensorContext("w", ["a"], {"rescale": False}, [{"density": density, "gamma": gamma}])
    if method == "ties":
        kept = sparsify_magnitude(x, ctx.model_params[0], ctx, 0)
        band = order[: math.floor(density * n)]
    else:
        kept = sparsify_outliers(x, ctx.model_params[0], ctx, 0)
        n_top = math.floor(gamma * n)
        band = order[n_top : n_top + math.floor(density * n)]
    assert kept.cut is not None and kept.mask is None and kept.packed is None
    want = torch.zeros(n, dtype=torch.bool)
    want[band] = True
    want = want.reshape(x.shape)
    chunks = [kept.apply(x[a : a + 5].clone(), slice(a, min(a + 5, 37))) for a in range(0, 37, 5)]
    assert torch.equal(torch.cat(chunks), torch.where(want, x, torch.zeros_like(x)))
    assert torch.equal(kept.apply(x.clone()) != 0, want & (x != 0))


@pytest.mark.parametrize("magnitudes", [False, True])
def test_sample_brackets_are_the_sorted_samples_values_at_the_margins(magnitudes):
    """The brackets read the sample at a few ranks only (selected there): the values a full sort of the sample
    puts at those ranks, open (±inf) past its ends."""
    import math

    from mergekit_lite.ops import sparsify as sp

    values = tie_prone("randn", (200_003,), seed=5).numpy()
    fractions = [0.0, 1e-6, 0.01, 0.25, 0.5, 0.75, 0.999, 1.0]
    got = sp.sample_brackets(values, fractions, magnitudes=magnitudes)
    sample = values[torch.randint(values.size, (sp.BRACKET_SAMPLE,), generator=torch.Generator().manual_seed(0)).numpy()]
    ordered = np.sort(np.abs(sample) if magnitudes else sample)
    size = sp.BRACKET_SAMPLE
    for q, (lo, hi) in zip(fractions, got):
        margin = int(sp.BRACKET_SIGMAS * math.sqrt(size * q * (1 - q))) + 16
        low, high = math.floor(q * (size - 1)) - margin, math.ceil(q * (size - 1)) + margin
        assert lo == (-math.inf if low <= 0 else float(ordered[low])), q
        assert hi == (math.inf if high >= size - 1 else float(ordered[high])), q


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), zeros=st.floats(0, 0.9), distinct=st.sampled_from([3, 50, 10**6]), size=st.integers(256, 70_000),
       nan=st.booleans())
def test_sample_order_values_are_a_sorts_values_at_the_ranks(seed, zeros, distinct, size, nan):
    """``_order_values`` (a sorted sub-sample's brackets, one native counting pass, the insides sorted) gives the
    values a full sort puts at each rank: with many equal values (an importance's zeros, a bfloat16's few values),
    with NaN (the fallback: a partition of everything), at the ends."""
    from mergekit_lite.ops import sparsify as sp

    rng = np.random.default_rng(seed)
    values = (rng.integers(0, distinct, size) / distinct).astype(np.float32)
    values[rng.random(size) < zeros] = 0.0
    if nan:
        values[rng.integers(0, size)] = np.nan
    ranks = sorted({0, size - 1, *rng.integers(0, size, 6).tolist()})
    want = np.sort(values)[ranks]  # NaN sorts last, as a partition puts it
    got = sp._order_values(values.copy(), ranks)
    assert np.array_equal(np.array(got, dtype=np.float32), want, equal_nan=True)
