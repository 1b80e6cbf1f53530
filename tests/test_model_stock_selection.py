"""model_stock, nearswap and arcee_fusion: hand-computed cases, and whole merges through the public API
checked against dense references written plainly here from the formulas (float64)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mergekit_lite
from mergekit_lite import Recipe, RecipeError, get_method
from mergekit_lite.ops.selection import (
    arcee_fusion,
    model_stock_ratio,
    model_stock_task_vector,
    nearswap,
    order_statistics,
    quartile_positions,
)

from helpers import leftovers, load_state, tiny_llama


def fine_tune(base: Path, folder: Path, seed: int, scale: float, shared: float = 0.0) -> Path:
    """base + a seeded task vector (scale · noise, plus ``shared`` · a direction common to every fine-tune)."""
    import shutil

    shutil.copytree(base, folder)
    state = load_state(base)
    gen = torch.Generator().manual_seed(seed)
    common = torch.Generator().manual_seed(12345)
    out = {}
    for name in sorted(state):
        t = state[name]
        out[name] = (t + scale * torch.randn(t.shape, generator=gen) + shared * torch.randn(t.shape, generator=common)).contiguous()
    (target,) = folder.glob("*.safetensors")
    save_file(out, str(target), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("selection")
    base = tiny_llama(root / "base", 3, 7)
    return {
        "base": base,
        "a": fine_tune(base, root / "a", 1, 0.02, shared=0.02),
        "b": fine_tune(base, root / "b", 2, 0.02, shared=0.02),
        "c": fine_tune(base, root / "c", 3, 0.05),
        "far": tiny_llama(root / "far", 3, 8),  # an unrelated model: large differences everywhere
    }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def merge(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    return load_state(mergekit_lite.run(Recipe.from_dict(recipe), out, progress=False))


# -- plain references (float64, straight from the formulas) ----------------------------------------
def ref_model_stock(base: torch.Tensor, models: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    w0 = base.double()
    ws = [m.double() for m in models]
    shape = w0.shape
    if filter_wise and w0.dim() > 1:
        rows_0, rows = w0.reshape(-1, shape[-1]), [w.reshape(-1, shape[-1]) for w in ws]
    else:
        rows_0, rows = w0.reshape(1, -1), [w.reshape(1, -1) for w in ws]
    k = len(ws)
    out = torch.empty_like(rows_0)
    for r in range(rows_0.shape[0]):
        offsets = [w[r] - rows_0[r] for w in rows]
        cosines = []
        for a, b in itertools.combinations(offsets, 2):
            c = float(a @ b) / max(float(a.norm()) * float(b.norm()), 1e-6)
            cosines.append(min(1.0, max(-1.0, c)))
        cos = sum(cosines) / len(cosines)
        denominator = 1 + (k - 1) * cos
        t = 0.0 if abs(denominator) < 1e-6 else k * cos / denominator
        average = sum(w[r] for w in rows) / k
        out[r] = t * average + (1 - t) * rows_0[r]
    return out.reshape(shape)


def ref_nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    a, b = base.double(), other.double()
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * b + (1 - w) * a


def ref_arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """In float32 like the method (the mask is a comparison: float64 could pick other entries at the threshold)."""
    p = torch.softmax(other, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    importance = (other - base).abs() * kl
    ordered = importance.flatten().sort().values
    n = ordered.numel()
    q1, med, q3 = ordered[int(0.25 * (n - 1))], ordered[int(0.5 * (n - 1))], ordered[int(0.75 * (n - 1))]
    mask = importance >= med + 1.5 * (q3 - q1)
    return torch.where(mask, other, base)


# -- model_stock: hand-computed ---------------------------------------------------------------------
def test_model_stock_ratio_by_hand():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert model_stock_ratio([e1, e2]).item() == 0.0  # orthogonal: t = 0, the base
    assert model_stock_ratio([e1, e1.clone()]).item() == pytest.approx(1.0)  # same direction: t = 1, the average
    c = 1 / math.sqrt(2)  # [1, 1] vs [1, 0]: 45°
    assert model_stock_ratio([torch.tensor([1.0, 1.0]), e1]).item() == pytest.approx(2 * c / (1 + c), rel=1e-6)
    # three task vectors at 60° from each other in pairs: cos = 1/2, t = 3·½ / (1 + 2·½) = 3/4
    v = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2, 0.0]), torch.tensor([0.5, math.sqrt(3) / 6, math.sqrt(6) / 3])]
    assert model_stock_ratio(v).item() == pytest.approx(0.75, rel=1e-5)


def test_model_stock_singular_and_zero_task_vectors_keep_the_base():
    e1 = torch.tensor([1.0, 0.0])
    assert model_stock_ratio([e1, -e1]).item() == 0.0  # cos = −1, K = 2: 1 + (K−1)·cos = 0
    assert model_stock_ratio([e1, torch.zeros(2)]).item() == 0.0  # a zero task vector has cos 0 (norm floor)
    merged = model_stock_task_vector([torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])])
    c = 1 / math.sqrt(2)
    torch.testing.assert_close(merged, torch.tensor([1.0, 0.5]) * (2 * c / (1 + c)))


def test_model_stock_filter_wise_gives_one_ratio_per_row():
    d1 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    d2 = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    t = model_stock_ratio([d1, d2], filter_wise=True)
    assert t.shape == (2, 1)
    assert t[0].item() == 0.0 and t[1].item() == pytest.approx(1.0)
    assert model_stock_ratio([d1, d2]).shape == (1, 1)  # whole tensor: one ratio
    # a 1-D tensor is one row either way
    assert model_stock_ratio([d1[1], d2[0]], filter_wise=True).item() == model_stock_ratio([d1[1], d2[0]]).item()


# -- model_stock: whole merges ----------------------------------------------------------------------
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
def test_model_stock_matches_the_formula(zoo, tmp_path, filter_wise, names):
    recipe = {"merge_method": "model_stock", "base_model": str(zoo["base"]),
              "models": [{"model": str(zoo[n])} for n in names], "parameters": {"filter_wise": filter_wise}}
    out = merge(recipe, tmp_path / "out")
    base = load_state(zoo["base"])
    models = [load_state(zoo[n]) for n in names]
    assert set(out) == set(base)
    moved = 0
    for name in base:
        want = ref_model_stock(base[name], [m[name] for m in models], filter_wise)
        assert rel(out[name], want) < 1e-5, name
        moved += not torch.equal(out[name], base[name])
    assert moved > len(base) // 2  # the shared direction gives t well above 0


def test_model_stock_with_the_base_listed_and_in_slices(zoo, tmp_path):
    listed = merge({"merge_method": "model_stock", "base_model": str(zoo["base"]),
                    "models": [{"model": str(zoo[n])} for n in ("a", "base", "b")]}, tmp_path / "listed")
    plain = merge({"merge_method": "model_stock", "base_model": str(zoo["base"]),
                   "models": [{"model": str(zoo[n])} for n in ("a", "b")]}, tmp_path / "plain")
    sliced = merge({"merge_method": "model_stock", "base_model": str(zoo["base"]),
                    "slices": [{"sources": [{"model": str(zoo[n]), "layer_range": [0, 3]} for n in ("base", "a", "b")]}]},
                   tmp_path / "sliced")
    for name in plain:
        assert torch.equal(listed[name], plain[name]), name
        assert torch.equal(sliced[name], plain[name]), name


def test_model_stock_needs_a_base_and_two_other_models(zoo):
    with pytest.raises(RecipeError, match="model_stock takes at least 2"):
        Recipe.from_dict({"merge_method": "model_stock", "base_model": str(zoo["base"]), "models": [{"model": str(zoo["a"])}]})
    with pytest.raises(RecipeError, match="needs a base model"):
        Recipe.from_dict({"merge_method": "model_stock", "models": [{"model": str(zoo["a"])}, {"model": str(zoo["b"])}]})


# -- nearswap -------------------------------------------------------------------------------------
def test_nearswap_by_hand():
    base = torch.zeros(5)
    other = torch.tensor([0.0005, 0.001, 0.004, -0.01, 0.0])
    # w = clamp(0.001 / max(|d|, 1e-6), 0, 1) = [1, 1, 0.25, 0.1, 1]
    torch.testing.assert_close(nearswap(base, other, 0.001), torch.tensor([0.0005, 0.001, 0.001, -0.001, 0.0]))
    torch.testing.assert_close(nearswap(torch.ones(3), torch.tensor([3.0, 1.0, -1.0]), 0.0), torch.ones(3))  # t = 0: the base


@pytest.mark.parametrize("t", [0.01, 0.1, [0.0, 0.5, 0.02]])
def test_nearswap_matches_the_formula(zoo, tmp_path, t):
    out = merge({"merge_method": "nearswap", "base_model": str(zoo["base"]), "models": [{"model": str(zoo["far"])}],
                 "parameters": {"t": t}}, tmp_path / "out")
    base, other = load_state(zoo["base"]), load_state(zoo["far"])
    for name in base:
        if isinstance(t, list):  # gradient over the 3 layers; t = 0 (first value) off the layers
            layer = int(name.split(".")[2]) if ".layers." in name else 0
            value = t[layer]
        else:
            value = t
        want = ref_nearswap(base[name], other[name], value)
        assert rel(out[name], want) < 1e-6, name


def test_nearswap_base_position_does_not_matter(zoo, tmp_path):
    first = merge({"merge_method": "nearswap", "base_model": str(zoo["base"]),
                   "models": [{"model": str(zoo["base"])}, {"model": str(zoo["c"])}], "parameters": {"t": 0.05}}, tmp_path / "first")
    last = merge({"merge_method": "nearswap", "base_model": str(zoo["base"]),
                  "models": [{"model": str(zoo["c"])}], "parameters": {"t": 0.05}}, tmp_path / "last")
    for name in first:
        assert torch.equal(first[name], last[name]), name


def test_nearswap_requires_t_and_leaves_nothing_behind(zoo, tmp_path):
    with pytest.raises(RecipeError, match="parameters.t: nearswap needs 't'"):  # said when the recipe is read
        Recipe.from_dict({"merge_method": "nearswap", "base_model": str(zoo["base"]), "models": [{"model": str(zoo["a"])}]})
    # a filter list that leaves some tensor without t is only found per tensor: refused, nothing written
    recipe = Recipe.from_dict({"merge_method": "nearswap", "base_model": str(zoo["base"]), "models": [{"model": str(zoo["a"])}],
                               "parameters": {"t": [{"filter": "mlp", "value": 0.1}]}})
    with pytest.raises(RecipeError, match="nearswap needs t"):
        mergekit_lite.run(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_nearswap_and_arcee_fusion_take_exactly_the_base_and_one_model(zoo):
    for method in ("nearswap", "arcee_fusion"):
        with pytest.raises(RecipeError, match=f"{method} takes exactly 2"):
            Recipe.from_dict({"merge_method": method, "base_model": str(zoo["base"]),
                              "models": [{"model": str(zoo["a"])}, {"model": str(zoo["b"])}], "parameters": {"t": 0.1}})
        with pytest.raises(RecipeError, match="needs a base model"):
            Recipe.from_dict({"merge_method": method, "models": [{"model": str(zoo["a"])}, {"model": str(zoo["b"])}]})


# -- arcee_fusion ---------------------------------------------------------------------------------
def test_quartile_positions_and_order_statistics():
    assert quartile_positions(5) == (1, 2, 3)
    assert quartile_positions(8) == (1, 3, 5)  # ⌊0.25·7⌋, ⌊0.5·7⌋, ⌊0.75·7⌋
    assert quartile_positions(1) == (0, 0, 0)
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 1000, 1_000_003):
        x = torch.randn(n, generator=gen)
        ordered = x.sort().values
        ranks = quartile_positions(n)
        got = order_statistics(x, ranks)
        assert [float(g) for g in got] == [float(ordered[r]) for r in ranks]
        assert all(g.dtype == x.dtype for g in got)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("kind", ["normal", "ties", "constant", "negative"])
def test_order_statistics_of_large_tensors_are_the_sorted_values(kind, native, monkeypatch):
    """The bracketed selection (tensors of 2^20 entries or more) gives exactly the sorted tensor's values, for the
    quartiles and the two ends, with heavy ties, one value throughout, and values all below zero; with the native
    kernel's counting pass and with numpy's."""
    from mergekit_lite.ops import fused, selection
    from mergekit_lite.ops.selection import _ranked_in_brackets

    if native and not fused.available():
        pytest.skip("the native kernel is not built")
    monkeypatch.setattr(selection.fused, "available", lambda: native)

    gen = torch.Generator().manual_seed(3)
    n = (1 << 20) + 12_345
    x = {
        "normal": torch.randn(n, generator=gen),
        "ties": torch.randint(0, 7, (n,), generator=gen).to(torch.float32),
        "constant": torch.full((n,), 0.25),
        "negative": -torch.rand(n, generator=gen, dtype=torch.float64) * 1e-9,
    }[kind]
    ordered = x.sort().values
    ranks = [*quartile_positions(n), 0, n - 1, 17]
    assert _ranked_in_brackets(x.numpy(), ranks) is not None  # the bracketed path, not the fallback
    got = order_statistics(x, ranks)
    assert [float(g) for g in got] == [float(ordered[r]) for r in ranks]
    assert all(g.dtype == x.dtype for g in got)
    x[n // 2] = float("nan")
    assert _ranked_in_brackets(x.numpy(), ranks) is None  # NaN: every value partitioned instead


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_native_bracket_counts_are_numpys(dtype):
    """The kernel's counts (a NaN below and above at once) and the values inside each bracket, in order, as numpy
    finds them, for open and closed brackets, at every length (the vector code's groups of 8 and its tail); None
    where a bracket holds more than the room given."""
    from mergekit_lite.ops import fused

    if not fused.available():
        pytest.skip("the native kernel is not built")
    rng = np.random.default_rng(4)
    for n in (1, 7, 8, 9, 100, 4099):
        values = rng.standard_normal(n).astype(dtype)
        values[::17] = 0.5
        values[3::29] = np.nan
        brackets = [(-0.3, 0.5), (-np.inf, -1.0), (1.0, np.inf), (0.5, 0.5)]
        for level in (2, 0):  # the vector code and the portable code
            fused._fused._max_isa(level)
            try:
                got = fused.bracket_counts(values, brackets, n)
            finally:
                fused._fused._max_isa(2)
            for (lo, hi), (below, above, inside) in zip(brackets, got):
                assert below == int(np.count_nonzero(~(values >= lo)))
                assert above == int(np.count_nonzero(~(values <= hi)))
                assert np.array_equal(inside, values[(values >= lo) & (values <= hi)])
                assert inside.dtype == dtype
    assert fused.bracket_counts(np.zeros(50, dtype=np.float32), [(-1.0, 1.0)], 49) is None
    assert fused.bracket_counts(np.zeros(50, dtype=np.float32), [(-1.0, 1.0)], 50)[0][2].size == 50


def test_arcee_fusion_by_hand():
    # one row: KL(p‖q) is one positive factor, so the importance ranks like |Δ|. Sorted |Δ| =
    # 1..7, 30 (n = 8): Q1 = #1 = 2, median = #3 = 4, Q3 = #5 = 6; threshold 4 + 1.5·(6 − 2) = 10 (× KL)
    base = torch.zeros(8)
    other = torch.tensor([3.0, 1.0, 30.0, 2.0, 7.0, 5.0, 4.0, 6.0])
    want = torch.tensor([0.0, 0.0, 30.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert torch.equal(arcee_fusion(base.clone(), other.clone()), want)
    # with a threshold of 0 (most |Δ| are 0), every entry is "taken": the other model
    sparse = torch.tensor([[0.0, 0.0, 0.0, 4.0], [0.0, 0.0, 0.1, 0.0]])
    assert torch.equal(arcee_fusion(torch.zeros(2, 4), sparse.clone()), sparse)
    # identical inputs: every importance is 0 = the threshold, every entry "taken": the base again
    same = torch.randn(3, 5)
    assert torch.equal(arcee_fusion(same.clone(), same.clone()), same)


def test_arcee_fusion_matches_the_formula(zoo, tmp_path):
    out = merge({"merge_method": "arcee_fusion", "base_model": str(zoo["base"]), "models": [{"model": str(zoo["c"])}]},
                tmp_path / "out")
    base, other = load_state(zoo["base"]), load_state(zoo["c"])
    taken = 0
    for name in base:
        want = ref_arcee_fusion(base[name], other[name])
        assert torch.equal(out[name], want), name
        taken += int((out[name] != base[name]).sum())
    total = sum(t.numel() for t in base.values())
    assert 0 < taken < total / 2  # outliers only


# -- declarations ---------------------------------------------------------------------------------
def test_declarations():
    ms, ns, af = get_method("model_stock"), get_method("nearswap"), get_method("arcee_fusion")
    assert (ms.inputs, ms.base, ms.min_models, ms.max_models) == ("task_vectors", "required", 2, None)
    assert [(p.name, p.default) for p in ms.params] == [("filter_wise", False)]
    assert (ns.inputs, ns.base, ns.min_models, ns.max_models) == ("weights", "required", 2, 2)
    assert [(p.name, p.default) for p in ns.params] == [("t", None)]  # required, as in mergekit
    assert (af.inputs, af.base, af.min_models, af.max_models, af.params) == ("weights", "required", 2, 2, ())
    # model_stock reads large tensors in row chunks (its Gram matrices add up): no copy per task vector; the two-model
    # methods hold a fixed few
    assert ms.working_copies(8) == ms.working_copies(2) and ns.working_copies(2) == ns.working_copies(8) and af.working_copies(2) == af.working_copies(8)
