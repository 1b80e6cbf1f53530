"""A chain run by mergekit 0.1.5's own ``mergekit-multi`` and by mergekit-lite: the same weights at every step."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

import harness
import mergekit_lite
from helpers import tiny_llama

#: linear → TIES over the base (reading step 'soup') → slerp toward the base (reading step 'tied'); mergekit needs every weight
CHAIN = [
    {"name": "soup", "merge_method": "linear",
     "models": [{"model": "{a}", "parameters": {"weight": 0.3}}, {"model": "{b}", "parameters": {"weight": 0.7}}]},
    {"name": "tied", "merge_method": "ties", "base_model": "{base}",
     "models": [{"model": "soup", "parameters": {"weight": 1.0, "density": 0.5}}, {"model": "{c}", "parameters": {"weight": 0.5, "density": 0.7}}],
     "parameters": {"normalize": True}},
    {"merge_method": "slerp", "base_model": "{base}", "models": [{"model": "tied"}, {"model": "{base}"}], "parameters": {"t": 0.3},
     "dtype": "float32"},
]


@pytest.mark.filterwarnings("ignore:.*no tokenizer")  # tiny_llama has no tokenizer files
def test_chain_gives_mergekit_multis_weights(tmp_path: Path) -> None:
    reason = harness.mergekit_unavailable()
    if reason:
        pytest.skip(reason)
    models = {n: tiny_llama(tmp_path / "models" / n, layers=3, seed=10 + i) for i, n in enumerate(("base", "a", "b", "c"))}
    text = yaml.safe_dump_all(CHAIN, sort_keys=False)
    for name, folder in models.items():
        text = text.replace(f"'{{{name}}}'", str(folder))
    recipe = tmp_path / "chain.yml"
    recipe.write_text(text, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    # no model card: mergekit's card asks the hub whether each input (a step's folder) is a hub repository
    proc = subprocess.run(
        [str(harness.mergekit_python()), "-m", "mergekit.scripts.multimerge", str(recipe), "--intermediate-dir", str(tmp_path / "mk-steps"),
         "--out-path", str(tmp_path / "mk-out"), "--no-write-model-card", "--no-copy-tokenizer"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    mergekit_lite.run(recipe, tmp_path / "ours", intermediate_dir=tmp_path / "our-steps", progress=False)
    pairs = [(tmp_path / "our-steps" / "soup", tmp_path / "mk-steps" / "soup"), (tmp_path / "our-steps" / "tied", tmp_path / "mk-steps" / "tied"),
             (tmp_path / "ours", tmp_path / "mk-out")]
    for ours, theirs in pairs:
        a, b = harness.load_state(ours), harness.load_state(theirs)
        assert set(a) == set(b), ours.name
        worst = max(harness._rel(a[n], b[n]) for n in b)
        assert worst <= harness.REL_TOL, (ours.name, worst)
    base = harness.load_state(models["base"])
    assert any(harness._rel(harness.load_state(tmp_path / "ours")[n], base[n]) > 1e-3 for n in base)  # not vacuous: the chain moved the weights
