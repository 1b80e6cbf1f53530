"""Tests for mergekit_lite.ops.select: exact streaming k-th largest magnitude (radix select)."""

from __future__ import annotations

import math
import weakref
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_lite.ops import select as sel_mod

KthLargestMagnitude = sel_mod.KthLargestMagnitude
kth_largest_magnitude_streaming = sel_mod.kth_largest_magnitude_streaming

DTYPES = [torch.float32, torch.float64]
MAX_PASSES = {torch.float32: 2, torch.float64: 4}
# 0: never gather candidates (pure histogram passes); default; huge: gather as soon as allowed.
COLLECT_LIMITS = [0, sel_mod.COLLECT_LIMIT, 1 << 40]


def _flat_magnitudes(tensors):
    flat = torch.cat([t.detach().abs().reshape(-1) for t in tensors])
    return flat[~torch.isnan(flat)]


def reference(tensors, k, flat=None):
    """The k-th largest |x| (NaN dropped) the in-memory way (the paper's reference)."""
    if flat is None:
        flat = _flat_magnitudes(tensors)
    n = flat.numel()
    return torch.kthvalue(flat, n - k + 1).values.item()


def count_non_nan(tensors):
    return sum(int((~torch.isnan(t)).sum()) for t in tensors)


def run_streaming(tensors, k, dtype):
    """Returns (value, number of passes = make_stream calls)."""
    calls = [0]

    def make_stream():
        calls[0] += 1
        return iter(tensors)

    value = kth_largest_magnitude_streaming(make_stream, k, dtype)
    return value, calls[0]


def same_float(a, b):
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def check_all_k(tensors, dtype, ks):
    flat = _flat_magnitudes(tensors)
    n = flat.numel()
    for k in ks:
        value, passes = run_streaming(tensors, k, dtype)
        expected = reference(tensors, k, flat)
        assert same_float(value, expected), (k, n, value, expected)
        assert 1 <= passes <= MAX_PASSES[dtype]
        # exactly representable in dtype
        assert torch.tensor(value, dtype=dtype).item() == value or math.isinf(value)


@pytest.fixture(params=COLLECT_LIMITS, ids=["nocollect", "default", "eager"])
def collect_limit(request, monkeypatch):
    monkeypatch.setattr(sel_mod, "COLLECT_LIMIT", request.param)
    return request.param


# --------------------------------------------------------------------- models
def _models(dtype, gen):
    fi = torch.finfo(dtype)
    tiny = fi.smallest_normal
    denorm_min = torch.tensor(tiny, dtype=dtype) * torch.tensor(fi.eps, dtype=dtype)  # smallest subnormal
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    big = 1e30 if dtype == torch.float32 else 1e300
    small = 1e-30 if dtype == torch.float32 else 1e-300
    one = torch.ones((), dtype=dtype)
    low_bits = one + torch.arange(3000, dtype=dtype) * fi.eps  # same high bits, differ in the low ones
    return {
        "random_shapes": [r(7, 5), r(13), r(2, 3, 4), r(1), r(())],
        "ties": [torch.randint(-3, 4, (50,), generator=gen).to(dtype), torch.randint(-3, 4, (8, 9), generator=gen).to(dtype)],
        "zeros_negzeros": [torch.zeros(10, dtype=dtype), -torch.zeros(7, dtype=dtype), r(5), torch.tensor([0.0, -0.0, 1.0], dtype=dtype)],
        "huge_tiny": [r(20) * big, r(20) * small, r(10), torch.tensor([fi.max, -fi.max, fi.tiny], dtype=dtype)],
        "subnormals": [torch.rand(30, generator=gen, dtype=dtype) * tiny, denorm_min.repeat(3), -denorm_min.reshape(1), r(4) * 1e-3],
        "inf": [r(10), torch.tensor([math.inf, -math.inf, 1.0, math.inf], dtype=dtype), r(3, 3)],
        "single": [torch.tensor([-2.5], dtype=dtype)],
        "all_equal": [torch.full((4, 4), -0.375, dtype=dtype), torch.full((9,), 0.375, dtype=dtype)],
        "all_zero": [torch.zeros(6, dtype=dtype), -torch.zeros(3, 2, dtype=dtype)],
        "low_bits": [low_bits[torch.randperm(3000, generator=gen)], -low_bits[:1000]],
        "empty_tensors": [torch.empty(0, dtype=dtype), r(6), torch.empty(3, 0, dtype=dtype)],
        "non_contiguous": [r(6, 8).t(), r(10, 10)[::3, 1::2]],
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(_models(torch.float32, torch.Generator().manual_seed(0))))
def test_models_match_reference(name, dtype, collect_limit):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    tensors = _models(dtype, gen)[name]
    n = count_non_nan(tensors)
    ks = {1, n, max(1, n // 2), max(1, n // 5)}
    ks |= {int(x) for x in torch.randint(1, n + 1, (4,), generator=gen)}
    check_all_k(tensors, dtype, sorted(ks))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_larger_random_model(dtype):
    gen = torch.Generator().manual_seed(1)
    tensors = [torch.randn(300, 200, generator=gen, dtype=dtype), torch.randn(50_000, generator=gen, dtype=dtype) * 1e-3]
    tensors.append(torch.zeros(5000, dtype=dtype))
    n = count_non_nan(tensors)
    check_all_k(tensors, dtype, [1, 2, n // 10, n // 3, n - 5001, n - 5000, n - 4999, n])


def test_float64_four_histogram_passes(monkeypatch):
    # > 65,536 distinct candidates share the top 48 bits, so with the collect shortcut
    # disabled every one of the 4 digits needs its own pass.
    monkeypatch.setattr(sel_mod, "COLLECT_LIMIT", 0)
    eps = torch.finfo(torch.float64).eps
    vals = 1.0 + torch.arange(70_000, dtype=torch.float64) * eps
    tensors = [vals, -vals.flip(0)]  # every value twice
    n = 140_000
    for k in (3, n // 2 + 1, n - 2):
        value, passes = run_streaming(tensors, k, torch.float64)
        assert value == reference(tensors, k)
        assert passes == 4
    # With the default limit the bin after pass 3 is still too big to gather, and after
    # pass 2 too: the same 4 passes, never more.
    monkeypatch.setattr(sel_mod, "COLLECT_LIMIT", 1 << 16)
    value, passes = run_streaming(tensors, n // 2 + 1, torch.float64)
    assert value == reference(tensors, n // 2 + 1) and passes <= 4


def test_collect_shortcut_finishes_float64_in_two_passes():
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(20_000, generator=gen, dtype=torch.float64) for _ in range(3)]
    n = 60_000
    for k in (17, n // 2, n - 17):
        value, passes = run_streaming(tensors, k, torch.float64)
        assert value == reference(tensors, k)
        # the bin after pass 1 holds < 65,536 entries -> gathered in pass 2 (or known at once
        # when the answer is the bin's largest/smallest entry)
        assert passes == (2 if k == n // 2 else passes) and passes <= 2


# --------------------------------------------------------------------- property
_F32 = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
_F64 = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True)


@st.composite
def _case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    elems = _F32 if dtype == torch.float32 else _F64
    # draw from a small pool sometimes, so that ties are frequent
    pool = draw(st.lists(elems, min_size=1, max_size=6))
    elem = st.one_of(elems, st.sampled_from(pool))
    lists = draw(st.lists(st.lists(elem, min_size=0, max_size=40), min_size=1, max_size=5))
    tensors = [torch.tensor(vals, dtype=dtype) for vals in lists]
    n = count_non_nan(tensors)
    k = draw(st.integers(0, n)) if n else 0
    limit = draw(st.sampled_from(COLLECT_LIMITS))
    return dtype, tensors, k, limit


@settings(max_examples=150, deadline=None)
@given(_case())
def test_property_matches_reference(case):
    dtype, tensors, k, limit = case
    old = sel_mod.COLLECT_LIMIT
    sel_mod.COLLECT_LIMIT = limit
    try:
        value, passes = run_streaming(tensors, k, dtype)
    finally:
        sel_mod.COLLECT_LIMIT = old
    if k == 0:
        assert value == math.inf and passes == 0
    else:
        assert same_float(value, reference(tensors, k))
        assert 1 <= passes <= MAX_PASSES[dtype]


# --------------------------------------------------------------------- passes
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_pass_bounds_and_progress(dtype, collect_limit):
    gen = torch.Generator().manual_seed(5)
    tensors = [torch.randn(40_000, generator=gen, dtype=dtype), torch.randn(100, 100, generator=gen, dtype=dtype)]
    n = 50_000
    for k in (1, 2, 1234, n // 2, n - 1, n):
        sel = KthLargestMagnitude(k, dtype)
        assert sel.passes_needed == MAX_PASSES[dtype]
        passes = 0
        while not sel.done:
            before = sel.passes_needed
            for t in tensors:
                sel.observe(t)
            sel.end_pass()
            passes += 1
            assert sel.passes_needed <= before - 1
        assert passes <= MAX_PASSES[dtype]
        assert sel.passes_done == passes and sel.passes_needed == 0
        assert sel.total == n
        assert sel.value == reference(tensors, k)
        if k in (1, n):
            assert passes == 1  # answer is the bin's max (k = 1) or min (k = n)


def test_early_stop_when_bin_has_one_value():
    # bf16-like values (low 16 bits zero in float32) -> each top-16-bit bin is one value.
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(100_000, generator=gen).to(torch.bfloat16).to(torch.float32)
    for k in (10, 50_000, 99_990):
        value, passes = run_streaming([x], k, torch.float32)
        assert value == reference([x], k) and passes == 1
    # mostly exact zeros, threshold 0 -> one pass
    z = torch.zeros(10_000)
    z[:100] = torch.randn(100, generator=gen)
    value, passes = run_streaming([z], 5_000, torch.float32)
    assert value == 0.0 and passes == 1


def test_k_zero_is_done_without_a_pass():
    for dtype in DTYPES:
        sel = KthLargestMagnitude(0, dtype)
        assert sel.done and sel.value == math.inf and sel.passes_needed == 0 and sel.total == 0

        def make_stream():
            raise AssertionError("no pass expected")

        assert kth_largest_magnitude_streaming(make_stream, 0, dtype) == math.inf
        sel.observe(torch.ones(3, dtype=dtype))  # no-op once done
        sel.end_pass()
        assert sel.value == math.inf


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_k_greater_than_n_raises_after_first_pass(dtype):
    tensors = [torch.ones(3, dtype=dtype), torch.tensor([math.nan, 2.0, math.nan], dtype=dtype)]
    sel = KthLargestMagnitude(5, dtype)  # 4 non-NaN entries
    for t in tensors:
        sel.observe(t)
    assert not sel.done
    with pytest.raises(ValueError, match=r"k=5 exceeds the number of entries"):
        sel.end_pass()
    with pytest.raises(ValueError, match=r"k=5 exceeds"):
        kth_largest_magnitude_streaming(lambda: iter(tensors), 5, dtype)
    with pytest.raises(ValueError, match=r"k=1 exceeds"):
        kth_largest_magnitude_streaming(lambda: iter([torch.empty(0, dtype=dtype)]), 1, dtype)
    assert kth_largest_magnitude_streaming(lambda: iter(tensors), 4, dtype) == 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_nan_is_ignored(dtype, collect_limit):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2000, generator=gen, dtype=dtype)
    x[::7] = math.nan
    x[3] = -math.nan
    ints = x.view(torch.int32 if dtype == torch.float32 else torch.int64)
    # NaNs with unusual payloads, including ones sharing the top 16 bits with +/-inf
    if dtype == torch.float32:
        ints[10], ints[11], ints[12] = 0x7F800001, -0x007FFFFF, 0x7FFFFFFF  # -0x7FFFFF == 0xFF800001
    else:
        ints[10], ints[11] = 0x7FF0000000000001, 0x7FF0000100000000
    x[20] = math.inf
    x[21] = -math.inf
    tensors = [x, torch.tensor([math.nan], dtype=dtype)]
    n = count_non_nan(tensors)
    assert n < 2000
    check_all_k(tensors, dtype, [1, 2, 3, n // 2, n - 1, n])
    sel = KthLargestMagnitude(1, dtype)
    for t in tensors:
        sel.observe(t)
    sel.end_pass()
    assert sel.total == n and sel.nan_count == 2001 - n and sel.value == math.inf
    assert run_streaming([torch.tensor([math.nan, math.inf, 3.0], dtype=dtype)], 2, dtype)[0] == 3.0


def test_inputs_are_not_modified():
    x = torch.tensor([-1.0, math.nan, -math.inf, -0.0, 2.0])
    before = x.clone()
    kth_largest_magnitude_streaming(lambda: iter([x]), 2)
    assert torch.equal(x.view(torch.int32), before.view(torch.int32))


# --------------------------------------------------------------------- memory
@pytest.mark.parametrize(
    "dtype,k,limit",
    [
        (torch.float32, 1, sel_mod.COLLECT_LIMIT),  # one pass
        (torch.float32, 777, sel_mod.COLLECT_LIMIT),  # two histogram passes
        (torch.float64, 30_000, sel_mod.COLLECT_LIMIT),  # histogram + gathering pass
        (torch.float64, 30_000, 0),  # histogram passes only
    ],
    ids=["f32-1pass", "f32-2passes", "f64-collect", "f64-nocollect"],
)
def test_selector_keeps_no_reference_to_fed_tensors(dtype, k, limit, monkeypatch):
    monkeypatch.setattr(sel_mod, "COLLECT_LIMIT", limit)
    refs = []
    passes = [0]

    def make_stream():
        gen = torch.Generator().manual_seed(11)
        for shape in [(100, 100), (20_000,), (5, 5, 5)]:
            yield torch.randn(*shape, generator=gen, dtype=dtype)  # fresh; the generator keeps no name for it

    sel = KthLargestMagnitude(k, dtype)
    while not sel.done:
        stream = make_stream()
        for t in stream:
            sel.observe(t)
            r = weakref.ref(t)
            refs.append(r)
            del t  # torch tensors are freed by reference counting: no gc.collect() needed
            assert r() is None, "the selector kept a reference to a fed tensor"
        sel.end_pass()
        passes[0] += 1
    assert all(r() is None for r in refs)
    expected = reference(list(make_stream()), k)
    assert sel.value == expected
    assert len(refs) == 3 * passes[0] and passes[0] >= 1


def test_state_is_small():
    """Per-selector state is O(65,536), whatever the stream size."""
    sel = KthLargestMagnitude(123_456, torch.float32)
    sel.observe(torch.randn(2_000_000))
    sizes = [v.numel() for v in vars(sel).values() if isinstance(v, torch.Tensor)]
    assert sizes and max(sizes) <= 65_538


# --------------------------------------------------------------------- API
def test_several_selectors_share_passes():
    gen = torch.Generator().manual_seed(12)
    tensors = [torch.randn(10_000, generator=gen), torch.zeros(3000), torch.randn(50, 40, generator=gen)]
    n = 15_000
    ks = [0, 1, 100, 7_000, 12_000, 12_001, n]
    sels = [KthLargestMagnitude(k) for k in ks]
    passes = 0
    while not all(s.done for s in sels):
        for t in tensors:
            for s in sels:
                s.observe(t)  # done selectors ignore it
        for s in sels:
            s.end_pass()
        passes += 1
    assert passes <= 2
    for k, s in zip(ks, sels):
        assert s.value == (math.inf if k == 0 else reference(tensors, k))
    assert sels[-2].value == 0.0  # falls among the zeros


def test_argument_and_state_errors():
    with pytest.raises(ValueError):
        KthLargestMagnitude(-1)
    with pytest.raises(ValueError):
        KthLargestMagnitude(3, torch.float16)
    with pytest.raises(TypeError):
        KthLargestMagnitude(1.5)
    sel = KthLargestMagnitude(2, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        sel.observe(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype"):
        sel.observe(torch.ones(3, dtype=torch.int32))
    with pytest.raises(RuntimeError):
        sel.value
    with pytest.raises(RuntimeError):
        sel.total
    # a stream that changes between passes is detected
    sel = KthLargestMagnitude(5, torch.float32)
    sel.observe(torch.arange(1000, dtype=torch.float32) * 1e-3 + 1.0)
    sel.end_pass()
    assert not sel.done
    sel.observe(torch.arange(999, dtype=torch.float32) * 1e-3 + 1.0)
    with pytest.raises(RuntimeError, match="changed between passes"):
        sel.end_pass()


def test_value_is_python_float_and_exact():
    x = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float32)
    v = kth_largest_magnitude_streaming(lambda: iter([x]), 2)
    assert type(v) is float and v == torch.tensor(0.2, dtype=torch.float32).item() and v != 0.2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_cuda_matches_cpu(dtype):
    gen = torch.Generator().manual_seed(13)
    cpu = [torch.randn(300_000, generator=gen, dtype=dtype), torch.zeros(1000, dtype=dtype), torch.randn(64, 64, generator=gen, dtype=dtype)]
    cpu[0][::100] = math.nan
    cuda = [t.cuda() for t in cpu]
    n = count_non_nan(cpu)
    for k in (1, 5, n // 3, n - 1000, n):
        assert run_streaming(cuda, k, dtype) == run_streaming(cpu, k, dtype)
        assert run_streaming(cuda, k, dtype)[0] == reference(cpu, k)
    # mixed devices within a pass
    mixed = [cuda[0], cpu[1], cuda[2]]
    assert run_streaming(mixed, n // 2, dtype)[0] == reference(cpu, n // 2)


# --------------------------------------------------------------------- partial states (workers)
import pickle  # noqa: E402


def run_split(parts, k, dtype):
    """Each pass: every part fed to its own pickled copy of the selector (a worker), the copies merged, then end_pass."""
    sel = KthLargestMagnitude(k, dtype)
    passes = 0
    while not sel.done:
        copies = [pickle.loads(pickle.dumps(sel)) for _ in parts]
        for copy, part in zip(copies, parts):
            for t in part:
                copy.observe(t)
        sel = sel_mod.merge_partial_selectors([[c] for c in pickle.loads(pickle.dumps(copies))])[0]
        sel.end_pass()
        passes += 1
    return sel.value, passes


@settings(max_examples=120, deadline=None)
@given(_case(), st.integers(1, 4), st.randoms(use_true_random=False))
def test_property_partial_states_merge_to_the_same_answer(case, workers, rnd):
    dtype, tensors, k, limit = case
    parts = [[] for _ in range(workers)]
    for t in tensors:  # tensors dealt to the workers at random; some workers may get none
        parts[rnd.randrange(workers)].append(t)
    old = sel_mod.COLLECT_LIMIT
    sel_mod.COLLECT_LIMIT = limit
    try:
        value, passes = run_split(parts, k, dtype)
        whole, whole_passes = run_streaming(tensors, k, dtype)
    finally:
        sel_mod.COLLECT_LIMIT = old
    assert same_float(value, whole) and passes == whole_passes
    if k:
        assert same_float(value, reference(tensors, k))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_merged_histograms_are_the_sums_by_hand(dtype):
    a, b = torch.tensor([1.0, -2.0, 3.0], dtype=dtype), torch.tensor([2.0, 0.5], dtype=dtype)
    one, two, both = KthLargestMagnitude(2, dtype), KthLargestMagnitude(2, dtype), KthLargestMagnitude(2, dtype)
    one.observe(a)
    two.observe(b)
    both.observe(a)
    both.observe(b)
    merged = one.merged(two)
    assert torch.equal(merged._hist, both._hist) and int(merged._hist.sum()) == 5
    assert torch.equal(merged._bin_min, both._bin_min) and torch.equal(merged._bin_max, both._bin_max)
    assert int(one._hist.sum()) == 3 and int(two._hist.sum()) == 2  # the parts are unchanged
    merged.end_pass()
    assert merged.value == 2.0  # |x| sorted: 3, 2, 2, 1, 0.5 -> the 2nd largest is 2


def test_merge_refuses_selectors_in_different_states():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    a = KthLargestMagnitude(10)
    with pytest.raises(ValueError, match="different search states"):
        a.merged(KthLargestMagnitude(11))
    b = KthLargestMagnitude(10)
    b.observe(x)
    b.end_pass()  # one pass ahead
    with pytest.raises(ValueError, match="different search states"):
        a.merged(b)
