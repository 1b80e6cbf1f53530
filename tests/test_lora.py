"""LoRA adapters as task vectors, and extract-lora, checked against PEFT itself.

References are PEFT's own: ``merge_and_unload()`` for what an adapter means, ``PeftModel.from_pretrained``
for what an extracted adapter loads as; SVD optima are computed plainly with torch.linalg.svd in float64.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import mergekit_lite
from mergekit_lite.adapter import AdapterCheckpoint, open_model, pattern_value, split_adapter_reference
from mergekit_lite.checkpoint import open_checkpoint
from mergekit_lite.cli import main
from mergekit_lite.errors import CheckpointError
from mergekit_lite.ops.lora import add_lora_, lora_scaling, low_rank
from mergekit_lite.recipe import Recipe

from helpers import load_state

peft = pytest.importorskip("peft")

TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore::mergekit_lite.errors.MergeKitLiteWarning")


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> bool:
    """Relative agreement in the Frobenius norm (and exact shapes)."""
    assert got.shape == want.shape
    return float((got.double() - want.double()).norm()) <= tol * max(float(want.double().norm()), 1e-12)


def _llama(folder: Path, seed: int = 0, hidden: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=48, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return model


def _gpt2(folder: Path, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    model.save_pretrained(folder)
    return model


def _adapter(model, folder: Path, seed: int, **config) -> dict[str, torch.Tensor]:
    """Wrap a copy of ``model`` with PEFT, draw every LoRA factor at random, save the adapter; return merge_and_unload's weights."""
    import copy

    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(folder)
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A tiny Llama base, a full fine-tune of it, and adapters of several kinds with PEFT's merged weights."""
    root = tmp_path_factory.mktemp("lora")
    base_model = _llama(root / "base")
    out = {"root": root, "base": root / "base", "base_state": {k: v.clone() for k, v in base_model.state_dict().items()}}
    out["plain_ref"] = _adapter(base_model, root / "plain", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    out["rs_ref"] = _adapter(base_model, root / "rs", 2, r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
                             rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3})
    out["emb_ref"] = _adapter(base_model, root / "emb", 3, r=2, lora_alpha=4, target_modules=["embed_tokens", "o_proj"], modules_to_save=["lm_head"])
    torch.manual_seed(4)
    full = {k: v + 0.02 * torch.randn_like(v) for k, v in out["base_state"].items()}
    base_model.load_state_dict(full)
    base_model.save_pretrained(root / "full")
    base_model.load_state_dict(out["base_state"])
    out["full_ref"] = full
    for name in ("plain", "rs"):  # the same fine-tunes as full checkpoints (PEFT's merge, float32)
        base_model.load_state_dict(out[f"{name}_ref"])
        base_model.save_pretrained(root / f"{name}_merged")
    base_model.load_state_dict(out["base_state"])
    gpt = _gpt2(root / "gpt2")
    out["gpt2"] = root / "gpt2"
    out["gpt2_ref"] = _adapter(gpt, root / "gpt2_lora", 5, r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_bias=True)
    return out


# -- the math ---------------------------------------------------------------------------------------
def test_scaling_by_hand():
    assert lora_scaling(16, 8) == 2.0
    assert lora_scaling(16, 4, rslora=True) == 8.0  # 16 / √4
    with pytest.raises(ValueError):
        lora_scaling(8, 0)


def test_add_lora_by_hand():
    a = torch.tensor([[1.0, 2.0, 0.0]])  # r = 1, in = 3
    b = torch.tensor([[1.0], [-1.0]])  # out = 2
    w = torch.zeros(2, 3)
    add_lora_(w, a, b, 0.5)
    assert torch.equal(w, torch.tensor([[0.5, 1.0, 0.0], [-0.5, -1.0, 0.0]]))
    wt = torch.ones(3, 2)
    add_lora_(wt, a, b, 2.0, transposed=True)
    assert torch.equal(wt, torch.ones(3, 2) + 2.0 * torch.tensor([[1.0, -1.0], [2.0, -2.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="gives"):
        add_lora_(torch.zeros(3, 3), a, b, 1.0)


def test_low_rank_by_hand():
    delta = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    f = low_rank(delta, 1)
    assert f.rank == 1 and math.isclose(f.relative_error, math.sqrt(5 / 14), rel_tol=1e-12)
    assert torch.allclose((f.lora_b @ f.lora_a).double(), torch.diag(torch.tensor([3.0, 0.0, 0.0])).double())
    assert low_rank(delta, 3, sv_epsilon=1.5).rank == 2  # σ = 1 is dropped
    assert low_rank(torch.zeros(4, 3), 2).rank == 0


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 7), st.integers(0, 2**31 - 1))
def test_low_rank_error_is_what_it_leaves(rows, cols, rank, seed):
    """The reported error is ‖Δ − BA‖/‖Δ‖ of the factors themselves, and the SVD optimum (Eckart–Young)."""
    delta = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    f = low_rank(delta, rank)
    actual = float((delta - f.lora_b @ f.lora_a).norm() / delta.norm())
    s = torch.linalg.svdvals(delta)
    optimum = math.sqrt(float((s[rank:] ** 2).sum() / (s**2).sum()))
    assert f.rank == min(rank, rows, cols)
    assert math.isclose(f.relative_error, optimum, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(actual, optimum, rel_tol=1e-6, abs_tol=1e-9)


def test_pattern_value_follows_peft():
    from peft.utils.other import get_pattern_key

    patterns = {"q_proj": 3, "layers.1.mlp.down_proj": 5, "v.*": 7}
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.down_proj",
                   "model.layers.0.self_attn.v_proj", "q_proj"):
        key = get_pattern_key(list(patterns), module)
        assert pattern_value(patterns, module, 1) == patterns.get(key, 1)


def test_split_adapter_reference(tmp_path):
    assert split_adapter_reference("org/base+org/lora") == ("org/base", "org/lora")
    assert split_adapter_reference("a+b+c") is None and split_adapter_reference("a") is None
    (tmp_path / "x+y").mkdir()
    assert split_adapter_reference(str(tmp_path / "x+y")) is None  # an existing path is never split


# -- adapters read as fine-tunes, against PEFT's merge_and_unload --------------------------------------
@pytest.mark.parametrize("kind", ["plain", "rs", "emb"])
def test_adapter_tensors_equal_peft_merge(lora, kind):
    """Every tensor of θ_0 + ΔW equals PEFT's merge_and_unload (rank/alpha patterns, rsLoRA, embedding LoRA, modules to save)."""
    ref = lora[f"{kind}_ref"]
    with open_model(lora["root"] / kind, str(lora["base"])) as ckpt:
        assert isinstance(ckpt, AdapterCheckpoint)
        assert set(ckpt.names) == set(ref)
        changed = 0
        for name in ckpt.names:
            got = ckpt.get(name)
            assert _close(got, ref[name]), name
            changed += not torch.equal(ref[name], lora["base_state"][name])
        assert changed == len(ckpt.edited) > 0


def test_fan_in_fan_out_and_lora_bias_equal_peft_merge(lora):
    """GPT-2's Conv1D (weights stored transposed) with a LoRA bias."""
    ref = lora["gpt2_ref"]
    with open_model(f"{lora['gpt2']}+{lora['root'] / 'gpt2_lora'}") as ckpt:
        assert any(n.endswith("c_attn.bias") for n in ckpt.edited)
        for name in ckpt.names:
            if name in ref:
                assert _close(ckpt.get(name), ref[name]), name


def test_merge_equals_base_plus_weighted_deltas(lora, tmp_path):
    """task_arithmetic over two adapters and a full fine-tune = θ_0 + λ Σ w (θ_merged − θ_0), each θ_merged PEFT's."""
    weights = {"plain": 0.7, "rs": -0.4, "full": 0.5}
    recipe = Recipe.from_dict({
        "merge_method": "task_arithmetic",
        "base_model": str(lora["base"]),
        "models": [
            {"model": str(lora["root"] / "plain"), "parameters": {"weight": weights["plain"]}},
            {"model": f"{lora['base']}+{lora['root'] / 'rs'}", "parameters": {"weight": weights["rs"]}},  # mergekit's syntax
            {"model": str(lora["root"] / "full"), "parameters": {"weight": weights["full"]}},
        ],
        "parameters": {"lambda": 0.9},
    })
    got = load_state(mergekit_lite.run(recipe, tmp_path / "out", progress=False))
    base = lora["base_state"]
    for name, theta in base.items():
        want = theta.double() + 0.9 * sum(w * (lora[f"{k}_ref"][name].double() - theta.double()) for k, w in weights.items())
        assert _close(got[name], want.float()), name


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.5}),
    ("dare_ties", {"density": 0.6}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
    ("slerp", {"t": 0.3}),
])
@pytest.mark.parametrize("chunk", [None, 7], ids=["whole", "row-chunks"])
def test_every_method_sees_adapters_as_their_merged_fine_tunes(lora, tmp_path, monkeypatch, method, params, chunk):
    """Adapters give the same merge as the full checkpoints PEFT merges them into (so TIES trims the same entries);
    with row chunks forced, the full checkpoints go through re-read row chunks and adapters are read whole."""
    if chunk is not None:
        from mergekit_lite import execute

        monkeypatch.setattr(execute, "ROW_CHUNK_ENTRIES", chunk)
    def recipe(refs):  # the same names: DARE's generators are drawn per (seed, model name, tensor)
        models = [{"model": r, "name": n, "parameters": {"weight": 0.6}} for r, n in zip(refs, ("p", "r"))]
        data = {"merge_method": method, "base_model": str(lora["base"]), "models": models, "parameters": dict(params)}
        if method == "slerp":
            data["models"] = [{"model": str(lora["base"])}, {"model": refs[0], "name": "p"}]
        return Recipe.from_dict(data)

    adapters = [str(lora["root"] / "plain"), str(lora["root"] / "rs")]
    merged = [str(lora["root"] / "plain_merged"), str(lora["root"] / "rs_merged")]
    got = load_state(mergekit_lite.run(recipe(adapters), tmp_path / "a", progress=False))
    want = load_state(mergekit_lite.run(recipe(merged), tmp_path / "b", progress=False))
    for name in want:
        assert _close(got[name], want[name], 1e-5), name


def test_tall_collection_of_adapters(lora, tmp_path):
    """A TALL-masks collection over adapters extracts the same tasks as over their merged checkpoints."""
    def compress(refs, out):
        data = {"merge_method": "tall_masks", "base_model": str(lora["base"]), "models": [{"model": r, "name": n} for r, n in zip(refs, ("p", "r"))]}
        return mergekit_lite.Collection.open(mergekit_lite.run(Recipe.from_dict(data), out, progress=False))

    a = compress([str(lora["root"] / "plain"), str(lora["root"] / "rs")], tmp_path / "a")
    b = compress([str(lora["root"] / "plain_merged"), str(lora["root"] / "rs_merged")], tmp_path / "b")
    for task in ("p", "r"):
        got, want = a.load_state_dict(task), b.load_state_dict(task)
        for name in want:
            assert _close(got[name], want[name], 1e-5), name
    out = a.extract("p", tmp_path / "p")
    assert json.loads((out / "config.json").read_text()) == json.loads((lora["base"] / "config.json").read_text())


# -- bad adapters: one line, exit 2, no output --------------------------------------------------------
def _run_cli(tmp_path: Path, model: str, base: str) -> tuple[int, str]:
    (tmp_path / "r.yml").write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {model}\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["run", str(tmp_path / "r.yml"), str(tmp_path / "out")])
    return result.exit_code, result.output


def _assert_refused(tmp_path, model, base, *needles):
    code, output = _run_cli(tmp_path, model, base)
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_refuses_an_adapter_of_another_base(lora, tmp_path):
    _llama(tmp_path / "wide", hidden=24)
    _assert_refused(tmp_path, str(lora["root"] / "plain"), str(tmp_path / "wide"), "plain/adapter_model.safetensors", "module model.layers.0.",
                    "lora_B @ lora_A gives [16, ", "has model.layers.0.", "[24, ")


def test_refuses_a_missing_target_module(lora, tmp_path):
    folder = shutil.copytree(lora["root"] / "plain", tmp_path / "renamed")
    state = load_file(folder / "adapter_model.safetensors")
    save_file({k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.qq_proj"): v for k, v in state.items()}, folder / "adapter_model.safetensors")
    _assert_refused(tmp_path, str(folder), str(lora["base"]), "adapter_model.safetensors", "model.layers.1.self_attn.qq_proj", "not in the base")


def test_refuses_an_adapter_without_weights(lora, tmp_path):
    folder = shutil.copytree(lora["root"] / "plain", tmp_path / "empty")
    (folder / "adapter_model.safetensors").unlink()
    _assert_refused(tmp_path, str(folder), str(lora["base"]), str(folder), "without weights")


def test_refuses_a_half_module(lora, tmp_path):
    folder = shutil.copytree(lora["root"] / "plain", tmp_path / "half")
    state = load_file(folder / "adapter_model.safetensors")
    save_file({k: v for k, v in state.items() if "layers.0.mlp.down_proj.lora_B" not in k}, folder / "adapter_model.safetensors")
    _assert_refused(tmp_path, str(folder), str(lora["base"]), "model.layers.0.mlp.down_proj", "no lora_B")


@pytest.mark.parametrize("change,needle", [({"use_dora": True}, "DoRA"), ({"peft_type": "IA3"}, "'IA3'")])
def test_refuses_other_adapter_types(lora, tmp_path, change, needle):
    folder = shutil.copytree(lora["root"] / "plain", tmp_path / "other")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    _assert_refused(tmp_path, str(folder), str(lora["base"]), "adapter_config.json", needle)


def test_an_adapter_needs_a_base(lora):
    with pytest.raises(CheckpointError, match="needs the base model"):
        open_model(lora["root"] / "plain")
    with pytest.raises(CheckpointError, match="PEFT adapter, not a full checkpoint"):
        open_checkpoint(lora["root"] / "plain")


# -- extract-lora ------------------------------------------------------------------------------------
def _extract(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["extract-lora", *args])
    return result.exit_code, result.output


def _peft_loaded(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def test_extract_recovers_a_low_rank_fine_tune(lora, tmp_path):
    """A rank-4 fine-tune extracted at rank 4 loads in PEFT as the fine-tune itself; unchanged modules are left out."""
    code, output = _extract(str(lora["root"] / "plain_merged"), str(lora["base"]), str(tmp_path / "x"), "--rank", "4")
    assert code == 0, output
    assert "adapter" in output and "MB" in output
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    loaded = _peft_loaded(lora["base"], tmp_path / "x")
    for name, want in lora["plain_ref"].items():
        assert _close(loaded[name], want, 1e-5), name


def test_extract_error_is_the_svd_optimum(lora, tmp_path):
    """At rank 2 of a full-rank change, PEFT's ΔW misses θ_ft − θ_0 by exactly the SVD optimum, which is what is reported."""
    code, output = _extract(str(lora["root"] / "full"), str(lora["base"]), str(tmp_path / "x"), "--rank", "2", "--skip-undecomposable")
    assert code == 0, output
    loaded = _peft_loaded(lora["base"], tmp_path / "x")
    reported = {line.split(":")[0]: float(line.rsplit(" ", 1)[1]) for line in output.splitlines() if "relative error" in line and line.startswith("model.")}
    assert len(reported) == 14
    for module, error in reported.items():
        name = f"{module}.weight"
        delta = (lora["full_ref"][name] - lora["base_state"][name]).double()
        s = torch.linalg.svdvals(delta)
        optimum = math.sqrt(float((s[2:] ** 2).sum() / (s**2).sum()))
        achieved = float((loaded[name].double() - lora["full_ref"][name].double()).norm() / delta.norm())
        assert math.isclose(error, optimum, rel_tol=1e-3), module
        assert math.isclose(achieved, optimum, rel_tol=1e-3), module
    assert torch.equal(loaded["model.norm.weight"], lora["base_state"]["model.norm.weight"])  # skipped: the base's
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # embeddings: saved whole
        assert torch.equal(loaded[name], lora["full_ref"][name])


def test_extract_sv_epsilon_gives_each_module_its_rank(lora, tmp_path):
    """--sv-epsilon: a module's rank is the count of singular values above it (≤ --rank), in PEFT's rank_pattern."""
    eps = 0.05
    code, output = _extract(str(lora["root"] / "rs_merged"), str(lora["base"]), str(tmp_path / "x"), "--rank", "4", "--sv-epsilon", str(eps))
    assert code == 0, output
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "x" / "adapter_model.safetensors")
    for module in config["target_modules"]:
        name = f"{module}.weight"
        s = torch.linalg.svdvals((lora["rs_ref"][name] - lora["base_state"][name]).float())
        want = min(4, int((s > eps).sum()))
        assert tensors[f"base_model.model.{module}.lora_A.weight"].shape[0] == want
        assert config["rank_pattern"].get(module, config["r"]) == want
    assert config["rank_pattern"]  # the rank-2 down_proj and whatever eps cut
    _peft_loaded(lora["base"], tmp_path / "x")  # and PEFT loads the per-module ranks


@pytest.mark.parametrize("embed_lora", [False, True])
def test_extract_embeddings_whole_or_as_lora(lora, tmp_path, embed_lora):
    """Embeddings (and lm_head) are saved whole as modules_to_save, or decomposed with --embed-lora; PEFT loads both."""
    base_model = _llama(tmp_path / "b")
    emb_merged = tmp_path / "emb_merged"
    base_model.load_state_dict(lora["emb_ref"])
    base_model.save_pretrained(emb_merged)
    args = [str(emb_merged), str(lora["base"]), str(tmp_path / "x"), "--rank", "2"] + (["--embed-lora"] if embed_lora else [])
    code, output = _extract(*args)
    assert code == 0, output
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    keys = set(load_file(tmp_path / "x" / "adapter_model.safetensors"))
    if embed_lora:
        assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys and "lm_head" in config["target_modules"]
        assert not config["modules_to_save"]
    else:
        assert set(config["modules_to_save"]) == {"model.embed_tokens", "lm_head"}
        assert "base_model.model.model.embed_tokens.weight" in keys
    loaded = _peft_loaded(lora["base"], tmp_path / "x")
    embed = "model.embed_tokens.weight"  # a rank-2 change: exact whole or at rank 2
    assert _close(loaded[embed], lora["emb_ref"][embed])
    if not embed_lora:  # lm_head's change is full rank: exact only when saved whole
        assert _close(loaded["lm_head.weight"], lora["emb_ref"]["lm_head.weight"])


def test_extract_include_exclude(lora, tmp_path):
    code, output = _extract(str(lora["root"] / "full"), str(lora["base"]), str(tmp_path / "x"), "--rank", "1", "-i", r"layers\.1\.", "-e", "mlp")
    assert code == 0, output
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert set(config["modules_to_save"]) == {"model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm"}


def test_extract_refusals_write_nothing(lora, tmp_path):
    _llama(tmp_path / "wide", hidden=24)
    code, output = _extract(str(tmp_path / "wide"), str(lora["base"]), str(tmp_path / "x"), "--rank", "2")
    assert code == 2 and output.count("\n") == 1 and "wide: tensor " in output and "has shape [48, 24]" in output, output
    assert not (tmp_path / "x").exists()
    code, output = _extract(str(lora["base"]), str(lora["base"]), str(tmp_path / "x"), "--rank", "2")
    assert code == 2 and "no module differs" in output and not (tmp_path / "x").exists()
    (tmp_path / "x").mkdir()
    code, output = _extract(str(lora["root"] / "full"), str(lora["base"]), str(tmp_path / "x"), "--rank", "2")
    assert code == 2 and "already exists" in output


def test_extract_from_an_adapter_reranks_it(lora, tmp_path):
    """FINETUNED may be BASE+ADAPTER: re-ranking a rank-4 adapter at rank 4 reproduces it."""
    code, output = _extract(f"{lora['base']}+{lora['root'] / 'plain'}", str(lora["base"]), str(tmp_path / "x"), "--rank", "4", "-q")
    assert code == 0, output
    loaded = _peft_loaded(lora["base"], tmp_path / "x")
    for name, want in lora["plain_ref"].items():
        assert _close(loaded[name], want, 1e-5), name


def test_task_vector_of_an_adapter(lora):
    """The Python API's TaskVector takes an adapter folder: τ = PEFT's merged weights − θ_0."""
    tv = mergekit_lite.TaskVector(lora["root"] / "plain", lora["base"])
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.norm.weight"):
        assert _close(tv[name], lora["plain_ref"][name] - lora["base_state"][name], 1e-5 if "proj" in name else 0.0)
