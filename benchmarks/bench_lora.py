#!/usr/bin/env python3
"""LoRA benchmark: memory of a K = 8 adapter merge, and extract-lora's time side by side with mergekit's.

    .venv/bin/python benchmarks/bench_lora.py            # prints a markdown section (BENCHMARKS.md "LoRA adapters")

Inputs (built once under benchmarks/work/lora/): a float32 Llama of 2 layers (hidden 1024, MLP 4096,
vocabulary 4096: 16 MiB per MLP matrix and per embedding, 168 MB in all), 8 PEFT adapters of it (rank 16 on
every attention and MLP projection, B drawn at random), the same 8 fine-tunes merged by PEFT
(``merge_and_unload``) and saved whole, and a dense fine-tune (base + noise everywhere).

1. ``mergekit-lite run`` of task_arithmetic over the 8 adapters, then over the 8 merged checkpoints:
   peak RSS (``os.wait4`` of the child) and wall time; ``run --dry-run``'s estimate for reference.
2. ``mergekit-lite extract-lora`` and mergekit 0.1.5's ``mergekit-extract-lora`` of the dense fine-tune at
   rank 16 (CPU): wall time, peak RSS, adapter size; and our largest per-module relative error.
Each run once (the machine is shared: the numbers are indicative, not medians).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_speed import run_child  # noqa: E402

WORK = REPO / "benchmarks" / "work" / "lora"
PY = str(REPO / ".venv" / "bin" / "python")
MK = REPO / ".venv-mergekit" / "bin" / "mergekit-extract-lora"
K = 8
RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build() -> None:
    """The base, K adapters, their merged fine-tunes and a dense fine-tune (skipped when present)."""
    if (WORK / "done").exists():
        return
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.rmtree(WORK, ignore_errors=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=16,
                         num_key_value_heads=16, max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(WORK / "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(K):
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS))
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        peft_model.save_pretrained(WORK / f"adapter{i}")
        peft_model.merge_and_unload().save_pretrained(WORK / f"merged{i}")
    dense = {k: v + 0.01 * torch.randn_like(v) for k, v in base_state.items()}
    model.load_state_dict(dense)
    model.save_pretrained(WORK / "dense")
    (WORK / "done").write_text("ok")


def recipe(kind: str) -> Path:
    path = WORK / f"{kind}.yml"
    models = "\n".join(f"  - model: {WORK / f'{kind}{i}'}\n    parameters: {{weight: 0.125}}" for i in range(K))
    path.write_text(f"merge_method: task_arithmetic\nbase_model: {WORK / 'base'}\nmodels:\n{models}\ndtype: float32\n", encoding="utf-8")
    return path


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


def main() -> int:
    build()
    rows = ["| inputs (K = 8) | wall | peak RSS | `--dry-run` estimate |", "|---|---|---|---|"]
    adapter_mb = (WORK / "adapter0" / "adapter_model.safetensors").stat().st_size / 1e6
    model_mb = (WORK / "merged0" / "model.safetensors").stat().st_size / 1e6
    for kind, label in (("adapter", f"8 LoRA adapters (rank 16, {adapter_mb:.1f} MB each)"),
                        ("merged", f"the same 8 fine-tunes, merged by PEFT ({model_mb:.0f} MB each)")):
        path = recipe(kind)
        dry = subprocess.run([PY, "-m", "mergekit_lite.cli", "run", str(path), str(WORK / "out"), "--dry-run"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        estimate = next((line.split(":", 1)[1].strip() for line in dry.splitlines() if line.startswith("peak memory")), "?")
        r = run_child([PY, "-m", "mergekit_lite.cli", "run", str(path), str(WORK / f"out-{kind}"), "--force", "-q"])
        assert r.rc == 0, r.stderr
        rows.append(f"| {label} | {r.wall:.1f} s | {mib(r.maxrss_kib)} | {estimate} |")
    rows += ["", "| extract-lora, dense fine-tune, rank 16 | wall | peak RSS | adapter |", "|---|---|---|---|"]
    ours = run_child([PY, "-m", "mergekit_lite.cli", "extract-lora", str(WORK / "dense"), str(WORK / "base"), str(WORK / "x-ours"),
                      "--rank", str(RANK), "--force", "--skip-undecomposable", "--exclude", "embed_tokens|lm_head"])
    assert ours.rc == 0, ours.stderr
    size = (WORK / "x-ours" / "adapter_model.safetensors").stat().st_size
    rows.append(f"| mergekit-lite extract-lora | {ours.wall:.1f} s | {mib(ours.maxrss_kib)} | {size / 1e6:.1f} MB |")
    if MK.exists():
        shutil.rmtree(WORK / "x-mk", ignore_errors=True)
        theirs = run_child([str(MK), "--model", str(WORK / "dense"), "--base-model", str(WORK / "base"), "--out-path", str(WORK / "x-mk"),
                            "--max-rank", str(RANK), "--skip-undecomposable", "--exclude-regex", "embed_tokens|lm_head", "--quiet"])
        if theirs.rc == 0:
            size = (WORK / "x-mk" / "adapter_model.safetensors").stat().st_size
            rows.append(f"| mergekit 0.1.5 mergekit-extract-lora | {theirs.wall:.1f} s | {mib(theirs.maxrss_kib)} | {size / 1e6:.1f} MB |")
        else:
            rows.append(f"| mergekit 0.1.5 mergekit-extract-lora | failed: {theirs.stderr.strip().splitlines()[-1][:200]} | | |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
