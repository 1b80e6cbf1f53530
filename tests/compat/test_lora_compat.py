"""mergekit 0.1.5's own ``model: BASE+ADAPTER`` (it merges each LoRA into its base with PEFT first) against
mergekit-lite's, which never materialises the fine-tune: the same weights."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

import harness
import mergekit_lite


@pytest.mark.parametrize("method,params", [("task_arithmetic", {}), ("ties", {"density": 0.5})])
def test_base_plus_adapter_gives_mergekits_weights(demo: dict[str, Path], tmp_path: Path, method: str, params: dict) -> None:
    reason = harness.mergekit_unavailable()
    if reason:
        pytest.skip(reason)
    if "adapter:poetry" not in demo:
        pytest.skip("the demo has no LoRA adapters (peft is not installed)")
    base = str(demo["base"])
    recipe = {
        "merge_method": method,
        "base_model": base,
        "models": [
            {"model": f"{base}+{demo['adapter:poetry']}", "parameters": {"weight": 0.7, **params}},
            {"model": f"{base}+{demo['adapter:legal']}", "parameters": {"weight": 0.5, **params}},
            {"model": str(demo["math"]), "parameters": {"weight": 0.3, **params}},
        ],
        "dtype": "float32",
    }
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [str(harness.mergekit_python()), "-m", "mergekit.scripts.run_yaml", str(path), str(tmp_path / "mk-out"),
         "--lora-merge-cache", str(tmp_path / "mk-cache"), "--no-write-model-card"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    mergekit_lite.run(path, tmp_path / "ours", progress=False)
    ours, theirs = harness.load_state(tmp_path / "ours"), harness.load_state(tmp_path / "mk-out")
    assert set(ours) == set(theirs)
    assert max(harness._rel(ours[n], theirs[n]) for n in theirs) <= harness.REL_TOL
    base_state = harness.load_state(demo["base"])
    assert any(harness._rel(ours[n], base_state[n]) > 1e-3 for n in base_state)  # not vacuous
