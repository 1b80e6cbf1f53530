"""Mask statistics: how many tasks use each weight, per tensor, per layer and overall; and a plot.

Accumulated one tensor at a time (``MaskStats.add``), so a whole model's masks are never held.
Catastrophic weights are used by no task (count 0), selfish ones by exactly one (count 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import MergeKitLiteError
from ..execute import TaskVectorPasses, resolve_device
from ..methods import TensorContext
from ..methods.tall import TALL_TIES_DENSITY, multitask_vector, tall_masks_for
from ..methods.task_arithmetic import stack_deltas, ties_model_statistics
from ..plan import plan as make_plan
from ..recipe import Recipe

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_of(name: str) -> str:
    """'model.layers.3.mlp.up_proj.weight' -> 'layer 3'; tensors outside the blocks -> 'other'."""
    match = _LAYER.search(name)
    return f"layer {int(match.group(1))}" if match else "other"


@dataclass
class Counts:
    """Counters for one group of weights (a tensor, a layer, or the whole model)."""

    tasks: int
    histogram: list[int] = field(default_factory=list)  # histogram[c] = weights used by exactly c tasks
    used: list[int] = field(default_factory=list)  # used[t] = weights in task t's mask
    overlap: list[list[int]] = field(default_factory=list)  # overlap[i][j] = weights in both masks i and j

    def __post_init__(self) -> None:
        self.histogram = self.histogram or [0] * (self.tasks + 1)
        self.used = self.used or [0] * self.tasks
        self.overlap = self.overlap or [[0] * self.tasks for _ in range(self.tasks)]

    def add(self, histogram: list[int], used: list[int], overlap: list[list[int]]) -> None:
        self.histogram = [a + b for a, b in zip(self.histogram, histogram)]
        self.used = [a + b for a, b in zip(self.used, used)]
        self.overlap = [[a + b for a, b in zip(r1, r2)] for r1, r2 in zip(self.overlap, overlap)]

    @property
    def total(self) -> int:
        return sum(self.histogram)

    def fraction(self, count: int) -> float:
        return self.histogram[count] / self.total if self.total else 0.0

    @property
    def density(self) -> list[float]:
        return [u / self.total if self.total else 0.0 for u in self.used]

    def jaccard(self, i: int, j: int) -> float:
        union = self.used[i] + self.used[j] - self.overlap[i][j]
        return self.overlap[i][j] / union if union else 0.0

    def as_dict(self, names: list[str]) -> dict[str, Any]:
        return {
            "weights": self.total,
            "histogram": self.histogram,
            "catastrophic_fraction": self.fraction(0),
            "selfish_fraction": self.fraction(1) if self.tasks >= 1 else 0.0,
            "density": dict(zip(names, self.density)),
            "overlap_jaccard": {f"{names[i]}|{names[j]}": self.jaccard(i, j) for i in range(self.tasks) for j in range(i + 1, self.tasks)},
        }


def mask_counts(masks: torch.Tensor) -> tuple[list[int], list[int], list[list[int]]]:
    """Histogram of tasks per weight, weights per task, and pairwise intersections of [T, ...] bool masks."""
    tasks = masks.shape[0]
    flat = masks.reshape(tasks, -1)
    # small counts and one pair at a time: a float64 copy of the T masks would be 2T float32 copies of the tensor
    per_weight = flat.sum(0, dtype=torch.uint8 if tasks < 256 else torch.int32)
    histogram = torch.bincount(per_weight, minlength=tasks + 1).tolist()
    del per_weight
    overlap = [[0] * tasks for _ in range(tasks)]
    for a in range(tasks):
        overlap[a][a] = int(flat[a].sum())
        for b in range(a + 1, tasks):
            overlap[a][b] = overlap[b][a] = int(torch.logical_and(flat[a], flat[b]).sum())
    used = [overlap[t][t] for t in range(tasks)]
    return histogram, used, overlap


class MaskStats:
    """Mask statistics for named tasks, added tensor by tensor."""

    def __init__(self, task_names: list[str]):
        self.task_names = list(task_names)
        tasks = len(task_names)
        self.overall = Counts(tasks)
        self.layers: dict[str, Counts] = {}
        self.tensors: dict[str, Counts] = {}

    def add(self, name: str, masks: torch.Tensor) -> None:
        """Count one tensor's masks ([T, ...] bool)."""
        self.add_counts(name, *mask_counts(masks))

    def add_counts(self, name: str, histogram: list[int], used: list[int], overlap: list[list[int]]) -> None:
        """Add one tensor's counts (``mask_counts`` of its masks, computed here or on a worker)."""
        tasks = len(self.task_names)
        for group in (self.overall, self.layers.setdefault(layer_of(name), Counts(tasks)), self.tensors.setdefault(name, Counts(tasks))):
            group.add(histogram, used, overlap)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.task_names,
            "overall": self.overall.as_dict(self.task_names),
            "layers": {k: v.as_dict(self.task_names) for k, v in self.layers.items()},
            "tensors": {k: v.as_dict(self.task_names) for k, v in self.tensors.items()},
        }

    def report(self) -> str:
        """A plain-text table: overall and per layer, then each task's density."""
        tasks = len(self.task_names)
        header = f"{'group':<14}{'weights':>12}" + "".join(f"{f'{c} tasks':>10}" for c in range(tasks + 1)) + f"{'catastr.':>10}{'selfish':>10}"
        lines = ["How many tasks' TALL masks use each weight (fractions of the group's weights):", header]
        for label, counts in [("overall", self.overall), *sorted(self.layers.items(), key=lambda kv: _layer_key(kv[0]))]:
            row = f"{label:<14}{counts.total:>12,}" + "".join(f"{counts.fraction(c):>10.3f}" for c in range(tasks + 1))
            lines.append(row + f"{counts.fraction(0):>10.3f}{counts.fraction(1):>10.3f}")
        lines.append("")
        lines.append("Task densities (fraction of weights in each task's mask):")
        for name, density in zip(self.task_names, self.overall.density):
            lines.append(f"  {name:<24}{density:.4f}")
        if tasks > 1:
            lines.append("")
            lines.append("Pairwise overlap (Jaccard index of two tasks' masks):")
            for i in range(tasks):
                for j in range(i + 1, tasks):
                    lines.append(f"  {self.task_names[i]} & {self.task_names[j]}: {self.overall.jaccard(i, j):.4f}")
        return "\n".join(lines)

    def plot(self, path: str | Path, title: str = "TALL mask statistics") -> Path:
        """A PNG with the overall histogram, the per-layer breakdown and each task's density."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:

            raise MergeKitLiteError("--plot needs matplotlib: pip install 'mergekit-lite[plot]' (or pip install matplotlib)") from None
        tasks = len(self.task_names)
        layers = sorted(self.layers, key=_layer_key)
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1, 2, 1]})
        counts = list(range(tasks + 1))
        colours = plt.cm.viridis([c / max(tasks, 1) for c in counts])
        axes[0].bar(counts, [self.overall.fraction(c) for c in counts], color=colours)
        axes[0].set_xlabel("number of tasks using the weight")
        axes[0].set_ylabel("fraction of weights")
        axes[0].set_title("overall")
        axes[0].set_xticks(counts)
        bottom = [0.0] * len(layers)
        for c in counts:
            values = [self.layers[l].fraction(c) for l in layers]
            axes[1].bar(range(len(layers)), values, bottom=bottom, color=colours[c], label=f"{c} task{'s' if c != 1 else ''}")
            bottom = [b + v for b, v in zip(bottom, values)]
        axes[1].set_xticks(range(len(layers)))
        axes[1].set_xticklabels(layers, rotation=60, ha="right", fontsize=8)
        axes[1].set_ylabel("fraction of weights")
        axes[1].set_title("per layer (0 = catastrophic, 1 = selfish)")
        axes[1].legend(fontsize=7, ncol=2)
        axes[2].barh(range(tasks), self.overall.density, color="tab:blue")
        axes[2].set_yticks(range(tasks))
        axes[2].set_yticklabels(self.task_names, fontsize=8)
        axes[2].set_xlabel("mask density")
        axes[2].set_title("per task")
        fig.suptitle(title)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path


def _layer_key(label: str) -> tuple[int, int]:
    return (0, int(label.split()[1])) if label.startswith("layer ") else (1, 0)


def mask_statistics(
    recipe: Recipe,
    *,
    device: str = "cpu",
    progress: bool = True,
    aggregate: str | None = None,
    tall_lambda: float | None = None,
) -> MaskStats:
    """TALL-mask statistics for the recipe's models, streamed one tensor at a time.

    Uses the recipe's ``aggregate`` and ``tall_lambda`` when its method has them (consensus),
    else task arithmetic and λ = 0.4; the arguments override both.
    """
    dev = resolve_device(device)
    the_plan = make_plan(recipe)
    try:
        if any(job.merge and job.base is None for job in the_plan.jobs):
            raise MergeKitLiteError(
                f"masks: TALL masks compare task vectors θ_t − θ_0, and merge_method {the_plan.method.name} does not take "
                "the base as θ_0; use the recipe of a task-vector method (task_arithmetic, ties, consensus, ...) with a base_model"
            )
        count = len(the_plan.models)
        params = {"aggregate": aggregate or the_plan.params.get("aggregate", "task_arithmetic")}
        if params["aggregate"] not in ("task_arithmetic", "ties"):
            raise MergeKitLiteError(f"--aggregate: {params['aggregate']!r} is not task_arithmetic or ties")
        model_params = [{"tall_lambda": tall_lambda if tall_lambda is not None else p.get("tall_lambda", 0.4)} for p in the_plan.model_params]
        source = TaskVectorPasses(the_plan, dev, progress)
        stats = ties_model_statistics(source, [TALL_TIES_DENSITY] * count, [1.0] * count) if params["aggregate"] == "ties" else {}
        result = MaskStats(the_plan.model_names)
        for name, deltas in source.tensors("TALL masks"):
            stacked = stack_deltas((d for _, d in deltas), count)
            ctx = TensorContext(name, the_plan.model_names, params, model_params, stats)
            result.add(name, tall_masks_for(stacked, multitask_vector(stacked, ctx), ctx).cpu())
        return result
    finally:
        the_plan.close()
