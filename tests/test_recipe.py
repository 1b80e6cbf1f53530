"""Recipe validation: every problem names its key path, and misspellings get the closest valid name."""

from __future__ import annotations

import pytest

from mergekit_lite import Recipe, RecipeError
from mergekit_lite.recipe import default_name, parse_size

BASE = {"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "m1"}, {"model": "x/m2"}]}


def recipe(**changes):
    data = {**BASE, **changes}
    return Recipe.from_dict({k: v for k, v in data.items() if v is not None})


def error_of(**changes) -> str:
    with pytest.raises(RecipeError) as info:
        recipe(**changes)
    return str(info.value)


def test_defaults():
    r = recipe()
    params, per_model = r.resolved_parameters()
    assert params["lambda"] == 1.0
    assert [p["weight"] for p in per_model] == [1.0, 1.0]  # weight defaults to 1.0, unlike mergekit
    assert r.compute_dtype == "float32" and r.output_dtype is None
    assert r.model_names == ["m1", "m2"]
    assert r.output.shard_size == 5 * 10**9


def test_mergekit_config_runs_unchanged():
    """A typical mergekit task_arithmetic config (weights, dtype, normalize-free) validates as is."""
    text = """
models:
  - model: org/a
    parameters:
      weight: 0.5
  - model: org/b
    parameters:
      weight: 0.3
merge_method: task_arithmetic
base_model: org/base
parameters:
  lambda: 0.9
  int8_mask: true
dtype: bfloat16
"""
    r = Recipe.from_text(text)
    assert r.output_dtype == "bfloat16" and r.compute_dtype == "float32"


@pytest.mark.parametrize(
    "changes, needles",
    [
        ({"modles": [{"model": "a"}]}, ["modles", "did you mean 'models'"]),
        ({"models": [{"model": "a", "parameters": {"wieght": 1}}]}, ["models[0].parameters.wieght", "did you mean 'weight'"]),
        ({"models": [{"model": "a", "paramters": {}}]}, ["models[0].paramters", "did you mean 'parameters'"]),
        ({"parameters": {"lambda": "big"}}, ["parameters.lambda", "number"]),
        ({"parameters": {"lambda": float("nan")}}, ["parameters.lambda", "finite"]),
        ({"parameters": {"weight": [[0, 1]]}}, ["parameters.weight", "plain values"]),
        ({"parameters": {"weight": {"grid": [0, 1]}}}, ["parameters.weight", "mapping"]),
        ({"parameters": {"lambda": {"search": []}}}, ["parameters.lambda.search", "non-empty"]),
        ({"models": [{"model": "a", "parameters": {"lambda": 2}}]}, ["models[0].parameters.lambda", "whole merge"]),
        ({"merge_method": "tie"}, ["merge_method", "unknown method"]),
        ({"slices": []}, ["slices", "at least 1"]),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]}, ["models/slices", "not both"]),
        ({"tokenizer": {"source": "union", "tokens": {"<x>": {"source": "zz"}}}}, ["tokenizer.tokens['<x>'].source", "not one of the merged models"]),
        ({"base_model": None}, ["base_model", "needs a base model"]),
        ({"merge_method": "linear_"}, ["merge_method", "unknown method"]),
        ({"models": []}, ["models"]),
        ({"models": [{"model": "a"}, {"model": "b/a"}]}, ["models[1].name", "'a'", "distinct"]),
        ({"models": [{"model": "a", "name": "../evil"}]}, ["models[0].name", "not a usable name"]),
        ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, ["tokenizer/tokenizer_source", "not both"]),
        ({"dtype": "int8"}, ["dtype"]),
        ({"output": {"shard_size": "lots"}}, ["output.shard_size", "5GB"]),
        ({"output": {"shard_sise": "1GB"}}, ["output.shard_sise", "did you mean 'shard_size'"]),
        ({"models": [{"model": "a+lora+b"}]}, ["models[0].model", "BASE+ADAPTER"]),
        ({"models": [{"model": "a+"}]}, ["models[0].model", "BASE+ADAPTER"]),
    ],
)
def test_errors_name_the_key(changes, needles):
    message = error_of(**changes)
    for needle in needles:
        assert needle in message, message
    assert "\n" not in message


def test_yaml_errors_give_a_line():
    with pytest.raises(RecipeError, match="line 2"):
        Recipe.from_text("merge_method: x\n  bad: [", "r.yml")
    with pytest.raises(RecipeError, match="expected a mapping"):
        Recipe.from_text("- just a list", "r.yml")


def test_tokenizer_source_by_model_name():
    assert recipe(tokenizer_source="m2").tokenizer_source == "m2"


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("1GiB", 2**30), (1234, 1234), ("2.5 kb", 2500)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["0", "-1GB", "GB", True, "5 parsecs"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_default_names():
    assert default_name("org/name@v1") == "name"
    assert default_name("/a/b/ckpt/") == "ckpt"
    assert default_name("x/model.safetensors") == "model"


def test_round_trip_yaml():
    r = recipe(parameters={"lambda": 0.3})
    again = Recipe.from_text(r.to_yaml())
    assert again == r
