"""Mask statistics: counts checked against plain loops, the CLI's JSON against dense TALL masks."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_lite.cli import main
from mergekit_lite.demo import DEMO_TASKS
from mergekit_lite.products.mask_stats import MaskStats, layer_of, mask_counts

from helpers import load_state, ta_recipe, write_recipe


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_mask_counts_match_loops(tasks, n, seed):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(tasks, n, generator=g) < 0.4
    histogram, used, overlap = mask_counts(masks)
    want_hist = [0] * (tasks + 1)
    for i in range(n):
        want_hist[sum(int(masks[t, i]) for t in range(tasks))] += 1
    assert histogram == want_hist
    assert used == [int(masks[t].sum()) for t in range(tasks)]
    for a in range(tasks):
        for b in range(tasks):
            assert overlap[a][b] == sum(int(masks[a, i] and masks[b, i]) for i in range(n))


def test_layers_and_fractions():
    assert layer_of("model.layers.12.mlp.up_proj.weight") == "layer 12"
    assert layer_of("transformer.h.3.attn.c_attn.weight") == "layer 3"
    assert layer_of("model.embed_tokens.weight") == "other"
    stats = MaskStats(["a", "b"])
    stats.add("model.layers.0.x", torch.tensor([[True, False, False, True], [True, True, False, False]]))
    stats.add("lm_head.weight", torch.tensor([[False], [False]]))
    overall = stats.overall
    assert overall.histogram == [2, 2, 1] and overall.total == 5
    assert overall.fraction(0) == pytest.approx(0.4) and overall.fraction(1) == pytest.approx(0.4)
    assert overall.density == [pytest.approx(0.4), pytest.approx(0.4)]
    assert overall.jaccard(0, 1) == pytest.approx(1 / 3)
    assert stats.layers["layer 0"].histogram == [1, 2, 1]
    assert "catastr." in stats.report()


def test_masks_command_json_matches_dense_tall_masks(demo, tmp_path):
    data = ta_recipe(demo, merge_method="consensus", parameters={"tall_lambda": 0.3})
    for entry in data["models"]:
        entry.pop("parameters")
    recipe = write_recipe(tmp_path / "r.yml", data)
    result = CliRunner().invoke(main, ["masks", str(recipe), "--json", "-q"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    base = load_state(demo["base"])
    fts = [load_state(demo[t]) for t in DEMO_TASKS]
    hist = torch.zeros(4, dtype=torch.int64)
    used = torch.zeros(3, dtype=torch.int64)
    for name, b in base.items():
        taus = [ft[name] - b for ft in fts]
        mtl = sum(taus)
        masks = [tau.abs() > 0.3 * (mtl - tau).abs() for tau in taus]
        count = sum(m.long() for m in masks)
        hist += torch.bincount(count.flatten(), minlength=4)
        used += torch.tensor([int(m.sum()) for m in masks])
    assert got["overall"]["histogram"] == hist.tolist()
    assert got["tasks"] == list(DEMO_TASKS)
    assert got["overall"]["density"]["math"] == pytest.approx(used[0].item() / hist.sum().item())
    assert set(got["layers"]) == {"layer 0", "layer 1", "other"}
    assert set(got["tensors"]) == set(base)


def test_masks_plot_and_missing_matplotlib(demo, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yml", ta_recipe(demo))
    png = tmp_path / "m.png"
    result = CliRunner().invoke(main, ["masks", str(recipe), "--plot", str(png), "-q"])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = CliRunner().invoke(main, ["masks", str(recipe), "--plot", str(tmp_path / "n.png"), "-q"])
    assert result.exit_code == 2
    assert "matplotlib" in result.stderr and "pip install" in result.stderr


def test_masks_refuses_a_method_without_task_vectors(demo, tmp_path):
    """karcher reads the base as one more model (no θ_0): one clear line and exit 2, not a crash."""
    data = {"merge_method": "karcher", "base_model": str(demo["base"]), "models": [{"model": str(demo[t])} for t in DEMO_TASKS]}
    result = CliRunner().invoke(main, ["masks", str(write_recipe(tmp_path / "r.yml", data)), "-q"])
    assert result.exit_code == 2, result.output
    assert "TALL masks compare task vectors" in result.output and "karcher" in result.output
