"""extract-lora: a PEFT LoRA adapter whose ΔW per linear module is the best rank-r approximation of θ_ft − θ_0.

One module at a time: read its two tensors, take their difference, keep the top singular triplets
(√σ on each side, so lora_alpha = r and the scaling is 1), drop everything else. Embeddings are
saved whole as modules to save (PEFT's ``modules_to_save``), or decomposed with ``embed_lora``;
other changed tensors (norms) are saved whole unless ``skip_undecomposable``. The folder is
written only when every module is done, so a failure leaves no output.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..adapter import ADAPTER_CONFIG, open_model
from ..checkpoint import Checkpoint, open_checkpoint
from ..errors import CheckpointError, MergeKitLiteError
from ..execute import read_for_merge, resolve_device
from ..ops.lora import low_rank
from ..progress import progress_bar
from ..writer import AtomicFolder, write_json

#: PEFT's prefix of every key in an adapter file.
PEFT_PREFIX = "base_model.model."
#: Leaf names of embedding modules, when the architecture cannot be instantiated to ask.
_EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings", "embed_in", "embed_positions")
#: Leaf names of output embeddings (lm heads), saved whole like the input embeddings unless embed_lora.
_OUTPUT_NAMES = ("lm_head", "embed_out")


@dataclass(frozen=True)
class ModuleReport:
    """What happened to one module: decomposed at a rank with an error, saved whole, or skipped."""

    name: str
    action: str  # "lora", "embedding lora", "saved whole", "skipped"
    rank: int = 0
    relative_error: float = 0.0
    shape: tuple[int, ...] = ()


@dataclass
class ExtractReport:
    """Per-module results and the adapter written."""

    out_dir: Path
    modules: list[ModuleReport] = field(default_factory=list)
    adapter_bytes: int = 0
    unchanged: int = 0

    def lines(self) -> list[str]:
        """A table of the modules and a summary, for the CLI."""
        rows = [f"{m.name}: {m.action}" + (f" rank {m.rank}, relative error {m.relative_error:.4g}" if m.action.endswith("lora") else "")
                for m in self.modules]
        lora = [m for m in self.modules if m.action.endswith("lora")]
        worst = max((m.relative_error for m in lora), default=0.0)
        rows.append(f"{len(lora)} module(s) decomposed (largest relative error {worst:.4g}), "
                    f"{sum(m.action == 'saved whole' for m in self.modules)} saved whole, "
                    f"{sum(m.action == 'skipped' for m in self.modules)} skipped, {self.unchanged} unchanged; "
                    f"adapter {self.adapter_bytes / 1e6:.2f} MB")
        return rows


def module_kinds(base: Checkpoint) -> dict[str, str]:
    """Module name → 'linear', 'embedding', 'conv1d' or 'other', from the architecture built on the meta device
    (no weights); by the names alone ('embedding' for the usual embedding names, else 'linear') when it cannot be built."""
    config = dict(base.config or {})
    archs = config.get("architectures") or []
    try:
        import transformers

        cls = getattr(transformers, archs[0])
        hf_config = transformers.AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = cls(hf_config)
    except Exception:  # noqa: BLE001 - unknown or remote-code architectures: fall back on the names
        return {}
    kinds: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            kinds[name] = "embedding"
        elif isinstance(module, torch.nn.Linear):
            kinds[name] = "linear"
        elif type(module).__name__ == "Conv1D":
            kinds[name] = "conv1d"
        else:
            kinds[name] = "other"
    for name in _OUTPUT_NAMES:
        if kinds.get(name) == "linear":
            kinds[name] = "output embedding"
    return kinds


def _kind(kinds: dict[str, str], module: str, shape: tuple[int, ...]) -> str:
    if module in kinds:
        return kinds[module]
    leaf = module.rsplit(".", 1)[-1]
    if len(shape) != 2:
        return "other"
    if leaf in _EMBEDDING_NAMES:
        return "embedding"
    return "output embedding" if leaf in _OUTPUT_NAMES else "linear"


def extract_lora(
    finetuned: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    rank: int,
    sv_epsilon: float = 0.0,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    embed_lora: bool = False,
    save_modules: Sequence[str] = (),
    skip_undecomposable: bool = False,
    force: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> ExtractReport:
    """Write a PEFT adapter to ``out_dir`` whose ΔW per linear module is the truncated SVD of θ_ft − θ_0.

    ``include``/``exclude``: regular expressions searched in module names (as mergekit's); ``sv_epsilon``:
    singular values at or below it are dropped too (mergekit's absolute threshold); ``save_modules``:
    module names (or their last part) saved whole.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergeKitLiteError(f"--rank: must be a whole number >= 1, got {rank!r}")
    if not sv_epsilon >= 0.0 or sv_epsilon == float("inf"):
        raise MergeKitLiteError(f"--sv-epsilon: must be a finite number >= 0, got {sv_epsilon!r}")
    patterns = []
    for option, values in (("--include", include), ("--exclude", exclude)):
        for value in values:
            try:
                patterns.append((option, re.compile(value)))
            except re.error as exc:
                raise MergeKitLiteError(f"{option}: {value!r} is not a regular expression ({exc})") from None
    includes = [p for o, p in patterns if o == "--include"]
    excludes = [p for o, p in patterns if o == "--exclude"]
    dev = resolve_device(device)
    folder = AtomicFolder(out_dir, force=force)
    folder.check()  # an unusable output fails before any work
    with open_checkpoint(base) as base_ckpt, open_model(finetuned, base_ckpt) as ft:
        plan = _plan(ft, base_ckpt, includes, excludes, embed_lora, save_modules, skip_undecomposable)
        report = ExtractReport(folder.destination)
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        targets: list[str] = []
        to_save: list[str] = []
        total = sum(base_ckpt.info(name).nbytes * 2 for name, _, _ in plan)
        with progress_bar(total, "extract-lora", progress) as bar:
            for name, module, action in plan:
                bar.update(base_ckpt.info(name).nbytes * 2)
                stored = ft.info(name).dtype
                delta = read_for_merge(ft, name, dev, torch.float32).sub_(read_for_merge(base_ckpt, name, dev, torch.float32))
                if not bool(delta.any()):
                    report.unchanged += 1
                    continue
                if action == "saved whole":
                    tensors[PEFT_PREFIX + name] = ft.get(name).contiguous()
                    to_save.append(module)
                    report.modules.append(ModuleReport(module, action, shape=tuple(delta.shape)))
                    continue
                if action == "skipped":
                    report.modules.append(ModuleReport(module, action, shape=tuple(delta.shape)))
                    continue
                embedding = action == "embedding lora"
                factors = low_rank(delta.T if embedding else delta, rank, sv_epsilon)
                del delta
                if factors.rank == 0:  # every singular value under sv_epsilon: nothing to add
                    report.unchanged += 1
                    continue
                a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
                tensors[f"{PEFT_PREFIX}{module}.{a_key}"] = factors.lora_a.to(device="cpu", dtype=stored).contiguous()
                tensors[f"{PEFT_PREFIX}{module}.{b_key}"] = factors.lora_b.to(device="cpu", dtype=stored).contiguous()
                ranks[module] = factors.rank
                targets.append(module)
                report.modules.append(ModuleReport(module, action, factors.rank, factors.relative_error, tuple(base_ckpt.info(name).shape)))
        if not tensors:
            raise CheckpointError(f"{ft.ref}: no module differs from the base {base_ckpt.ref} (among those selected); there is no adapter to write")
        config = _adapter_config(str(base), rank, targets, ranks, to_save)
        with folder as tmp:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            write_json(tmp / ADAPTER_CONFIG, config)
            (tmp / "README.md").write_text(_card(str(finetuned), str(base), rank, sv_epsilon, report), encoding="utf-8")
            report.adapter_bytes = (tmp / "adapter_model.safetensors").stat().st_size
    return report


def _plan(ft: Checkpoint, base: Checkpoint, includes: list[re.Pattern[str]], excludes: list[re.Pattern[str]], embed_lora: bool,
          save_modules: Sequence[str], skip_undecomposable: bool) -> list[tuple[str, str, str]]:
    """(tensor, module, action) for every selected floating-point tensor of the base, checked against the fine-tune's headers."""
    kinds = module_kinds(base)
    chosen: list[tuple[str, str, str, str]] = []  # (tensor, module, leaf, kind)
    for name in base.names:
        info = base.info(name)
        if not info.is_float:
            continue
        if name not in ft:
            raise CheckpointError(f"{ft.ref}: has no tensor {name} (the base {base.ref} has it); not a fine-tune of this base")
        if ft.info(name).shape != info.shape:
            raise CheckpointError(f"{ft.ref}: tensor {name} has shape {list(ft.info(name).shape)}, the base {base.ref} has {list(info.shape)} "
                                  "(a resized vocabulary cannot be extracted)")
        module, _, leaf = name.rpartition(".")
        if (includes and not any(p.search(module) for p in includes)) or any(p.search(module) for p in excludes):
            continue
        chosen.append((name, module, leaf, _kind(kinds, module, info.shape) if leaf == "weight" else "other"))
    plan = []
    decomposed: set[str] = set()
    for name, module, leaf, kind in chosen:
        if module in save_modules or module.rsplit(".", 1)[-1] in save_modules:
            action = "saved whole"
        elif kind == "linear" or (embed_lora and kind == "output embedding"):
            action = "lora"
        elif kind == "embedding":
            action = "embedding lora" if embed_lora else "saved whole"
        elif kind == "output embedding":
            action = "saved whole"
        else:  # norms, biases, Conv1D (stored transposed): not carried as low-rank factors
            action = "skipped" if skip_undecomposable else "saved whole"
        if action.endswith("lora"):
            decomposed.add(module)
        plan.append((name, module, action))
    # the bias of a decomposed module cannot be saved whole (PEFT would replace the module that carries the LoRA)
    return [(n, m, "skipped" if a == "saved whole" and m in decomposed else a) for n, m, a in plan]


def _adapter_config(base: str, rank: int, targets: list[str], ranks: dict[str, int], to_save: list[str]) -> dict[str, Any]:
    """PEFT's adapter_config.json: r = lora_alpha = the rank (scaling 1); modules of another rank in rank/alpha patterns."""
    other = {m: r for m, r in ranks.items() if r != rank}
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": base,
        "task_type": None,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": dict(other),
        "alpha_pattern": dict(other),
        "target_modules": sorted(targets),
        "modules_to_save": sorted(set(to_save)) or None,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }


def _card(finetuned: str, base: str, rank: int, sv_epsilon: float, report: ExtractReport) -> str:
    lora = [m for m in report.modules if m.action.endswith("lora")]
    worst = max((m.relative_error for m in lora), default=0.0)
    mean = sum(m.relative_error for m in lora) / len(lora) if lora else 0.0
    front = json.dumps(base)
    return (
        f"---\nbase_model: {front}\nlibrary_name: peft\ntags:\n- lora\n- mergekit-lite\n---\n"
        f"# LoRA adapter extracted from {finetuned}\n\n"
        f"Made by `mergekit-lite extract-lora` from the difference between `{finetuned}` and its base `{base}`: "
        f"each linear module's ΔW is its best rank-{rank} approximation (truncated SVD"
        + (f", singular values ≤ {sv_epsilon:g} dropped" if sv_epsilon else "")
        + f"). {len(lora)} module(s) decomposed, relative Frobenius error mean {mean:.4g}, largest {worst:.4g}.\n\n"
        "```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, \"this folder\")\n```\n"
    )
