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


def plain_tie_word(generator: np.random.Generator, j: int) -> int:
    """DARE's documented low half L_j of entry j's 32-bit uniform, written plainly: the low 16 bits of SplitMix64
    of key + (j + 1)·0x9E3779B97F4A7C15, the key the generator's state and increment folded to 64 bits."""
    m = 2**64 - 1
    state = generator.bit_generator.state["state"]
    key = (state["state"] ^ (state["state"] >> 64) ^ state["inc"]) & m
    z = (key + (j + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return (z ^ (z >> 31)) & 0xFFFF


def plain_dare_keep(generator: np.random.Generator, count: int, density: float) -> np.ndarray:
    """DARE's documented draws written plainly: entry j kept iff 2^16·H_j + L_j < density·2^32, H_j the generator's
    j-th 16-bit word (four from each 64-bit output, the lowest first), L_j ``plain_tie_word``; the generator is
    advanced past the outputs drawn."""
    key_source = np.random.Generator(type(generator.bit_generator)())
    key_source.bit_generator.state = generator.bit_generator.state
    words = [int(w) for w in generator.bit_generator.random_raw((count + 3) // 4)]
    high = [(w >> (16 * k)) & 0xFFFF for w in words for k in range(4)][:count]
    return np.array([h * 2**16 + plain_tie_word(key_source, j) < density * 2**32 for j, h in enumerate(high)], dtype=bool)


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
