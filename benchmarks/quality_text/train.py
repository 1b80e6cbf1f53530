"""Building the text suite: data, a linear-probe head per task on frozen features, one fine-tune per task (TALL-masks protocol)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from benchmarks.quality.train import Schedule, Timer, _optimise

from .data import get_task, seed_for, task_splits
from .suite import Encoder, TextSuite, load_bert, pretrained_dir, save_bert, save_head

Log = Callable[[str], None]


@torch.inference_mode()
def features(encoder: Encoder, inputs: dict[str, torch.Tensor], batch: int = 500) -> torch.Tensor:
    n = len(inputs["input_ids"])
    return torch.cat([encoder(**{k: v[i:i + batch] for k, v in inputs.items()}) for i in range(0, n, batch)])


def linear_probe(encoder: Encoder, inputs: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int, schedule: Schedule, seed: int) -> nn.Linear:
    """The task head: logistic regression on the frozen pretrained mean-pooled features."""
    torch.manual_seed(seed)
    feats = features(encoder.eval(), inputs).clone()
    head = nn.Linear(feats.shape[1], num_classes)
    _optimise(list(head.parameters()), lambda i: nn.functional.cross_entropy(head(feats[i]), labels[i]), len(labels), schedule, seed)
    return head.eval()


def finetune(base_state: dict[str, torch.Tensor], head: nn.Linear, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
             schedule: Schedule, seed: int, freeze_word_embeddings: bool) -> nn.Module:
    """A copy of the pretrained BertModel fine-tuned on one task through its frozen head."""
    torch.manual_seed(seed)
    bert = load_bert(pretrained_dir())
    bert.load_state_dict(base_state, strict=False)
    if freeze_word_embeddings:
        bert.embeddings.word_embeddings.weight.requires_grad_(False)
    head.requires_grad_(False)
    encoder = Encoder(bert).train()
    params = [p for p in bert.parameters() if p.requires_grad]
    _optimise(params, lambda i: nn.functional.cross_entropy(head(encoder(**{k: v[i] for k, v in inputs.items()})), labels[i]),
              len(labels), schedule, seed)
    head.requires_grad_(True)
    return bert.eval()


def _reusable(previous: Path | None, suite: TextSuite, name: str, data_text: str) -> bool:
    """Whether an interrupted build of the same profile in ``previous`` holds this task, with exactly this data."""
    if previous is None:
        return False
    old = TextSuite(previous, suite.profile)
    files = [old.data_path(name), old.head_path(name), old.model_dir(name) / "model.safetensors", old.model_dir(name) / "config.json"]
    return all(f.is_file() for f in files) and old.data_path(name).read_text() == data_text


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def build(suite: TextSuite, log: Log, resume_from: Path | None = None) -> dict[str, object]:
    """Generate the data and train everything into ``suite.root`` (skipped when already built).

    ``resume_from``: the folder of an interrupted build with the same profile and training code; a task whose generated
    data there is identical to this build's is copied (head and fine-tune) instead of trained again.
    """
    if suite.is_built():
        log(f"checkpoints: cached in {suite.root} (key {suite.key()})")
        return suite.build_info()
    if suite.root.exists():
        shutil.rmtree(suite.root)
    suite.root.mkdir(parents=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    p, timer = suite.profile, Timer()
    base = load_bert(pretrained_dir())
    save_bert(base, suite.base_dir)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    encoder = Encoder(base)
    per_task: dict[str, dict[str, float]] = {}
    reused: list[str] = []
    for name in suite.tasks:
        task = get_task(name)
        with timer("data"):
            splits = task_splits(task, {"train": p.n_train, "val": p.n_val, "test": p.n_test}, p.seed)
            suite.data_path(name).parent.mkdir(parents=True, exist_ok=True)
            data_text = json.dumps({s: {"x": x, "y": y.tolist()} for s, (x, y) in splits.items()}) + "\n"
            suite.data_path(name).write_text(data_text)
            train_x, train_y = suite.split(name, "train")
        if _reusable(resume_from, suite, name, data_text):
            old = TextSuite(resume_from, suite.profile)  # type: ignore[arg-type]
            shutil.copyfile(old.head_path(name), _mkparent(suite.head_path(name)))
            shutil.copytree(old.model_dir(name), suite.model_dir(name))
            head, tuned = suite.head(name), load_bert(suite.model_dir(name))
            reused.append(name)
        else:
            with timer("heads"):
                head = linear_probe(encoder, train_x, train_y, task.num_classes, p.probe, seed_for(p.seed, name, "probe"))
            save_head(head, suite.head_path(name))
            with timer("finetune"):
                tuned = finetune(base_state, head, train_x, train_y, p.finetune, seed_for(p.seed, name, "finetune"), p.freeze_word_embeddings)
            save_bert(tuned, suite.model_dir(name))
        with torch.inference_mode():
            val_x, val_y = suite.split(name, "val")
            zero = float((head(features(encoder, val_x)).argmax(1) == val_y).float().mean())
            tuned_acc = float((head(features(Encoder(tuned), val_x)).argmax(1) == val_y).float().mean())
        per_task[name] = {"zero_shot_val": zero, "finetuned_val": tuned_acc}
        log(f"  {name:10s} zero-shot {zero:.3f} -> fine-tuned {tuned_acc:.3f} (validation)  [{sum(timer.phases.values()):.0f} s so far]")
    n_params = sum(v.numel() for v in base_state.values() if v.is_floating_point())
    info = {"parameters": n_params, "seconds": {k: round(v, 1) for k, v in timer.phases.items()}, "tasks": per_task,
            "resumed_tasks": reused}
    suite.mark_built(info)
    return suite.build_info()
