"""Two-phase methods on row chunks: the same bits as on held task vectors (Model Stock: the same up to
the order its dot products are summed in), and row reads that read the right bytes.

The held path is the one checked against dense references and mergekit elsewhere (test_methods,
tests/compat); here large tensors are forced through the re-read row chunks (``ROW_CHUNK_ENTRIES``
tiny, so chunks of one to a few rows, uneven at the end) and must give identical outputs.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergekit_lite
from mergekit_lite import Recipe, execute
from mergekit_lite.checkpoint import open_checkpoint
from mergekit_lite.methods.base import METHODS, row_chunks
from mergekit_lite.ops import fused

from helpers import DEMO_TASKS, load_state, ta_recipe

WEIGHTS = (1.0, 0.5, -0.25)

CASES = [
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.3, "rescale": True}),
    ("ties", {"density": 0.3, "rescale": True, "rescale_rule": "density", "merge": "max"}),
    ("ties", {"density": 0.2, "scope": "model", "normalize": False}),
    ("ties", {"density": 1.0}),
    ("ties", {"density": 0.0}),
    ("dare_ties", {"density": 0.5, "seed": 3}),
    ("dare_ties", {"density": 0.5, "rescale_rule": "density", "merge": "sum"}),
    ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.05}),
    ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.05, "scope": "row", "rescale": True}),
    ("della", {"density": 0.5, "epsilon": 0.2}),
    ("della", {"density": 0.5, "epsilon": 0.2, "rescale_rule": "density"}),
    ("consensus", {"consensus_k": 2}),
    ("consensus_ta", {"consensus_k": 1, "tall_lambda": 0.6}),
    ("consensus_ties", {"consensus_k": 2}),
    ("sce", {"select_topk": 0.3}),
    ("sce", {"select_topk": 1.0, "merge": "sum"}),
    ("sce", {"select_topk": 0.0}),
    ("task_arithmetic", {"normalize": True}),
    ("breadcrumbs", {"density": 0.4, "gamma": 0.05}),
    ("breadcrumbs", {"density": 0.4, "gamma": 0.05, "scope": "row", "rescale": True}),
    ("dare_linear", {"density": 0.5, "seed": 3}),
    ("dare_linear", {"density": 0.5, "rescale": False, "normalize": True}),
    ("dare_linear", {"density": 0.4, "rescale_rule": "density"}),
    ("dare_linear", {"density": 1.0}),
    ("della_linear", {"density": 0.5, "epsilon": 0.2}),
    ("della_linear", {"density": 0.5, "epsilon": 0.2, "rescale": False}),
    ("della_linear", {"density": 0.5, "epsilon": 0.2, "rescale_rule": "density"}),
    ("model_stock", {}),
    ("model_stock", {"filter_wise": True}),
    ("iso_cts", {"common_space_fraction": 0.5}),
    # epsilon near the demo's changes: entries that no, one or several models changed (unique entries boosted)
    ("ramplus_tl", {"epsilon": 0.003}),
    ("ramplus_tl", {"epsilon": 0.001, "r": 0.5, "alpha": 3.0}),
    ("ramplus_tl", {"epsilon": 0.003, "scope": "model", "r": 0.2, "alpha": 1.0}),
    ("ramplus_tl", {"r": 0.0}),
]


def test_every_two_phase_method_is_covered():
    two_phase = {name for name, m in METHODS.items() if m.combine_rows is not None}
    assert two_phase == {name for name, _ in CASES}


def _l1_rescaled_by_rows(method: str, params: dict) -> bool:
    """Members whose masks are made by rows, L1-rescaled: their norms are added up over row chunks."""
    return method in ("dare_linear", "della_linear", "dare_ties", "della") and params.get("rescale", True) and params.get("rescale_rule", "l1") == "l1"


#: methods that take exactly one (two) models besides the base: merged with the first demo fine-tune(s) only
PAIRWISE = {"nearswap": 1, "slerp": 1, "nuslerp": 2, "passthrough": 1}


def _merge(demo: dict[str, Path], out: Path, method: str, params: dict, dtype: str | None = None) -> dict[str, torch.Tensor]:
    data = ta_recipe(demo, merge_method=method, parameters={"lambda": 0.8, **params})
    if method in PAIRWISE:
        models = data["models"][: PAIRWISE[method]]
        data["models"] = models if method == "nuslerp" else [{"model": m["model"]} for m in models]
        data["parameters"] = dict(params)
        if method == "passthrough":  # one model, no base
            data.pop("base_model")
    if dtype:
        data["dtype"] = dtype
    return load_state(mergekit_lite.run(Recipe.model_validate(data), out, progress=False))


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_row_chunks_give_the_held_path_bits(demo, tmp_path, monkeypatch, method, params):
    if METHODS[method].entrywise(params):  # task arithmetic: its two-phase form too
        monkeypatch.setitem(METHODS, method, dataclasses.replace(METHODS[method], entrywise=lambda params: False))
    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 1 << 40)  # nothing in row chunks
    held = _merge(demo, tmp_path / "held", method, params)
    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 7)  # everything of 7+ entries in chunks of 1–7 rows
    chunked = _merge(demo, tmp_path / "chunked", method, params)
    assert set(held) == set(chunked)
    for name in held:
        if method == "model_stock":  # its dot products add up chunk by chunk: the same sums, rounded in another order
            torch.testing.assert_close(chunked[name], held[name], rtol=1e-6, atol=1e-7, msg=name)
        elif _l1_rescaled_by_rows(method, params):
            # the same masks; each task's L1 norm is added up (in float64) over other blocks: the float32 factor
            # may differ in its last bit
            torch.testing.assert_close(chunked[name], held[name], rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(held[name], chunked[name]), name


def test_row_chunks_in_bfloat16_inputs(demo_bf16, tmp_path, monkeypatch):
    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 1 << 40)
    held = _merge(demo_bf16, tmp_path / "held", "ties", {"density": 0.4, "rescale": True})
    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 16)
    chunked = _merge(demo_bf16, tmp_path / "chunked", "ties", {"density": 0.4, "rescale": True})
    for name in held:
        assert held[name].dtype == torch.bfloat16
        assert torch.equal(held[name], chunked[name]), name


def test_chunked_merge_reads_each_input_at_most_twice(demo, tmp_path, monkeypatch):
    """Phase 1 reads whole tensors once, phase 2 only rows: no input is read whole a second time."""
    from mergekit_lite import checkpoint as ckpt_module

    whole: dict[str, int] = {}
    original = ckpt_module.Checkpoint.get

    def counting(self, name):
        whole[f"{self.ref}:{name}"] = whole.get(f"{self.ref}:{name}", 0) + 1
        return original(self, name)

    rows: list[tuple[int, int]] = []
    original_rows = ckpt_module.Checkpoint.get_rows

    def counting_rows(self, name, start, stop):
        rows.append((start, stop))
        return original_rows(self, name, start, stop)

    monkeypatch.setattr(ckpt_module.Checkpoint, "get", counting)
    monkeypatch.setattr(ckpt_module.Checkpoint, "get_rows", counting_rows)
    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 7)
    _merge(demo, tmp_path / "out", "ties", {"density": 0.3})
    assert whole and max(whole.values()) == 1
    assert len(rows) > 3 * 10 and all(b - a <= 7 for a, b in rows)  # the fine-tunes' rows, in small chunks


ENTRYWISE = [
    ("task_arithmetic", {}),
    ("task_arithmetic", {"normalize": True}),
    ("linear", {}),
    ("linear", {"normalize": False}),
    ("ram", {}),
    ("ram", {"epsilon": 0.02}),
    ("nearswap", {"t": 0.02}),
    ("passthrough", {}),
    ("passthrough", {"scale": 0.37}),
]


def test_every_entrywise_method_is_covered():
    assert {name for name, m in METHODS.items() if m.entrywise({})} == {name for name, _ in ENTRYWISE}


def _dense(demo: dict[str, Path], method: str, params: dict) -> dict[str, torch.Tensor]:
    """The merge written out plainly over whole float32 tensors (the recipe's weights, λ = 0.8)."""
    from helpers import DEMO_TASKS

    base = load_state(demo["base"])
    models = [load_state(demo[t]) for t in DEMO_TASKS]
    out = {}
    for name, b in base.items():
        xs = [m[name].float() for m in models]
        if method == "task_arithmetic":
            total = sum(w * (x - b.float()) for w, x in zip(WEIGHTS, xs))
            if params.get("normalize"):
                total = total / sum(WEIGHTS)
            out[name] = (b.float() + 0.8 * total).to(b.dtype)
        elif method == "nearswap":  # w = clamp(t / |θ_base − θ_1|, 0, 1) per entry, θ = w·θ_1 + (1 − w)·θ_base
            w = (params["t"] / (b.float() - xs[0]).abs().clamp(min=1e-6)).clamp(0, 1)
            out[name] = (w * xs[0] + (1 - w) * b.float()).to(b.dtype)
        elif method == "passthrough":  # the first model's tensor times scale
            out[name] = (xs[0] * params.get("scale", 1.0)).to(b.dtype)
        elif method == "ram":  # changed entries (|τ| > ε) averaged over the tasks that changed them; no weights, no λ
            taus = [x - b.float() for x in xs]
            epsilon = params.get("epsilon", 1e-5)
            total = sum(torch.where(tau.abs() > epsilon, tau, torch.zeros(())) for tau in taus)
            count = sum((tau.abs() > epsilon).float() for tau in taus)
            out[name] = (b.float() + total / count.clamp(min=1)).to(b.dtype)
        else:  # the base is an input too (mergekit's rule), at weight 1
            weights = (*WEIGHTS, 1.0)
            total = sum(w * x for w, x in zip(weights, [*xs, b.float()]))
            out[name] = (total / sum(weights) if params.get("normalize", True) else total).to(b.dtype)
    return out


@pytest.mark.parametrize("method,params", ENTRYWISE, ids=[f"{m}-{i}" for i, (m, _) in enumerate(ENTRYWISE)])
@pytest.mark.parametrize("fixture", ["demo", "demo_bf16"])
def test_entrywise_row_chunks_give_the_whole_tensor_bits(request, tmp_path, monkeypatch, method, params, fixture):
    """An entrywise method's large tensors are made from re-read rows, chunk by chunk: the same bits as whole."""
    demo = request.getfixturevalue(fixture)
    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 1 << 40)
    whole = _merge(demo, tmp_path / "whole", method, params)
    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 7)
    calls = []
    monkeypatch.setattr(execute, "entrywise_output", lambda *a, real=execute.entrywise_output: calls.append(1) or real(*a))
    chunked = _merge(demo, tmp_path / "chunked", method, params)
    unchanged = method == "passthrough" and params.get("scale", 1.0) == 1.0  # the stored tensors handed on (next test)
    assert bool(calls) != unchanged  # the chunked path ran
    dense = _dense(demo, method, params)
    assert set(whole) == set(chunked) == set(dense)
    for name in whole:
        assert torch.equal(whole[name], chunked[name]), name
        tol = dict(rtol=8e-3, atol=1e-5) if dense[name].dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)  # one bf16 rounding apart at most
        torch.testing.assert_close(chunked[name].float(), dense[name].float(), **tol, msg=name)


@pytest.mark.parametrize("fixture", ["demo", "demo_bf16"])
def test_passthrough_at_scale_one_hands_on_the_stored_tensors(request, tmp_path, monkeypatch, fixture):
    """Passthrough at scale 1 writes each stored tensor itself (no working copy): the input's very bytes, a NaN
    still refused; a compute dtype that would round the inputs takes the method's own path."""
    demo = request.getfixturevalue(fixture)
    handed: list[bool] = []
    real = execute._unchanged_input

    def spy(*args):
        tensor = real(*args)
        handed.append(tensor is not None)
        return tensor

    monkeypatch.setattr(execute, "_unchanged_input", spy)
    merged = _merge(demo, tmp_path / "out", "passthrough", {})
    first = load_state(demo[DEMO_TASKS[0]])
    assert handed and all(handed) and set(merged) == set(first)
    for name, tensor in merged.items():
        assert tensor.dtype == first[name].dtype and torch.equal(tensor.view(torch.uint8), first[name].view(torch.uint8)), name
    if fixture == "demo":  # float32 inputs through a bfloat16 compute dtype: rounded, as mergekit's dtype does
        handed.clear()
        rounded = _merge(demo, tmp_path / "rounded", "passthrough", {}, dtype="bfloat16")
        assert handed and not any(handed)
        for name, tensor in rounded.items():
            assert torch.equal(tensor.float(), first[name].bfloat16().float()), name
    poisoned = tmp_path / "poisoned"
    shutil.copytree(demo[DEMO_TASKS[0]], poisoned)
    shard = sorted(poisoned.glob("*.safetensors"))[0]
    state = load_file(str(shard))
    name = sorted(state)[0]
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(shard))
    with pytest.raises(mergekit_lite.MergeKitLiteError, match=f"tensor {name} has 1 NaN/Inf"):
        _merge({**demo, DEMO_TASKS[0]: poisoned}, tmp_path / "refused", "passthrough", {})


def test_entrywise_row_chunks_read_only_rows_and_each_once(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_LITE_NATIVE", "0")  # the torch path (the native kernel's reads: the next test)
    from mergekit_lite import checkpoint as ckpt_module

    whole: list[str] = []
    original = ckpt_module.Checkpoint.get
    monkeypatch.setattr(ckpt_module.Checkpoint, "get", lambda self, name: whole.append(name) or original(self, name))
    rows: dict[tuple[str, str], list[tuple[int, int]]] = {}
    original_rows = ckpt_module.Checkpoint.get_rows

    def counting_rows(self, name, start, stop):
        rows.setdefault((self.ref, name), []).append((start, stop))
        return original_rows(self, name, start, stop)

    monkeypatch.setattr(ckpt_module.Checkpoint, "get_rows", counting_rows)
    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 7)
    plan = mergekit_lite.plan(Recipe.model_validate(ta_recipe(demo)))
    merged = {job.name: job.out.shape for job in plan.jobs if job.merge and job.out.numel >= 7}
    plan.close()
    _merge(demo, tmp_path / "out", "task_arithmetic", {})
    assert merged and not set(whole) & set(merged)  # no large merged tensor read whole
    for (ref, name), spans in rows.items():
        assert name in merged
        assert sorted(spans) == row_chunks(merged[name], 7), (ref, name)  # every row once, in chunks of ≤ 7 entries (chunks run in parallel)
    assert len(rows) == 4 * len(merged)  # the base and the three fine-tunes


@pytest.mark.skipif(not fused.available(), reason="the native kernel is not built")
@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_native_kernel_reads_every_input_byte_once_in_chunks(demo, tmp_path, monkeypatch, method):
    """The native path has the kernel read each input's stored bytes from its file itself, each byte once, in
    the chunks of ``fused_chunks`` (at most FUSED_CHUNK_ENTRIES entries), and reads no merged tensor whole."""
    from mergekit_lite import checkpoint as ckpt_module

    whole: list[str] = []
    original = ckpt_module.Checkpoint.get
    monkeypatch.setattr(ckpt_module.Checkpoint, "get", lambda self, name: whole.append(name) or original(self, name))
    starts: dict[tuple[int, int], tuple[str, str]] = {}  # (descriptor, position of the data) → (checkpoint, tensor)
    original_span = ckpt_module.Checkpoint.file_span

    def recording_span(self, name):
        where = original_span(self, name)
        starts[where] = (self.ref, name)
        return where

    monkeypatch.setattr(ckpt_module.Checkpoint, "file_span", recording_span)
    read: list[tuple[int, int, int]] = []  # (descriptor, first byte, end) of each span the kernel was given
    original_combination = fused.linear_combination_into

    def recording_combination(out, base, inputs, form, **options):
        for x in [base, *inputs]:
            if isinstance(x, fused.Span):
                for start, stop in options.get("chunks") or [(0, out.numel())]:
                    read.append((x.fd, x.position + start * x.dtype.itemsize, x.position + stop * x.dtype.itemsize))
        return original_combination(out, base, inputs, form, **options)

    monkeypatch.setattr(fused, "linear_combination_into", recording_combination)
    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 7)
    monkeypatch.setattr(execute, "FUSED_CHUNK_ENTRIES", 5)
    data = ta_recipe(demo, merge_method=method)
    plan = mergekit_lite.plan(Recipe.model_validate(data))
    merged = {job.name: job.out.numel * 4 for job in plan.jobs if job.merge and job.out.numel >= 7}  # float32 bytes
    plan.close()
    _merge(demo, tmp_path / "out", method, {})
    assert merged and not set(whole) & set(merged)
    spans: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for fd, begin, end in read:
        (data_fd, data_start), key = max(((where, key) for where, key in starts.items() if where[0] == fd and where[1] <= begin), key=lambda w: w[0][1])
        spans.setdefault(key, []).append((begin - data_start, end - data_start))
    inputs = 4  # the base and three fine-tunes (linear: the base is an input too)
    assert len(spans) == inputs * len(merged)
    for (ref, name), chunks in spans.items():
        nbytes = merged[name]
        assert sorted(chunks) == [(4 * start, 4 * stop) for start, stop in execute.fused_chunks(nbytes // 4)], (ref, name)
        assert max(stop - start for start, stop in chunks) <= 20


@pytest.mark.parametrize(
    "method,params", [("task_arithmetic", {}), ("karcher", {})] + CASES, ids=["entrywise", "karcher"] + [f"{m}-{i}" for i, (m, _) in enumerate(CASES)]
)
def test_row_chunks_refuse_a_non_finite_input_with_its_whole_count(demo, tmp_path, monkeypatch, method, params):
    from safetensors.torch import load_file

    from helpers import copy_checkpoint

    bad = copy_checkpoint(demo["math"], tmp_path / "bad")
    file = next(bad.glob("*.safetensors"))
    state = load_file(str(file))
    name = next(n for n, t in state.items() if t.dim() == 2 and t.shape[0] > 4)
    state[name][1, 0] = float("nan")
    state[name][-1, -1] = float("inf")
    save_file(state, str(file))
    data = ta_recipe(demo, merge_method=method, parameters={"lambda": 0.8, **params})
    data["models"][-1]["model"] = str(bad)  # the last: whole task vectors after the first are read into a reused buffer
    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 7)
    with pytest.raises(mergekit_lite.CheckpointError, match=f"{file.name}: tensor {name} has 2 NaN/Inf value"):
        mergekit_lite.run(Recipe.model_validate(data), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,params", [
    ("slerp", {"t": 0.3}),
    ("slerp", {"t": 0.7}),
    ("nuslerp", {}),
    ("nuslerp", {"nuslerp_flatten": False}),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
])
def test_spherical_pairs_by_row_chunks_hold_no_whole_input(demo, tmp_path, monkeypatch, method, params):
    """slerp and nuslerp read large tensors by rows (two passes: the Gram matrix, then the interpolation) and give
    the held path's numbers up to the order of the norms' float64 sums; only along the first dimension
    (nuslerp_row_wise) are inputs read whole."""
    from mergekit_lite import checkpoint as ckpt_module

    whole: list[str] = []
    original = ckpt_module.Checkpoint.get
    monkeypatch.setattr(ckpt_module.Checkpoint, "get", lambda self, name: whole.append(name) or original(self, name))
    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 1 << 40)
    held = _merge(demo, tmp_path / "held", method, params)
    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 7)
    whole.clear()
    chunked = _merge(demo, tmp_path / "chunked", method, params)
    big = [name for name, t in held.items() if t.numel() >= 7 and t.dim() > 0]
    assert big
    read_whole = set(whole) & set(big)
    along_first = {name for name in big if held[name].dim() > 1} if params.get("nuslerp_row_wise") else set()  # rank 1: one vector
    assert read_whole == along_first, sorted(read_whole ^ along_first)[:3]
    for name in held:
        torch.testing.assert_close(chunked[name], held[name], rtol=1e-6, atol=1e-7, msg=name)


def test_row_chunks_cover_the_rows_once():
    for shape, entries in [((10, 3), 7), ((10, 3), 1), ((1, 100), 7), ((5,), 2), ((), 4), ((0, 4), 3), ((4, 2, 3), 13)]:
        chunks = row_chunks(shape, entries)
        rows = shape[0] if shape else 1
        assert chunks[0][0] == 0 and chunks[-1][1] == rows
        assert all(a < b or rows == 0 for a, b in chunks)
        assert all(chunks[i][1] == chunks[i + 1][0] for i in range(len(chunks) - 1))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_get_rows_reads_exactly_those_rows(tmp_path, fmt):
    torch.manual_seed(0)
    tensors = {"m": torch.randn(9, 5), "v": torch.randn(7).to(torch.bfloat16), "s": torch.tensor(3.5), "e": torch.zeros(0, 3)}
    if fmt == "safetensors":
        save_file(tensors, str(tmp_path / "model.safetensors"))
    else:
        torch.save(tensors, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as ckpt:
        for name, t in tensors.items():
            rows = t.shape[0] if t.dim() else 1
            for a, b in [(0, rows), (0, 1), (2, 5), (rows - 1, rows), (3, 100)]:
                got = ckpt.get_rows(name, a, b)
                want = t if t.dim() == 0 else t[a:b]
                assert got.dtype == t.dtype and torch.equal(got, want), (name, a, b)


@pytest.mark.parametrize("zero", [False, True])
def test_karcher_by_row_chunks_reads_twice_and_matches_the_iteration_on_whole_tensors(zero):
    """Two passes over row chunks (the Gram matrix, then the sum) give the mean that the iteration on whole
    float64 unit vectors gives (test_spherical's reference), whatever the chunks."""
    from mergekit_lite.methods.base import row_chunks
    from mergekit_lite.ops.spherical import karcher_mean_by_rows
    from test_spherical import ref_karcher

    torch.manual_seed(4)
    tensors = [torch.randn(6, 5) + i for i in range(4)]
    if zero:
        tensors[1].zero_()
    alphas = [0.25] * 4
    # a zero tensor is left out of the direction and counts in the mean norm: ¾ of the other three's mean
    want = ref_karcher([t.double() for t in tensors if t.any()], 10, 1e-7) * (0.75 if zero else 1.0)
    for entries in (1, 7, 30):
        reads = []

        def rows(i, a, b):
            reads.append((i, a, b))
            return tensors[i][a:b].clone()

        chunks = row_chunks((6, 5), entries)
        got = karcher_mean_by_rows(rows, 4, chunks, (6, 5), alphas, max_iter=10, tol=1e-7)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
        assert sorted(reads) == sorted([(i, a, b) for a, b in chunks for i in range(4)] * 2)  # every chunk of every input, twice


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_by_row_chunks_matches_the_reference(with_base, normalize):
    """Multi-SLERP in two passes over row chunks (the Gram matrix, then Σ a_i x_i scaled) equals the whole-tensor
    reference with its tangent step, for any chunking; every input's chunks, the base's too, are read twice."""
    from mergekit_lite.methods.base import HeldWeightInputs, METHODS, TensorContext
    from test_spherical import ref_multislerp

    torch.manual_seed(5)
    base = torch.randn(6, 5)
    models = [base + torch.randn(6, 5) * (i + 1) for i in range(3)]
    weights = [0.5, 2.0, 1.0]
    tensors = [base, *models] if with_base else models
    xs = [m - base for m in models] if with_base else models
    want = ref_multislerp([x.double() for x in xs], weights, normalize) + (base.double() if with_base else 0)
    ctx = TensorContext("w", [f"m{i}" for i in range(len(tensors))], {"normalize_weights": normalize, "eps": 1e-8},
                        [{"weight": 1.0}] * (len(tensors) - 3) + [{"weight": w} for w in weights], base_index=0 if with_base else None)
    for entries in (1, 7, 30):
        inputs = HeldWeightInputs(tensors, entries)
        reads = []
        rows = inputs.rows
        inputs.rows = lambda i, a, b: reads.append((i, a, b)) or rows(i, a, b)
        got = METHODS["multislerp"].compute_inputs(inputs, ctx)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        chunks = row_chunks((6, 5), entries)
        models_read = [(i, a, b) for i in range(1 if with_base else 0, len(tensors)) for a, b in chunks] * 2
        assert sorted(reads) == sorted(models_read + ([(0, a, b) for a, b in chunks] * 2 if with_base else []))


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 5), (9,)])
@pytest.mark.parametrize("base_index", [0, 1])
def test_arcee_fusion_by_row_chunks_equals_the_whole_tensor_computation(shape, base_index):
    """Arcee Fusion's two passes over row chunks (each row's importance, then the fused rows) on both threads give
    the whole-tensor ``arcee_fusion``'s bits for any chunking and base position (a vector goes whole)."""
    from mergekit_lite.methods.base import HeldWeightInputs, METHODS, TensorContext
    from mergekit_lite.ops.selection import arcee_fusion

    gen = torch.Generator().manual_seed(11)
    base = torch.randn(shape, generator=gen)
    other = base + torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen) ** 4  # a few large moves
    tensors = [base, other] if base_index == 0 else [other, base]
    want = arcee_fusion(base.clone(), other.clone())
    assert 0 < int((want != base).sum()) < want.numel()  # some entries taken, some not
    ctx = TensorContext("w", ["a", "b"], {}, [{}, {}], base_index=base_index)
    for entries in (1, 7, 30):
        got = METHODS["arcee_fusion"].compute_inputs(HeldWeightInputs([t.clone() for t in tensors], entries), ctx)
        assert torch.equal(got, want), entries


def test_multislerp_refuses_weights_that_sum_to_zero_and_falls_back_where_directions_cancel():
    from mergekit_lite.ops.spherical import multislerp_degenerate, multislerp_terms

    with pytest.raises(ValueError, match="sum to zero"):
        multislerp_terms([1.0, 1.0], [1.0, -1.0])
    assert multislerp_terms([2.0, 4.0], [1.0, 3.0], eps=0.0) == ([0.25, 0.75], [0.125, 0.1875], 3.5)
    assert multislerp_degenerate([0.5, 0.5], [1.0, 1.0]) == [0.5, 0.5]  # two antipodal vectors: linear
    assert multislerp_degenerate([0.2, 0.3, 0.5], [0.0, 0.0, 0.0]) == [0.0, 0.0, 0.0]  # all zero: zero
    with pytest.raises(ValueError, match="cancel out"):
        multislerp_degenerate([0.2, 0.3, 0.5], [1.0, 0.0, 1.0])


@pytest.mark.parametrize("method,params", [("karcher", {"max_iter": 5}), ("multislerp", {})])
def test_reread_weight_methods_equal_their_held_form_whatever_the_base_position(demo, tmp_path, method, params):
    """The executor reads karcher's and multislerp's inputs again (base first); the held form gives the same bits."""
    from mergekit_lite.methods.base import HeldWeightInputs, METHODS

    data = ta_recipe(demo, merge_method=method, parameters=params)
    data["models"].append({"model": str(demo["base"])})  # the base listed last, as an input
    out = load_state(mergekit_lite.run(Recipe.model_validate(data), tmp_path / "out", progress=False))
    m = METHODS[method]
    plan = mergekit_lite.plan(Recipe.model_validate(data))
    for job in plan.jobs:
        if not job.merge:
            continue
        tensors = [plan.checkpoints[r.source].get(r.name).to(plan.compute_dtype) for r in job.inputs]
        ctx = execute.context(plan, job)
        held = m.compute(iter([t.clone() for t in tensors]), ctx)
        again = m.compute_inputs(HeldWeightInputs(tensors), ctx)
        assert torch.equal(held, again), job.name
        assert torch.equal(held.to(out[job.name].dtype), out[job.name]), job.name


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3}), ("dare_ties", {"density": 0.5}), ("model_stock", {})])
def test_chunked_output_is_freed_without_the_garbage_collector(demo, tmp_path, monkeypatch, method, params):
    """The source hands merged rows to the executor through a callback; no reference cycle may keep the
    output tensor (or the source's chunks) alive until a garbage collection, which may come many tensors later."""
    import gc
    import weakref

    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 7)
    plan = mergekit_lite.plan(Recipe.model_validate(ta_recipe(demo, merge_method=method, parameters=params)))
    job = max((job for job in plan.jobs if job.merge), key=lambda job: job.out.numel)
    freed: list[bool] = []
    gc.disable()
    try:
        out = execute.compute_tensor(plan, job, torch.device("cpu"))
        assert tuple(out.shape) == tuple(job.out.shape)
        ref = weakref.ref(out)
        del out
        freed.append(ref() is None)
    finally:
        gc.enable()
        plan.close()
    assert freed == [True]


def test_masks_made_by_rows_read_no_input_whole(demo, tmp_path, monkeypatch):
    """DARE-TIES: its masks come a few rows at a time, so large tensors are only ever read by rows."""
    from mergekit_lite import checkpoint as ckpt_module

    whole: list[str] = []
    original = ckpt_module.Checkpoint.get
    monkeypatch.setattr(ckpt_module.Checkpoint, "get", lambda self, name: whole.append(name) or original(self, name))
    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 7)
    plan = mergekit_lite.plan(Recipe.model_validate(ta_recipe(demo, merge_method="dare_ties", parameters={"density": 0.5})))
    large = {job.name for job in plan.jobs if job.merge and job.out.numel >= 7 and job.out.shape}
    plan.close()
    _merge(demo, tmp_path / "out", "dare_ties", {"density": 0.5})
    assert large and not large & set(whole)


def test_map_strided_runs_each_item_once_with_inline_torch_and_stops_on_failure():
    """Every item once, taken by whichever thread is free (both take some), torch single-threaded inside and the
    caller's count put back; a failing item's error is raised and the other thread stops at its next item."""
    import threading

    from mergekit_lite.ops.threads import map_strided

    seen: list[tuple[int, str, int]] = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def note(i: int) -> None:
            seen.append((i, threading.current_thread().name, torch.get_num_threads()))
            time.sleep(0.01)  # long enough for the other thread to take items too

        map_strided(note, list(range(9)))
        assert sorted(i for i, _, _ in seen) == list(range(9)) and {n for _, _, n in seen} == {1}
        assert len({name for _, name, _ in seen}) == 2 and torch.get_num_threads() == 2
        done: list[int] = []

        def work(i: int) -> None:
            if i == 2:
                raise ValueError("item 2")
            done.append(i)
            time.sleep(0.02)

        with pytest.raises(ValueError, match="item 2"):
            map_strided(work, list(range(40)))
        assert len(done) < 10 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("method,params", [("task_arithmetic", {}), ("ram", {}), ("linear", {})])
def test_entrywise_chunks_in_parallel_give_the_bytes_of_one_thread(demo, tmp_path, monkeypatch, method, params):
    """Row chunks merged on two threads (kernels inline) or on one: the same bytes."""
    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 50)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _merge(demo, tmp_path / "one", method, params)
        torch.set_num_threads(2)
        two = _merge(demo, tmp_path / "two", method, params)
    finally:
        torch.set_num_threads(before)
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name].view(torch.uint8), two[name].view(torch.uint8)), name


def test_window_bytes_counts_one_window_per_checkpoint_of_row_chunked_jobs(demo, monkeypatch):
    """A job read by row chunks holds one window per checkpoint, each at most ROW_WINDOW_BYTES and at most the
    tensor; a job read whole holds none; the plan's estimate counts them for the largest tensor."""
    from mergekit_lite import checkpoint

    monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 7)
    monkeypatch.setattr(execute, "ROW_WINDOW_BYTES", 64)
    plan = mergekit_lite.plan(Recipe.model_validate(ta_recipe(demo)))
    try:
        for job in plan.jobs:
            info = plan.checkpoints[job.reads[0].source].info(job.reads[0].name)
            chunked = job.merge and job.out.numel >= 7 and bool(job.out.shape)
            assert execute.window_bytes(plan, job) == (len(job.reads) * min(64, info.nbytes) if chunked else 0), job.name
        monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", 10**12)  # nothing by rows
        assert all(execute.window_bytes(plan, job) == 0 for job in plan.jobs)
        assert checkpoint.ROW_WINDOW_BYTES == 16 << 20
    finally:
        plan.close()


@pytest.mark.parametrize("device", [None, torch.device("cpu")])
@pytest.mark.parametrize("parallel", [False, True])
def test_rows_assembled_in_the_output_dtype_equal_the_whole_result_converted(parallel, device):
    """Row chunks stored straight into a bfloat16 tensor round as converting the assembled float32 tensor does,
    whether the first chunk tells the device or the caller does (then every chunk, the first too, is a part's)."""
    from mergekit_lite.ops.spherical import assembled_rows

    gen = torch.Generator().manual_seed(2)
    whole = torch.randn(37, 11, generator=gen) * 1e3
    chunks = row_chunks((37, 11), 40)
    assert len(chunks) > 2
    made = []
    got = assembled_rows(lambda a, b: made.append(a) or whole[a:b].clone(), chunks, (37, 11), parallel, torch.bfloat16, device)
    assert got.dtype == torch.bfloat16 and torch.equal(got, whole.to(torch.bfloat16))
    assert sorted(made) == [start for start, _ in chunks]


@pytest.mark.parametrize("method", ["multislerp", "slerp", "karcher", "arcee_fusion"])
def test_reread_methods_storing_in_the_output_dtype_round_as_converting_afterwards(method):
    """With the caller's output dtype known (bfloat16), the row-chunked methods store their chunks in it: the same
    bytes as their float32 result converted."""
    from mergekit_lite.methods.base import HeldWeightInputs, METHODS, TensorContext

    gen = torch.Generator().manual_seed(8)
    base = torch.randn(9, 6, generator=gen)
    tensors = [base, *(base + torch.randn(9, 6, generator=gen) * 0.3 for _ in range(1 if method in ("slerp", "arcee_fusion") else 3))]
    params = {"multislerp": {"normalize_weights": True, "eps": 1e-8}, "slerp": {"t": 0.3}, "karcher": {"max_iter": 5, "tol": 1e-5},
              "arcee_fusion": {}}[method]
    ctx = TensorContext("w", [f"m{i}" for i in range(len(tensors))], params, [{"weight": 1.0 + i} for i in range(len(tensors))], base_index=0)
    m = METHODS[method]
    want = m.compute_inputs(HeldWeightInputs([t.clone() for t in tensors], 12), ctx).to(torch.bfloat16)
    inputs = HeldWeightInputs([t.clone() for t in tensors], 12)
    inputs.out_dtype = torch.bfloat16
    got = m.compute_inputs(inputs, ctx)
    assert len(inputs.chunks()) > 2 and got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize("numel", [1, 1000, execute.FUSED_SPLIT_MIN - 1, execute.FUSED_SPLIT_MIN, 262144, 262145, 1024 * 2816, 32000 * 1024, 10**7 + 3])
def test_the_kernels_chunks_cover_a_tensor_in_an_even_number_of_like_chunks(numel):
    chunks = execute.fused_chunks(numel)
    assert chunks[0][0] == 0 and chunks[-1][1] == numel and all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    lengths = [stop - start for start, stop in chunks]
    assert max(lengths) <= execute.FUSED_CHUNK_ENTRIES and min(lengths) > 0
    if numel >= execute.FUSED_SPLIT_MIN:  # two threads get the same number of chunks, all but the last of one length
        assert len(chunks) % 2 == 0 and len(set(lengths[:-1])) <= 1 and lengths[-1] <= lengths[0]
        if lengths[0] > execute.FUSED_CHUNK_ALIGN:
            assert all(start % execute.FUSED_CHUNK_ALIGN == 0 for start, _ in chunks)
    else:
        assert chunks == [(0, numel)]
    before = torch.get_num_threads()
    try:  # the chunks, and so the sums made chunk by chunk, do not depend on the thread count
        torch.set_num_threads(1)
        assert execute.fused_chunks(numel) == chunks
    finally:
        torch.set_num_threads(before)
