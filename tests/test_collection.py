"""TALL-masks collections: extraction is θ_0 + m_t ⊙ τ_MTL bit for bit; corruption and misuse fail cleanly."""

from __future__ import annotations

import json
import math
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import mergekit_lite
from mergekit_lite import Collection, CollectionError, Recipe
from mergekit_lite.ops.bitpack import packed_size
from mergekit_lite.cli import main
from mergekit_lite.demo import DEMO_TASKS, build_demo, finetune_like

from helpers import leftovers, load_state
from test_methods import flatten, kth_largest, ref_ties_flat, unflatten


def tall_recipe(demo, **params) -> Recipe:
    data = {
        "merge_method": "tall_masks",
        "base_model": str(demo["base"]),
        "models": [{"model": str(demo[t])} for t in DEMO_TASKS],
        "parameters": params,
    }
    return Recipe.from_dict(data)


def compress(demo, tmp_path, name="coll", **params) -> Path:
    return mergekit_lite.run(tall_recipe(demo, **params), tmp_path / name, progress=False)


def unpack_reference(packed: torch.Tensor, shape) -> torch.Tensor:
    """Independent unpacking with numpy (big-endian bit order, as np.packbits writes)."""
    bits = np.unpackbits(packed.numpy())[: math.prod(shape)]
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


@pytest.mark.parametrize("aggregate", ["task_arithmetic", "ties"])
def test_extract_is_base_plus_masked_mtl_bit_for_bit(demo, tmp_path, aggregate):
    coll = compress(demo, tmp_path, aggregate=aggregate, tall_lambda=0.4)
    base = load_state(demo["base"])
    fts = [load_state(demo[t]) for t in DEMO_TASKS]
    names = list(base)
    taus = [{n: ft[n] - base[n] for n in names} for ft in fts]
    stored = load_file(coll / "tau_mtl.safetensors")
    # τ_MTL is what the method says (checked independently, to float tolerance)
    if aggregate == "task_arithmetic":
        want_mtl = {n: sum(tau[n].double() for tau in taus) for n in names}
    else:
        flat = flatten(taus, names)
        k = math.floor(0.2 * flat.shape[1])
        want_mtl = unflatten(ref_ties_flat(flat, [1.0] * 3, [kth_largest(flat[t], k) for t in range(3)], "sum", None), taus[0], names)
    for n in names:
        torch.testing.assert_close(stored[n].double(), want_mtl[n].double(), atol=1e-6, rtol=0, msg=n)
    for t, task in enumerate(DEMO_TASKS):
        masks = load_file(coll / "masks" / f"{t:03d}-{task}.safetensors")
        out = mergekit_lite.Collection.open(coll).extract(task, tmp_path / f"ex-{task}", progress=False)
        got = load_state(out)
        for n in names:
            m = taus[t][n].abs() > 0.4 * (stored[n] - taus[t][n]).abs()
            assert torch.equal(unpack_reference(masks[n], m.shape), m), (task, n)  # the mask round-trips
            want = base[n] + torch.where(m, stored[n], torch.zeros(()))
            assert torch.equal(got[n], want), (task, n)


def test_extract_loads_in_transformers_with_task_files(demo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    coll = compress(demo, tmp_path)
    out = Collection.open(coll).extract("code", tmp_path / "code", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 512
    assert AutoTokenizer.from_pretrained(out)("w3").input_ids
    assert json.loads((out / "config.json").read_text()) == json.loads((demo["code"] / "config.json").read_text())
    assert (out / "generation_config.json").is_file()


def test_lazy_state_dict_and_stats(demo, tmp_path):
    """The lazy state dict is θ_0 + m ⊙ τ_MTL and the recorded statistics count the mask bits,
    both recomputed here from the files (read with safetensors, masks unpacked with numpy)."""
    path = compress(demo, tmp_path)
    base = load_file(demo["base"] / "model.safetensors")
    stored = load_file(path / "tau_mtl.safetensors")
    assert set(stored) == set(base)  # every demo tensor is float, so every one is merged
    masks = {
        task: {n: unpack_reference(packed, base[n].shape) for n, packed in load_file(path / "masks" / f"{t:03d}-{task}.safetensors").items()}
        for t, task in enumerate(DEMO_TASKS)
    }
    coll = Collection.open(path)
    assert coll.tasks == list(DEMO_TASKS)
    state = coll.load_state_dict("math")
    try:
        assert set(state) == set(base) and len(state) == len(base)
        for n, b in base.items():
            want = b + torch.where(masks["math"][n], stored[n], torch.zeros(()))
            assert state[n].dtype == b.dtype and torch.equal(state[n], want), n
    finally:
        state.close()
    stats = coll.mask_stats()["overall"]
    total = sum(t.numel() for t in base.values())
    per_weight = {n: sum(masks[task][n].to(torch.int64) for task in DEMO_TASKS) for n in base}
    histogram = [sum(int((per_weight[n] == c).sum()) for n in base) for c in range(len(DEMO_TASKS) + 1)]
    assert stats["weights"] == total
    assert stats["histogram"] == histogram
    assert sum(histogram) == total and histogram[0] < total  # the masks are neither empty nor trivially full
    assert stats["catastrophic_fraction"] == pytest.approx(histogram[0] / total, abs=1e-12)
    assert stats["selfish_fraction"] == pytest.approx(histogram[1] / total, abs=1e-12)
    used = {task: sum(int(m.sum()) for m in masks[task].values()) for task in DEMO_TASKS}
    assert set(stats["density"]) == set(DEMO_TASKS)
    for task in DEMO_TASKS:
        assert 0 < used[task] < total
        assert stats["density"][task] == pytest.approx(used[task] / total, abs=1e-12), task


def test_extract_reads_only_its_own_mask(demo, tmp_path, monkeypatch):
    from mergekit_lite.products import collection as collection_module

    coll_path = compress(demo, tmp_path)
    read: list[str] = []
    real_hash, real_open = collection_module.sha256_file, collection_module.open_checkpoint
    monkeypatch.setattr(collection_module, "sha256_file", lambda p, *a: read.append(str(p)) or real_hash(p, *a))
    monkeypatch.setattr(collection_module, "open_checkpoint", lambda p: read.append(str(p)) or real_open(p))
    Collection.open(coll_path).extract("chat", tmp_path / "chat", progress=False)
    masks_read = {Path(p).name for p in read if "/masks/" in p}
    assert masks_read == {"002-chat.safetensors"}


def test_size_on_disk_matches_formula(tmp_path):
    """Collection = 32·P (τ_MTL) + T·P bits, plus headers; the referenced base adds 32·P."""
    folders = build_demo(tmp_path / "d", seed=5)
    base = load_state(folders["base"])
    extra = {}
    for i in range(5):  # 8 tasks in all
        extra[f"t{i}"] = tmp_path / f"t{i}"
        shutil.copytree(folders["base"], extra[f"t{i}"])
        tuned = finetune_like(base, ("math", "code", "chat")[i % 3], 100 + i)
        from safetensors.torch import save_file

        save_file(tuned, extra[f"t{i}"] / "model.safetensors", metadata={"format": "pt"})
    models = [folders[t] for t in DEMO_TASKS] + list(extra.values())
    recipe = Recipe.from_dict({"merge_method": "tall_masks", "base_model": str(folders["base"]), "models": [{"model": str(m), "name": f"task{i}"} for i, m in enumerate(models)]})
    coll = mergekit_lite.run(recipe, tmp_path / "coll", progress=False)
    P = sum(t.numel() for t in base.values())
    T = len(models)
    headers = 0
    for f in [coll / "tau_mtl.safetensors", *(coll / "masks").iterdir()]:
        headers += 8 + int.from_bytes(f.read_bytes()[:8], "little")
    mask_padding = T * sum(packed_size(t.numel()) * 8 - t.numel() for t in base.values()) / 8
    weights_bytes = 4 * P + T * P / 8 + mask_padding
    tensor_files = (coll / "tau_mtl.safetensors").stat().st_size + sum(f.stat().st_size for f in (coll / "masks").iterdir())
    assert tensor_files == pytest.approx(weights_bytes + headers, abs=0.5)
    summary = Collection.open(coll).summary()
    assert summary["original_bytes"] == T * 4 * P
    base_file = (folders["base"] / "model.safetensors").stat().st_size
    assert summary["ratio"] == pytest.approx(T * 4 * P / (summary["bytes_on_disk"] + base_file))
    assert summary["ratio"] > 3.0  # 8 tasks: 32·8 / (32 + 32 + 8) = 3.6 minus headers and support files


def test_embedded_base_survives_the_base_moving(demo, tmp_path):
    base_copy = shutil.copytree(demo["base"], tmp_path / "base")
    recipe = tall_recipe(demo, embed_base=True)
    data = recipe.model_dump()
    data["base_model"] = str(base_copy)
    coll = mergekit_lite.run(Recipe.from_dict(data), tmp_path / "coll", progress=False)
    shutil.rmtree(base_copy)
    out = Collection.open(coll).extract("math", tmp_path / "m", progress=False)
    assert set(load_state(out)) == set(load_state(demo["base"]))


# -- corruption and misuse --------------------------------------------------------------------
def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.fixture
def coll(demo, tmp_path):
    return compress(demo, tmp_path)


def test_flipped_byte_in_mask(coll, tmp_path):
    path = coll / "masks" / "000-math.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    assert_error(cli("extract", str(coll), "math", str(tmp_path / "out"), "-q"), "000-math.safetensors", "SHA-256")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert cli("extract", str(coll), "code", str(tmp_path / "code"), "-q").exit_code == 0  # other tasks still extract
    assert_error(cli("inspect", str(coll), "--verify"), "000-math.safetensors")


def test_flipped_byte_in_tau(coll, tmp_path):
    path = coll / "tau_mtl.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert_error(cli("extract", str(coll), "chat", str(tmp_path / "out")), "tau_mtl.safetensors", "SHA-256")


def test_truncated_file(coll, tmp_path):
    path = coll / "masks" / "001-code.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    assert_error(cli("inspect", str(coll)), "001-code.safetensors", "truncated")


def test_missing_mask_file(coll, tmp_path):
    (coll / "masks" / "002-chat.safetensors").unlink()
    assert_error(cli("extract", str(coll), "chat", str(tmp_path / "out")), "002-chat.safetensors", "missing")


def test_tampered_manifest(coll, tmp_path):
    manifest = json.loads((coll / "manifest.json").read_text())
    manifest["tasks"][0]["tall_lambda"] = 0.9
    (coll / "manifest.json").write_text(json.dumps(manifest))
    assert_error(cli("inspect", str(coll)), "manifest.json", "SHA-256")


def test_changed_base(demo, tmp_path):
    base_copy = shutil.copytree(demo["base"], tmp_path / "base")
    data = tall_recipe(demo).model_dump()
    data["base_model"] = str(base_copy)
    coll = mergekit_lite.run(Recipe.from_dict(data), tmp_path / "coll", progress=False)
    state = load_state(base_copy)
    state["model.norm.weight"][0] += 1
    from safetensors.torch import save_file

    save_file(state, base_copy / "model.safetensors", metadata={"format": "pt"})
    assert_error(cli("extract", str(coll), "math", str(tmp_path / "out")), "model.safetensors", "changed")
    moved = shutil.copytree(demo["base"], tmp_path / "moved")
    assert cli("extract", str(coll), "math", str(tmp_path / "out"), "--base", str(moved), "-q").exit_code == 0


def test_unknown_task_and_existing_output(coll, tmp_path):
    assert_error(cli("extract", str(coll), "mathh", str(tmp_path / "out")), "mathh", "did you mean 'math'")
    (tmp_path / "exists").mkdir()
    assert_error(cli("extract", str(coll), "math", str(tmp_path / "exists")), "already exists", "--force")
    assert_error(cli("inspect", str(tmp_path / "exists")), "not a collection")


def test_task_names_never_become_paths(demo, tmp_path):
    data = tall_recipe(demo).model_dump()
    data["models"][0]["name"] = "weird name ü..*"
    data["models"][1]["name"] = ".hidden"
    coll = mergekit_lite.run(Recipe.from_dict(data), tmp_path / "coll", progress=False)
    assert sorted(p.name for p in (coll / "masks").iterdir()) == ["000-weird_name.safetensors", "001-hidden.safetensors", "002-chat.safetensors"]
    out = tmp_path / "all"
    assert cli("extract", str(coll), "--all", str(out), "-q").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["000-weird_name", "001-hidden", "002-chat"]
    assert Collection.open(coll).tasks[0] == "weird name ü..*"


# -- λ search with an evaluator ------------------------------------------------------------------
EVALUATOR = """
import torch
from safetensors.torch import load_file

TARGETS = {}

def closeness(task, state):
    '''Minus the distance to the original fine-tune: the best λ reconstructs it best.'''
    target = TARGETS[task]
    return -sum(float((state[n].double() - target[n].double()).square().sum()) for n in target)
"""


def test_tall_lambda_search_picks_the_best_grid_point(demo, tmp_path, monkeypatch):
    (tmp_path / "my_eval.py").write_text(textwrap.dedent(EVALUATOR))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_eval

    my_eval.TARGETS.update({t: load_state(demo[t]) for t in DEMO_TASKS})
    data = tall_recipe(demo).model_dump()
    data["evaluator"] = "my_eval:closeness"
    data["parameters"] = {"tall_lambda": {"search": [0.2, 0.4, 0.6]}}
    coll = mergekit_lite.run(Recipe.from_dict(data), tmp_path / "coll", progress=False)
    base = load_state(demo["base"])
    mtl = {n: sum(load_state(demo[t])[n] - base[n] for t in DEMO_TASKS) for n in base}
    manifest = json.loads((coll / "manifest.json").read_text())
    for entry in manifest["tasks"]:
        ft = load_state(demo[entry["name"]])
        errors = {}
        for lam in (0.2, 0.4, 0.6):
            errors[lam] = sum(
                float(((base[n] + torch.where((ft[n] - base[n]).abs() > lam * (mtl[n] - (ft[n] - base[n])).abs(), mtl[n], 0)).double() - ft[n].double()).square().sum())
                for n in base
            )
        assert entry["tall_lambda"] == min(errors, key=errors.get), (entry["name"], errors)
        assert set(entry["lambda_scores"]) == {"0.2", "0.4", "0.6"}
    sys.modules.pop("my_eval", None)


def test_merge_lambda_search_for_consensus(demo, tmp_path, monkeypatch):
    (tmp_path / "my_eval2.py").write_text(textwrap.dedent(EVALUATOR))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_eval2

    my_eval2.TARGETS.update({t: load_state(demo[t]) for t in DEMO_TASKS})
    data = {
        "merge_method": "consensus",
        "base_model": str(demo["base"]),
        "models": [{"model": str(demo[t])} for t in DEMO_TASKS],
        "parameters": {"consensus_k": 1},
        "evaluator": "my_eval2:closeness",
    }
    out = mergekit_lite.run(Recipe.from_dict(data), tmp_path / "out", progress=False)
    card = (out / "README.md").read_text()
    assert "was chosen by the evaluator" in card
    # brute force over the default grid: the chosen λ minimises the summed distance to the fine-tunes
    results = {}
    for lam in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        data["parameters"] = {"consensus_k": 1, "lambda": lam}
        data.pop("evaluator", None)
        merged = load_state(mergekit_lite.run(Recipe.from_dict(data), tmp_path / f"l{lam}", progress=False))
        results[lam] = sum(float((merged[n].double() - my_eval2.TARGETS[t][n].double()).square().sum()) for t in DEMO_TASKS for n in merged)
    best = min(results, key=results.get)
    chosen = load_state(out)
    assert all(torch.equal(chosen[n], load_state(tmp_path / f"l{best}")[n]) for n in chosen)
    sys.modules.pop("my_eval2", None)


def test_evaluator_errors_are_clear(demo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad_eval.py").write_text("def score(task, state):\n    return 'high'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tall_recipe(demo).model_dump()
    data["evaluator"] = "bad_eval:score"
    with pytest.raises(mergekit_lite.MergeKitLiteError, match="must return a number"):
        mergekit_lite.run(Recipe.from_dict(data), tmp_path / "coll", progress=False)
    assert not (tmp_path / "coll").exists() and leftovers(tmp_path) == []
    data["evaluator"] = "no_such_module:f"
    with pytest.raises(mergekit_lite.RecipeError, match="cannot import"):
        mergekit_lite.run(Recipe.from_dict(data), tmp_path / "coll", progress=False)
    sys.modules.pop("bad_eval", None)
