"""SCE, RAM and RAM+ (sce, ram, ramplus_tl): hand-computed cases for the kernels, and whole merges
through the public API against plain dense references written here from the formulas.

The references work on whole state dicts with plain torch, entry by entry in meaning (stack, mask,
divide), independent of the streaming kernels in ``mergekit_lite/ops/{sce,ram}.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mergekit_lite
from mergekit_lite import Recipe, RecipeError
from mergekit_lite.api import plan
from mergekit_lite.methods import get_method
from mergekit_lite.ops.ram import ram, ramplus
from mergekit_lite.ops.sce import sce_merge, sce_weights, variance_select_count, variance_select_mask

from helpers import load_state, tiny_llama

EPS = 1e-5


# -- tiny checkpoints: a base and fine-tunes with sparse task vectors -----------------------------
def _finetune(base: Path, folder: Path, seed: int, density: float, scale: float) -> Path:
    """base + a task vector moving a ``density`` fraction of each tensor's entries (some below 1e-5)."""
    shutil.copytree(base, folder)
    state = load_state(base)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in sorted(state.items()):
        move = torch.rand(w.shape, generator=g) < density
        delta = torch.randn(w.shape, generator=g) * scale
        tiny = torch.rand(w.shape, generator=g) < 0.05  # changes below RAM's epsilon
        delta = torch.where(tiny, delta * 1e-7, delta)
        if "norm" in name:  # tiny energies: SCE's uniform-weight fallback (Σ mean τ² < 1e-6) applies here
            delta = delta * 1e-4
        out[name] = (w + torch.where(move, delta, torch.zeros(()))).contiguous()
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def agents(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("agents")
    base = tiny_llama(root / "base", 3, 11)
    fts = {f"a{i}": _finetune(base, root / f"a{i}", 100 + i, d, s) for i, (d, s) in enumerate([(0.3, 0.1), (0.5, 0.05), (0.15, 0.2), (0.9, 0.02)])}
    return {"base": base, **fts}


def recipe(agents: dict[str, Path], method: str, names: list[str], parameters: dict | None = None, **extra) -> Recipe:
    data = {"merge_method": method, "base_model": str(agents["base"]), "models": [{"model": str(agents[n])} for n in names], "dtype": "float32"}
    if parameters:
        data["parameters"] = parameters
    data.update(extra)
    return Recipe.from_dict(data)


def merged(r: Recipe, tmp_path: Path, name: str = "out") -> dict[str, torch.Tensor]:
    return load_state(mergekit_lite.run(r, tmp_path / name, progress=False))


def deltas_of(agents: dict[str, Path], names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The base state and, per tensor, the task vectors stacked [T, ...] (float32)."""
    base = load_state(agents["base"])
    fts = [load_state(agents[n]) for n in names]
    return base, {k: torch.stack([ft[k].float() - base[k].float() for ft in fts]) for k in base}


def assert_states_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for k in want:
        scale = float(want[k].double().abs().max()) or 1.0
        torch.testing.assert_close(got[k].double(), want[k].double(), atol=rtol * scale, rtol=0, msg=k)


# -- plain references -----------------------------------------------------------------------------
def ref_sce(d: torch.Tensor, select_topk: float, floor: float = 1e-6, mode: str = "mean") -> torch.Tensor:
    d = d.clone().double()
    t, shape = d.shape[0], d.shape[1:]
    flat = d.reshape(t, -1)
    if select_topk < 1:
        mean = flat.mean(0)
        var = ((flat - mean) ** 2).mean(0)
        nonzero = int((var != 0).sum())
        k = int(torch.tensor(nonzero) * select_topk)  # mergekit's float32 product
        order = torch.sort(var.float(), descending=True, stable=True).indices
        keep = torch.zeros(var.numel(), dtype=torch.bool)
        keep[order[:k]] = True
        flat = flat * keep
    energy = (flat ** 2).mean(1)
    eta = torch.full((t,), 1.0 / t, dtype=torch.float64) if float(energy.sum()) < floor or float(energy.sum()) == 0 else energy / energy.sum()
    positive = flat.sum(0) >= 0
    agree = torch.where(positive, flat > 0, flat < 0).double()
    num = (eta[:, None] * agree * flat).sum(0)
    if mode == "sum":
        return num.reshape(shape)
    den = (eta[:, None] * agree).sum(0).clamp(min=1e-6)
    return (num / den).reshape(shape)


def ref_ram_counts(d: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """active [T, n], contributor count c [n], per task (shared, unique) entry counts."""
    flat = d.reshape(d.shape[0], -1).double()
    active = flat.abs() > eps
    c = active.sum(0)
    shared = [int((active[t] & (c > 1)).sum()) for t in range(d.shape[0])]
    unique = [int((active[t] & (c == 1)).sum()) for t in range(d.shape[0])]
    return active, c, shared, unique


def ref_ram(d: torch.Tensor, eps: float, lambdas: list[float] | None = None) -> torch.Tensor:
    flat = d.reshape(d.shape[0], -1).double()
    active, c, _, _ = ref_ram_counts(d, eps)
    lam = torch.tensor(lambdas or [1.0] * d.shape[0], dtype=torch.float64)[:, None]
    kept = flat * active
    shared_mean = kept.sum(0) / c.clamp(min=1)
    unique_part = (kept * lam).sum(0)
    out = torch.where(c == 1, unique_part, torch.where(c > 1, shared_mean, torch.zeros(())))
    return out.reshape(d.shape[1:])


def ref_lambdas(shared: list[int], unique: list[int], r: float, alpha: float, eps: float) -> list[float]:
    return [1 + r * min(max(s / max(u, eps), 0.0), alpha) for s, u in zip(shared, unique)]


# -- hand-computed kernels ------------------------------------------------------------------------
def test_sce_by_hand() -> None:
    d = torch.tensor([[2.0, -1.0, 0.0, 3.0], [1.0, 1.0, -2.0, -3.0]])
    # η = (3.5, 3.75) / 7.25 = (14/29, 15/29); signs of the sums (3, 0, -2, 0) → (+, +, -, +)
    torch.testing.assert_close(sce_merge(d.clone()), torch.tensor([43 / 29, 1.0, -2.0, 3.0]))
    torch.testing.assert_close(sce_merge(d.clone(), mode="sum"), torch.tensor([43 / 29, 15 / 29, -30 / 29, 42 / 29]))
    torch.testing.assert_close(sce_weights(d), torch.tensor([14 / 29, 15 / 29]))


def test_sce_select_by_hand() -> None:
    d = torch.tensor([[2.0, -1.0, 0.0, 3.0], [1.0, 1.0, -2.5, -3.0]])
    # variances 0.25, 1, 1.5625, 9: half of 4 keeps the last two entries
    assert variance_select_mask(d, 0.5).tolist() == [False, False, True, True]
    # selected: τ1 = (0,0,0,3), τ2 = (0,0,-2.5,-3); sums (0,0,-2.5,0): entry 3's zero sum counts as +
    torch.testing.assert_close(sce_merge(d.clone(), select_topk=0.5), torch.tensor([0.0, 0.0, -2.5, 3.0]))
    assert not variance_select_mask(d, 0.0).any() and variance_select_mask(d, 1.0).all()
    # one model: every variance is 0, so select keeps nothing and the task vector is erased
    assert sce_merge(d[:1].clone(), select_topk=0.5).abs().sum() == 0


def test_sce_energy_floor_by_hand() -> None:
    d = torch.tensor([[2.0, -1.0, 0.0, 3.0], [1.0, 1.0, -2.0, -3.0]]) * 1e-4
    # Σ mean τ² = 7.25e-8 < 1e-6: mergekit's weights are uniform; energy_floor 0 keeps η = (14, 15)/29
    torch.testing.assert_close(sce_weights(d), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(sce_weights(d, energy_floor=0.0), torch.tensor([14 / 29, 15 / 29]))
    torch.testing.assert_close(sce_merge(d.clone(), mode="sum"), torch.tensor([1.5, 0.5, -1.0, 1.5]) * 1e-4)


def test_select_count_is_mergekits_float32_product() -> None:
    assert variance_select_count(100, 0.29) == 29  # float64 would give 28
    assert variance_select_count(1000, 0.15) == 150
    assert variance_select_count(3, 0.2) == 0


def test_ram_and_ramplus_by_hand() -> None:
    d = torch.tensor([
        [0.5, 0.0, 1e-6, 2.0, -1.0],
        [0.3, 0.0, 0.0, 0.0, 1.0],
        [0.1, 0.2, 0.0, 0.0, 0.0],
    ])
    # entry 0: shared by 3 → mean 0.3; 1: only τ3; 2: below ε; 3: only τ1; 4: τ1, τ2 → mean 0
    torch.testing.assert_close(ram(d), torch.tensor([0.3, 0.2, 0.0, 2.0, 0.0]))
    # ρ1 = 2 shared / 1 unique, ρ2 = 2 / 0 (→ α), ρ3 = 1 / 1: with α = 0.2 every λ = 1.02
    torch.testing.assert_close(ramplus(d), torch.tensor([0.3, 0.2 * 1.02, 0.0, 2.0 * 1.02, 0.0]))
    torch.testing.assert_close(ramplus(d, r=0.5, alpha=5.0), torch.tensor([0.3, 0.3, 0.0, 4.0, 0.0]))
    assert d[0, 2] == 1e-6  # the inputs are left as they were


def test_ramplus_untouched_model_is_not_nan() -> None:
    d = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 2.0]])
    # model 0 changed nothing: ρ = 0/ε = 0; with ε = 0 mergekit computes 0/0 = NaN, and NaN · 0 spreads
    # over model 1's unique entries; we take ρ = 0. Model 1 has no shared entries: ρ = 0, λ = 1.
    torch.testing.assert_close(ramplus(d, epsilon=0.0), torch.tensor([1.0, 0.0, 2.0]))


# -- whole merges through the public API ----------------------------------------------------------
NAMES = ["a0", "a1", "a2", "a3"]


@pytest.mark.parametrize("params", [
    {},
    {"select_topk": 0.4},
    {"select_topk": 0.4, "merge": "sum", "energy_floor": 0.0},
    {"select_topk": [{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.5}]},
])
def test_sce_against_dense_reference(agents, tmp_path, params) -> None:
    r = recipe(agents, "sce", NAMES, params)
    got = merged(r, tmp_path)
    base, deltas = deltas_of(agents, NAMES)
    layers = 3
    want = {}
    for k, b in base.items():
        topk = params.get("select_topk", 1.0)
        if isinstance(topk, list):  # the filter list, resolved by hand: layer i has t = i/(L−1), others t = 0
            t = int(k.split(".")[2]) / (layers - 1) if ".layers." in k else 0.0
            topk = 0.2 + 0.6 * t if "mlp" in k else 0.5
        want[k] = (b.double() + ref_sce(deltas[k], topk, params.get("energy_floor", 1e-6), params.get("merge", "mean"))).float()
    assert_states_close(got, want)


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("mode", ["mean", "sum"])
@pytest.mark.parametrize("select_topk", [0.0, 0.3, 0.7, 1.0])
def test_sce_rows_masks_the_erased_result_with_the_bits_of_masking_every_task_vector(mode, select_topk, gather, monkeypatch) -> None:
    """sce_rows erases the unmasked task vectors and then zeroes the entries left out of the selection (or, with
    ``gather``, erases only the kept entries' columns, gathered in the energy pass, chunk by chunk); ``sce_merge``
    (the plain order: mask every τ_t, then erase) is the reference, bit for bit, every zero's sign included."""
    from mergekit_lite.methods import sce as sce_module
    from mergekit_lite.methods.base import HeldTaskVectors, TensorContext
    from mergekit_lite.methods.sce import sce_rows

    monkeypatch.setattr(sce_module, "GATHER_COPIES", 1e9 if gather else 0.0)
    erased = []
    monkeypatch.setattr(sce_module, "sce_erase", lambda d, *a, real=sce_module.sce_erase: erased.append(d.shape) or real(d, *a))

    torch.manual_seed(5)
    deltas = torch.randn(4, 60, 70)
    deltas[1, ::3] = -deltas[0, ::3]  # entries whose sum is 0
    deltas[:, 5] = -0.0
    params = {"select_topk": select_topk, "energy_floor": 1e-6, "merge": mode}
    ctx = TensorContext("w", NAMES, params, [{} for _ in NAMES], {}, None)
    got = sce_rows(HeldTaskVectors(list(deltas.clone()), entries=700), ctx)  # chunks of 10 rows
    want = sce_merge(deltas.clone(), select_topk, 1e-6, mode)
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
    if select_topk == 0:  # nothing kept: nothing to gather or erase
        assert erased == []
    elif select_topk < 1:  # gathered: [T, kept entries] per chunk; else [T, 10 rows, 70]
        assert len(erased) == 6 and all(len(shape) == (2 if gather else 3) for shape in erased)
    if 0 < select_topk < 1:
        assert bool((got == 0).any())


def test_sce_floor_changes_small_tensors_only(agents, tmp_path) -> None:
    mk = merged(recipe(agents, "sce", NAMES), tmp_path, "mk")
    paper = merged(recipe(agents, "sce", NAMES, {"energy_floor": 0.0}), tmp_path, "paper")
    for k in mk:
        same = torch.equal(mk[k], paper[k])
        assert same != ("norm" in k), k  # only the norms' tiny task vectors fall under 1e-6


def test_sce_ignores_weights_and_warns(agents, tmp_path) -> None:
    r = Recipe.from_dict({
        "merge_method": "sce", "base_model": str(agents["base"]), "dtype": "float32",
        "models": [{"model": str(agents[n]), "parameters": {"weight": w}} for n, w in zip(NAMES, (1.0, 0.2, 3.0, 0.5))],
        "parameters": {"select_topk": 0.4},
    })
    assert any("weight" in w for w in r.warnings)
    assert_states_close(merged(r, tmp_path, "w"), merged(recipe(agents, "sce", NAMES, {"select_topk": 0.4}), tmp_path, "now"), rtol=0)


@pytest.mark.parametrize("eps", [1e-5, 0.01])
def test_ram_against_dense_reference(agents, tmp_path, eps) -> None:
    got = merged(recipe(agents, "ram", NAMES, {"epsilon": eps}), tmp_path)
    base, deltas = deltas_of(agents, NAMES)
    assert_states_close(got, {k: (b.double() + ref_ram(deltas[k], eps)).float() for k, b in base.items()})


@pytest.mark.parametrize("r_, alpha", [(0.1, 0.2), (0.5, 3.0)])
def test_ramplus_tensor_scope_against_dense_reference(agents, tmp_path, r_, alpha) -> None:
    got = merged(recipe(agents, "ramplus_tl", NAMES, {"r": r_, "alpha": alpha}), tmp_path)
    base, deltas = deltas_of(agents, NAMES)
    want = {}
    for k, b in base.items():
        _, _, shared, unique = ref_ram_counts(deltas[k], EPS)
        want[k] = (b.double() + ref_ram(deltas[k], EPS, ref_lambdas(shared, unique, r_, alpha, EPS))).float()
    assert_states_close(got, want)


def test_ramplus_model_scope_is_the_authors_rescale(agents, tmp_path) -> None:
    """scope: model, r 0.2, alpha 1 = the authors' code (arm-r-v2, rescale_factor 1.2): one scale per model,
    1 + 0.2 · min(1, O/U) with O, U the model's shared and unique entries over the whole model."""
    names = ["a0", "a2"]  # sparse enough that O/U < 1: the two models get different scales
    r = recipe(agents, "ramplus_tl", names, {"scope": "model", "r": 0.2, "alpha": 1.0})
    assert plan(r).passes == 2
    got = merged(r, tmp_path)
    base, deltas = deltas_of(agents, names)
    overlap, changed = [0] * len(names), [0] * len(names)
    for k in base:
        active, c, _, _ = ref_ram_counts(deltas[k], EPS)
        for t in range(len(names)):
            changed[t] += int(active[t].sum())
            overlap[t] += int((active[t] & (c >= 2)).sum())
    scales = [1 + 0.2 * min(1.0, o / (ch - o)) for o, ch in zip(overlap, changed)]
    assert len({round(s, 6) for s in scales}) > 1, "the models should get different scales"
    assert_states_close(got, {k: (b.double() + ref_ram(deltas[k], EPS, scales)).float() for k, b in base.items()})
    local = merged(recipe(agents, "ramplus_tl", names, {"r": 0.2, "alpha": 1.0}), tmp_path, "tensor-scope")
    assert any(not torch.equal(local[k], got[k]) for k in got)


def test_ram_is_ramplus_without_boost(agents, tmp_path) -> None:
    a = merged(recipe(agents, "ram", NAMES), tmp_path, "ram")
    b = merged(recipe(agents, "ramplus_tl", NAMES, {"r": 0.0}), tmp_path, "plus")
    assert_states_close(a, b, rtol=0)


@pytest.mark.parametrize("method", ["sce", "ram", "ramplus_tl"])
def test_base_is_required(agents, method) -> None:
    with pytest.raises(RecipeError, match="base"):
        Recipe.from_dict({"merge_method": method, "models": [{"model": str(agents[n])} for n in NAMES[:2]]})


def test_declarations() -> None:
    sce, ram_, plus = get_method("sce"), get_method("ram"), get_method("ramplus_tl")
    assert {p.name: p.default for p in sce.params} == {"select_topk": 1.0, "energy_floor": 1e-6, "merge": "mean", "int8_mask": False}
    assert {p.name: p.default for p in ram_.params} == {"epsilon": 1e-5}
    assert {p.name: p.default for p in plus.params} == {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5, "scope": "tensor"}
    assert all(m.inputs == "task_vectors" and m.base == "required" for m in (sce, ram_, plus))
    assert sce.working_copies(8) == sce.working_copies(2)  # SCE works on row chunks: no stack of the task vectors
    assert ram_.working_copies(8) == ram_.working_copies(2)  # RAM streams them
    assert plus.passes({"scope": "tensor"}, torch.float32) == 1 and plus.passes({"scope": "model"}, torch.float32) == 2


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("block", [1 << 17, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_task_variance_is_torch_var_bit_for_bit(count, dtype, block, native, monkeypatch):
    """The select step ranks the variances, so ties at its threshold depend on their last bit: the running
    (Welford) variance must round as torch.var over the stacked task vectors does (whole, or a few thousand
    entries at a time with a shorter last block; of a matrix too); float32 by the native kernel too, its entries
    split over the threads."""
    from mergekit_lite.ops import fused, sce
    from mergekit_lite.ops.sce import task_variance

    if native and not fused.available():
        pytest.skip("the native kernel is not built")
    monkeypatch.setattr(sce, "native_available", lambda: native)
    monkeypatch.setattr(sce, "VARIANCE_SPLIT_MIN", 1000)
    monkeypatch.setattr(sce, "VARIANCE_BLOCK", block)
    torch.manual_seed(count)
    scales = torch.logspace(-6, 2, 9).repeat_interleave(5000)
    deltas = [(torch.randn(scales.numel()) * scales).to(dtype).reshape(450, 100) for _ in range(count)]
    deltas[0][:100] = 0.0
    want = torch.var(torch.stack(deltas), dim=0, unbiased=False)
    assert torch.equal(task_variance(deltas), want)
    assert torch.equal(task_variance(iter(deltas)), want)
    assert torch.equal(task_variance(torch.stack(deltas)), want)
    empty = [torch.empty(0, 3, dtype=dtype) for _ in range(count)]  # no entries: an empty variance
    assert task_variance(empty).shape == (0, 3)


@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_sce_erase_is_the_signed_weighted_sum_bit_for_bit(mode):
    """The erase step adds the agreeing magnitudes and puts the sign back once: the same bits as a plain
    signed, weighted running sum from +0, the sign of every zero included."""
    from mergekit_lite.ops.sce import SCE_DIVISOR_FLOOR, sce_erase

    torch.manual_seed(8)
    deltas = torch.randn(3, 4000)
    deltas[:, ::9] = 0.0
    deltas[1, 1::13] = -0.0
    deltas[:, 5::17] = torch.tensor([1.0, -1.0, 0.0]).unsqueeze(1)  # sums of zero: counted positive
    weights = [0.2, 0.5, 0.3]
    positive = deltas.sum(dim=0) >= 0
    merged, divisor = torch.zeros(4000), torch.zeros(4000)
    for d, w in zip(deltas, weights):
        agree = torch.where(positive, d > 0, d < 0)
        merged = torch.add(merged, torch.where(agree, d, torch.zeros(())), alpha=w)  # torch's fused a + w·b
        divisor = divisor + agree.float() * w
    want = merged / divisor.clamp(min=SCE_DIVISOR_FLOOR) if mode == "mean" else merged
    got = sce_erase(deltas.clone(), weights, mode)
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())


@pytest.mark.parametrize("eps", [0.25, 0.0])
def test_ram_accumulate_keeps_exactly_the_entries_beyond_epsilon(eps) -> None:
    """|τ| > ε exactly (entries at ±ε, zeros of either sign, one float32 step past ε), bit for bit with a plain mask."""
    from mergekit_lite.ops.ram import ram_accumulate

    step = float(torch.nextafter(torch.tensor(0.25), torch.tensor(1.0)))
    d = torch.tensor([
        [0.25, -0.25, step, -step, -0.0, 0.0, 1.0, -2.0],
        [0.5, 0.25, -0.0, 0.1, -0.0, 3.0, -1.0, 0.0],
    ])
    state = ram_accumulate((row.clone() for row in d), eps, track_owner=True)
    active = d.abs() > eps
    total = torch.zeros(d.shape[1])
    for row, a in zip(d, active):
        total = total + torch.where(a, row, torch.zeros(()))
    assert torch.equal(state.total, total) and torch.equal(state.total.signbit(), total.signbit())
    assert torch.equal(state.count, active.sum(0).to(torch.int16))
    assert state.active == [int(a.sum()) for a in active]
    assert torch.equal(state.owner, active[1].to(torch.int16))  # Σ_t t·[τ_t active] until unique_counts
    from mergekit_lite.ops.ram import unique_counts

    assert unique_counts(state) == [int((a & (active.sum(0) == 1)).sum()) for a in active]
    assert torch.equal(state.owner, torch.where(active.sum(0) == 1, torch.where(active[1], 1, 0), -1).to(torch.int16))


def test_ram_owner_map_survives_int16_wrap_with_many_task_vectors() -> None:
    """The owner map is a sum of task indices modulo 2^16: with 300 task vectors the sum wraps where many tasks are
    active, and the entries one task owns (the only ones read) still name that task."""
    from mergekit_lite.ops.ram import ram_accumulate, unique_counts

    count = 300
    deltas = torch.zeros(count, 5)
    deltas[299, 0] = 1.0  # owned by the last task
    deltas[:, 1] = 1.0  # every task: Σ t = 44850, past int16
    deltas[0, 2] = -2.0  # owned by the first
    deltas[150:, 3] = 0.5  # shared by half of them
    deltas[7, 4] = 3.0
    state = ram_accumulate((d.clone() for d in deltas), 1e-5, track_owner=True)
    unique = unique_counts(state)
    assert state.owner.tolist() == [299, -1, 0, -1, 7]
    assert unique == [1 if t in (0, 7, 299) else 0 for t in range(count)]


def test_nonzero_mask_is_torchs_comparison_on_every_path() -> None:
    """numpy's comparison (CPU float32/float64, contiguous) and torch's (everything else) give x != 0 exactly:
    zeros of both signs, subnormals, infinities and NaN included."""
    from mergekit_lite.ops.ram import nonzero_mask

    tiny = float(torch.finfo(torch.float32).tiny) / 4  # a subnormal
    values = torch.tensor([0.0, -0.0, tiny, -tiny, 1.0, float("inf"), float("-inf"), float("nan"), -3.5, 0.0])
    for x in (values, values.double(), values.reshape(2, 5), values.reshape(5, 2).t(), values.bfloat16(), values[::2], torch.tensor(-0.0), torch.tensor(2.0)):
        got = nonzero_mask(x)
        assert got.dtype == torch.bool and got.shape == x.shape and torch.equal(got, x != 0), x


@pytest.mark.parametrize("block", [1, 3, 7, 1 << 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_ramplus_scaling_and_counts_match_a_loop_per_task(monkeypatch, block, dtype) -> None:
    """unique_counts (one bincount) and ramplus_finish (a gather by owner, in blocks over the threads) against a
    comparison per task: the same counts and the same bits, for any block size and on torch's path (bfloat16)."""
    from mergekit_lite.ops import ram as ram_ops

    monkeypatch.setattr(ram_ops, "SCALE_BLOCK", block)
    g = torch.Generator().manual_seed(7)
    deltas = (torch.randn(5, 13, 11, generator=g) * (torch.rand(5, 13, 11, generator=g) < 0.4)).to(dtype)
    deltas[2, 0, 0] = -0.0
    scales = [1.0, 1.25, 0.5, 1.0 + 2**-20, 3.0]
    state = ram_ops.ram_accumulate((d.clone() for d in deltas), 0.0, track_owner=True)
    active = deltas != 0
    count = active.sum(0)
    owner = torch.full(count.shape, -1, dtype=torch.long)
    for t in range(5):
        owner[active[t] & (count == 1)] = t
    assert ram_ops.unique_counts(state) == [int((owner == t).sum()) for t in range(5)]
    total = state.total.clone()
    want = total.clone()
    for t, lam in enumerate(scales):
        want = torch.where(owner == t, want * lam, want)
    want = want / count.clamp(min=1).to(dtype)
    got = ram_ops.ramplus_finish(state, scales)
    assert got.dtype == dtype and torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())


def test_count_true_on_every_path() -> None:
    from mergekit_lite.ops.ram import count_true

    g = torch.Generator().manual_seed(2)
    mask = torch.rand(37, 11, generator=g) < 0.3
    for m in (mask, mask.t(), mask[::3], mask[0, 0], torch.zeros(0, 4, dtype=torch.bool)):
        assert count_true(m) == int(m.sum())


@pytest.mark.parametrize("entries", [11, 30, 1 << 20])
@pytest.mark.parametrize("scope", ["tensor", "model"])
@pytest.mark.parametrize("keep_rows", [False, True])
def test_ramplus_rows_gives_the_stacked_ramplus_bits(entries, scope, keep_rows) -> None:
    """ramplus_rows (row chunks on the threads, counts added up over chunks, each chunk finished with the tensor's
    scales) against the stacked ``ramplus`` and ``ref_ram`` with per-task λ from counts written out here: the same
    bits whether the chunks are kept one by one or the merged tensor is returned."""
    from mergekit_lite.methods.base import HeldTaskVectors, TensorContext
    from mergekit_lite.methods.ram import ramplus_rows

    g = torch.Generator().manual_seed(11)
    deltas = torch.randn(4, 17, 6, generator=g) * (torch.rand(4, 17, 6, generator=g) < torch.tensor([0.2, 0.5, 0.1, 0.7])[:, None, None])
    deltas[1, 3] = 1e-7  # below epsilon
    params = {"epsilon": EPS, "r": 0.5, "alpha": 3.0, "scope": scope}
    _, _, shared, unique = ref_ram_counts(deltas, EPS)
    stats = {"ram_shared": [s + 5 for s in shared], "ram_unique": [u + 1 for u in unique]} if scope == "model" else {}
    lambdas = ref_lambdas(*(stats.values() if stats else (shared, unique)), 0.5, 3.0, EPS)
    assert len(set(lambdas)) > 1
    source = HeldTaskVectors(list(deltas), entries=entries)
    kept: dict[int, torch.Tensor] = {}
    if keep_rows:
        source.keep_merged_rows = lambda rows, merged: kept.__setitem__(0 if rows is None else rows.start, merged.clone())
    got = ramplus_rows(source, TensorContext("w", NAMES, params, [{} for _ in NAMES], stats, None))
    if keep_rows:
        assert got is None and len(kept) == len(source.chunks())
        got = torch.cat([kept[start] for start in sorted(kept)])
    if scope == "tensor":
        assert torch.equal(got, ramplus(deltas.clone(), 0.5, 3.0, EPS))
    torch.testing.assert_close(got.double(), ref_ram(deltas, EPS, lambdas), rtol=1e-6, atol=1e-7)
    assert torch.equal(deltas[1, 3], torch.full((6,), 1e-7))  # the held task vectors were not changed
