"""Built-in demo: a small random Llama-style base and three fine-tune-like variants, made offline.

``python -m mergekit_lite.demo build DIR`` writes ``DIR/checkpoints/{base,math,code,chat}`` and,
when PEFT is installed, two LoRA adapters of the base in ``DIR/adapters/{poetry,legal}``;
``python -m mergekit_lite.demo load DIR`` loads a merged folder with transformers as a check.
The variants differ from the base by distinct sparse and low-rank changes, like real fine-tunes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

#: A small Llama: ~0.3M parameters, builds in about a second.
DEMO_CONFIG = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)

DEMO_TASKS = ("math", "code", "chat")
#: LoRA adapters of the demo base: name → (rank, target modules).
DEMO_ADAPTERS = {
    "poetry": (4, ["q_proj", "v_proj", "up_proj", "down_proj"]),
    "legal": (8, ["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"]),
}


def build_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over made-up words, saved as Hugging Face tokenizer files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(vocab_size - len(specials)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)


def finetune_like(state: dict[str, torch.Tensor], task: str, seed: int) -> dict[str, torch.Tensor]:
    """Perturb a state dict as a fine-tune would: sparse edits, low-rank updates, or both, per task."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        t = tensor.clone()
        if t.dim() == 2 and t.is_floating_point():
            if task in ("math", "chat"):  # sparse: 3% of entries moved
                keep = torch.rand(t.shape, generator=gen) < 0.03
                t += keep * torch.randn(t.shape, generator=gen) * 0.05
            if task in ("code", "chat") and ("mlp" in name or task == "code"):  # low rank: rank 2
                u = torch.randn(t.shape[0], 2, generator=gen) * 0.05
                v = torch.randn(2, t.shape[1], generator=gen) * 0.05
                t += u @ v
        elif t.dim() == 1 and t.is_floating_point():
            t += torch.randn(t.shape, generator=gen) * 0.002
        out[name] = t
    return out


def build_demo(root: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, config_overrides: dict | None = None) -> dict[str, Path]:
    """Write the base and the three variants under ``root/checkpoints``; returns their folders by name."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = Path(root)
    folders = {name: root / "checkpoints" / name for name in ("base", *DEMO_TASKS)}
    torch.manual_seed(seed)
    config = LlamaConfig(**{**DEMO_CONFIG, **(config_overrides or {})})
    model = LlamaForCausalLM(config).to(dtype)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.save_pretrained(folders["base"])
    build_tokenizer(folders["base"], config.vocab_size)
    for i, task in enumerate(DEMO_TASKS):
        tuned = finetune_like({k: v.float() for k, v in base_state.items()}, task, seed + 1 + i)
        model.load_state_dict({k: v.to(dtype) for k, v in tuned.items()}, strict=False)
        model.save_pretrained(folders[task])
        build_tokenizer(folders[task], config.vocab_size)
    model.load_state_dict(base_state)
    folders.update(build_adapters(model, root / "adapters", folders["base"], seed))
    return folders


def build_adapters(model: torch.nn.Module, root: Path, base_folder: Path, seed: int) -> dict[str, Path]:
    """Two PEFT LoRA adapters of ``model`` (B drawn at random, so ΔW ≠ 0), saved with PEFT; none without PEFT."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        print("peft is not installed: the demo has no LoRA adapters (pip install 'mergekit-lite[lora]')", file=sys.stderr)
        return {}
    import copy

    folders = {}
    for i, (name, (rank, targets)) in enumerate(DEMO_ADAPTERS.items()):
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
        gen = torch.Generator().manual_seed(seed + 100 + i)
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name:  # PEFT starts B at zero (ΔW = 0); a trained adapter's is not
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        peft_model.peft_config["default"].base_model_name_or_path = str(base_folder)
        peft_model.save_pretrained(root / name)
        folders[f"adapter:{name}"] = root / name
    return folders


def load_check(folder: str | Path) -> str:
    """Load a merged folder with transformers and run one forward pass; returns a one-line report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    params = sum(p.numel() for p in model.parameters())
    return f"loaded {type(model).__name__} ({params:,} parameters) from {folder}; forward pass ok, logits {list(logits.shape)}"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("build", "load"):
        print("usage: python -m mergekit_lite.demo build DIR | load MERGED_DIR", file=sys.stderr)
        return 2
    if argv[0] == "build":
        folders = build_demo(argv[1])
        print(f"demo checkpoints: {', '.join(str(p) for p in folders.values())}")
    else:
        print(load_check(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
