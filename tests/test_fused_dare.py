"""DARE in the native kernel (mergekit_lite/native/fused.c): its keep draws are ops.sparsify.dare_mask's, entry for
entry (PCG64DXSM's 16-bit words and the tie words, from any offset); its L1 norms are float64 sums of |τ| within
float64 rounding of a plain sum; its masked, rescaled combination is the torch operations' bytes, written out plainly
here; and whole DARE-linear merges agree with the torch path's: identical without the L1 rescale, within a rounding
of the output dtype with it (the norms are summed in another order, so the factor may move in its last bit)."""

from __future__ import annotations

import errno
import math
import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import mergekit_lite
from mergekit_lite import Recipe, execute
from mergekit_lite.ops import fused
from mergekit_lite.ops.fused import DareDraws, Keep, LinearForm
from mergekit_lite.ops.sparsify import UNIFORM_SCALE, dare_mask, generator_for

from helpers import load_state, ta_recipe
from test_fused import bits, values

pytestmark = pytest.mark.skipif(not fused.available(), reason="the native kernel is not built (no C compiler at install)")


def draws(density: float, seed: int = 0, model: str = "m", tensor: str = "w") -> DareDraws:
    return DareDraws.of(generator_for(seed, model, tensor), density)


def kernel_mask(keep: Keep, n: int, first: int) -> np.ndarray:
    """The kernel's keep-mask of entries [first, first + n): base 0, input 1, weight 1, λ 1."""
    out = torch.empty(n)
    form = LinearForm((1.0,), None, 1.0, keeps=(keep,))
    assert fused.linear_combination_into(out, torch.zeros(n), [torch.ones(n)], form, first=first) == -1
    return out.numpy() != 0


def reference_mask(density: float, n: int, first: int, seed: int = 0) -> np.ndarray:
    return dare_mask((n,), density, generator_for(seed, "m", "w"), first, split=False).numpy()


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9, 0.3 + 2.0**-20, 0.25, 1 - 1e-12, 2.0**-33])
@pytest.mark.parametrize("first", [0, 1, 2, 3, 5, 1000, 7 * 262144 + 2])
@pytest.mark.parametrize("n", [1, 2, 7, 1024, 1025, 5000])
def test_keep_draws_are_dare_masks_from_any_offset(density, first, n):
    assert np.array_equal(kernel_mask(Keep(draws(density)), n, first), reference_mask(density, n, first))


def test_the_tie_words_decide_where_the_high_half_is_the_thresholds():
    """At a density whose threshold has a low half, the entries whose 16-bit word equals the threshold's high half
    (about 1 in 65,536) are decided by the tie words: the masks agree there too, and both outcomes occur."""
    density, n = 0.3 + 2.0**-20, 1 << 20
    ceiling = math.ceil(density * UNIFORM_SCALE)
    assert ceiling & 0xFFFF
    generator = generator_for(0, "m", "w")
    words = generator.bit_generator.random_raw(n // 4).view(np.uint16)
    ties = np.flatnonzero(words == ceiling >> 16)
    got, want = kernel_mask(Keep(draws(density)), n, 0), reference_mask(density, n, 0)
    assert ties.size >= 5 and want[ties].any() and not want[ties].all()
    assert np.array_equal(got, want)


@settings(max_examples=60, deadline=None)
@given(density=st.floats(1e-6, 1 - 1e-6), first=st.integers(0, 10**9), n=st.integers(1, 3000), seed=st.integers(0, 2**31))
def test_property_keep_draws_are_dare_masks(density, first, n, seed):
    keep = Keep(DareDraws.of(generator_for(seed, "m", "w"), density))
    assert np.array_equal(kernel_mask(keep, n, first), reference_mask(density, n, first, seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,first", [(1, 0), (67, 3), (5000, 0), (300_001, 11)])
def test_norms_are_float64_l1_norms_before_and_after_the_draws(dtype, n, first):
    base = values(n, dtype, 1)
    inputs = [values(n, dtype, s) for s in (2, 3)]
    keeps = [Keep(draws(0.37, tensor="a")), Keep(None)]
    norms, bad = fused.dare_norms(base, inputs, keeps, first=first)
    assert bad == -1
    for x, keep, (before, after) in zip(inputs, keeps, norms):
        tau = (x.float() - base.float()).double().abs()
        mask = torch.ones(n, dtype=torch.bool) if keep.draws is None else dare_mask((n,), 0.37, generator_for(0, "m", "a"), first, split=False)
        assert before == pytest.approx(float(tau.sum()), rel=1e-13, abs=0)
        assert after == pytest.approx(float(tau[mask].sum()), rel=1e-13, abs=0)


def torch_steps(base: torch.Tensor, inputs: list[torch.Tensor], form: LinearForm, masks: list[torch.Tensor | None]) -> torch.Tensor:
    """The torch path's operations in its order (Kept.apply, then the weighted sum, then θ_0 + λ·sum): τ = x − θ_0,
    times the 0/1 mask, times the factor or divided by the density, scaled or added with add(alpha=)."""
    b = base.to(torch.float32, copy=True)
    total = None
    for w, x, keep, mask in zip(form.weights, inputs, form.keeps, masks):
        d = x.to(torch.float32, copy=True).sub_(b)
        if mask is not None:
            d.mul_(mask)
        if keep.scale == "mul":
            d.mul_(keep.by)
        elif keep.scale == "div":
            d.div_(keep.by)
        total = d.mul_(w) if total is None else total.add_(d, alpha=w)
    if form.divisor is not None:
        total.div_(form.divisor)
    return b.add_(total, alpha=form.lam)


@pytest.mark.parametrize("n,first", [(1, 0), (67, 1), (1024, 0), (5003, 262144)])
@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("scales", [(None, None, None), ("mul", "div", None), ("div", "mul", "mul")])
@pytest.mark.parametrize("divisor", [None, 1.75])
def test_masked_combination_is_the_bytes_of_the_torch_operations(n, first, in_dtype, out_dtype, scales, divisor):
    base = values(n, in_dtype, 0)
    inputs = [values(n, in_dtype, s) for s in (1, 2, 3)]
    densities = (0.1, 0.55, None)  # the last keeps everything
    keeps = tuple(Keep(None if d is None else draws(d, tensor=str(t)), s, 1.37 if s == "mul" else (d or 0.8) if s == "div" else 0.0)
                  for t, (d, s) in enumerate(zip(densities, scales)))
    form = LinearForm((1.0, -0.7, 0.3), divisor, 0.8, keeps=keeps)
    masks = [None if d is None else dare_mask((n,), d, generator_for(0, "m", str(t)), first, split=False)
             for t, d in enumerate(densities)]
    out = torch.empty(n, dtype=out_dtype)
    assert fused.linear_combination_into(out, base, inputs, form, first=first) == -1
    assert torch.equal(bits(out), bits(torch_steps(base, inputs, form, masks).to(out_dtype)))


def test_portable_and_vector_code_give_the_same_bytes_and_norms():
    n = 100_003
    base = values(n, torch.bfloat16, 0)
    inputs = [values(n, torch.bfloat16, s) for s in (1, 2)]
    keeps = (Keep(draws(0.2, tensor="x")), Keep(draws(0.6, tensor="y")))
    form = LinearForm((0.6, 0.4), None, 1.0, keeps=(Keep(keeps[0].draws, "mul", 1.9), Keep(keeps[1].draws, "div", 0.6)))
    results = []
    for level in (2, 0):  # the fastest code the CPU has, the portable code
        fused._fused._max_isa(level)
        try:
            out = torch.empty(n, dtype=torch.bfloat16)
            fused.linear_combination_into(out, base, inputs, form, first=5)
            results.append((bits(out), fused.dare_norms(base, inputs, keeps, first=5)))
        finally:
            fused._fused._max_isa(2)
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]


@pytest.mark.parametrize("n,first", [(1, 0), (13, 5), (1024, 0), (5003, 262144)])
def test_masks_written_by_the_norms_pass_give_the_drawn_combination(n, first):
    """The second pass reads the keep-masks the first wrote (one bit per entry) instead of drawing again: the same
    bytes, and the masks are the draws' bits, entry j at bit j mod 8 of byte j // 8."""
    base = values(n, torch.bfloat16, 0)
    inputs = [values(n, torch.bfloat16, s) for s in (1, 2)]
    keeps = (Keep(draws(0.3 + 2.0**-20, tensor="p")), Keep(None))
    masks = [torch.full((fused.mask_bytes(n),), 0xA5, dtype=torch.uint8), None]
    fused.dare_norms(base, inputs, keeps, first=first, masks_out=masks)
    expected_bits = np.packbits(reference_mask_of("p", 0.3 + 2.0**-20, n, first), bitorder="little")
    assert np.array_equal(masks[0].numpy(), expected_bits)
    form = LinearForm((0.5, 2.0), None, 0.7, keeps=(Keep(keeps[0].draws, "mul", 1.7), Keep(None)))
    drawn, read = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    fused.linear_combination_into(drawn, base, inputs, form, first=first)
    fused.linear_combination_into(read, base, inputs, form, first=first, masks=masks)
    assert torch.equal(bits(drawn), bits(read))
    with pytest.raises(ValueError, match="keep-masks"):
        fused.linear_combination_into(read, base, inputs, form, first=first, masks=[torch.empty(0, dtype=torch.uint8), None])


def reference_mask_of(tensor: str, density: float, n: int, first: int) -> np.ndarray:
    return dare_mask((n,), density, generator_for(0, "m", tensor), first, split=False).numpy()


@pytest.mark.parametrize("n", [1, 67, 1024, 5003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_keep_is_the_bytes_of_arcee_fusions_torch_operations(n, dtype):
    """A keep gated by float32 values (Arcee Fusion's importance ≥ its threshold): θ_base + (θ_other − θ_base)·keep,
    as torch's sub_, mul_ by the comparison, add_; values equal to the threshold kept, a NaN not."""
    base, other = values(n, dtype, 0), values(n, dtype, 1)
    gate = torch.randn(n, generator=torch.Generator().manual_seed(2))
    threshold = 0.25
    gate[::4] = threshold
    gate[1::9] = float("nan")
    form = LinearForm((1.0,), None, 1.0, keeps=(Keep(None, gate_min=threshold),))
    out = torch.empty(n, dtype=dtype)
    assert fused.linear_combination_into(out, base, [other], form, gates=[gate]) == -1
    b = base.float()
    expected = b.clone().add_(other.float().sub_(b).mul_(gate >= torch.tensor(threshold)))
    assert torch.equal(bits(out), bits(expected.to(dtype)))
    with pytest.raises(ValueError, match="gates"):
        fused.linear_combination_into(out, base, [other], form)
    with pytest.raises(ValueError, match="gates"):
        fused.linear_combination_into(out, base, [other], form, gates=[gate[:-1] if n > 1 else gate.double()])


def test_norms_find_non_finite_entries():
    base, x = torch.zeros(100), torch.ones(100)
    x[40] = float("nan")
    assert fused.dare_norms(base, [torch.ones(100), x], [Keep(None), Keep(draws(0.5))])[1] == 2
    base[3] = float("inf")
    assert fused.dare_norms(base, [x], [Keep(None)])[1] == 0


def test_with_norms_fixes_the_l1_factor_as_the_torch_rule_does():
    form = LinearForm((1.0, 1.0, 1.0), None, 1.0, keeps=(Keep(draws(0.5), "l1", l1_eps=1e-7), Keep(draws(0.5), "l1", l1_eps=1e-7), Keep(None)))
    fixed = form.with_norms([(3.0, 1.5), (1.0, 1e-9), (5.0, 5.0)])
    assert [(k.scale, k.by) for k in fixed.keeps] == [("mul", 2.0), (None, 0.0), (None, 0.0)]
    assert not fixed.needs_norms and form.needs_norms
    assert fixed.rounding_key() != form.rounding_key()
    other = LinearForm(form.weights, None, 1.0, keeps=(Keep(draws(0.5, seed=9), "l1", l1_eps=1e-7),) * 2 + (Keep(None),))
    assert other.rounding_key() == form.rounding_key()  # the draws' states do not change the roundings


def test_refuses_an_unfixed_l1_rescale_and_keeps_without_a_base():
    keep = Keep(draws(0.5), "l1", l1_eps=1e-7)
    with pytest.raises(ValueError, match="with_norms"):
        fused.linear_combination_into(torch.empty(4), torch.zeros(4), [torch.ones(4)], LinearForm((1.0,), None, 1.0, keeps=(keep,)))
    with pytest.raises(ValueError):
        fused.linear_combination_into(torch.empty(4), None, [torch.ones(4)], LinearForm((1.0,), None, None, keeps=(Keep(None),)))


# -- whole merges --------------------------------------------------------------------------------
def _dare(demo, out, params, monkeypatch, native_on: bool, model_params=None):
    monkeypatch.setenv("MERGEKIT_LITE_NATIVE", "1" if native_on else "0")
    data = ta_recipe(demo, merge_method="dare_linear", parameters={"lambda": 0.9, **params})
    for m, p in zip(data["models"], model_params or ({"density": 0.3}, {"density": 0.6}, {"density": 1.0})):
        m["parameters"].update(p)
    return load_state(mergekit_lite.run(Recipe.model_validate(data), out, progress=False))


def _count_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = fused.linear_combination_into
    monkeypatch.setattr(fused, "linear_combination_into", lambda *a, **k: calls.append(a[0].numel()) or original(*a, **k))
    return calls


def _small_chunks(monkeypatch) -> None:
    monkeypatch.setattr(execute, "two_phase_min_entries", lambda: 7)  # every tensor of 7+ entries by row chunks
    monkeypatch.setattr(execute, "two_phase_chunk_entries", lambda: 24)
    monkeypatch.setattr(execute, "FUSED_CHUNK_ENTRIES", 50)  # the kernel in uneven chunks, on both threads


@pytest.mark.parametrize("params", [{"rescale": False}, {"rescale_rule": "density"}, {"rescale_rule": "density", "normalize": True}])
@pytest.mark.parametrize("fixture", ["demo", "demo_bf16"])
def test_dare_linear_without_the_l1_rescale_is_identical_with_the_kernel_on_and_off(request, tmp_path, monkeypatch, params, fixture):
    demo = request.getfixturevalue(fixture)
    _small_chunks(monkeypatch)
    calls = _count_calls(monkeypatch)
    torch_out = _dare(demo, tmp_path / "torch", params, monkeypatch, native_on=False)
    assert not calls
    native_out = _dare(demo, tmp_path / "native", params, monkeypatch, native_on=True)
    assert any(n != execute.FUSED_SAMPLE_ENTRIES for n in calls)
    for name in torch_out:
        assert torch.equal(bits(torch_out[name]), bits(native_out[name])), name


@pytest.mark.parametrize("fixture", ["demo", "demo_bf16"])
def test_dare_linear_with_the_l1_rescale_agrees_with_the_torch_path_to_a_rounding(request, tmp_path, monkeypatch, fixture):
    """The same masks (the same dropped entries), the factor from float64 norms: the outputs agree to about a
    rounding of their dtype, and the kernel's merge is the same on one thread and on two."""
    demo = request.getfixturevalue(fixture)
    _small_chunks(monkeypatch)
    calls = _count_calls(monkeypatch)
    torch_out = _dare(demo, tmp_path / "torch", {}, monkeypatch, native_on=False)
    native_out = _dare(demo, tmp_path / "native", {}, monkeypatch, native_on=True)
    assert any(n != execute.FUSED_SAMPLE_ENTRIES for n in calls)
    base = load_state(demo["base"])
    for name in torch_out:
        tol = dict(rtol=2**-7, atol=1e-6) if torch_out[name].dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(native_out[name].float(), torch_out[name].float(), **tol, msg=name)
    changed = sum(int((native_out[n] != base[n]).sum()) for n in native_out if n in base)
    assert changed > 0
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = _dare(demo, tmp_path / "one", {}, monkeypatch, native_on=True)
    finally:
        torch.set_num_threads(before)
    for name in native_out:
        assert torch.equal(bits(one_thread[name]), bits(native_out[name])), name


def test_a_model_that_keeps_nothing_leaves_dare_linear_to_torch(demo, tmp_path, monkeypatch):
    _small_chunks(monkeypatch)
    calls = _count_calls(monkeypatch)
    _dare(demo, tmp_path / "out", {}, monkeypatch, native_on=True, model_params=({"density": 0.0}, {"density": 0.5}, {"density": 0.5}))
    assert not calls


def _spans_of(tmp_path, tensors: list[torch.Tensor], lead: int = 13) -> tuple[list[fused.Span], list[int]]:
    """The tensors' bytes in one file after ``lead`` bytes (an odd start), and each as a span; the open descriptor."""
    path = tmp_path / "stored.bin"
    blobs = [t.reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors]
    path.write_bytes(b"x" * lead + b"".join(blobs))
    fd = os.open(path, os.O_RDONLY)
    spans, position = [], lead
    for t, blob in zip(tensors, blobs):
        spans.append(fused.Span(fd, position, t.dtype))
        position += len(blob)
    return spans, [fd]


@pytest.mark.parametrize("n", [1, 1000, 16384, 16385, 40_003])
def test_the_kernel_reading_files_itself_gives_the_bytes_it_gives_from_memory(tmp_path, n):
    """Spans instead of tensors: the kernel reads stretches of the files itself (16 Ki entries at a time); the Gram
    matrix, the sum, DARE's norms and the masks they write, the combination (DARE's draws, masks read back, a gate
    included) are those from memory."""
    base = values(n, torch.bfloat16, 0)
    inputs = [values(n, torch.bfloat16, 1), values(n, torch.float32, 2), values(n, torch.bfloat16, 3)]
    spans, fds = _spans_of(tmp_path, [base, *inputs])
    try:
        for b, b_span in ((base, spans[0]), (None, None)):
            sums = torch.empty(n), torch.empty(n)
            from_memory = fused.gram(b, inputs, sums[0])
            from_files = fused.gram(b_span, spans[1:], sums[1], n=n)
            assert torch.equal(from_memory[0], from_files[0]) and from_memory[1] == from_files[1] and torch.equal(bits(sums[0]), bits(sums[1]))
        keeps = (Keep(draws(0.3, tensor="a"), "mul", 1.7), Keep(None), Keep(draws(0.6, tensor="b"), "div", 0.6))
        gate = torch.randn(n)
        forms = [LinearForm((0.5, -1.0, 2.0), 3.0, 0.8, post_scale=1.3), LinearForm((0.5, -1.0, 2.0), None, 1.0, keeps=keeps),
                 LinearForm((1.0, 1.0, 1.0), None, 0.4, keeps=(Keep(None), Keep(None, gate_min=0.1), Keep(None)))]
        for form in forms:
            gates = [None, gate, None] if form.keeps is not None and form.keeps[1].gate_min is not None else None
            outs = [torch.empty(n, dtype=torch.bfloat16) for _ in range(2)]
            masks = [[None if k.draws is None else torch.zeros(fused.mask_bytes(n), dtype=torch.uint8) for k in keeps] for _ in range(2)]
            norms = [fused.dare_norms(base, inputs, keeps, first=7, masks_out=masks[0]),
                     fused.dare_norms(spans[0], spans[1:], keeps, first=7, masks_out=masks[1], n=n)]
            assert norms[0] == norms[1] and all(a is None or torch.equal(a, b) for a, b in zip(*masks))
            assert fused.linear_combination_into(outs[0], base, inputs, form, first=7, gates=gates) == -1
            assert fused.linear_combination_into(outs[1], spans[0], spans[1:], form, first=7, gates=gates) == -1
            assert torch.equal(bits(outs[0]), bits(outs[1]))
            if form.keeps is keeps:  # the masks the norms pass wrote, read back in stretches
                again = torch.empty(n, dtype=torch.bfloat16)
                assert fused.linear_combination_into(again, spans[0], spans[1:], form, first=7, masks=masks[0]) == -1
                assert torch.equal(bits(again), bits(outs[0]))
        mixed = torch.empty(n, dtype=torch.bfloat16)  # a sum in memory beside a base in a file (Model Stock's output pass)
        given = LinearForm((1.0,), 8.0, 1.0, post_scale=0.7, given_task_vectors=True)
        fused.linear_combination_into(mixed, spans[0], [inputs[1]], given)
        want = torch.empty(n, dtype=torch.bfloat16)
        fused.linear_combination_into(want, base, [inputs[1]], given)
        assert torch.equal(bits(mixed), bits(want))
    finally:
        for fd in fds:
            os.close(fd)


def test_a_read_the_kernel_cannot_make_is_a_read_failure_naming_the_input(tmp_path):
    base, x = values(3000, torch.bfloat16, 0), values(3000, torch.bfloat16, 1)
    spans, fds = _spans_of(tmp_path, [base, x])
    try:
        past_the_end = fused.Span(spans[1].fd, spans[1].position + 100, torch.bfloat16)
        with pytest.raises(fused.ReadFailed) as failure:
            fused.linear_combination_into(torch.empty(3000), spans[0], [past_the_end], LinearForm((1.0,), None, 1.0))
        assert (failure.value.index, failure.value.errno) == (1, -1)
        with pytest.raises(fused.ReadFailed) as failure:
            fused.gram(None, [spans[1], past_the_end], n=3000)
        assert (failure.value.index, failure.value.errno) == (2, -1)
    finally:
        for fd in fds:
            os.close(fd)
    with pytest.raises(fused.ReadFailed) as failure:  # the descriptor closed
        fused.gram(spans[0], [spans[1]], n=3000)
    assert failure.value.index == 0 and failure.value.errno == errno.EBADF


def test_a_file_truncated_during_a_merge_is_one_clear_error(demo_bf16, tmp_path, monkeypatch):
    """The kernel reads the stored bytes itself: a shard cut short after the plan opened it stops the merge with the
    reader's one-line error, naming the file and the tensor, and nothing is written."""
    from mergekit_lite.errors import CheckpointError

    copies = {}
    for name in ("base", "math", "code"):
        copies[name] = tmp_path / name
        shutil.copytree(demo_bf16[name], copies[name])
    data = {"merge_method": "task_arithmetic", "base_model": str(copies["base"]), "dtype": "float32",
            "models": [{"model": str(copies["math"]), "parameters": {"weight": 1.0}}, {"model": str(copies["code"]), "parameters": {"weight": 0.5}}]}
    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 7)
    original = execute._spans_of
    cut = []

    def truncating(sources, *args, **kwargs):  # just before the kernel's first reads
        if not cut:
            shard = next((copies["code"]).glob("*.safetensors"))
            os.truncate(shard, 1000)
            cut.append(shard)
        return original(sources, *args, **kwargs)

    monkeypatch.setattr(execute, "_spans_of", truncating)
    with pytest.raises(CheckpointError, match=r"safetensors: file ended while reading tensor .*truncated"):
        mergekit_lite.run(Recipe.model_validate(data), tmp_path / "out", progress=False)
    assert cut and not (tmp_path / "out").exists()


def test_a_failed_kernel_read_that_reads_again_is_still_one_clear_error(demo_bf16, tmp_path, monkeypatch):
    """Where the kernel's read failed (an I/O error) but the reader's own read of the same bytes then succeeds, the
    merge still stops with one line naming the checkpoint, the tensor, the entries and the error."""
    from mergekit_lite.errors import CheckpointError

    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 7)

    def failing(*args, **kwargs):
        raise fused.ReadFailed(1, errno.EIO)

    monkeypatch.setattr(execute.fused, "linear_combination_into", failing)
    monkeypatch.setattr(execute, "_kernel_matches", lambda *a, **k: True)
    data = {"merge_method": "task_arithmetic", "base_model": str(demo_bf16["base"]),
            "models": [{"model": str(demo_bf16["math"]), "parameters": {"weight": 1.0}}]}
    with pytest.raises(CheckpointError, match=r"math: could not read entries 0-\d+ of tensor .+: Input/output error; the file may be truncated"):
        mergekit_lite.run(Recipe.model_validate(data), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_gram_of_chunks_on_the_kernels_threads_adds_the_chunks_matrices_in_chunk_order(tmp_path, threads):
    """One call with chunks: each chunk's matrix (and sum) is what a call on that chunk alone gives, the matrices
    added in chunk order from zero (as torch's add_ would), on any thread count, from memory or from files."""
    n = 40_003
    base = values(n, torch.bfloat16, 0)
    inputs = [values(n, torch.bfloat16, 1), values(n, torch.float32, 2), values(n, torch.bfloat16, 3)]
    cuts = [0, 1, 999, 16_385, 16_386, 33_000, n]
    chunks = list(zip(cuts, cuts[1:]))
    expected_sum = torch.empty(n)
    expected = torch.zeros(3, 3, dtype=torch.float64)
    for start, stop in chunks:
        part, bad = fused.gram(base[start:stop], [x[start:stop] for x in inputs], expected_sum[start:stop])
        assert bad == -1
        expected.add_(part)
    spans, fds = _spans_of(tmp_path, [base, *inputs])
    try:
        for b, xs in ((base, inputs), (spans[0], spans[1:])):
            got_sum = torch.empty(n)
            got, bad = fused.gram(b, xs, got_sum, n=n, chunks=chunks, threads=threads)
            assert bad == -1 and torch.equal(got, expected) and torch.equal(bits(got_sum), bits(expected_sum))
        past_the_end = fused.Span(spans[-1].fd, spans[-1].position + 100, torch.bfloat16)  # the file ends in the last chunk
        with pytest.raises(fused.ReadFailed) as failure:
            fused.gram(None, [spans[1], past_the_end], n=n, chunks=chunks, threads=threads)
        assert (failure.value.index, failure.value.errno, failure.value.chunk) == (2, -1, chunks[-1])
        with pytest.raises(ValueError, match="consecutive"):
            fused.gram(base, inputs, chunks=[(0, 10), (11, n)])
        with pytest.raises(ValueError, match="increasing"):
            fused.gram(base, inputs, chunks=[(0, 10), (10, n - 1)])
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_combination_in_chunks_on_the_kernels_threads_is_the_one_calls_bytes(tmp_path, threads):
    """Chunks taken by the kernel's threads: entrywise, so the bytes of one call over every entry (DARE's draws from
    the tensor's entry 0, a gate, masks written and read back at chunk starts that are multiples of 8), from memory or
    from files; masks with a chunk start that is not a multiple of 8 are refused."""
    n = 40_003
    base = values(n, torch.bfloat16, 0)
    inputs = [values(n, torch.bfloat16, 1), values(n, torch.float32, 2), values(n, torch.bfloat16, 3)]
    cuts = [0, 8, 1000, 16_384, 16_392, 33_000, n]
    chunks = list(zip(cuts, cuts[1:]))
    keeps = (Keep(draws(0.3, tensor="a"), "mul", 1.7), Keep(None), Keep(draws(0.6, tensor="b"), "div", 0.6))
    gate = torch.randn(n)
    forms = [LinearForm((0.5, -1.0, 2.0), 3.0, 0.8, post_scale=1.3), LinearForm((0.5, -1.0, 2.0), None, 1.0, keeps=keeps),
             LinearForm((1.0, 1.0, 1.0), None, 0.4, keeps=(Keep(None), Keep(None, gate_min=0.1), Keep(None)))]
    spans, fds = _spans_of(tmp_path, [base, *inputs])
    try:
        for form in forms:
            gates = [None, gate, None] if form.keeps is not None and form.keeps[1].gate_min is not None else None
            want = torch.empty(n, dtype=torch.bfloat16)
            assert fused.linear_combination_into(want, base, inputs, form, gates=gates) == -1
            for b, xs in ((base, inputs), (spans[0], spans[1:])):
                got = torch.empty(n, dtype=torch.bfloat16)
                assert fused.linear_combination_into(got, b, xs, form, gates=gates, chunks=chunks, threads=threads) == -1
                assert torch.equal(bits(got), bits(want))
        masks = [None if k.draws is None else torch.zeros(fused.mask_bytes(n), dtype=torch.uint8) for k in keeps]
        fused.dare_norms(base, inputs, keeps, masks_out=masks)
        again = torch.empty(n, dtype=torch.bfloat16)
        assert fused.linear_combination_into(again, spans[0], spans[1:], forms[1], masks=masks, chunks=chunks, threads=threads) == -1
        want = torch.empty(n, dtype=torch.bfloat16)
        fused.linear_combination_into(want, base, inputs, forms[1])
        assert torch.equal(bits(again), bits(want))
        with pytest.raises(ValueError, match="multiples of 8"):
            fused.linear_combination_into(again, base, inputs, forms[1], masks=masks, chunks=[(0, 9), (9, n)], threads=threads)
        past_the_end = fused.Span(spans[-1].fd, spans[-1].position + 100, torch.bfloat16)  # the file ends in the last chunk
        with pytest.raises(fused.ReadFailed) as failure:
            fused.linear_combination_into(torch.empty(n), spans[0], [spans[1], past_the_end], LinearForm((1.0, 1.0), None, 1.0),
                                          chunks=chunks, threads=threads)
        assert (failure.value.index, failure.value.errno, failure.value.chunk) == (2, -1, chunks[-1])
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("n", [1, 15, 16, 1023, 1024, 5000, 300_001])
def test_abs_sums_are_dare_norms_floats_for_the_same_task_vector(n):
    """The L1 norms of a task vector already made (``fused.abs_sums``, the torch path's ``l1_norms``) are the very
    floats of the native DARE pass's norms for the base and input it came from: the same lanes, the same order."""
    base, x = values(n, torch.float32, 1), values(n, torch.float32, 2)
    keep = Keep(draws(0.37, tensor="a"))
    norms, bad = fused.dare_norms(base, [x], [keep], first=0)
    assert bad == -1
    mask = dare_mask((n,), 0.37, generator_for(0, "m", "a"), 0, split=False)
    tau = x - base
    assert fused.abs_sums(tau, mask) == tuple(norms[0])
    assert fused.abs_sums(tau)[0] == norms[0][0]
    from mergekit_lite.ops.sparsify import l1_norm, l1_norms

    assert l1_norms(tau, mask) == tuple(norms[0]) and l1_norm(tau) == norms[0][0] and l1_norm(tau, mask) == norms[0][1]
