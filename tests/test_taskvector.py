"""TaskVector: lazy arithmetic over checkpoints on disk, checked against dense state-dict arithmetic."""

from __future__ import annotations

import pytest
import torch

from mergekit_lite import CheckpointError, TaskVector, open_checkpoint

from helpers import leftovers, load_state


def test_arithmetic_matches_dense(demo, tmp_path):
    base, math, code, chat = (load_state(demo[k]) for k in ("base", "math", "code", "chat"))
    tv = TaskVector(demo["math"], demo["base"]) + 0.5 * TaskVector(demo["code"], demo["base"]) - TaskVector(demo["chat"], demo["base"]) * 2
    for name in base:
        want = (math[name] - base[name]) + 0.5 * (code[name] - base[name]) - 2 * (chat[name] - base[name])
        torch.testing.assert_close(tv[name], want, atol=1e-6, rtol=0)
    assert len(tv) == len(base) and set(tv) == set(base)


def test_sum_and_negation(demo):
    tvs = [TaskVector(demo[k], demo["base"]) for k in ("math", "code")]
    total = sum(tvs)
    name = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(total[name], tvs[0][name] + tvs[1][name])
    torch.testing.assert_close((-tvs[0])[name], -tvs[0][name])
    assert torch.count_nonzero((tvs[0] - tvs[0])[name]) == 0


def test_apply_to_and_save(demo, tmp_path):
    from transformers import AutoModelForCausalLM

    tv = TaskVector(demo["math"], demo["base"]) + TaskVector(demo["code"], demo["base"])
    merged = tv.apply_to(demo["base"], scale=0.3)
    base, math, code = (load_state(demo[k]) for k in ("base", "math", "code"))
    name = "model.layers.1.self_attn.o_proj.weight"
    torch.testing.assert_close(merged[name], base[name] + 0.3 * ((math[name] - base[name]) + (code[name] - base[name])), atol=1e-6, rtol=0)
    out = merged.save_pretrained(tmp_path / "out", progress=False, shard_size="100KB")
    model = AutoModelForCausalLM.from_pretrained(out)
    for key, tensor in model.state_dict().items():
        want = base[key] + 0.3 * ((math[key] - base[key]) + (code[key] - base[key]))
        torch.testing.assert_close(tensor, want, atol=1e-6, rtol=0)
    assert leftovers(tmp_path) == []


def test_lazy_reads_only_what_is_asked(demo, monkeypatch):
    """Asking for one tensor reads that tensor from each checkpoint and nothing else."""
    ft, base = open_checkpoint(demo["math"]), open_checkpoint(demo["base"])
    reads: list[str] = []
    for ckpt in (ft, base):
        real = ckpt.get
        monkeypatch.setattr(ckpt, "get", lambda name, real=real: reads.append(name) or real(name))
    tv = TaskVector(ft, base)
    assert reads == []
    tv["model.norm.weight"]
    assert reads == ["model.norm.weight", "model.norm.weight"]


def test_incompatible_checkpoints(demo, demo_tied):
    with pytest.raises(CheckpointError):
        TaskVector(demo["math"], demo["base"]) + TaskVector(demo_tied["math"], demo_tied["base"])
