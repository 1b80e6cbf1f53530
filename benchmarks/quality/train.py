"""Training: pretrain the backbone on letters, fit each task's head, fine-tune the backbone per task.

Protocol (as in the TALL-masks / task-arithmetic papers, where each task's classification head is
fixed and only the shared encoder is fine-tuned and merged):

1. **Pretrain** the backbone (+ a throw-away 26-way letter head) on letters: generic stroke
   features that have never seen a digit or any task's transform.
2. **Head** of each task: a linear probe on the *frozen* pretrained features (logistic regression
   on the task's train split). Base backbone + this head is the task's **zero-shot** model.
3. **Fine-tune** the backbone on each task with its head frozen, so every backbone -- base,
   fine-tuned, merged, reconstructed -- is evaluated with the same head.

All randomness is seeded; training runs on the CPU with at most two threads.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .model import Backbone, BackboneConfig

if TYPE_CHECKING:
    from .suite import Suite

Log = Callable[[str], None]


@dataclass(frozen=True)
class Schedule:
    """One optimisation run: AdamW with a cosine learning-rate decay, no warm-up."""

    steps: int
    lr: float
    batch_size: int = 128
    weight_decay: float = 0.0


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def _optimise(params: list[nn.Parameter], loss_fn: Callable[[torch.Tensor], torch.Tensor], n: int, schedule: Schedule, seed: int) -> float:
    """Minimise ``loss_fn(batch_indices)`` with minibatches drawn from range(n); returns the last loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    loss = torch.tensor(float("nan"))
    for step in range(schedule.steps):
        for group in opt.param_groups:
            group["lr"] = schedule.lr * _cosine(step, schedule.steps)
        idx = torch.randint(0, n, (min(schedule.batch_size, n),), generator=gen)
        loss = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


def pretrain(images: np.ndarray, labels: np.ndarray, num_classes: int, schedule: Schedule, seed: int, config: BackboneConfig = BackboneConfig()) -> Backbone:
    """Backbone (and a discarded head) trained on the generic pretraining task."""
    torch.manual_seed(seed)
    backbone, head = Backbone(config), nn.Linear(config.feature_size, num_classes)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    backbone.train()
    _optimise(list(backbone.parameters()) + list(head.parameters()), lambda i: nn.functional.cross_entropy(head(backbone(x[i])), y[i]), len(y), schedule, seed)
    return backbone.eval()


@torch.no_grad()
def features(backbone: Backbone, images: np.ndarray | torch.Tensor, batch: int = 4096) -> torch.Tensor:
    x = torch.as_tensor(images)
    return torch.cat([backbone(x[i : i + batch]) for i in range(0, len(x), batch)])


def linear_probe(backbone: Backbone, images: np.ndarray, labels: np.ndarray, num_classes: int, schedule: Schedule, seed: int) -> nn.Linear:
    """The task head: logistic regression on frozen backbone features."""
    torch.manual_seed(seed)
    feats, y = features(backbone.eval(), images), torch.from_numpy(labels)
    head = nn.Linear(feats.shape[1], num_classes)
    _optimise(list(head.parameters()), lambda i: nn.functional.cross_entropy(head(feats[i]), y[i]), len(y), schedule, seed)
    return head.eval()


def finetune(base: Backbone, head: nn.Linear, images: np.ndarray, labels: np.ndarray, schedule: Schedule, seed: int) -> Backbone:
    """A copy of ``base`` fine-tuned on one task through its frozen head."""
    torch.manual_seed(seed)
    backbone = Backbone(base.config)
    backbone.load_state_dict(base.state_dict())
    head.requires_grad_(False)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    backbone.train()
    _optimise(list(backbone.parameters()), lambda i: nn.functional.cross_entropy(head(backbone(x[i])), y[i]), len(y), schedule, seed)
    head.requires_grad_(True)
    return backbone.eval()


@torch.no_grad()
def accuracy(backbone: Backbone, head: nn.Linear, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    predictions = head(features(backbone.eval(), images)).argmax(1)
    return float((predictions == torch.as_tensor(labels)).float().mean())


class Timer:
    """Wall time of named phases, for the report."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    def __call__(self, name: str) -> "_Phase":
        return _Phase(self, name)


class _Phase:
    def __init__(self, timer: Timer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.phases[self.name] = self.timer.phases.get(self.name, 0.0) + time.perf_counter() - self.start


def quantise(images: np.ndarray) -> np.ndarray:
    """8-bit pixels, as stored on disk: training sees exactly what evaluation sees."""
    return (np.round(images * 255) / 255).astype(np.float32)


def build(suite: "Suite", log: Log) -> dict[str, object]:
    """Generate the data and train everything into ``suite.root`` (skipped when already built).

    Returns the build information stored in ``suite.json``: phase times and, per task, the
    validation accuracy of the zero-shot and fine-tuned models.
    """
    import shutil

    from .data import PRETRAIN_CLASSES, get_task, pretrain_split, task_split, seed_for
    from .model import num_parameters, save_backbone, save_head

    if suite.is_built():
        log(f"checkpoints: cached in {suite.root} (key {suite.key()})")
        return suite.build_info()
    if suite.root.exists():
        shutil.rmtree(suite.root)
    suite.root.mkdir(parents=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    p, timer = suite.profile, Timer()
    with timer("data"):
        images, labels = pretrain_split(p.n_pretrain, p.seed)
    with timer("pretrain"):
        base = pretrain(quantise(images), labels, PRETRAIN_CLASSES, p.pretrain, seed_for(p.seed, "pretrain"), p.backbone)
    save_backbone(base, suite.base_dir)
    log(f"pretrained the backbone ({num_parameters(base):,} parameters) on {p.n_pretrain:,} letters in {timer.phases['pretrain']:.0f}s")
    per_task: dict[str, dict[str, float]] = {}
    for name in suite.tasks:
        task = get_task(name)
        with timer("data"):
            train_x, train_y = task_split(task, "train", p.n_train, p.seed)
            val, test = task_split(task, "val", p.n_val, p.seed), task_split(task, "test", p.n_test, p.seed)
            suite.save_split(name, {"val": val, "test": test})
            train_x = quantise(train_x)
        with timer("heads"):
            head = linear_probe(base, train_x, train_y, task.num_classes, p.probe, seed_for(p.seed, name, "probe"))
        save_head(head, suite.head_path(name))
        with timer("finetune"):
            tuned = finetune(base, head, train_x, train_y, p.finetune, seed_for(p.seed, name, "finetune"))
        save_backbone(tuned, suite.model_dir(name))
        val_x, val_y = quantise(val[0]), val[1]
        per_task[name] = {"zero_shot_val": accuracy(base, head, val_x, val_y), "finetuned_val": accuracy(tuned, head, val_x, val_y)}
        log(f"  {name:12s} zero-shot {per_task[name]['zero_shot_val']:.3f} -> fine-tuned {per_task[name]['finetuned_val']:.3f} (validation)")
    info = {"parameters": num_parameters(base), "seconds": {k: round(v, 1) for k, v in timer.phases.items()}, "tasks": per_task}
    suite.mark_built(info)
    return suite.build_info()
