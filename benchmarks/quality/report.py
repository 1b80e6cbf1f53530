"""Results of a run: the tables, the plot, the paper comparison, and the BENCHMARKS.md section."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tuning import MethodSearch

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

    def noise_normalized(self, label: str) -> float:
        """Standard error of a row's average normalized accuracy (binomial, tasks independent)."""
        return normalized_noise([self.row(label).test], self.finetuned, self.n_test)

    def row(self, label: str) -> Row:
        return next(r for r in self.rows if r.label == label)

    def avg_abs(self, label: str) -> float:
        return Row.mean(self.row(label).test)

    def avg_norm(self, label: str) -> float:
        return Row.mean(self.row(label).normalized(self.finetuned))


def normalized_noise(groups: Sequence[Mapping[str, float]], finetuned: Mapping[str, float], n: int) -> float:
    """Standard error of the mean over groups of each group's average normalized accuracy (binomial, independent)."""
    var = sum(p * (1 - p) / n / finetuned[t] ** 2 / len(acc) ** 2 for acc in groups for t, p in acc.items())
    return math.sqrt(var) / len(groups)


@dataclass
class PairResults:
    """The pairwise table: per method, the test accuracy on each pair's two tasks at its chosen point."""

    pairs: Sequence[tuple[str, ...]]
    methods: list[tuple[str, list[dict[str, float]], str]]  #: (label, per pair {task: accuracy}, chosen point)
    zero_shot: dict[str, float]
    finetuned: dict[str, float]
    n_test: int

    def rows(self) -> list[tuple[str, list[dict[str, float]], str]]:
        zero = [{t: self.zero_shot[t] for t in pair} for pair in self.pairs]
        return [("Zero-shot", zero, "the pretrained backbone"), *self.methods]

    def normalized(self, accs: Sequence[Mapping[str, float]]) -> list[float]:
        return [sum(acc[t] / self.finetuned[t] for t in acc) / len(acc) for acc in accs]

    def average(self, accs: Sequence[Mapping[str, float]]) -> float:
        values = self.normalized(accs)
        return sum(values) / len(values)

    def noise(self, accs: Sequence[Mapping[str, float]]) -> float:
        return normalized_noise(accs, self.finetuned, self.n_test)


def pair_table(results: PairResults) -> str:
    """One row per method, one column per pair: average normalized test accuracy (%) on the pair's two tasks."""
    head = "| method | " + " | ".join(" + ".join(p) for p in results.pairs) + " | **average** | chosen on validation |"
    lines = [head, "|---|" + "---:|" * (len(results.pairs) + 1) + "---|"]
    for label, accs, chosen in results.rows():
        cells = " | ".join(f"{100 * v:.1f}" for v in results.normalized(accs))
        lines.append(f"| {label} | {cells} | **{100 * results.average(accs):.1f}** | {chosen} |")
    return "\n".join(lines)


def _compare(entries: list[tuple[str, float, float]], what: str) -> list[str]:
    """Best entry, those within two standard errors of it (indistinguishable here), and those clearly behind.

    ``entries``: (label, average normalized test accuracy, its standard error)."""
    ranked = sorted(entries, key=lambda e: -e[1])
    best = ranked[0]
    close = [e for e in ranked[1:] if best[1] - e[1] < 2 * math.hypot(best[2], e[2])]
    behind = [e for e in ranked[1:] if e not in close]
    out = [f"Best {what} on test: **{best[0]}**, {100 * best[1]:.1f}% normalized (± {100 * best[2]:.1f}, one standard error of test-set noise)."]
    if close:
        out.append("Within two standard errors of it, so this suite cannot tell them apart: "
                   + ", ".join(f"{e[0]} ({100 * e[1]:.1f})" for e in close) + ".")
    if behind:
        out.append("Clearly behind (more than two standard errors): " + ", ".join(f"{e[0]} ({100 * e[1]:.1f})" for e in behind) + ".")
    return out


def _identical(rows: list[tuple[str, tuple[float, ...]]]) -> list[list[str]]:
    """Groups of labels whose accuracies are equal on every task (the same predictions)."""
    groups: dict[tuple[float, ...], list[str]] = {}
    for label, values in rows:
        groups.setdefault(tuple(round(v, 9) for v in values), []).append(label)
    return [labels for labels in groups.values() if len(labels) > 1]


def ranking_findings(results: Results) -> list[str]:
    """Which 8-task merges win, which the suite cannot separate, which merges are the same model."""
    merges = [r for r in results.rows if r.kind == "merge"]
    out = [" ".join(_compare([(r.label, results.avg_norm(r.label), results.noise_normalized(r.label)) for r in merges], "merge of all 8 tasks"))]
    for labels in _identical([(r.label, tuple(r.test[t] for t in results.tasks)) for r in merges]):
        out.append(f"{', '.join(labels)} give exactly the same test accuracy on every task: with these fine-tunes they return "
                   "(nearly) the same weights, so the suite cannot tell them apart at all.")
    return out


@dataclass
class PairGeometry:
    """Angles between the two fine-tunes of each pair (degrees)."""

    task_vectors: list[float]  #: between τ_a and τ_b, over the whole backbone
    weights: list[float]  #: between θ_a and θ_b, the largest over the tensors (SLERP works tensor by tensor)


def pair_findings(results: PairResults, geometry: PairGeometry, best_multi: float, zero_multi: float) -> list[str]:
    """Which pairwise merges win, why some coincide, and how much more of the gap pairs recover than 8 tasks.

    ``best_multi`` / ``zero_multi``: average normalized test accuracy of the best 8-task merge and of zero-shot."""
    entries = [(label, results.average(accs), results.noise(accs)) for label, accs, _ in results.methods]
    out = [" ".join(_compare(entries, "pairwise merge"))]
    for labels in _identical([(label, tuple(v for acc in accs for v in acc.values())) for label, accs, _ in results.methods]):
        out.append(f"{', '.join(labels)} give exactly the same test accuracy on every pair.")
    tau, theta = geometry.task_vectors, geometry.weights
    mean_tau = sum(tau) / len(tau)
    out.append(f"Geometry: tensor by tensor, two fine-tunes' weights are at most {max(theta):.1f}° apart, so SLERP and linear "
               f"interpolation nearly coincide (at t = 0.5, SLERP is the linear midpoint times 1/cos(Ω/2) ≤ "
               f"{1 / math.cos(math.radians(max(theta) / 2)):.4f}; Multi-SLERP and the Karcher mean over the 8 fine-tunes sit as close to "
               "the linear soup in the first table). "
               f"Their task vectors, by contrast, are nearly orthogonal ({min(tau):.1f}–{max(tau):.1f}° over the backbone), so NuSLERP at "
               f"t = 0.5, θ_0 + (τ_a + τ_b) / (2 cos(Ω/2)), is task arithmetic at λ ≈ {1 / (2 * math.cos(math.radians(mean_tau) / 2)):.2f}.")
    zero = results.average(results.rows()[0][1])
    best = max(e[1] for e in entries)
    out.append(f"Two tasks at a time leave far more room than 8: the best pairwise merge recovers {100 * (best - zero) / (1 - zero):.0f}% "
               f"of the normalized gap between zero-shot ({100 * zero:.1f} on these pairs) and the fine-tunes, the best 8-task merge "
               f"{100 * (best_multi - zero_multi) / (1 - zero_multi):.0f}%.")
    return out


def search_findings(searches: Sequence["MethodSearch"], n_val: int) -> list[str]:
    """Which methods' own parameters change the validation score by more than its noise, and which do not."""
    matter, flat = [], []
    for s in searches:
        if len(s.points) < 2:
            continue
        lo, hi = s.spread()
        noise = 2 * math.sqrt(2) * normalized_noise(s.val, s.finetuned_val, n_val)  # two standard errors of a difference
        where = "pairs" if len(s.groups) > 1 else "8 tasks"
        text = f"{s.spec.label} ({where}; {', '.join(s.grid)}: {100 * lo:.1f}–{100 * hi:.1f})"
        (matter if hi - lo > noise else flat).append(text)
    out = []
    if matter:
        out.append("Parameters whose grid moves the validation score by more than two standard errors: " + "; ".join(matter) + ".")
    if flat:
        out.append("Parameters whose whole grid stays within two standard errors, so the suite cannot measure their effect and "
                   "the chosen value is one of equals: " + "; ".join(flat) + ".")
    return out


def search_table(searches: Sequence["MethodSearch"], setting: str) -> str:
    """Per method: what was searched, how many merges, the chosen point, its validation score and the grid's range."""
    lines = [f"| method ({setting}) | searched on validation | merges | chosen | val (chosen) | range over grid points |", "|---|---|---:|---|---:|---|"]
    for s in searches:
        grid = " × ".join(f"{name} {{{', '.join(_fmt(v) for v in values)}}}" for name, values in s.grid.items())
        grid = " × ".join(filter(None, [grid, "λ" if s.spec.scaled else ""])) or "nothing"
        lo, hi = s.spread()
        merges = s.merges()
        span = "one point" if len(s.points) == 1 else f"{100 * lo:.1f} – {100 * hi:.1f}"
        lines.append(f"| {s.spec.label} | {grid} | {merges} | {s.chosen_text()} | {100 * s.scores[s.best()]:.1f} | {span} |")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value:g}"


def curve_table(searches: Sequence["MethodSearch"]) -> str:
    """Average normalized validation accuracy per λ at each scaled method's chosen grid point; the chosen λ in bold."""
    scaled = [s for s in searches if s.spec.scaled]
    lambdas = sorted({lam for s in scaled for lam in s.curve()})
    lines = ["| method | " + " | ".join(f"λ={lam:g}" for lam in lambdas) + " |", "|---|" + "---:|" * len(lambdas)]
    for s in scaled:
        curve, best = s.curve(), s.lam
        cells = ["" if lam not in curve else f"**{100 * curve[lam]:.1f}**" if lam == best else f"{100 * curve[lam]:.1f}" for lam in lambdas]
        lines.append(f"| {s.spec.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def val_noise_text(searches: Sequence["MethodSearch"], n_val: int) -> str:
    """One standard error of an average normalized validation score, from the chosen merges' own accuracies."""
    ses = [normalized_noise(s.val, s.finetuned_val, n_val) for s in searches if s.val]
    return f"one standard error is about {100 * max(ses):.1f} points" if ses else "unknown"


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


def update_section(benchmarks_md: Path, body: str, heading: str = SECTION) -> None:
    """Replace (or append) the ``heading`` section (default ``## Merge quality``) of BENCHMARKS.md; other sections stay as they are."""
    text = benchmarks_md.read_text() if benchmarks_md.exists() else "# Benchmarks\n"
    section = f"{heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(heading)}\s*\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
        text = text.rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    benchmarks_md.write_text(text)
