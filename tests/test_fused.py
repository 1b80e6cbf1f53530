"""The native fused kernel (mergekit_lite/native/fused.c): the bytes of the torch operations it replaces, written
out plainly here, for every size, dtype mix and form; within a rounding of the exact (float64) combination; its Gram
matrix within float64 rounding of a plain one; NaN/Inf found and named; and whole merges identical with the kernel
on and off, falling back to torch where it disagrees."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import mergekit_lite
from mergekit_lite import Recipe, execute
from mergekit_lite.methods import base as base_module
from mergekit_lite.ops import fused
from mergekit_lite.ops.fused import LinearForm

from helpers import load_state, ta_recipe

pytestmark = pytest.mark.skipif(not fused.available(), reason="the native kernel is not built (no C compiler at install)")

DTYPES = (torch.float32, torch.bfloat16)


def torch_steps(base: torch.Tensor | None, inputs: list[torch.Tensor], form: LinearForm) -> torch.Tensor:
    """The torch path's operations in its order: task vectors scaled then added with add(alpha=) (given, or taken off
    θ_0), or a running sum from zero; divided; multiplied by the post-scale; then θ_0 + λ·sum."""
    if base is not None:
        b = base.to(torch.float32, copy=True)
        total = None
        for w, x in zip(form.weights, inputs):
            d = x.to(torch.float32, copy=True)
            if not form.given_task_vectors:
                d.sub_(b)
            total = d.mul_(w) if total is None else total.add_(d, alpha=w)
    elif form.rounded_products:  # slerp's x_0·w_0 + x_1·w_1, each product rounded
        total = None
        for w, x in zip(form.weights, inputs):
            product = x.to(torch.float32, copy=True).mul_(w)
            total = product if total is None else total.add_(product)
    else:
        total = torch.zeros(inputs[0].shape)
        for w, x in zip(form.weights, inputs):
            total.add_(x.to(torch.float32), alpha=w)
    if form.divisor is not None:
        total.div_(form.divisor)
    if form.post_scale is not None:
        total.mul_(form.post_scale)
    return b.add_(total, alpha=form.lam) if base is not None else total


def exact(base: torch.Tensor | None, inputs: list[torch.Tensor], form: LinearForm) -> torch.Tensor:
    """The same combination in float64."""
    taken_off = base.double() if base is not None and not form.given_task_vectors else 0
    total = sum(w * (x.double() - taken_off) for w, x in zip(form.weights, inputs))
    if form.divisor is not None:
        total = total / form.divisor
    if form.post_scale is not None:
        total = total * form.post_scale
    return base.double() + form.lam * total if base is not None else total


def values(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 2.0 ** torch.randint(-8, 9, (n,), generator=g)
    x[::11] = 0.0
    x[5::11] = -0.0
    return x.to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.dtype.itemsize == 2 else torch.int32)


def native(out_dtype, base, inputs, form) -> tuple[torch.Tensor, int]:
    out = torch.empty(inputs[0].numel(), dtype=out_dtype)
    return out, fused.linear_combination_into(out, base, inputs, form)


@pytest.mark.parametrize("n", [1, 7, 8, 31, 67, 1023, 1024, 1025, 5000])
@pytest.mark.parametrize("in_dtype,out_dtype", [(a, b) for a in DTYPES for b in DTYPES])
@pytest.mark.parametrize(
    "form,with_base",
    [
        (LinearForm((1.0, 1.0, 1.0, 1.0), None, 0.5), True),  # task arithmetic as benchmarked
        (LinearForm((1.0, 0.5, -0.25), None, 0.7), True),
        (LinearForm((0.3, 0.3), 0.6, 0.9), True),  # normalize: true
        (LinearForm((1.0,), None, 1.0), True),
        (LinearForm((1.0,), 8.0, 1.0, post_scale=0.7321, given_task_vectors=True), True),  # Model Stock's θ_0 + t·Σ/K
        (LinearForm((1.0, 0.5), 3.0, 0.6, post_scale=-1.3, given_task_vectors=True), True),
        (LinearForm((0.2, 0.7, 0.1), 1.0, None), False),  # linear
        (LinearForm((1.0, -0.37, 2.5, 0.0), 3.13, None), False),
        (LinearForm((0.5, 0.5), None, None), False),  # normalize: false
        (LinearForm((0.8123, 0.2211), None, None, rounded_products=True), False),  # slerp's factors
        (LinearForm((-1.5, 2.75, 0.3), 1.7, None, rounded_products=True), False),
    ],
)
def test_the_bytes_of_the_torch_operations(n, in_dtype, out_dtype, form, with_base):
    inputs = [values(n, in_dtype, seed) for seed in range(len(form.weights))]
    base = values(n, in_dtype, 99) if with_base else None
    got, bad = native(out_dtype, base, inputs, form)
    expected = torch_steps(base, inputs, form).to(out_dtype)
    assert bad == -1
    assert torch.equal(bits(got), bits(expected))
    reference = exact(base, inputs, form)
    # each float32 step rounds by at most 2^-24 of the magnitudes it combines (bounded per entry below); a bfloat16
    # output adds half an ulp of 8 bits
    b = base.double().abs() if base is not None else 0
    taken_off = b if not form.given_task_vectors else 0
    magnitude = sum(abs(w) * (x.double().abs() + taken_off) for w, x in zip(form.weights, inputs)) / (abs(form.divisor) if form.divisor else 1)
    magnitude = magnitude * abs(form.post_scale) if form.post_scale is not None else magnitude
    magnitude = magnitude * abs(form.lam) + b if base is not None else magnitude
    tolerance = (2.0 ** -8 if out_dtype == torch.bfloat16 else 0.0) * reference.abs() + 2.0 ** -20 * magnitude
    assert bool(((got.double() - reference).abs() <= tolerance).all())


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 2100),
    weights=st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=1, max_size=6),
    lam=st.one_of(st.none(), st.floats(-3, 3, allow_nan=False, width=32)),
    divisor=st.one_of(st.none(), st.floats(0.015625, 10), st.floats(-10, -0.015625)),
    rounded=st.booleans(),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=8, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_property_any_form_any_dtype_mix(n, weights, lam, divisor, rounded, dtypes, seed):
    """Each input (and the base, and the output) may have its own stored dtype."""
    form = LinearForm(tuple(weights), divisor, lam, rounded_products=rounded and lam is None)
    inputs = [values(n, dtypes[t], seed + t) for t in range(len(weights))]
    base = values(n, dtypes[6], seed + 77) if lam is not None else None
    got, bad = native(dtypes[7], base, inputs, form)
    assert bad == -1
    assert torch.equal(bits(got), bits(torch_steps(base, inputs, form).to(dtypes[7])))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_finds_the_first_input_with_a_non_finite_entry(dtype, poison):
    n = 3000
    inputs = [values(n, dtype, seed) for seed in range(3)]
    base = values(n, dtype, 9)
    inputs[2][2500] = poison
    inputs[1][2999] = poison
    assert native(torch.float32, base, inputs, LinearForm((1.0, 1.0, 1.0), None, 1.0))[1] == 2  # model 1 (1 + t)
    assert native(torch.float32, None, inputs, LinearForm((1.0, 1.0, 1.0), None, None))[1] == 2
    base[0] = poison
    assert native(torch.float32, base, inputs, LinearForm((1.0, 1.0, 1.0), None, 1.0))[1] == 0  # the base


@pytest.mark.parametrize("n", [1, 5, 1024, 3001])
@pytest.mark.parametrize("with_base", [False, True])
def test_gram_is_the_float64_gram_matrix(n, with_base):
    """Each product of two float32 numbers is exact in float64; only the order of the sums differs from a plain
    float64 reference, so they agree to float64 rounding of the sums."""
    inputs = [values(n, dtype, seed) for seed, dtype in enumerate((torch.bfloat16, torch.float32, torch.bfloat16))]
    base = values(n, torch.bfloat16, 50) if with_base else None
    got, bad = fused.gram(base, inputs)
    vectors = torch.stack([x.float() - (base.float() if base is not None else 0) for x in inputs]).double()
    expected = vectors @ vectors.T
    assert bad == -1 and got.dtype == torch.float64 and got.shape == (3, 3)
    assert torch.equal(got, got.T)
    magnitude = vectors.abs() @ vectors.abs().T
    assert bool(((got - expected).abs() <= 1e-13 * magnitude + 1e-300).all())


ISA_LEVELS = (0, 1, 2)  # the kernel's portable code, at most AVX2, the fastest the CPU has (AVX-512 where it is there)


def test_portable_and_vector_code_give_the_same_bytes():
    """The kernel's portable code (CPUs without AVX2), its AVX2 code and its AVX-512 code: the same operations, the
    same bytes."""
    inputs = [values(3001, dtype, seed) for seed, dtype in enumerate((torch.bfloat16, torch.float32, torch.bfloat16, torch.float32))]
    base = values(3001, torch.bfloat16, 50)
    forms = [(LinearForm((0.3, -1.2, 2.5, 0.7), 2.3, 0.9), base), (LinearForm((0.3, -1.2, 2.5, 0.7), None, None), None),
             (LinearForm((0.3, -1.2, 2.5, 0.7), None, None, rounded_products=True), None)]
    results = []
    try:
        for level in ISA_LEVELS:
            fused._fused._max_isa(level)
            grams = [fused.gram(b, inputs, torch.empty(3001))[0] for b in (None, base)]
            outs = [native(torch.bfloat16, b, inputs, form)[0] for form, b in forms]
            results.append((grams, outs))
    finally:
        fused._fused._max_isa(2)
    (grams_portable, outs_portable), *vector = results
    for grams, outs in vector:
        assert all(torch.equal(a, b) for a, b in zip(grams, grams_portable))
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(outs, outs_portable))


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 7, 8, 9, 13, 17, 40])
def test_gram_and_sum_are_the_same_bytes_on_every_code_path(count):
    """The Gram matrix's tiles of pairs and stretches of a block (AVX-512), its pairs two at a time (AVX2), one at a
    time (portable): the same sums, lane for lane, for any number of inputs and any length (tails of 1–15 entries,
    blocks and stretches cut anywhere); the sum and the non-finite answer too."""
    for n in (1, 15, 17, 255, 1024, 1041, 2048 + 513):
        inputs = [values(n, (torch.bfloat16, torch.float32)[t % 2], 100 + t) for t in range(count)]
        base = values(n, torch.bfloat16, 7)
        if n > 600:
            inputs[-1][n - 3] = float("inf")  # in the last tail
            inputs[0][600] = float("nan")  # inside a stretch
        results = []
        try:
            for level in ISA_LEVELS:
                fused._fused._max_isa(level)
                for b in (None, base):
                    for diagonal in (False, True):
                        total = torch.empty(n)
                        gram, bad = fused.gram(b, inputs, total, diagonal)
                        results.append((level, b is None, diagonal, gram, bad, bits(total)))
        finally:
            fused._fused._max_isa(2)
        portable = {(no_base, diagonal): rest for level, no_base, diagonal, *rest in results if level == 0}
        for level, no_base, diagonal, gram, bad, total in results:
            want_gram, want_bad, want_total = portable[(no_base, diagonal)]
            assert torch.equal(gram.nan_to_num(7.0), want_gram.nan_to_num(7.0)) and bad == want_bad and torch.equal(total, want_total), (level, n)
            if n > 600:
                assert bad == 1


def test_gram_diagonal_only_is_the_full_matrix_diagonal():
    inputs = [values(2500, torch.bfloat16, seed) for seed in range(5)]
    base = values(2500, torch.float32, 8)
    for b in (None, base):
        full, _ = fused.gram(b, inputs)
        diagonal, bad = fused.gram(b, inputs, diagonal=True)
        assert bad == -1 and torch.equal(diagonal, torch.diag(torch.diagonal(full)))


def test_gram_finds_non_finite_entries():
    inputs = [values(2000, torch.float32, seed) for seed in range(3)]
    base = values(2000, torch.float32, 9)
    inputs[1][1999] = float("inf")
    assert fused.gram(None, inputs)[1] == 2
    assert fused.gram(base, inputs)[1] == 2
    base[3] = float("nan")
    assert fused.gram(base, inputs)[1] == 0


def test_overflow_of_finite_inputs_rounds_as_torch_does():
    """Finite inputs whose combination leaves float32's or bfloat16's range: the same infinities as torch."""
    big = torch.full((40,), 3.0e38)
    for out_dtype in DTYPES:
        got, bad = native(out_dtype, None, [big, big], LinearForm((1.0, 1.0), None, None))
        assert bad == -1 and torch.equal(bits(got), bits(torch_steps(None, [big, big], LinearForm((1.0, 1.0), None, None)).to(out_dtype)))
    near = torch.full((40,), 3.3895e38)  # rounds up to bfloat16's infinity
    got, _ = native(torch.bfloat16, None, [near], LinearForm((1.0,), None, None))
    assert torch.equal(bits(got), bits(near.to(torch.bfloat16)))


def test_switched_off_by_the_environment_or_absent(monkeypatch):
    monkeypatch.setenv("MERGEKIT_LITE_NATIVE", "0")
    assert not fused.available()
    monkeypatch.setenv("MERGEKIT_LITE_NATIVE", "1")
    assert fused.available()
    monkeypatch.setattr(fused, "_fused", None)  # built without a C compiler
    assert not fused.available()


def test_refuses_mismatched_arguments():
    x = torch.zeros(10)
    with pytest.raises(ValueError):
        fused.linear_combination_into(torch.empty(9), None, [x], LinearForm((1.0,), None, None))
    with pytest.raises(ValueError):
        fused.linear_combination_into(torch.empty(10), None, [x, x], LinearForm((1.0,), None, None))
    with pytest.raises(ValueError):
        fused.linear_combination_into(torch.empty(10), None, [x], LinearForm((1.0,), None, 1.0))  # task vectors need a base
    with pytest.raises(ValueError):
        fused.linear_combination_into(torch.empty(10), None, [x.double()], LinearForm((1.0,), None, None))
    with pytest.raises(ValueError):
        fused.linear_combination_into(torch.empty(10), None, [torch.zeros(20)[::2]], LinearForm((1.0,), None, None))


# -- whole merges --------------------------------------------------------------------------------
RECIPES = [
    ("slerp", {"t": 0.3}),
    ("multislerp", {}),
    ("task_arithmetic", {"lambda": 0.8}),
    ("task_arithmetic", {"lambda": 0.37, "normalize": True}),
    ("linear", {}),
    ("linear", {"normalize": False}),
    ("arcee_fusion", {}),
    # the L1 rescale's norms: float64 sums on both paths (the native pass's, ``_block_l1``'s), the same factor
    ("dare_linear", {"density": 0.5, "rescale": True}),
]


def _run(demo, out, method, params, monkeypatch, native_on: bool):
    monkeypatch.setenv("MERGEKIT_LITE_NATIVE", "1" if native_on else "0")
    data = ta_recipe(demo, merge_method=method, parameters=params)
    if method in ("slerp", "arcee_fusion"):  # the base and one other model
        data["models"] = [{"model": data["models"][0]["model"]}]
    return load_state(mergekit_lite.run(Recipe.model_validate(data), out, progress=False))


@pytest.mark.parametrize("method,params", RECIPES)
@pytest.mark.parametrize("fixture", ["demo", "demo_bf16"])
def test_whole_merges_are_identical_with_the_kernel_on_and_off(request, tmp_path, monkeypatch, method, params, fixture):
    demo = request.getfixturevalue(fixture)
    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 7)  # every tensor of 7+ entries goes the entrywise way
    monkeypatch.setattr(execute, "FUSED_CHUNK_ENTRIES", 50)  # in uneven chunks, on both threads
    monkeypatch.setattr(base_module, "REREAD_CHUNK_ENTRIES", 40)  # slerp's torch passes in chunks too
    calls = []  # the entries of each kernel call (its output's, or its first input's)
    original, original_gram = fused.linear_combination_into, fused.gram
    monkeypatch.setattr(fused, "linear_combination_into", lambda *a, **k: calls.append(a[0].numel()) or original(*a, **k))
    monkeypatch.setattr(fused, "gram", lambda *a, **k: calls.append(k["n"] if "n" in k else a[1][0].numel()) or original_gram(*a, **k))
    torch_out = _run(demo, tmp_path / "torch", method, params, monkeypatch, native_on=False)
    assert not calls
    native_out = _run(demo, tmp_path / "native", method, params, monkeypatch, native_on=True)
    assert any(n != execute.FUSED_SAMPLE_ENTRIES for n in calls)  # the kernel made outputs, not only the sample
    assert torch_out.keys() == native_out.keys()
    for name in torch_out:
        assert torch.equal(bits(torch_out[name]), bits(native_out[name])), name


@pytest.mark.parametrize("fixture", ["demo", "demo_bf16"])
def test_model_stock_with_the_kernel_is_the_torch_merge_up_to_its_gram_rounding(request, tmp_path, monkeypatch, fixture):
    """The kernel's pass makes the same sum of task vectors and a float64 Gram matrix (torch's is float32): the
    ratio t differs by float32's error in the dot products (absolute, ~1e-7), so the outputs agree to about a
    rounding of their dtype."""
    from mergekit_lite.ops import selection

    demo = request.getfixturevalue(fixture)
    monkeypatch.setattr(execute, "FUSED_CHUNK_ENTRIES", 50)
    monkeypatch.setattr(execute, "two_phase_min_entries", lambda: 7)  # every tensor of 7+ entries by row chunks
    calls = []
    original = fused.gram
    monkeypatch.setattr(fused, "gram", lambda *a, **k: calls.append(1) or original(*a, **k))
    ratios = {}
    original_ratio = selection.model_stock_ratio_from_gram
    monkeypatch.setattr("mergekit_lite.methods.model_stock.model_stock_ratio_from_gram",
                        lambda gram, dtype=torch.float32: ratios.setdefault(len(ratios), original_ratio(gram, dtype)))
    torch_out = _run(demo, tmp_path / "torch", "model_stock", {}, monkeypatch, native_on=False)
    torch_ratios, ratios = dict(ratios), {}
    monkeypatch.setattr("mergekit_lite.methods.model_stock.model_stock_ratio_from_gram",
                        lambda gram, dtype=torch.float32: ratios.setdefault(len(ratios), original_ratio(gram, dtype)))
    assert not calls
    native_out = _run(demo, tmp_path / "native", "model_stock", {}, monkeypatch, native_on=True)
    assert calls
    assert len(ratios) == len(torch_ratios)
    for i in ratios:  # where cos θ is near 0, float32's dot products are far off in relative terms: t itself is ~K·cos θ
        torch.testing.assert_close(ratios[i], torch_ratios[i], rtol=0, atol=1e-6)
    for name in torch_out:
        tol = dict(rtol=2 ** -7, atol=1e-6) if torch_out[name].dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(native_out[name].float(), torch_out[name].float(), **tol, msg=name)


@pytest.mark.parametrize("fixture", ["demo", "demo_bf16"])
@pytest.mark.parametrize("params", [{}, {"lambda": 0.7}])
def test_model_stock_output_pass_in_the_kernel_is_the_torch_steps_bytes(request, tmp_path, monkeypatch, fixture, params):
    """θ_0 + λ·t·Σ/K from the kernel's stored sum: one kernel pass (θ_0 read again) against scale_mean and the
    executor's θ_0 + λ·merged in torch, on the same sum and t (the kernel's Gram pass in both runs): the same bytes."""
    demo = request.getfixturevalue(fixture)
    monkeypatch.setattr(execute, "FUSED_CHUNK_ENTRIES", 50)  # uneven chunks on both threads
    monkeypatch.setattr(execute, "two_phase_min_entries", lambda: 7)
    passes = []
    original = execute.RereadTaskVectors.native_scaled_sum
    monkeypatch.setattr(execute.RereadTaskVectors, "native_scaled_sum", lambda *a: passes.append(original(*a)) or passes[-1])
    native_out = _run(demo, tmp_path / "native", "model_stock", params, monkeypatch, native_on=True)
    assert passes and all(passes)  # every row-chunked tensor's output made by the kernel
    monkeypatch.setattr(execute.RereadTaskVectors, "native_scaled_sum", lambda *a: False)
    torch_out = _run(demo, tmp_path / "torch", "model_stock", params, monkeypatch, native_on=True)
    assert torch_out.keys() == native_out.keys()
    assert any(not torch.equal(torch_out[name], load_state(demo["base"])[name]) for name in torch_out)  # a merge, not the base
    for name in torch_out:
        assert torch.equal(bits(torch_out[name]), bits(native_out[name])), name


def test_a_kernel_that_disagrees_on_the_sample_is_not_used(demo, tmp_path, monkeypatch):
    """Where the kernel's bytes differ from the method's torch path (another CPU's roundings), torch is used."""
    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 7)
    monkeypatch.setattr(execute, "_FUSED_CHECKED", {})
    original = fused.linear_combination_into
    calls = []

    def off_by_a_bit(out, base, inputs, form, **options):
        calls.append(out.numel())
        result = original(out, base, inputs, form, **options)
        out.view(torch.int32)[0] ^= 1
        return result

    monkeypatch.setattr(fused, "linear_combination_into", off_by_a_bit)
    merged = _run(demo, tmp_path / "out", "task_arithmetic", {"lambda": 0.8}, monkeypatch, native_on=True)
    assert calls and set(calls) == {execute.FUSED_SAMPLE_ENTRIES}  # tried on the sample only
    monkeypatch.setattr(fused, "linear_combination_into", original)
    reference = _run(demo, tmp_path / "ref", "task_arithmetic", {"lambda": 0.8}, monkeypatch, native_on=False)
    for name in reference:
        assert torch.equal(merged[name], reference[name]), name


def test_non_finite_input_is_refused_naming_file_and_tensor(demo, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from helpers import copy_checkpoint
    from mergekit_lite.errors import CheckpointError

    bad = copy_checkpoint(demo["math"], tmp_path / "bad")
    file = next(bad.glob("*.safetensors"))
    state = load_file(str(file))
    name = next(n for n, t in state.items() if t.dim() == 2 and t.shape[0] > 4)
    state[name][-1, -1] = float("inf")
    state[name][2, 3] = float("nan")
    save_file(state, str(file))
    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 7)
    monkeypatch.setattr(execute, "FUSED_CHUNK_ENTRIES", 16)
    data = ta_recipe(demo)
    data["models"][0]["model"] = str(bad)
    with pytest.raises(CheckpointError, match=rf"{file.name}.*{name.replace('.', '[.]')} has 2 NaN/Inf"):
        mergekit_lite.run(Recipe.model_validate(data), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_kernel_needs_float32_arithmetic_and_stays_off_for_float64(demo, tmp_path, monkeypatch):
    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 7)
    calls = []
    original = fused.linear_combination_into
    monkeypatch.setattr(fused, "linear_combination_into", lambda *a: calls.append(1) or original(*a))
    data = ta_recipe(demo)
    data["dtype"] = "float64"
    mergekit_lite.run(Recipe.model_validate(data), tmp_path / "out", progress=False)
    assert not calls


def test_where_the_kernel_cannot_read_files_the_merge_is_torchs(demo, tmp_path, monkeypatch):
    """A build without ``pread`` (READS_FILES 0): no pass over stored inputs goes to the kernel; the merge is the
    torch path's, byte for byte."""
    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 7)
    monkeypatch.setattr(fused._fused, "READS_FILES", 0)
    assert fused.available() and not fused.reads_files()
    spans = []
    original = fused.linear_combination_into
    monkeypatch.setattr(fused, "linear_combination_into",
                        lambda out, base, inputs, form, **k: spans.extend(x for x in [base, *inputs] if isinstance(x, fused.Span)) or original(out, base, inputs, form, **k))
    without = _run(demo, tmp_path / "without", "task_arithmetic", {"lambda": 0.8}, monkeypatch, native_on=True)
    assert not spans
    torch_out = _run(demo, tmp_path / "torch", "task_arithmetic", {"lambda": 0.8}, monkeypatch, native_on=False)
    assert without.keys() == torch_out.keys()
    assert all(torch.equal(bits(without[name]), bits(torch_out[name])) for name in without)


@pytest.mark.parametrize("fixture", ["demo", "demo_bf16"])
def test_dare_ties_first_phase_by_the_kernel_gives_the_torch_phases_bytes(request, tmp_path, monkeypatch, fixture):
    """DARE-TIES with the L1 rescale: its masks and norms drawn by the kernel in one pass over the stored bytes
    (``native_dare_masks``: its draws are ``dare_mask``'s, its norms the same floats) give the bytes of the torch
    phase 1, chunk by chunk; the election of phase 2 is torch's either way."""
    demo = request.getfixturevalue(fixture)
    monkeypatch.setattr(execute, "FUSED_CHUNK_ENTRIES", 48)  # uneven kernel chunks, on both threads
    monkeypatch.setattr(execute, "two_phase_min_entries", lambda: 7)  # every tensor of 7+ entries in two phases
    monkeypatch.setattr(base_module, "ROW_CHUNK_ENTRIES", 40)
    made = []  # per call: whether the kernel made the masks
    original = execute.RereadTaskVectors.native_dare_masks

    def native_dare_masks(self, keeps):
        found = original(self, keeps)
        made.append(found is not None)
        return found

    monkeypatch.setattr(execute.RereadTaskVectors, "native_dare_masks", native_dare_masks)
    params = {"density": 0.4, "rescale": True}
    torch_out = _run(demo, tmp_path / "torch", "dare_ties", params, monkeypatch, native_on=False)
    assert made and not any(made)  # asked, and declined: the kernel is off
    made.clear()
    native_out = _run(demo, tmp_path / "native", "dare_ties", params, monkeypatch, native_on=True)
    assert made and all(made)  # the kernel's first phase, for every two-phase tensor
    assert torch_out.keys() == native_out.keys()
    for name in torch_out:
        assert torch.equal(bits(torch_out[name]), bits(native_out[name])), name
