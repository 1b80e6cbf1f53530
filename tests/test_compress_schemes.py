"""EMR-Merging and TSV-C collections: the formulas against plain dense computations written here,
round trips compress → extract on the demo, storage sizes, and clean failures (one line, exit 2)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import mergekit_lite
from mergekit_lite import Collection, Recipe
from mergekit_lite.cli import main
from mergekit_lite.demo import DEMO_TASKS
from mergekit_lite.ops import emr_elect, emr_mask, emr_rescaler, low_rank_product, rank_budget, truncated_svd
from mergekit_lite.ops.bitpack import packed_size
from mergekit_lite.plan import plan as make_plan

from helpers import leftovers, load_state, write_recipe


# -- plain references ------------------------------------------------------------------------------
def ref_emr(taus: list[list[float]]) -> tuple[list[float], list[list[bool]]]:
    """EMR's election and masks entry by entry, as the authors' code states them: flag = +1 where
    Σ_t τ_t > 0 else −1; mask_t = τ_t · flag > 0; τ_uni = flag · max_t |mask_t · τ_t|."""
    unified, masks = [], [[] for _ in taus]
    for i in range(len(taus[0])):
        flag = 1.0 if sum(tau[i] for tau in taus) > 0 else -1.0
        biggest = 0.0
        for t, tau in enumerate(taus):
            agree = tau[i] * flag > 0
            masks[t].append(agree)
            if agree:
                biggest = max(biggest, abs(tau[i]))
        unified.append(flag * biggest)
    return unified, masks


def numpy_rank_k(matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best rank-k approximation by numpy's SVD in float64, and all singular values."""
    u, s, vh = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k], s


def unpack(packed: torch.Tensor, shape) -> torch.Tensor:
    bits = np.unpackbits(packed.numpy())[: math.prod(shape)]
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


# -- ops -------------------------------------------------------------------------------------------
def test_emr_hand_computed():
    taus = [torch.tensor([1.0, -2.0, 0.0, 3.0]), torch.tensor([-3.0, 1.0, 0.0, -1.0]), torch.tensor([1.0, -1.0, 0.0, 0.0])]
    # sums -1, -2, 0, 2 → signs −, −, − (a zero sum counts as negative), +
    uni = emr_elect(taus)
    assert uni.tolist() == [-3.0, -2.0, 0.0, 3.0]
    masks = [emr_mask(t, uni).tolist() for t in taus]
    assert masks == [[False, True, False, True], [True, False, False, False], [False, True, False, False]]
    # λ_t = Σ|τ_t| / Σ|m_t ⊙ τ_uni|: 6 / (2 + 3), 5 / 3, 2 / 2
    assert emr_rescaler(6.0, 5.0) == pytest.approx(1.2)
    assert emr_rescaler(5.0, 3.0) == pytest.approx(5 / 3)
    assert emr_rescaler(2.0, 2.0) == 1.0
    assert emr_rescaler(4.0, 0.0) == 1.0  # nothing kept: the task comes back as the base whatever λ is
    assert [t.tolist() for t in taus][0] == [1.0, -2.0, 0.0, 3.0]  # inputs untouched


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_emr_matches_the_reference_entry_by_entry(tasks, size, seed):
    gen = torch.Generator().manual_seed(seed)
    # small integers: many ties, zero entries and zero sums
    taus = [torch.randint(-2, 3, (size,), generator=gen).float() for _ in range(tasks)]
    want_uni, want_masks = ref_emr([t.tolist() for t in taus])
    uni = emr_elect(taus)
    assert uni.tolist() == want_uni
    for tau, want in zip(taus, want_masks):
        assert emr_mask(tau, uni).tolist() == want


def test_emr_mask_does_not_underflow():
    tiny = torch.tensor([1e-30, -1e-30])
    uni = torch.tensor([1e-30, 1e-30])
    assert emr_mask(tiny, uni).tolist() == [True, False]  # a product would underflow to 0 in float32


@pytest.mark.parametrize(
    ("shape", "tasks", "fraction", "rank", "want"),
    [((64, 128), 3, None, None, 21), ((32, 64), 3, None, None, 10), ((2, 100), 3, None, None, 1), ((64, 64), 8, None, None, 8),
     ((64, 128), 3, 0.5, None, 32), ((64, 128), 3, 0.0, None, 1), ((64, 128), 3, 1.0, None, 64), ((64, 128), 3, None, 5, 5),
     ((64, 128), 3, None, 1000, 64)],
)
def test_rank_budget(shape, tasks, fraction, rank, want):
    assert rank_budget(shape, tasks, fraction, rank) == want


def test_rank_budget_refuses_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        rank_budget((4,), 2)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_truncated_svd_is_the_best_rank_k_approximation(k):
    gen = torch.Generator().manual_seed(k)
    matrix = torch.randn(9, 7, generator=gen, dtype=torch.float64)
    got = truncated_svd(matrix, k)
    want, sigma = numpy_rank_k(matrix.numpy(), k)
    assert got.u.shape == (9, k) and got.s.shape == (k,) and got.vh.shape == (k, 7)
    np.testing.assert_allclose(got.s.numpy(), sigma[:k], rtol=1e-12)
    np.testing.assert_allclose(low_rank_product(got.u, got.s, got.vh).numpy(), want, atol=1e-12)
    assert got.dropped == pytest.approx(float((sigma[k:] ** 2).sum()), rel=1e-12, abs=1e-24)
    # Eckart–Young: what is dropped is exactly the squared error
    assert float(((matrix.numpy() - want) ** 2).sum()) == pytest.approx(got.dropped, rel=1e-9, abs=1e-20)


def test_truncated_svd_refuses_bad_rank():
    with pytest.raises(ValueError, match="between 1 and 3"):
        truncated_svd(torch.zeros(3, 5), 4)


# -- collections on the demo -----------------------------------------------------------------------
def scheme_recipe(demo, method: str, **params) -> Recipe:
    return Recipe.from_dict({"merge_method": method, "base_model": str(demo["base"]),
                             "models": [{"model": str(demo[t])} for t in DEMO_TASKS], "parameters": params})


def compress(demo, tmp_path, method, name="coll", **params) -> Path:
    return mergekit_lite.run(scheme_recipe(demo, method, **params), tmp_path / name, progress=False)


@pytest.fixture(scope="module")
def built(demo, tmp_path_factory):
    """One EMR and one TSV-C collection of the demo with default parameters, shared by the tests that only read them
    (the others copy them first)."""
    folder = tmp_path_factory.mktemp("schemes")
    return {"emr": compress(demo, folder, "emr", name="emr"), "tsv_compress": compress(demo, folder, "tsv_compress", name="tsv")}


def copied(built, tmp_path, method) -> Path:
    return Path(shutil.copytree(built[method], tmp_path / f"copy-{method}"))


@pytest.fixture(scope="module")
def dense(demo):
    """The base, the fine-tunes and the task vectors, read plainly."""
    base = load_state(demo["base"])
    fts = [load_state(demo[t]) for t in DEMO_TASKS]
    return base, fts, [{n: ft[n] - base[n] for n in base} for ft in fts]


@pytest.mark.parametrize("rescaler", ["l1", "tensor_mean"])
def test_emr_collection_is_the_dense_formula(demo, dense, built, tmp_path, rescaler):
    base, fts, taus = dense
    coll = built["emr"] if rescaler == "l1" else compress(demo, tmp_path, "emr", rescaler=rescaler)
    stored = load_file(coll / "tau_mtl.safetensors")
    manifest = json.loads((coll / "manifest.json").read_text())
    assert manifest["scheme"] == "emr" and manifest["format_version"] == 3 and manifest["rescaler"] == rescaler
    # τ_uni written plainly: sign of τ_1 + τ_2 + τ_3 (0 counts as negative), largest agreeing magnitude
    uni, masks = {}, [{} for _ in DEMO_TASKS]
    for n in base:
        positive = (taus[0][n] + taus[1][n] + taus[2][n]) > 0
        agree = [torch.where(positive, tau[n] > 0, tau[n] < 0) for tau in taus]
        biggest = torch.stack([torch.where(a, tau[n].abs(), torch.zeros(())) for a, tau in zip(agree, taus)]).amax(0)
        uni[n] = torch.where(positive, biggest, -biggest)
        for t in range(3):
            masks[t][n] = agree[t]
        assert torch.equal(stored[n], uni[n]), n
    # λ_t = Σ|τ_t| / Σ|m_t ⊙ τ_uni| over the model (or the sum of per-tensor means)
    for t, task in enumerate(DEMO_TASKS):
        if rescaler == "l1":
            num = sum(float(taus[t][n].double().abs().sum()) for n in base)
            den = sum(float((masks[t][n] * uni[n]).double().abs().sum()) for n in base)
        else:
            num = sum(float(taus[t][n].double().abs().mean()) for n in base)
            den = sum(float((masks[t][n] * uni[n]).double().abs().mean()) for n in base)
        entry = manifest["tasks"][t]
        assert entry["rescaler"] == pytest.approx(num / den, rel=1e-9), task
        lam = entry["rescaler"]
        packed = load_file(coll / "masks" / f"{t:03d}-{task}.safetensors")
        got = load_state(Collection.open(coll).extract(task, tmp_path / task, progress=False))
        err = norm = 0.0
        for n in base:
            assert torch.equal(unpack(packed[n], base[n].shape), masks[t][n]), (task, n)
            want = base[n] + torch.where(masks[t][n], uni[n], torch.zeros(())) * lam
            torch.testing.assert_close(got[n], want, rtol=1e-6, atol=1e-7, msg=f"{task} {n}")
            err += float((got[n].double() - fts[t][n].double()).square().sum())
            norm += float(taus[t][n].double().square().sum())
        assert entry["relative_error"] == pytest.approx((err / norm) ** 0.5, rel=1e-4), task
        total = sum(m.numel() for m in masks[t].values())
        assert entry["density"] == pytest.approx(sum(int(m.sum()) for m in masks[t].values()) / total, abs=1e-12)


def test_emr_reproduces_a_single_task(demo, tmp_path):
    """With one task τ_uni = τ and the mask keeps every non-zero entry: λ = 1 and the fine-tune comes back."""
    data = scheme_recipe(demo, "emr").model_dump()
    data["models"] = data["models"][:1]
    coll = mergekit_lite.run(Recipe.from_dict(data), tmp_path / "one", progress=False)
    entry = json.loads((coll / "manifest.json").read_text())["tasks"][0]
    assert entry["rescaler"] == 1.0 and entry["relative_error"] < 1e-6
    got = load_state(Collection.open(coll).extract("math", tmp_path / "m", progress=False))
    want = load_state(demo["math"])
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("params", [{}, {"rank_fraction": 1.0}])
def test_tsv_collection_is_the_dense_formula(demo, dense, built, tmp_path, params):
    base, fts, taus = dense
    coll = built["tsv_compress"] if not params else compress(demo, tmp_path, "tsv_compress", **params)
    manifest = json.loads((coll / "manifest.json").read_text())
    assert manifest["scheme"] == "tsv" and manifest["format_version"] == 3
    matrices = [n for n in base if base[n].dim() == 2]
    others = [n for n in base if base[n].dim() != 2]
    assert matrices and others
    ranks = {n: params.get("rank") or math.floor(min(base[n].shape) * params.get("rank_fraction", 1 / 3) + 1e-9) for n in matrices}
    assert manifest["factors"]["ranks"] == ranks
    stored = load_file(coll / "tau_mtl.safetensors")
    assert set(stored) == set(others)  # τ_MTL only for the tensors that are not 2-D
    for n in others:
        assert torch.equal(stored[n], taus[0][n] + taus[1][n] + taus[2][n]), n
    for t, task in enumerate(DEMO_TASKS):
        factors = load_file(coll / "factors" / f"{t:03d}-{task}.safetensors")
        packed = load_file(coll / "masks" / f"{t:03d}-{task}.safetensors")
        assert set(packed) == set(others)
        assert set(factors) == {f"{n}{s}" for n in matrices for s in (".U", ".S", ".Vh")}
        got = load_state(Collection.open(coll).extract(task, tmp_path / task, progress=False))
        err = norm = 0.0
        for n in matrices:
            k = ranks[n]
            want, sigma = numpy_rank_k(taus[t][n].numpy(), k)
            np.testing.assert_allclose(factors[f"{n}.S"].numpy(), sigma[:k], rtol=1e-4, atol=1e-7, err_msg=f"{task} {n}")
            # the best rank-k approximation: the same matrix as numpy's (float32 vs float64 SVD: to 1e-3 of its
            # norm, the top-k subspace moves where σ_k ≈ σ_k+1) and the optimal error Σ_i>k σ_i² (Eckart–Young)
            update = (got[n] - base[n]).double().numpy()
            assert np.linalg.norm(update - want) <= 1e-3 * np.linalg.norm(want), (task, n)
            optimal = float((sigma[k:] ** 2).sum())
            assert float(((taus[t][n].double().numpy() - update) ** 2).sum()) == pytest.approx(optimal, rel=1e-3, abs=1e-9 * float((sigma ** 2).sum())), (task, n)
            # what is written is exactly base + (U · S) @ Vh from the stored factors
            exact = base[n] + (factors[f"{n}.U"] * factors[f"{n}.S"]) @ factors[f"{n}.Vh"]
            assert torch.equal(got[n], exact), (task, n)
        for n in others:
            m = taus[t][n].abs() > 0.4 * (stored[n] - taus[t][n]).abs()
            assert torch.equal(unpack(packed[n], m.shape), m), (task, n)
            assert torch.equal(got[n], base[n] + torch.where(m, stored[n], torch.zeros(()))), (task, n)
        for n in base:
            err += float((got[n].double() - fts[t][n].double()).square().sum())
            norm += float(taus[t][n].double().square().sum())
        assert manifest["tasks"][t]["relative_error"] == pytest.approx((err / norm) ** 0.5, rel=1e-4), task
        if params:  # full rank: the matrices come back as they were, to float32 rounding
            for n in matrices:
                torch.testing.assert_close(got[n], fts[t][n], rtol=0, atol=2e-6)


def header_bytes(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_storage_sizes(demo, dense, built):
    """EMR: 32·P + T·P bits (as TALL masks); TSV-C: T · 32·k(m + n + 1) bits per matrix, TALL for the rest;
    the plan's estimate says the same."""
    base = dense[0]
    T = len(DEMO_TASKS)
    for method in ("emr", "tsv_compress"):
        coll = built[method]
        files = [coll / "tau_mtl.safetensors", *(coll / "masks").iterdir(), *((coll / "factors").iterdir() if method == "tsv_compress" else [])]
        headers = sum(header_bytes(f) for f in files)
        masked = [n for n in base if method == "emr" or base[n].dim() != 2]
        want = sum(4 * base[n].numel() + T * packed_size(base[n].numel()) for n in masked)
        if method == "tsv_compress":
            for n in base:
                if base[n].dim() == 2:
                    m, k_n = base[n].shape
                    k = min(m, k_n) // T
                    want += T * 4 * k * (m + k_n + 1)
        assert sum(f.stat().st_size for f in files) == want + headers, method
        plan = make_plan(scheme_recipe(demo, method))
        assert plan.bytes_to_write == want, method
        summary = Collection.open(coll).summary()
        assert summary["bytes_on_disk"] == sum(e["size"] for e in json.loads((coll / "manifest.json").read_text())["files"].values()) + (coll / "manifest.json").stat().st_size


def test_extract_reads_only_its_own_files(built, tmp_path, monkeypatch):
    from mergekit_lite.products import collection as collection_module

    coll, emr = built["tsv_compress"], built["emr"]
    read: list[str] = []
    real_hash, real_open = collection_module.sha256_file, collection_module.open_checkpoint
    monkeypatch.setattr(collection_module, "sha256_file", lambda p, *a: read.append(str(p)) or real_hash(p, *a))
    monkeypatch.setattr(collection_module, "open_checkpoint", lambda p: read.append(str(p)) or real_open(p))
    Collection.open(coll).extract("code", tmp_path / "code", progress=False)
    assert {Path(p).name for p in read if "/masks/" in p or "/factors/" in p} == {"001-code.safetensors"}
    assert {Path(p).parent.name for p in read if "/masks/" in p or "/factors/" in p} == {"masks", "factors"}
    read.clear()
    Collection.open(emr).extract("chat", tmp_path / "chat", progress=False)
    assert {Path(p).name for p in read if "/masks/" in p} == {"002-chat.safetensors"}


def test_tall_collections_stay_version_2_and_old_manifests_read_as_tall(demo, tmp_path):
    coll = compress(demo, tmp_path, "tall_masks")
    manifest = json.loads((coll / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["scheme"] == "tall"
    del manifest["scheme"]  # as mergekit-lite wrote version 2 before the other schemes
    rewrite_manifest(coll, manifest)
    opened = Collection.open(coll)
    assert opened.scheme == "tall" and opened.summary()["scheme"] == "tall"
    assert load_state(opened.extract("math", tmp_path / "m", progress=False))


# -- inspect -------------------------------------------------------------------------------------
def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_inspect_shows_the_scheme(built):
    emr = built["emr"]
    tsv = built["tsv_compress"]
    out = cli("inspect", str(emr))
    assert out.exit_code == 0, out.output
    assert "scheme: EMR-Merging" in out.output and "rescaler: l1" in out.output and "λ (rescaler)" in out.output
    out = cli("inspect", str(tsv), "--verify")
    assert out.exit_code == 0, out.output
    assert "scheme: TSV-C" in out.output and "16 2-D tensors at rank 10/21 per task" in out.output and "verified" in out.output
    info = json.loads(cli("inspect", str(tsv), "--json").output)
    assert info["scheme"] == "tsv" and info["ranks"] == [10, 21] and info["factored_tensors"] == 16
    assert json.loads(cli("inspect", str(emr), "--json").output)["tasks"][0]["rescaler"] > 0
    assert "tsv_compress" in cli("methods").output and "rank_fraction" in cli("methods", "tsv_compress").output


# -- corruption and misuse -------------------------------------------------------------------------
def assert_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def rewrite_manifest(coll: Path, manifest: dict) -> None:
    """Edit a manifest and fix its checksum, as someone hand-editing it would."""
    (coll / "manifest.json").write_text(json.dumps(manifest))
    (coll / "manifest.json.sha256").write_text(hashlib.sha256((coll / "manifest.json").read_bytes()).hexdigest() + "\n")


def test_flipped_byte_in_factors(built, tmp_path):
    coll = copied(built, tmp_path, "tsv_compress")
    path = coll / "factors" / "001-code.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    assert_error(cli("extract", str(coll), "code", str(tmp_path / "out")), "factors/001-code.safetensors", "SHA-256")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert cli("extract", str(coll), "math", str(tmp_path / "math"), "-q").exit_code == 0
    assert_error(cli("inspect", str(coll), "--verify"), "001-code.safetensors")


def test_missing_factor_file(built, tmp_path):
    coll = copied(built, tmp_path, "tsv_compress")
    (coll / "factors" / "000-math.safetensors").unlink()
    assert_error(cli("inspect", str(coll)), "000-math.safetensors", "missing")


def test_edited_manifests_are_refused(built, tmp_path):
    emr = copied(built, tmp_path, "emr")
    original = json.loads((emr / "manifest.json").read_text())
    for edit, needle in [
        (lambda m: m["tasks"][0].update(rescaler="big"), "non-numeric"),
        (lambda m: m["tasks"][0].update(rescaler=-1.0), "rescaler must be >= 0"),
        (lambda m: m.update(format_version=2), "needs format version 3"),
        (lambda m: m.update(scheme="zip"), "'scheme' must be one of"),
    ]:
        manifest = json.loads(json.dumps(original))
        edit(manifest)
        rewrite_manifest(emr, manifest)
        assert_error(cli("inspect", str(emr)), "invalid manifest", needle)
    tsv = copied(built, tmp_path, "tsv_compress")
    manifest = json.loads((tsv / "manifest.json").read_text())
    manifest["factors"]["ranks"]["model.norm.weight"] = 1
    rewrite_manifest(tsv, manifest)
    assert_error(cli("inspect", str(tsv)), "not a stored 2-D tensor")
    manifest["factors"]["ranks"].pop("model.norm.weight")
    name = "model.layers.0.mlp.up_proj.weight"
    manifest["factors"]["ranks"][name] += 1  # the stored factors no longer have this rank
    rewrite_manifest(tsv, manifest)
    assert_error(cli("extract", str(tsv), "math", str(tmp_path / "out")), name, "malformed")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("method", "params", "extra", "needles"),
    [
        ("tsv_compress", {"rank": 2, "rank_fraction": 0.5}, {}, ("rank or rank_fraction, not both",)),
        ("tsv_compress", {"rank_fraction": 1.5}, {}, ("rank_fraction", "<= 1")),
        ("tsv_compress", {"rank": 0}, {}, ("rank", ">= 1")),
        ("emr", {"rescaler": "l2"}, {}, ("rescaler", "not one of")),
        ("emr", {}, {"evaluator": "my_eval:score"}, ("evaluator", "no parameter an evaluator can search")),
        ("tsv_compress", {"tall_lambda": {"search": [0.2, 0.4]}}, {"evaluator": "my_eval:score"}, ("tall_lambda cannot be searched",)),
    ],
)
def test_bad_parameters_are_one_line(demo, tmp_path, method, params, extra, needles):
    data = scheme_recipe(demo, method).model_dump() | {"parameters": params} | extra
    path = write_recipe(tmp_path / "r.yml", data)
    assert_error(cli("run", str(path), str(tmp_path / "out")), *needles)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert_error(cli("run", str(path), str(tmp_path / "out"), "--dry-run"), *needles)  # refused before anything is read
