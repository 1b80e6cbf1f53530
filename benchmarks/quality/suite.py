"""The benchmark suite on disk: profiles, paths, cached splits and heads, and the evaluator hook.

A suite folder (``benchmarks/quality/work/<profile>/``) holds everything training produced::

    suite.json                         profile + cache key; written last, so it marks a complete build
    checkpoints/base/                  pretrained backbone   (model.safetensors + config.json)
    checkpoints/<task>/                fine-tuned backbones  (same format)
    heads/<task>.safetensors           each task's head (never merged)
    data/<task>.npz                    validation and test splits (uint8 pixels + labels)

``validation_accuracy(task_name, state)`` is the evaluator a recipe can name
(``evaluator: benchmarks.quality.suite:validation_accuracy``, with the repository root on
``PYTHONPATH``): it scores a merged or reconstructed backbone on one task's validation split.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import TASK_NAMES
from .model import BackboneConfig, backbone_from_state, load_head
from .train import Schedule

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
#: environment variable naming the suite folder the evaluator hook uses (default: the full profile's)
SUITE_ENV = "MLK_QUALITY_SUITE"
#: source files whose content is part of the cache key: editing them retrains
SOURCES = ("data.py", "model.py", "train.py")


@dataclass(frozen=True)
class Profile:
    """Sizes, schedules and search grids of one run of the benchmark."""

    name: str
    n_pretrain: int = 30_000
    pretrain: Schedule = Schedule(steps=1500, lr=2e-3, batch_size=256, weight_decay=0.01)
    n_train: int = 20_000
    n_val: int = 1_000
    n_test: int = 5_000
    probe: Schedule = Schedule(steps=400, lr=1e-2, batch_size=512)
    finetune: Schedule = Schedule(steps=1500, lr=1e-4, batch_size=128)
    #: λ grid of every merge method (the papers' 0.1 ... 1.0)
    lambdas: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    #: tried in order, while validation improves, when the best λ is the grid's largest
    lambda_extension: tuple[float, ...] = (1.2, 1.4, 1.6, 1.8, 2.0)
    #: λ_t grid of the TALL masks (the paper's)
    tall_lambdas: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    seed: int = 0


PROFILES: dict[str, Profile] = {
    "full": Profile("full"),
    "quick": Profile(
        "quick",
        n_pretrain=6_000,
        pretrain=Schedule(steps=300, lr=2e-3, batch_size=256, weight_decay=0.01),
        n_train=3_000,
        n_val=400,
        n_test=800,
        probe=Schedule(steps=200, lr=1e-2, batch_size=512),
        finetune=Schedule(steps=300, lr=2e-4, batch_size=128),
        lambdas=(0.4, 0.7, 1.0),
        lambda_extension=(),
        tall_lambdas=(0.2, 0.4, 0.6),
    ),
}


def _profile_from_json(data: dict) -> Profile:
    data = dict(data)
    for key in ("pretrain", "probe", "finetune"):
        data[key] = Schedule(**data[key])
    for key in ("lambdas", "lambda_extension", "tall_lambdas"):
        data[key] = tuple(data[key])
    data["backbone"] = BackboneConfig(**{**data["backbone"], "widths": tuple(data["backbone"]["widths"])})
    return Profile(**data)


class SuiteFolder:
    """A built suite's folder: where each file lives and the cache key of what built it. Shared by the
    MLP suite and the MiniLM suite (benchmarks/quality_text); each says its sources, data suffix and
    how to read its profile back."""

    here: Path = HERE
    sources: tuple[str, ...] = SOURCES
    data_suffix = ".npz"
    run_hint = ".venv/bin/python benchmarks/quality/run.py"

    def __init__(self, root: Path, profile: Any):
        self.root = Path(root)
        self.profile = profile

    @staticmethod
    def profile_from_json(data: dict) -> Any:
        return _profile_from_json(data)

    @classmethod
    def open(cls, root: Path) -> Any:
        """A built suite, from its folder alone (what the evaluator hook uses)."""
        meta = Path(root) / "suite.json"
        if not meta.is_file():
            raise FileNotFoundError(f"{root}: no built suite here (run: {cls.run_hint})")
        return cls(Path(root), cls.profile_from_json(json.loads(meta.read_text())["profile"]))

    # -- paths -------------------------------------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        return self.root / "checkpoints" / "base"

    def model_dir(self, task: str) -> Path:
        return self.root / "checkpoints" / task

    def head_path(self, task: str) -> Path:
        return self.root / "heads" / f"{task}.safetensors"

    def data_path(self, task: str) -> Path:
        return self.root / "data" / f"{task}{self.data_suffix}"

    # -- cache -------------------------------------------------------------------------------------
    def key(self) -> str:
        """Hash of the profile and of the code that generates data and trains: any change retrains."""
        digest = hashlib.sha256(json.dumps(asdict(self.profile), sort_keys=True).encode())
        for name in self.sources:
            digest.update((self.here / name).read_bytes())
        return digest.hexdigest()[:16]

    def is_built(self) -> bool:
        meta = self.root / "suite.json"
        return meta.is_file() and json.loads(meta.read_text()).get("key") == self.key()

    def mark_built(self, info: dict) -> None:
        meta = {"key": self.key(), "profile": asdict(self.profile), **info}
        (self.root / "suite.json").write_text(json.dumps(meta, indent=2) + "\n")

    def build_info(self) -> dict:
        return json.loads((self.root / "suite.json").read_text())


class Suite(SuiteFolder):
    """One suite folder: where each file lives, and how a backbone state is scored on a task."""

    def __init__(self, root: Path, profile: Profile):
        super().__init__(root, profile)
        self.tasks: tuple[str, ...] = TASK_NAMES

    # -- data and heads ----------------------------------------------------------------------------
    def save_split(self, task: str, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        arrays = {}
        for split, (images, labels) in splits.items():
            arrays[f"{split}_x"] = np.round(images * 255).astype(np.uint8)
            arrays[f"{split}_y"] = labels.astype(np.int64)
        self.data_path(task).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(self.data_path(task), **arrays)

    @functools.lru_cache(maxsize=None)
    def split(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (float32 in [0, 1]) and labels of a stored split (``val`` or ``test``)."""
        with np.load(self.data_path(task)) as npz:
            return torch.from_numpy(npz[f"{split}_x"].astype(np.float32) / 255.0), torch.from_numpy(npz[f"{split}_y"])

    @functools.lru_cache(maxsize=None)
    def head(self, task: str) -> torch.nn.Linear:
        return load_head(self.head_path(task))

    # -- scoring -----------------------------------------------------------------------------------
    @torch.no_grad()
    def accuracy(self, state: Mapping[str, torch.Tensor], task: str, split: str = "val") -> float:
        """Accuracy of backbone ``state`` + the task's head on one split."""
        return self.accuracies(state, split, tasks=(task,))[task]

    @torch.no_grad()
    def accuracies(self, state: Mapping[str, torch.Tensor], split: str = "val", tasks: tuple[str, ...] | None = None) -> dict[str, float]:
        backbone = backbone_from_state({k: state[k] for k in state.keys()}, self.profile.backbone)
        out = {}
        for task in tasks or self.tasks:
            images, labels = self.split(task, split)
            predictions = self.head(task)(backbone(images)).argmax(1)
            out[task] = float((predictions == labels).float().mean())
        return out


def default_root(profile: str = "full") -> Path:
    return WORK / profile


@functools.lru_cache(maxsize=4)
def _suite_at(root: str) -> Suite:
    return Suite.open(Path(root))


def validation_accuracy(task_name: str, state: Mapping[str, torch.Tensor]) -> float:
    """Evaluator hook for recipes (``evaluator: benchmarks.quality.suite:validation_accuracy``).

    Scores the backbone tensors ``state`` (merged or reconstructed) with ``task_name``'s head on its
    validation split; higher is better. The suite folder is ``$MLK_QUALITY_SUITE``, else the full
    profile's (``benchmarks/quality/work/full``), which must have been built by ``run.py``.
    """
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return _suite_at(os.environ.get(SUITE_ENV, str(default_root()))).accuracy(state, task_name, "val")
