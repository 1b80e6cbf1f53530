"""Plain helpers for tests: read checkpoints densely, write recipes, find leftovers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from mergekit_lite.demo import DEMO_TASKS


def plain_uniforms(generator: np.random.Generator, count: int) -> np.ndarray:
    """DARE's and DELLA's documented draws written plainly: 32-bit uniforms, two from each 64-bit output of the
    generator's stream (its low half first), as the float64 numbers u / 2^32; the generator is advanced past them."""
    words = [int(w) for w in generator.bit_generator.random_raw((count + 1) // 2)]
    halves = [half for w in words for half in (w & 0xFFFFFFFF, w >> 32)][:count]
    return np.array(halves, dtype=np.float64) / 2**32


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read plainly (safetensors or .bin, sharded or not)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f) if f.suffix == ".safetensors" else torch.load(f, weights_only=True))
    return state


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def ta_recipe(demo: dict[str, Path], **overrides) -> dict:
    """A task arithmetic recipe over the demo models, as a dict."""
    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(demo["base"]),
        "models": [{"model": str(demo[t]), "parameters": {"weight": w}} for t, w in zip(DEMO_TASKS, (1.0, 0.5, -0.25))],
        "parameters": {"lambda": 0.7},
    }
    data.update(overrides)
    return data


def leftovers(parent: Path) -> list[str]:
    """Temporary folders the writer left behind in ``parent`` (there must be none)."""
    return [p.name for p in Path(parent).iterdir() if p.name.startswith(".mergekit-lite-tmp-")]


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tiny_llama(folder: Path, layers: int, seed: int) -> Path:
    """A tiny random Llama checkpoint (float32 safetensors + config) with ``layers`` blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
