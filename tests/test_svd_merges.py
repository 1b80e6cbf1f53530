"""TSV-M, Iso-C, Iso-CTS and WUDI (tsv_m, iso_c, iso_cts, wudi): hand-computed cases, each paper's
proven property, the kernels against dense references written here from the papers' equations, and
whole merges through the public API against a plain state-dict reference.

The references avoid the kernels' route where they can: the Procrustes factor as A·(AᵀA)^(-1/2) by
an eigendecomposition (the kernels use an SVD), the mean singular value as the nuclear norm over the
rank, WUDI by autograd on the literal loss with torch.optim.Adam (the kernel uses the closed-form
gradient and its own Adam update).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergekit_lite
from mergekit_lite import Recipe, RecipeError
from mergekit_lite.methods import get_method
from mergekit_lite.ops.svd_merge import is_spectral, iso_c, iso_cts, iso_cts_sizes, tsv_merge, tsv_rank, wudi_loss, wudi_merge

from helpers import load_state, tiny_llama

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer")  # tiny_llama has no tokenizer files


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def task_vectors(t: int, m: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    return [randn(m, n, seed=seed + i, scale=0.1 * (i + 1)) for i in range(t)]


def orthonormalise(a: torch.Tensor) -> torch.Tensor:
    """A·(AᵀA)^(-1/2) (columns) or (AAᵀ)^(-1/2)·A (rows): the Procrustes factor, by an eigendecomposition."""
    if a.shape[0] >= a.shape[1]:
        lam, q = torch.linalg.eigh(a.mT @ a)
        return a @ (q @ torch.diag(lam.rsqrt()) @ q.mT)
    lam, q = torch.linalg.eigh(a @ a.mT)
    return (q @ torch.diag(lam.rsqrt()) @ q.mT) @ a


# -- dense references from the papers -------------------------------------------------------------
def ref_tsv(taus: list[torch.Tensor]) -> torch.Tensor:
    """TSV-M (Gargiulo et al., Eq. 6-8): top r/T of each task, U⊥ = closest orthonormal U, same for V, U⊥ΣV⊥ᵀ."""
    r, t = min(taus[0].shape), len(taus)
    k = r // t
    us, ss, vs = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].mT)
    return orthonormalise(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ orthonormalise(torch.cat(vs, 1)).mT


def ref_iso_c(taus: list[torch.Tensor]) -> torch.Tensor:
    """Iso-C (Marczak et al., Eq. 7): σ̄·U·Vᵀ of M = Σ τ_t, σ̄ = ‖M‖_* / r and U·Vᵀ = M(MᵀM)^(-1/2)."""
    total = sum(taus)
    mean_sigma = torch.linalg.matrix_norm(total, "nuc") / min(total.shape)
    return mean_sigma * orthonormalise(total)


def ref_iso_cts(taus: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """Iso-CTS (Marczak et al., Alg. 1): common top-c of Σ τ_t, each task's top-d of (I − U_c U_cᵀ)τ_t, orthonormalised, flat."""
    total = sum(taus)
    r, t = min(total.shape), len(taus)
    c = int(r * fraction)
    d = round((r - c) / t)
    c = r - d * t
    u, s, vh = torch.linalg.svd(total)
    us, ss, vs = [u[:, :c]], [s[:c]], [vh[:c].mT]
    proj = torch.eye(total.shape[0], dtype=F64) - u[:, :c] @ u[:, :c].mT
    for tau in taus:
        ut, st_, vht = torch.linalg.svd(proj @ tau)
        us.append(ut[:, :d])
        ss.append(st_[:d])
        vs.append(vht[:d].mT)
    return torch.cat(ss).mean() * orthonormalise(torch.cat(us, 1)) @ orthonormalise(torch.cat(vs, 1)).mT


def ref_wudi(taus: list[torch.Tensor], steps: int, lr: float) -> torch.Tensor:
    """WUDI (Cheng et al., Eq. 12, the authors' loop): Adam on Σ_t ‖(τ − τ_t)τ_tᵀ‖² / ‖τ_t‖²_F from Σ τ_t, by autograd."""
    stacked = torch.stack(taus)
    merged = torch.nn.Parameter(stacked.sum(0).clone())
    optimizer = torch.optim.Adam([merged], lr=lr)
    norms = stacked.flatten(1).norm(dim=1).square()
    for _ in range(steps):
        loss = ((merged.unsqueeze(0) - stacked) @ stacked.mT).square().div(norms[:, None, None]).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merged.detach()


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-9) -> None:
    torch.testing.assert_close(got, want, atol=rtol * float(want.abs().max()), rtol=0)


# -- hand-computed cases ---------------------------------------------------------------------------
def test_hand_cases():
    # TSV-M: two tasks in orthogonal rank-1 directions (k = 1 each): already orthogonal, so the sum
    t1 = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=F64)
    t2 = torch.tensor([[0.0, 0.0], [0.0, 3.0]], dtype=F64)
    close(tsv_merge([t1.clone(), t2.clone()], 2), torch.diag(torch.tensor([2.0, 3.0], dtype=F64)))
    # TSV-M with more tasks than the rank: each keeps 1 triplet (the reference keeps int(2/3) = 0: no update)
    wide = task_vectors(3, 2, 5, seed=9)
    merged = tsv_merge((x.clone() for x in wide), 3)
    assert merged.shape == (2, 5) and float(merged.abs().max()) > 0.01
    # Iso-C: diag(3, 1) has mean singular value 2
    close(iso_c(torch.diag(torch.tensor([3.0, 1.0], dtype=F64))), torch.diag(torch.tensor([2.0, 2.0], dtype=F64)))
    # WUDI: τ_1 = [1, 0] and τ_2 = [0, 1] do not interfere: the loss (a − 1)² + (b − 1)² is 0 at their sum
    rows = [torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([[0.0, 1.0]], dtype=F64)]
    close(wudi_merge([r.clone() for r in rows], steps=50, lr=0.1), torch.tensor([[1.0, 1.0]], dtype=F64))
    # ... and τ_1 = [1, 0], τ_2 = [2, 0]: loss (a − 1)² + (a − 2)², minimum at a = 1.5 (from the sum, 3)
    rows = [torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([[2.0, 0.0]], dtype=F64)]
    close(wudi_merge([r.clone() for r in rows], steps=3000, lr=0.01), torch.tensor([[1.5, 0.0]], dtype=F64), rtol=1e-3)


def test_sizes_follow_the_reference_rounding():
    # (98, 49): the reference's int(98 * (1/49)) is 1, a float rounding; r/T is 2
    assert [tsv_rank(64, 3), tsv_rank(30, 3), tsv_rank(98, 49), tsv_rank(2, 3), tsv_rank(64, 4, 0.5)] == [21, 10, 2, 1, 8]
    # c = ⌊r·f⌋, then r − c rounded to a multiple of T: (64, 3, 0.8): c = 51, 13/3 → 4 per task, c = 52
    assert iso_cts_sizes(64, 3, 0.8) == (52, 4)
    assert iso_cts_sizes(10, 3, 0.8) == (7, 1)
    assert iso_cts_sizes(5, 2, 0.0) == (1, 2)  # round(2.5) = 2 (Python's round)
    assert iso_cts_sizes(2, 3, 0.0) == (2, 0)  # the reference would give c = -1; we keep every dimension common
    assert iso_cts_sizes(16, 4, 1.0) == (16, 0)


def test_which_tensors_are_merged_in_the_singular_basis():
    w = torch.zeros(4, 3)
    assert is_spectral("model.layers.0.mlp.down_proj.weight", w)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "transformer.wpe.weight", "bert.embeddings.position_embeddings.weight"):
        assert not is_spectral(name, w), name
    assert not is_spectral("model.layers.0.input_layernorm.weight", torch.zeros(4))
    assert not is_spectral("conv.weight", torch.zeros(2, 2, 3, 3))


# -- the kernels against the dense references ------------------------------------------------------
@pytest.mark.parametrize("t,m,n", [(3, 12, 9), (4, 8, 16), (2, 10, 10)])
def test_kernels_match_the_dense_references(t, m, n):
    taus = task_vectors(t, m, n, seed=t * 100 + m)
    close(tsv_merge((x.clone() for x in taus), t), ref_tsv(taus), rtol=1e-9)
    close(iso_c(sum(taus)), ref_iso_c(taus), rtol=1e-9)
    close(iso_cts([x.clone() for x in taus], 0.5), ref_iso_cts(taus, 0.5), rtol=1e-9)
    want = ref_wudi(taus, 40, 1e-3)
    close(wudi_merge((x.clone() for x in taus), steps=40, lr=1e-3), want, rtol=1e-9)
    close(wudi_merge((x.clone() for x in taus), steps=40, lr=1e-3, tasks=t), want, rtol=1e-9)  # G factored when n > T·m


def test_wudi_keeps_a_wide_matrix_gram_factored():
    taus = task_vectors(2, 3, 20, seed=4)  # n = 20 > T·m = 6
    want = ref_wudi(taus, 30, 1e-3)
    close(wudi_merge((x.clone() for x in taus), steps=30, lr=1e-3, tasks=2), want, rtol=1e-9)
    close(wudi_merge((x.clone() for x in taus), steps=30, lr=1e-3), want, rtol=1e-9)


def test_wudi_matches_the_reference_in_float32_at_the_paper_settings():
    taus = [x.float() for x in task_vectors(3, 16, 24, seed=7)]
    got = wudi_merge((x.clone() for x in taus), steps=300, lr=1e-5)
    want = ref_wudi(taus, 300, 1e-5)
    close(got, want, rtol=1e-5)
    assert not torch.equal(got, sum(taus))  # the steps moved it


# -- each paper's property -------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 4), m=st.integers(4, 12), n=st.integers(4, 12), seed=st.integers(0, 10_000))
def test_tsv_keeps_every_task_singular_value_on_orthonormal_factors(t, m, n, seed):
    """U⊥ and V⊥ are orthonormal, so the merged matrix's singular values are exactly the kept ones."""
    taus = task_vectors(t, m, n, seed)
    k = tsv_rank(min(m, n), t)
    kept = torch.cat([torch.linalg.svdvals(x)[:k] for x in taus])
    merged = tsv_merge((x.clone() for x in taus), t)
    got = torch.linalg.svdvals(merged)[: k * t]
    close(got, kept.sort(descending=True).values, rtol=1e-9)
    assert int((torch.linalg.svdvals(merged) > 1e-9 * float(kept.max())).sum()) == k * t
    if t == 1:  # one task keeps its whole rank: the merge is the task vector itself
        close(merged, taus[0], rtol=1e-9)


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 4), m=st.integers(3, 12), n=st.integers(3, 12), f=st.sampled_from([0.0, 0.3, 0.8, 1.0]), seed=st.integers(0, 10_000))
def test_iso_spectra_are_flat(t, m, n, f, seed):
    """Iso-C: every singular value is the mean of Σ τ_t's; Iso-CTS: flat too, and Iso-C at f = 1."""
    taus = task_vectors(t, m, n, seed)
    total = sum(taus)
    sigma = torch.linalg.svdvals(iso_c(total.clone()))
    close(sigma, torch.full_like(sigma, float(torch.linalg.svdvals(total).mean())), rtol=1e-9)
    cts = torch.linalg.svdvals(iso_cts([x.clone() for x in taus], f))
    close(cts, torch.full_like(cts, float(cts.mean())), rtol=1e-8)
    if f == 1.0:
        close(iso_cts([x.clone() for x in taus], 1.0), iso_c(total.clone()), rtol=1e-9)


def test_wudi_lowers_the_interference_loss_and_keeps_a_single_task():
    taus = task_vectors(4, 10, 14, seed=3)
    start = sum(taus)
    merged = wudi_merge((x.clone() for x in taus), steps=100, lr=1e-3)
    assert float(wudi_loss(merged, taus)) < 0.8 * float(wudi_loss(start, taus))
    # run long enough, Adam reaches the loss's unique minimiser: Σ_t (τ − τ_t)·τ_tᵀτ_t / ‖τ_t‖² = 0
    grams = [x.mT @ x / x.square().sum() for x in taus]
    best = torch.linalg.solve(sum(grams), sum(x @ g for x, g in zip(taus, grams)).mT).mT
    close(wudi_merge((x.clone() for x in taus), steps=4000, lr=1e-2), best, rtol=1e-3)
    close(wudi_merge((x.clone() for x in taus), steps=0), start)
    # one task: its own update is the minimiser (loss 0); Adam only jitters around it, by about lr (the
    # gradient there is rounding noise, which Adam's normalisation amplifies up to a step of lr)
    assert float((wudi_merge([taus[0].clone()], steps=300, lr=1e-3) - taus[0]).abs().max()) <= 3e-3


def test_rank_deficient_task_vectors_give_one_answer():
    """Zero singular values carry arbitrary vectors; the merges must not depend on them (float32 vs float64 SVDs)."""
    full = task_vectors(2, 12, 10, seed=5)
    low = randn(12, 2, seed=8) @ randn(2, 10, seed=9) * 0.1  # rank 2 < k = 3
    taus = [full[0], low, full[1]]
    for merge in (lambda xs: tsv_merge(xs, 3), lambda xs: iso_cts(list(xs), 0.5), lambda xs: iso_c(sum(xs))):
        want = merge([x.clone() for x in taus])
        got = merge([x.float() for x in taus]).double()
        close(got, want, rtol=1e-4)
    # the sum of two rank-1 updates: Iso-C stays on their rank-2 range, at the mean of its two singular values
    a, b = randn(6, 1, seed=1) @ randn(1, 5, seed=2), randn(6, 1, seed=3) @ randn(1, 5, seed=4)
    total = a + b
    sigma = torch.linalg.svdvals(total)
    got = iso_c(total.clone())
    close(torch.linalg.svdvals(got)[:2], sigma[:2].mean().expand(2), rtol=1e-9)
    close(torch.linalg.pinv(total) @ total @ got.mT @ got, got.mT @ got, rtol=1e-9)  # no direction outside the range
    # TSV-M of two identical task vectors: each keeps the same top r/2, and the merge is that truncation
    tau = randn(8, 6, seed=11)
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    close(tsv_merge([tau.clone(), tau.clone()], 2), u[:, :3] @ torch.diag(s[:3]) @ vh[:3], rtol=1e-9)
    # all-zero task vectors merge to zero
    zeros = torch.zeros(4, 3, dtype=F64)
    for merged in (tsv_merge([zeros.clone()] * 2, 2), iso_cts([zeros.clone()] * 2), iso_c(zeros.clone())):
        assert torch.equal(merged, zeros)


# -- whole merges through the API ------------------------------------------------------------------
@pytest.fixture(scope="module")
def dense_finetunes(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama and three fine-tunes whose task vectors are dense (full rank): every reference is well defined."""
    import shutil

    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("svd")
    base = tiny_llama(root / "base", 2, 21)
    out = {"base": base}
    for i in range(3):
        folder = root / f"ft{i}"
        shutil.copytree(base, folder)
        g = torch.Generator().manual_seed(300 + i)
        state = {k: (w + torch.randn(w.shape, generator=g) * 0.02 * (i + 1)).contiguous() for k, w in load_state(base).items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        out[f"ft{i}"] = folder
    return out


def merge_dense(method: str, base: dict, fts: list[dict], weights: list[float], lam: float, **params) -> dict:
    """The merged state dict, tensor by tensor: the paper's merge on 2-D linear weights, the mean elsewhere."""
    out = {}
    for name, b in base.items():
        taus = [(ft[name].double() - b.double()) * w for ft, w in zip(fts, weights)]
        if b.ndim == 2 and "embed" not in name and "lm_head" not in name:
            merged = {
                "tsv_m": lambda: ref_tsv(taus),
                "iso_c": lambda: ref_iso_c(taus),
                "iso_cts": lambda: ref_iso_cts(taus, params.get("common_space_fraction", 0.8)),
                "wudi": lambda: ref_wudi(taus, params.get("steps", 300), params.get("lr", 1e-5)),
            }[method]()
        else:
            merged = sum(taus) / len(taus)
        out[name] = (b.double() + lam * merged).to(b.dtype)
    return out


@pytest.mark.parametrize("method,params", [
    ("tsv_m", {}), ("iso_c", {}), ("iso_cts", {"common_space_fraction": 0.5}), ("wudi", {"steps": 20, "lr": 1e-4}),
])
def test_api_merge_matches_the_dense_reference(dense_finetunes, tmp_path, method, params):
    names = ["ft0", "ft1", "ft2"]
    weights = [1.0, 0.5, 1.5]
    recipe = Recipe.from_dict({
        "merge_method": method, "base_model": str(dense_finetunes["base"]), "dtype": "float32",
        "models": [{"model": str(dense_finetunes[t]), "parameters": {"weight": w}} for t, w in zip(names, weights)],
        "parameters": {"lambda": 0.8, **params},
    })
    got = load_state(mergekit_lite.run(recipe, tmp_path / "out", progress=False))
    base = load_state(dense_finetunes["base"])
    want = merge_dense(method, base, [load_state(dense_finetunes[t]) for t in names], weights, 0.8, **params)
    assert set(got) == set(want)
    for name in want:
        scale = float((want[name].double() - base[name].double()).abs().max())
        torch.testing.assert_close(got[name].double(), want[name].double(), atol=1e-5 * scale, rtol=0, msg=name)
        assert not torch.equal(got[name], base[name]), name


def test_merges_are_deterministic(demo, tmp_path):
    from mergekit_lite.demo import DEMO_TASKS

    outs = []
    for i in range(2):
        recipe = Recipe.from_dict({"merge_method": "tsv_m", "base_model": str(demo["base"]), "dtype": "float32",
                                   "models": [{"model": str(demo[t])} for t in DEMO_TASKS]})
        outs.append((mergekit_lite.run(recipe, tmp_path / f"out{i}", progress=False) / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("method,params,field", [
    ("iso_cts", {"common_space_fraction": 1.5}, "common_space_fraction"),
    ("tsv_m", {"rank_fraction": -0.1}, "rank_fraction"),
    ("wudi", {"steps": 2.5}, "steps"),
    ("wudi", {"lr": -1.0}, "lr"),
])
def test_bad_parameters_name_the_field(demo, method, params, field):
    with pytest.raises(RecipeError, match=field):
        Recipe.from_dict({"merge_method": method, "base_model": str(demo["base"]), "models": [{"model": str(demo["math"])}],
                          "parameters": params})


def test_declarations():
    for name in ("tsv_m", "iso_c", "iso_cts", "wudi"):
        method = get_method(name)
        assert method.inputs == "task_vectors" and method.base == "required" and method.paper.startswith("https://arxiv.org/")
        assert {"weight", "lambda"} <= {p.name for p in method.params}
    # large tensors read each task vector twice instead of holding them: the declaration does not grow with K
    assert get_method("iso_cts").working_copies(8) == get_method("iso_cts").working_copies(2)
    assert get_method("tsv_m").working_copies(8) == get_method("tsv_m").working_copies(2)  # one at a time
    # an evaluator searches λ; Iso's flat spectrum shrinks the update, so its grid reaches above 1
    assert get_method("iso_c").param("lambda").searchable and max(get_method("iso_cts").param("lambda").default_grid) == 3.0


def test_recipes_run_on_the_demo(demo, tmp_path):
    """recipes/{tsv_m,iso_c,iso_cts,wudi}.yml, pointed at the demo checkpoints, merge."""
    import yaml

    repo = Path(__file__).resolve().parent.parent
    for name in ("tsv_m", "iso_c", "iso_cts", "wudi"):
        data = yaml.safe_load((repo / "recipes" / f"{name}.yml").read_text())
        data["base_model"] = str(demo["base"])
        for entry in data["models"]:
            entry["model"] = str(demo[Path(entry["model"]).name])
        if name == "wudi":
            data["parameters"]["steps"] = 5  # the recipe's 300 steps are covered above; keep this test fast
        out = mergekit_lite.run(Recipe.from_dict(data), tmp_path / name, progress=False)
        assert (out / "model.safetensors").is_file()


def test_iso_cts_from_a_source_read_twice_equals_iso_cts_of_the_list():
    torch.manual_seed(11)
    taus = [torch.randn(9, 6, dtype=torch.float64) for _ in range(3)]
    calls = []

    def again():
        calls.append(1)
        return (t.clone() for t in taus)

    assert torch.equal(iso_cts(again, 0.5), iso_cts([t.clone() for t in taus], 0.5))
    assert len(calls) == 2
