"""Deterministic tiny Hugging Face Llama checkpoints for the mergekit compatibility harness.

Two families, all float32 safetensors with untied embeddings and a tiny word-level tokenizer:

* ``base`` (32 layers, the depth of Mistral-7B / Llama-2-7B / Llama-3-8B, so the published
  ``layer_range: [0, 32]`` of most configs stays as published) and five fine-tunes
  ``ft1`` .. ``ft5`` = base + seeded task vectors;
* ``big1`` and ``big2`` (40 layers, the depth of Llama-2-13B and Mistral-Nemo-12B) for the
  frankenmerge / passthrough-stack configs: two independent random models.

Each fine-tune's task vector is built per tensor from a seed that depends only on the fine-tune
and the tensor name: a scale (2.5%, 10% or 50% of the weights' std, so SLERP takes both its
linear fallback and its spherical path), a density (100%, 30% or 5% of the entries move, so
TIES / DARE / Breadcrumbs trimming is non-trivial), and 1% outliers five times as large (so
Breadcrumbs' gamma has something to cut). ``ft5`` leaves ``model.norm.weight`` untouched, as a
fine-tune with frozen tensors does. Everything is built in a second or two, offline.

Run ``python tests/compat/checkpoints.py DIR`` to write them by hand.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import torch

#: Tiny Llama shape shared by every model here; only the depth differs.
TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
)
BASE_LAYERS = 32
BIG_LAYERS = 40
FINETUNES = ("ft1", "ft2", "ft3", "ft4", "ft5")
BIGS = ("big1", "big2")
#: Every placeholder a corpus config may use.
PLACEHOLDERS = ("base", *FINETUNES, *BIGS)

_SCALES = (0.025, 0.1, 0.5)     # of the tensor's std (or of 0.02 for constant tensors like norms)
_DENSITIES = (1.0, 0.3, 0.05)   # fraction of entries a fine-tune moves
_STAMP = "compat-checkpoints-v1"  # bump when the construction changes (invalidates caches)


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def _tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer with exactly ``vocab_size`` entries (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    while len(vocab) < vocab_size:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(folder)


def _random_model(num_layers: int, seed: int) -> tuple[object, dict[str, torch.Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=num_layers, architectures=["LlamaForCausalLM"], **TINY)
    model = LlamaForCausalLM(config)
    config.dtype = torch.float32
    state = {k: v.detach().clone().float().contiguous() for k, v in model.state_dict().items()}
    # RMSNorm weights start at exactly 1; give them some spread so they look trained.
    gen = torch.Generator().manual_seed(seed + 1)
    for name, t in state.items():
        if name.endswith("norm.weight"):
            state[name] = t + 0.1 * torch.randn(t.shape, generator=gen)
    return config, state


def task_vector(name: str, tensor: torch.Tensor, finetune: str) -> torch.Tensor:
    """The seeded change ``finetune`` makes to ``tensor`` (same shape, float32)."""
    if finetune == "ft5" and name == "model.norm.weight":
        return torch.zeros_like(tensor)
    s = _seed(finetune, name)
    gen = torch.Generator().manual_seed(s)
    std = float(tensor.std()) if tensor.numel() > 1 else 0.0
    ref = std if std > 1e-6 else 0.02
    scale = _SCALES[s % 3] * ref
    density = _DENSITIES[(s // 3) % 3]
    noise = torch.randn(tensor.shape, generator=gen)
    outliers = torch.rand(tensor.shape, generator=gen) < 0.01
    noise = torch.where(outliers, noise * 5.0, noise)
    if density < 1.0:
        noise = noise * (torch.rand(tensor.shape, generator=gen) < density)
    return noise * scale


def _save(folder: Path, config: object, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    # Plain save (not model.save_pretrained) so the stored tensors are exactly ours.
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _tokenizer(folder, config.vocab_size)


def build_all(root: str | Path) -> dict[str, Path]:
    """Write every model under ``root`` (reusing a complete earlier build); returns name -> folder."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = Path(root)
    folders = {name: root / name for name in PLACEHOLDERS}
    stamp = root / ".complete"
    if stamp.exists() and stamp.read_text() == _STAMP and all((f / "model.safetensors").exists() for f in folders.values()):
        return folders
    config, base = _random_model(BASE_LAYERS, seed=1234)
    _save(folders["base"], config, base)
    for ft in FINETUNES:
        _save(folders[ft], config, {k: v + task_vector(k, v, ft) for k, v in base.items()})
    for i, big in enumerate(BIGS):
        big_config, big_state = _random_model(BIG_LAYERS, seed=4321 + i)
        _save(folders[big], big_config, big_state)
    stamp.write_text(_STAMP)
    return folders


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/compat/checkpoints.py DIR")
    print(json.dumps({k: str(v) for k, v in build_all(sys.argv[1]).items()}, indent=2))
