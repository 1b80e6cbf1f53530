"""Results of a run: the tables, the plot, the paper comparison, and the BENCHMARKS.md section."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SECTION = "## Merge quality"


@dataclass
class Row:
    """One method's test accuracy per task, and how its hyper-parameter was chosen."""

    label: str
    test: dict[str, float]
    chosen: str = ""  #: e.g. "λ = 0.3" or "λ_t per task"
    kind: str = "merge"  #: reference | merge | tall

    def normalized(self, finetuned: dict[str, float]) -> dict[str, float]:
        return {t: self.test[t] / finetuned[t] for t in self.test}

    @staticmethod
    def mean(values: dict[str, float]) -> float:
        return sum(values.values()) / len(values)


@dataclass
class Results:
    tasks: Sequence[str]
    rows: list[Row]
    finetuned: dict[str, float]  #: test accuracy of the individual fine-tunes (normaliser)
    n_test: int  #: test images per task

    def noise(self, label: str) -> float:
        """Standard error of a row's average accuracy from the test-set size (binomial, tasks independent)."""
        test = self.row(label).test
        return math.sqrt(sum(p * (1 - p) / self.n_test for p in test.values())) / len(test)

    def row(self, label: str) -> Row:
        return next(r for r in self.rows if r.label == label)

    def avg_abs(self, label: str) -> float:
        return Row.mean(self.row(label).test)

    def avg_norm(self, label: str) -> float:
        return Row.mean(self.row(label).normalized(self.finetuned))


def table(results: Results, normalized: bool) -> str:
    """A markdown table, one row per method, one column per task, and the average."""
    head = "| method | " + " | ".join(results.tasks) + " | **average** | chosen on validation |"
    rule = "|---|" + "---:|" * (len(results.tasks) + 1) + "---|"
    lines = [head, rule]
    for row in results.rows:
        values = row.normalized(results.finetuned) if normalized else row.test
        cells = " | ".join(f"{100 * values[t]:.1f}" for t in results.tasks)
        lines.append(f"| {row.label} | {cells} | **{100 * Row.mean(values):.1f}** | {row.chosen} |")
    return "\n".join(lines)


def plot(results: Results, path: Path) -> Path:
    """Normalized test accuracy per method: a bar for the average, a dot per task. Small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.rows
    fig, ax = plt.subplots(figsize=(7.5, 0.36 * len(rows) + 1.2))
    colours = {"reference": "#9e9e9e", "merge": "#4c72b0", "tall": "#55a868"}
    for i, row in enumerate(rows):
        values = [100 * v for v in row.normalized(results.finetuned).values()]
        ax.barh(i, sum(values) / len(values), color=colours[row.kind], height=0.65)
        ax.scatter(values, [i] * len(values), s=9, color="black", zorder=3, linewidths=0)
        ax.text(101, i, f"{sum(values) / len(values):.1f}", va="center", fontsize=8)
    ax.axvline(100, color="black", lw=0.8, ls="--")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r.label for r in rows], fontsize=8)
    ax.invert_yaxis()
    lo = min(min(r.normalized(results.finetuned).values()) for r in rows) * 100
    ax.set_xlim(max(0.0, lo - 5), 108)
    ax.set_xlabel("normalized test accuracy (% of the individual fine-tune); bar = average, dots = tasks", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(f"Merge quality: {len(results.tasks)} tasks, one shared backbone", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def findings(results: Results) -> list[str]:
    """The paper's qualitative findings, each checked against this run (holds / does not hold)."""

    def verdict(ok: bool) -> str:
        return "holds" if ok else "**does not hold**"

    out = []
    for label in [r.label for r in results.rows if r.kind == "tall"]:
        value = results.avg_norm(label)
        worst = min(results.row(label).normalized(results.finetuned).items(), key=lambda kv: kv[1])
        out.append(
            f"TALL reconstruction retains > 99% of fine-tuned accuracy (paper: 99.7% normalized, ViT-B/32, 8 tasks): "
            f"{label} {100 * value:.1f}% on average, worst task {worst[0]} {100 * worst[1]:.1f}% -- {verdict(value > 0.99)}."
        )
    def within_noise(a: str, b: str) -> str:
        gap, se = abs(results.avg_abs(a) - results.avg_abs(b)), math.hypot(results.noise(a), results.noise(b))
        return f" (the difference, {100 * gap:.1f} points, is within 2 standard errors of test-set noise, ±{200 * se:.1f})" if gap < 2 * se else ""

    for consensus, base in (("Consensus-TA", "Task arithmetic"), ("Consensus-TIES", "TIES")):
        a, b = results.avg_abs(consensus), results.avg_abs(base)
        out.append(f"{consensus} >= {base} (paper: consensus improves on its base method): {100 * a:.1f} vs {100 * b:.1f} absolute "
                   f"-- {verdict(a >= b)}{within_noise(consensus, base)}.")
    ta, ties = results.avg_abs("Task arithmetic"), results.avg_abs("TIES")
    out.append(f"TIES > task arithmetic (paper, ViT-B/32 8 tasks: TIES ahead): {100 * ties:.1f} vs {100 * ta:.1f} "
               f"-- {verdict(ties > ta)}{within_noise('TIES', 'Task arithmetic')}.")
    zs, ft = results.avg_abs("Zero-shot"), Row.mean(results.finetuned)
    merges = [r for r in results.rows if r.kind == "merge"]
    between = all(zs < Row.mean(r.test) < ft for r in merges)
    zs_norm = results.avg_norm("Zero-shot")
    recovered = sorted((results.avg_norm(r.label) - zs_norm) / (1 - zs_norm) for r in merges)
    out.append(f"Every merge lies between zero-shot ({100 * zs:.1f}) and the individual fine-tunes ({100 * ft:.1f}) -- {verdict(between)}. "
               f"The merges recover {100 * recovered[0]:.0f}-{100 * recovered[-1]:.0f}% of the normalized gap between zero-shot and fine-tuning. "
               f"In the paper (ViT-B/32, 8 tasks) it is roughly half, so this small backbone leaves far less room to merge 8 tasks.")
    return out


def update_section(benchmarks_md: Path, body: str) -> None:
    """Replace (or append) the ``## Merge quality`` section of BENCHMARKS.md; other sections stay as they are."""
    text = benchmarks_md.read_text() if benchmarks_md.exists() else "# Benchmarks\n"
    section = f"{SECTION}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\s*\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
        text = text.rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    benchmarks_md.write_text(text)
