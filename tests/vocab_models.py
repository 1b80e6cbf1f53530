"""Tiny Llama checkpoints whose vocabularies differ, with real tokenizers (no mocks), built offline in a second.

* ``vbase``: a byte-level BPE tokenizer trained here with ``tokenizers`` (specials ``<s>``, ``</s>``,
  ``<pad>``), embeddings with exactly one row per token;
* ``vchat``: vbase + two added special tokens ``<|im_start|>``, ``<|im_end|>`` and embeddings resized
  by two rows (as a chat fine-tune does), every other tensor moved by a seeded task vector;
* ``vtool``: vbase + one added token ``<tool>`` (not special), one more row;
* ``vother``: a BPE tokenizer trained on another text, so the tokens it shares with vbase mostly have
  other ids, and some tokens are its own; its rows for shared tokens are vbase's rows (moved);
* ``vpad``: vbase's tokenizer with embeddings padded to a multiple of 16 rows (rows past the tokenizer, as
  Qwen or Llama 3.2 ship them).

Used by tests/test_vocabulary.py and the mergekit compatibility corpus (placeholders ``{vbase}``, ...).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

VOCAB_MODELS = ("vbase", "vchat", "vtool", "vother", "vpad")
#: The tiny shape; vocab_size is set per model from its tokenizer.
SHAPE = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-5)
VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
SPECIALS = ["<s>", "</s>", "<pad>"]
TEXT_A = [
    "the quick brown fox jumps over the lazy dog",
    "merging models one tensor at a time keeps memory small",
    "a tokenizer maps text to token ids and back again",
    "the embeddings hold one row for every token of the vocabulary",
] * 4
TEXT_B = [
    "zebras quietly vanish while waltzing by xylophones",
    "jovial kangaroos hop across the vast dusty plains",
    "token ids differ when the merges differ",
] * 4
_STAMP = "vocab-models-v1"


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _llama(rows: int, state: dict[str, torch.Tensor], folder: Path) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=rows, architectures=["LlamaForCausalLM"], **SHAPE)
    config.dtype = torch.float32
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _moved(name: str, tensor: torch.Tensor, who: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_seed(who, name))
    return tensor + 0.1 * tensor.std() * torch.randn(tensor.shape, generator=gen)


def _new_rows(count: int, width: int, who: str, name: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_seed(who, name, "rows"))
    return torch.randn(count, width, generator=gen) * 0.02


def build_vocab_models(root: str | Path) -> dict[str, Path]:
    """Write every model under ``root`` (reusing a complete earlier build); returns name -> folder."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = Path(root)
    folders = {name: root / name for name in VOCAB_MODELS}
    stamp = root / ".complete"
    if stamp.exists() and stamp.read_text() == _STAMP:
        return folders
    base_tok = train_bpe(TEXT_A, 300)
    rows = len(base_tok)
    torch.manual_seed(7)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=rows, **SHAPE))
    base = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(8)
    for name, t in base.items():  # norms start at exactly 1: give them some spread
        if name.endswith("norm.weight"):
            base[name] = t + 0.1 * torch.randn(t.shape, generator=gen)
    _llama(rows, base, folders["vbase"])
    base_tok.save_pretrained(folders["vbase"])
    base_vocab = base_tok.get_vocab()

    def fine_tune(who: str, tokenizer, extra_rows: int) -> None:
        state = {k: _moved(k, v, who) for k, v in base.items()}
        for name in VOCABULARY_TENSORS:
            state[name] = torch.cat([state[name], _new_rows(extra_rows, SHAPE["hidden_size"], who, name)])
        _llama(rows + extra_rows, state, folders[who])
        tokenizer.save_pretrained(folders[who])

    chat_tok = train_bpe(TEXT_A, 300)
    chat_tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fine_tune("vchat", chat_tok, 2)
    tool_tok = train_bpe(TEXT_A, 300)
    tool_tok.add_tokens(["<tool>"])
    fine_tune("vtool", tool_tok, 1)

    other_tok = train_bpe(TEXT_B, 300)
    other_vocab = other_tok.get_vocab()
    state = {k: _moved(k, v, "vother") for k, v in base.items()}
    for name in VOCABULARY_TENSORS:
        fresh = _new_rows(len(other_vocab), SHAPE["hidden_size"], "vother", name)
        for token, i in other_vocab.items():
            if token in base_vocab:
                fresh[i] = state[name][base_vocab[token]]
        state[name] = fresh
    _llama(len(other_vocab), state, folders["vother"])
    other_tok.save_pretrained(folders["vother"])

    padded = -(-rows // 16) * 16 + (16 if rows % 16 == 0 else 0)
    state = {k: _moved(k, v, "vpad") for k, v in base.items()}
    for name in VOCABULARY_TENSORS:
        state[name] = torch.cat([state[name], _new_rows(padded - rows, SHAPE["hidden_size"], "vpad", name)])
    _llama(padded, state, folders["vpad"])
    base_tok.save_pretrained(folders["vpad"])
    stamp.write_text(_STAMP)
    return folders


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    print(json.dumps({k: str(v) for k, v in build_vocab_models(sys.argv[1]).items()}, indent=2))
