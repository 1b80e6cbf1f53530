"""Task arithmetic end to end: output checked against a plain dense computation on the loaded state dicts."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

import mergekit_lite
from mergekit_lite import Recipe
from mergekit_lite.demo import DEMO_TASKS

from helpers import leftovers, load_state, ta_recipe


def dense_task_arithmetic(base: Path, models: list[Path], weights: list[float], lam: float) -> dict[str, torch.Tensor]:
    """θ_0 + λ Σ w_t (θ_t − θ_0), in float64 over whole state dicts — the independent reference."""
    b = load_state(base)
    fts = [load_state(m) for m in models]
    out = {}
    for name, t in b.items():
        if not t.is_floating_point():
            out[name] = t
            continue
        acc = torch.zeros_like(t, dtype=torch.float64)
        for w, ft in zip(weights, fts):
            acc += w * (ft[name].double() - t.double())
        out[name] = (t.double() + lam * acc).to(t.dtype)
    return out


def assert_state_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(got[name].double(), want[name].double(), atol=atol, rtol=0, msg=name)


def test_task_arithmetic_matches_dense_reference(demo, tmp_path):
    recipe = Recipe.from_dict(ta_recipe(demo))
    out = mergekit_lite.run(recipe, tmp_path / "out", progress=False)
    want = dense_task_arithmetic(demo["base"], [demo[t] for t in DEMO_TASKS], [1.0, 0.5, -0.25], 0.7)
    assert_state_close(load_state(out), want)
    assert leftovers(tmp_path) == []


def test_output_loads_in_transformers_with_expected_weights(demo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = mergekit_lite.run(Recipe.from_dict(ta_recipe(demo)), tmp_path / "out", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    want = dense_task_arithmetic(demo["base"], [demo[t] for t in DEMO_TASKS], [1.0, 0.5, -0.25], 0.7)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor.double(), want[name].double(), atol=1e-6, rtol=0, msg=name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("w1 w2").input_ids[-1] == tokenizer.convert_tokens_to_ids("w2")
    assert (out / "generation_config.json").is_file()


def test_model_card_has_front_matter_and_recipe(demo, tmp_path):
    out = mergekit_lite.run(Recipe.from_dict(ta_recipe(demo)), tmp_path / "out", progress=False)
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert "base_model" not in front and f"`{demo['base']}` (a local folder)" in text  # a local path is no hub reference
    assert {"merge", "mergekit-lite"} <= set(front["tags"])
    assert front["library_name"] == "transformers"
    assert "merge_method: task_arithmetic" in text


def test_bf16_inputs_are_merged_in_float32(demo_bf16, tmp_path):
    """The result is the float64 reference rounded once to bf16, not bf16 arithmetic."""
    recipe = Recipe.from_dict(ta_recipe(demo_bf16))
    out = mergekit_lite.run(recipe, tmp_path / "out", progress=False)
    got = load_state(out)
    want = dense_task_arithmetic(demo_bf16["base"], [demo_bf16[t] for t in DEMO_TASKS], [1.0, 0.5, -0.25], 0.7)
    mismatched = 0
    total = 0
    for name, w in want.items():
        assert got[name].dtype == torch.bfloat16
        mismatched += int((got[name] != w).sum())
        total += w.numel()
    # float32 accumulation then one rounding agrees with the float64 reference nearly everywhere
    assert mismatched / total < 0.001, mismatched / total
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_out_dtype_is_recorded_in_config(demo, tmp_path):
    out = mergekit_lite.run(Recipe.from_dict(ta_recipe(demo, out_dtype="bfloat16")), tmp_path / "out", progress=False)
    state = load_state(out)
    assert all(t.dtype == torch.bfloat16 for t in state.values() if t.is_floating_point())
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_mergekit_half_dtype_means_output_dtype(demo, tmp_path):
    """A mergekit config's `dtype: bfloat16` still computes in float32 but stores bfloat16."""
    recipe = Recipe.from_dict(ta_recipe(demo, dtype="bfloat16"))
    assert recipe.compute_dtype == "float32" and recipe.output_dtype == "bfloat16"


def test_include_exclude_copy_from_base(demo, tmp_path):
    recipe = Recipe.from_dict(ta_recipe(demo, include=["model.layers.*"], exclude=["*.mlp.*"]))
    out = mergekit_lite.run(recipe, tmp_path / "out", progress=False)
    got, base = load_state(out), load_state(demo["base"])
    want = dense_task_arithmetic(demo["base"], [demo[t] for t in DEMO_TASKS], [1.0, 0.5, -0.25], 0.7)
    for name in base:
        merged = name.startswith("model.layers.") and ".mlp." not in name
        expected = want[name] if merged else base[name]
        torch.testing.assert_close(got[name], expected, atol=1e-6, rtol=0, msg=name)
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_tied_embeddings(demo_tied, tmp_path):
    from transformers import AutoModelForCausalLM

    assert "lm_head.weight" not in load_state(demo_tied["base"])
    out = mergekit_lite.run(Recipe.from_dict(ta_recipe(demo_tied)), tmp_path / "out", progress=False)
    want = dense_task_arithmetic(demo_tied["base"], [demo_tied[t] for t in DEMO_TASKS], [1.0, 0.5, -0.25], 0.7)
    assert_state_close(load_state(out), want)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_untied_base_with_tied_finetune(demo, demo_tied, tmp_path):
    """A fine-tune that omits lm_head.weight because its config ties it contributes its embedding there."""
    from mergekit_lite import open_checkpoint

    with open_checkpoint(demo_tied["math"]) as ckpt:
        assert "lm_head.weight" in ckpt and "lm_head.weight" not in ckpt.names
        torch.testing.assert_close(ckpt.get("lm_head.weight"), ckpt.get("model.embed_tokens.weight"))


@pytest.mark.parametrize("shard_size", [1000, 40_000, 10**9])
def test_sharding_boundaries(demo, tmp_path, shard_size):
    """A shard size smaller than one tensor gives one tensor per shard; the index covers every tensor."""
    from transformers import AutoModelForCausalLM

    out = mergekit_lite.run(Recipe.from_dict(ta_recipe(demo, output={"shard_size": shard_size})), tmp_path / "out", progress=False)
    shards = sorted(out.glob("*.safetensors"))
    state = load_state(out)
    if shard_size == 10**9:
        assert [s.name for s in shards] == ["model.safetensors"]
        assert not (out / "model.safetensors.index.json").exists()
    else:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(state)
        assert set(index["weight_map"].values()) == {s.name for s in shards}
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
        if shard_size == 1000:
            assert len(shards) == len(state)
        for shard in shards:
            assert shard.stat().st_size - 8 - int.from_bytes(shard.read_bytes()[:8], "little") <= max(shard_size, max(t.numel() * 4 for t in state.values()))
    want = dense_task_arithmetic(demo["base"], [demo[t] for t in DEMO_TASKS], [1.0, 0.5, -0.25], 0.7)
    assert_state_close(state, want)
    AutoModelForCausalLM.from_pretrained(out)


def safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor entries of a .safetensors file, read plainly: an 8-byte little-endian length, then JSON."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    return header


def test_dry_run_plan(demo):
    """The printed plan states the tensor count and bytes that the checkpoint files themselves give."""
    headers = {m: safetensors_header(demo[m] / "model.safetensors") for m in ("base", *DEMO_TASKS)}
    data_bytes = {m: sum(e["data_offsets"][1] - e["data_offsets"][0] for e in h.values()) for m, h in headers.items()}
    for m, h in headers.items():  # the files hold nothing but their tensors' data
        assert data_bytes[m] == (demo[m] / "model.safetensors").stat().st_size - 8 - int.from_bytes((demo[m] / "model.safetensors").read_bytes()[:8], "little")
    count = len(headers["base"])
    assert count == 21  # demo Llama: embed, 2 layers x 9, norm, lm_head
    assert all(e["dtype"] == "F32" for h in headers.values() for e in h.values())
    to_write = data_bytes["base"]
    to_read = sum(data_bytes.values())  # one pass: base + three fine-tunes, every tensor merged
    assert (to_write, to_read) == (558336, 2233344)
    largest = max(math.prod(e["shape"]) for e in headers["base"].values())
    largest_names = {n for n, e in headers["base"].items() if math.prod(e["shape"]) == largest}

    the_plan = mergekit_lite.plan(Recipe.from_dict(ta_recipe(demo)))
    try:
        assert len(the_plan.jobs) == count
        assert {j.name for j in the_plan.jobs} == set(headers["base"])
        assert all(j.merge for j in the_plan.jobs)
        assert the_plan.bytes_to_write == to_write
        assert the_plan.bytes_to_read == to_read
        assert the_plan.peak_memory_estimate > largest * 4 * 2  # at least one working copy and one stored copy
        lines = dict(line.split(":", 1) for line in the_plan.summary().splitlines())
        lines = {k.strip(): v.strip() for k, v in lines.items()}
    finally:
        the_plan.close()
    assert lines["method"].startswith("task_arithmetic ")
    assert lines["base"] == str(demo["base"])
    assert lines["models"] == "3 (math, code, chat)"
    assert re.fullmatch(rf"{count} \({count} merged, 0 copied\b.*", lines["tensors"]), lines["tensors"]
    assert lines["bytes to read"] == f"{to_read / 1e6:.1f} MB" == "2.2 MB"  # one pass: no "passes" note
    assert re.fullmatch(rf"{to_write / 1e3:.1f} KB in 1 shard\b.*", lines["bytes to write"]), lines["bytes to write"]
    assert lines["bytes to write"].startswith("558.3 KB ")
    name, shape = lines["largest merged tensor"].split(" ", 1)
    assert name in largest_names and json.loads(shape) == headers["base"][name]["shape"]
    assert lines["compute dtype"] == "float32"


def test_lambda_zero_gives_base(demo, tmp_path):
    out = mergekit_lite.run(Recipe.from_dict(ta_recipe(demo, parameters={"lambda": 0.0})), tmp_path / "out", progress=False)
    assert_state_close(load_state(out), load_state(demo["base"]), atol=0)


def test_run_from_yaml_path_and_force(demo, tmp_path):
    from helpers import write_recipe

    path = write_recipe(tmp_path / "r.yml", ta_recipe(demo))
    out = mergekit_lite.run(path, tmp_path / "out", progress=False)
    (out / "marker").write_text("old")
    with pytest.raises(mergekit_lite.OutputError, match="already exists"):
        mergekit_lite.run(path, tmp_path / "out", progress=False)
    assert (out / "marker").exists()
    mergekit_lite.run(path, tmp_path / "out", progress=False, force=True)
    assert not (out / "marker").exists()
    assert leftovers(tmp_path) == []


def test_failure_mid_merge_leaves_nothing(demo, tmp_path, monkeypatch):
    """An error while tensors are being written removes the temporary folder; an old output survives."""
    from mergekit_lite import execute

    calls = {"n": 0}
    real = execute.compute_tensor

    def flaky(plan, job, device):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real(plan, job, device)

    monkeypatch.setattr(execute, "compute_tensor", flaky)
    with pytest.raises(mergekit_lite.OutputError, match="No space left"):
        mergekit_lite.run(Recipe.from_dict(ta_recipe(demo)), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []
