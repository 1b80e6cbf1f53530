"""The plan of output tensors: per-tensor parameters (gradients, filters, precedence), slices, and the
weight-space methods (linear, passthrough, slerp) — each against values computed plainly here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mergekit_lite
from mergekit_lite import Recipe, RecipeError
from mergekit_lite.api import plan
from mergekit_lite.cli import main
from mergekit_lite.params import evaluate_setting

from helpers import copy_checkpoint, load_state, tiny_llama, write_recipe


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deep")
    return {"a": tiny_llama(root / "a", 5, 1), "b": tiny_llama(root / "b", 5, 2), "c": tiny_llama(root / "c", 5, 3),
            "big1": tiny_llama(root / "big1", 40, 4), "big2": tiny_llama(root / "big2", 40, 5)}


# -- parameter values ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, name, t, want",
    [
        (0.3, "x", 0.7, 0.3),
        ([0.0, 1.0], "x", 0.25, 0.25),
        ([0.0, 0.5, 0.3, 0.7, 1.0], "x", 0.5, 0.3),  # position 2 exactly
        ([0.0, 0.5, 0.3, 0.7, 1.0], "x", 0.375, 0.4),  # position 1.5: halfway between 0.5 and 0.3
        ([0.0, 0.5, 0.3, 0.7, 1.0], "x", 1.0, 1.0),
        ([1, 2], "x", 0.0, 1),
        ([True, False], "x", 0.9, True),  # non-numeric lists pick ⌊t·(n−1)⌋
        ([{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": 0.9}, {"value": 0.5}], "model.layers.0.mlp.up_proj.weight", 0.0, 0.9),
        ([{"filter": "self_attn", "value": 0.1}, {"value": 0.5}], "model.norm.weight", 0.0, 0.5),
        ([{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}], "layers.1.self_attn.q", 0.5, 0.5),
        ([{"filter": "self_attn", "value": 0.1}], "model.norm.weight", 0.0, None),  # no match: falls through
        ([{"filter": "*", "value": 0.2}], "anything", 0.0, 0.2),
        ({"search": [0.1, 0.2]}, "x", 0.0, [0.1, 0.2]),
    ],
)
def test_evaluate_setting(value, name, t, want):
    got = evaluate_setting(value, name, t)
    assert got == pytest.approx(want) if isinstance(want, float) else got == want


def test_gradient_over_layers_and_precedence(deep, tmp_path):
    """t = layer/(L−1) for a whole model; model parameters beat global ones; a filter that misses falls through."""
    recipe = Recipe.from_dict({
        "merge_method": "linear",
        "models": [
            {"model": str(deep["a"]), "parameters": {"weight": [{"filter": "mlp", "value": [1.0, 3.0]}]}},
            {"model": str(deep["b"])},
        ],
        "parameters": {"weight": 2.0, "normalize": [{"filter": "norm", "value": False}, {"value": True}]},
    })
    the_plan = plan(recipe)
    try:
        jobs = {j.name: j for j in the_plan.jobs}
        up = jobs["model.layers.2.mlp.up_proj.weight"]  # t = 2/4
        assert up.t == 0.5 and [p["weight"] for p in up.model_params] == [2.0, 2.0]
        assert up.params["normalize"] is True
        assert [p["weight"] for p in jobs["model.layers.4.mlp.up_proj.weight"].model_params] == [3.0, 2.0]
        assert [p["weight"] for p in jobs["model.layers.0.self_attn.q_proj.weight"].model_params] == [2.0, 2.0]
        assert jobs["model.norm.weight"].params["normalize"] is False and jobs["model.norm.weight"].t == 0.0
        assert the_plan.per_tensor_parameters() == ["normalize", "weight"]
        assert "per-tensor parameters: normalize, weight" in the_plan.summary()
    finally:
        the_plan.close()
    out = load_state(mergekit_lite.run(recipe, tmp_path / "out", progress=False))
    a, b = load_state(deep["a"]), load_state(deep["b"])
    n = "model.layers.4.mlp.up_proj.weight"
    torch.testing.assert_close(out[n], (3 * a[n] + 2 * b[n]) / 5)
    n = "model.norm.weight"
    torch.testing.assert_close(out[n], 2 * a[n] + 2 * b[n])


# -- weight-space methods ----------------------------------------------------------------------------
def test_linear_passthrough_slerp_against_plain_formulas(deep, tmp_path):
    a, b = load_state(deep["a"]), load_state(deep["b"])
    linear = load_state(mergekit_lite.run(Recipe.from_dict({
        "merge_method": "linear", "models": [{"model": str(deep["a"]), "parameters": {"weight": 0.3}}, {"model": str(deep["b"]), "parameters": {"weight": 0.9}}],
    }), tmp_path / "linear", progress=False))
    for n in a:
        torch.testing.assert_close(linear[n], (0.3 * a[n] + 0.9 * b[n]) / 1.2)
    passthrough = load_state(mergekit_lite.run(Recipe.from_dict({
        "merge_method": "passthrough", "models": [{"model": str(deep["a"]), "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]}}],
    }), tmp_path / "pass", progress=False))
    for n in a:
        assert torch.equal(passthrough[n], torch.zeros_like(a[n]) if "o_proj" in n else a[n]), n
    slerp = load_state(mergekit_lite.run(Recipe.from_dict({
        "merge_method": "slerp", "base_model": str(deep["a"]), "models": [{"model": str(deep["a"])}, {"model": str(deep["b"])}],
        "parameters": {"t": 0.3},
    }), tmp_path / "slerp", progress=False))
    for n in a:
        v0, v1 = a[n].double().flatten(), b[n].double().flatten()
        cos = float(v0 @ v1 / (v0.norm() * v1.norm()))
        if abs(cos) > 0.9995:
            want = 0.7 * v0 + 0.3 * v1
        else:
            theta = math.acos(cos)
            want = math.sin(0.7 * theta) / math.sin(theta) * v0 + math.sin(0.3 * theta) / math.sin(theta) * v1
        torch.testing.assert_close(slerp[n].double().flatten(), want, rtol=1e-5, atol=1e-6, msg=n)


def test_slerp_of_identical_models_falls_back_to_linear(deep, tmp_path):
    twin = copy_checkpoint(deep["a"], tmp_path / "twin")
    out = load_state(mergekit_lite.run(Recipe.from_dict({
        "merge_method": "slerp", "base_model": str(deep["a"]), "models": [{"model": str(deep["a"])}, {"model": str(twin)}],
    }), tmp_path / "same", progress=False))
    a = load_state(deep["a"])
    for n in a:
        torch.testing.assert_close(out[n], a[n])


def test_slerp_needs_exactly_two_models(deep):
    with pytest.raises(RecipeError, match="slerp takes exactly 2"):
        Recipe.from_dict({"merge_method": "slerp", "base_model": str(deep["a"]), "models": [{"model": str(deep["b"])}, {"model": str(deep["c"])}]})


# -- slices ----------------------------------------------------------------------------------------
def test_passthrough_stack_of_two_40_layer_models_loads(deep, tmp_path):
    """A 44-layer frankenmerge: layers 0–23 of big1 then 20–39 of big2; embeddings from big1, norm and head from big2."""
    from transformers import AutoModelForCausalLM

    recipe = Recipe.from_dict({
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(deep["big1"]), "layer_range": [0, 24]}]},
            {"sources": [{"model": str(deep["big2"]), "layer_range": [20, 40]}]},
        ],
        "dtype": "float32",
    })
    out = mergekit_lite.run(recipe, tmp_path / "stack", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 44
    got = load_state(out)
    one, two = load_state(deep["big1"]), load_state(deep["big2"])
    assert torch.equal(got["model.embed_tokens.weight"], one["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], two["model.norm.weight"])
    assert torch.equal(got["lm_head.weight"], two["lm_head.weight"])
    assert torch.equal(got["model.layers.23.mlp.down_proj.weight"], one["model.layers.23.mlp.down_proj.weight"])
    assert torch.equal(got["model.layers.24.mlp.down_proj.weight"], two["model.layers.20.mlp.down_proj.weight"])
    assert torch.equal(got["model.layers.43.self_attn.q_proj.weight"], two["model.layers.39.self_attn.q_proj.weight"])
    assert not any(".layers.44." in n for n in got)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 44
    model(torch.tensor([[1, 2, 3]]))


def test_slices_merge_with_gradient_over_each_slice(deep, tmp_path):
    """slerp over slices: t runs 0 → 1 over each slice's own layers."""
    recipe = Recipe.from_dict({
        "merge_method": "linear",
        "slices": [{"sources": [
            {"model": str(deep["a"]), "layer_range": [1, 4], "parameters": {"weight": [0.0, 1.0]}},
            {"model": str(deep["b"]), "layer_range": [2, 5], "parameters": {"weight": 1.0}},
        ]}],
        "parameters": {"normalize": False},
    })
    out = load_state(mergekit_lite.run(recipe, tmp_path / "sl", progress=False))
    a, b = load_state(deep["a"]), load_state(deep["b"])
    for offset, weight in enumerate([0.0, 0.5, 1.0]):
        n = f"model.layers.{offset}.mlp.gate_proj.weight"
        want = weight * a[f"model.layers.{1 + offset}.mlp.gate_proj.weight"] + b[f"model.layers.{2 + offset}.mlp.gate_proj.weight"]
        torch.testing.assert_close(out[n], want)
    assert not any(".layers.3." in n for n in out)
    torch.testing.assert_close(out["model.embed_tokens.weight"], b["model.embed_tokens.weight"])  # t = 0: weight 0 for a


def test_slice_layer_range_past_the_model_is_refused(deep, tmp_path):
    recipe = Recipe.from_dict({"merge_method": "passthrough", "slices": [{"sources": [{"model": str(deep["a"]), "layer_range": [0, 9]}]}]})
    with pytest.raises(RecipeError, match=r"slices\[0\].sources: layer_range \[0, 9\] goes past the 5 layers"):
        mergekit_lite.run(recipe, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


# -- small things a user hit -------------------------------------------------------------------------
def test_validate_lists_every_problem(tmp_path):
    path = write_recipe(tmp_path / "r.yml", {
        "merge_method": "ties", "base_model": "b", "models": [{"model": "m", "parameters": {"densty": 0.5}}],
        "parameters": {"lambda": "big", "normalise": True},
    })
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "error: 3 problems in the recipe:"
    assert any("models[0].parameters.densty" in ln and "did you mean 'density'" in ln for ln in lines)
    assert any("parameters.lambda" in ln and "number" in ln for ln in lines)
    assert any("parameters.normalise" in ln and "did you mean 'normalize'" in ln for ln in lines)


def test_unknown_method_is_said_first_and_suggestions_name_other_algorithms(tmp_path):
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict({"merge_method": "lineer", "models": [{"model": "m"}]})
    assert str(info.value).startswith("recipe: merge_method: unknown method 'lineer'; did you mean 'linear'?")
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict({"merge_method": "dare", "models": [{"model": "m"}]})
    assert "is a different algorithm" in str(info.value)


def test_misplaced_top_level_parameter_warns_and_runs(deep, tmp_path):
    path = write_recipe(tmp_path / "r.yml", {
        "merge_method": "linear", "models": [{"model": str(deep["a"])}, {"model": str(deep["b"])}], "normalize": True,
    })
    result = CliRunner().invoke(main, ["run", str(path), str(tmp_path / "deeper" / "still" / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert "warning: " in result.stderr and "normalize: has no effect at the top level" in result.stderr and "parameters:" in result.stderr
    assert (tmp_path / "deeper" / "still" / "out" / "model.safetensors").is_file()  # missing parents are created
    typo = write_recipe(tmp_path / "t.yml", {"merge_method": "linear", "models": [{"model": "a"}], "paramters": {}})
    with pytest.raises(RecipeError, match="paramters: unknown key; did you mean 'parameters'"):
        Recipe.from_yaml(typo)


def test_lambda_grid_needs_the_search_spelling(deep):
    with pytest.raises(RecipeError, match=r"parameters.lambda.*needs 'evaluator"):
        Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": str(deep["a"]), "models": [{"model": str(deep["b"])}],
                          "parameters": {"lambda": {"search": [0.2, 0.4]}}})
    # a plain list is a gradient over the layers now
    Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": str(deep["a"]), "models": [{"model": str(deep["b"])}],
                      "parameters": {"lambda": [0.2, 0.4]}})


def test_mergekit_parameter_this_method_does_not_use_warns_and_typo_errors(deep):
    recipe = Recipe.from_dict({"merge_method": "slerp", "base_model": str(deep["a"]), "models": [{"model": str(deep["a"])}, {"model": str(deep["b"])}],
                               "parameters": {"t": 0.5, "embed_slerp": True}})
    assert recipe.warnings == ["recipe: parameters.embed_slerp: slerp does not use 'embed_slerp'; it has no effect (mergekit ignores it too)"]
    with pytest.raises(RecipeError, match=r"parameters.tt: slerp has no parameter 'tt'; did you mean 't'\?"):
        Recipe.from_dict({"merge_method": "slerp", "base_model": str(deep["a"]), "models": [{"model": str(deep["b"])}], "parameters": {"tt": 0.5}})


def test_empty_parameters_mean_none(deep):
    recipe = Recipe.from_text(f"merge_method: linear\nmodels:\n  - model: {deep['a']}\n    parameters:\nparameters:\n")
    assert recipe.parameters == {} and recipe.models[0].parameters == {}


def test_a_mergekit_method_we_lack_is_never_offered_a_look_alike(monkeypatch):
    from mergekit_lite.methods import METHODS

    monkeypatch.delitem(METHODS, "della_linear")  # as before the catalogue was complete
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict({"merge_method": "della_linear", "base_model": "b", "models": [{"model": "m"}]})
    message = str(info.value)
    assert "'della_linear' — a mergekit method that mergekit-lite does not have yet; 'dare_linear' is a different algorithm" in message
    assert "did you mean" not in message


def test_yaml_scientific_notation_text_is_a_number_and_int_gradients_must_land_on_whole_numbers(deep, tmp_path):
    recipe = Recipe.from_text(f"merge_method: linear\nmodels:\n  - model: {deep['a']}\n    parameters: {{weight: 1e-1}}\n  - model: {deep['b']}\n")
    the_plan = plan(recipe)
    try:
        assert the_plan.jobs[0].model_params[0]["weight"] == pytest.approx(0.1)  # YAML 1.1 reads 1e-1 as text
    finally:
        the_plan.close()
    bad = Recipe.from_dict({"merge_method": "consensus", "base_model": str(deep["a"]), "models": [{"model": str(deep["b"])}, {"model": str(deep["c"])}],
                            "parameters": {"consensus_k": [1, 2]}})
    with pytest.raises(RecipeError, match="consensus_k: the gradient gives 1.25 for model.layers.1.* takes whole numbers"):
        plan(bad)


def test_ties_with_slices_runs_per_tensor_but_not_at_model_scope(deep, tmp_path):
    slices = [{"sources": [{"model": str(deep["a"]), "layer_range": [0, 5]}, {"model": str(deep["b"]), "layer_range": [0, 5]}]}]
    Recipe.from_dict({"merge_method": "ties", "base_model": str(deep["a"]), "slices": slices, "parameters": {"density": 0.5}})
    with pytest.raises(RecipeError, match="slices: ties with these parameters works on whole models"):
        Recipe.from_dict({"merge_method": "ties", "base_model": str(deep["a"]), "slices": slices, "parameters": {"density": 0.5, "scope": "model"}})
