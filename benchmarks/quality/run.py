#!/usr/bin/env python3
"""Merge-quality benchmark (TALL-masks protocol) of the mergekit-lite CLI.

    .venv/bin/python benchmarks/quality/run.py            # full run (about 4 minutes on 2 cores; 2 once cached)
    .venv/bin/python benchmarks/quality/run.py --write    # ... and update BENCHMARKS.md and the plots
    .venv/bin/python benchmarks/quality/run.py --quick    # smoke run, about a minute

Steps (see benchmarks/quality/README.md):
  1. build the suite, once (cached in benchmarks/quality/work/<profile>/): pretrain a small
     backbone on letters, fit a head per task on its frozen features, fine-tune the backbone per
     task; save every backbone as a Hugging Face style folder;
  2. TALL masks: choose λ_t per task on validation and reconstruct each fine-tune;
  3. merge with ``mergekit-lite run RECIPE OUT --force -q`` for every method and every λ of the
     grid, choose λ on validation (average normalized accuracy), report test accuracy;
  4. mask statistics with ``mergekit-lite masks``; tables, plots, and the comparison with the paper.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.quality import merge, report, tall, train  # noqa: E402
from benchmarks.quality.data import get_task  # noqa: E402
from benchmarks.quality.merge import METHODS, MethodSpec  # noqa: E402
from benchmarks.quality.model import read_state  # noqa: E402
from benchmarks.quality.suite import PROFILES, WORK, Profile, Suite  # noqa: E402

HERE = Path(__file__).resolve().parent
COMMAND = ".venv/bin/python benchmarks/quality/run.py --write"


def log(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: small data, short training, coarse grids (about a minute)")
    parser.add_argument("--write", action="store_true", help="update the '## Merge quality' section of BENCHMARKS.md and the PNGs next to this file")
    parser.add_argument("--tall", choices=("auto", "reference", "cli"), default="auto",
                        help="TALL reconstruction: the tool's 'extract' (cli), this benchmark's reference code, or cli when available (auto)")
    parser.add_argument("--workers", type=int, default=2, help="CLI processes at a time (default 2)")
    parser.add_argument("--rebuild", action="store_true", help="retrain even if cached checkpoints match")
    parser.add_argument("--work", type=Path, default=WORK, help=f"cache folder (default {WORK.relative_to(REPO)})")
    args = parser.parse_args(argv)
    if args.write and args.quick:
        parser.error("--write records full runs only; drop --quick")
    return args


# -- merges ---------------------------------------------------------------------------------------
class Merger:
    """Runs one method at one λ through the CLI and scores the result on every task."""

    def __init__(self, suite: Suite, runs: Path, finetuned_val: dict[str, float], per_model: dict[str, dict[str, dict]]):
        self.suite, self.runs, self.finetuned_val, self.per_model = suite, runs, finetuned_val, per_model

    def recipe_path(self, spec: MethodSpec, lam: float | None) -> Path:
        models = {t: self.suite.model_dir(t) for t in self.suite.tasks}
        params = {**spec.parameters, **({"lambda": lam} if lam is not None else {})}
        base = self.suite.base_dir if spec.with_base else None
        data = merge.recipe(spec.merge_method, base, models, params, self.per_model.get(spec.key))
        return merge.write_recipe(self.runs / "recipes" / f"{spec.key}-{_tag(lam)}.yml", data, f"{spec.label}, lambda = {_tag(lam)} (written by benchmarks/quality/run.py)")

    def out_dir(self, spec: MethodSpec, lam: float | None) -> Path:
        return self.runs / "merged" / f"{spec.key}-{_tag(lam)}"

    def __call__(self, job: tuple[MethodSpec, float]) -> dict:
        """Merge and score on the validation split; the output stays until ``test`` has been called."""
        spec, lam = job
        state = read_state(merge.merge(self.recipe_path(spec, lam), self.out_dir(spec, lam)))
        val = self.suite.accuracies(state, "val")
        norm = sum(val[t] / self.finetuned_val[t] for t in val) / len(val)
        return {"method": spec.key, "lambda": lam, "val": val, "val_normalized": norm}

    def test(self, spec: MethodSpec, lam: float | None) -> dict[str, float]:
        """Test accuracy of the chosen merge (only the chosen λ is ever scored on test)."""
        return self.suite.accuracies(read_state(self.out_dir(spec, lam)), "test")


def search_lambda(merger: Merger, methods: tuple[MethodSpec, ...], grid: tuple[float, ...], extension: tuple[float, ...], workers: int) -> dict[str, dict]:
    """Every method at every λ; the best λ by average normalized validation accuracy (smallest among ties).

    When a method's best λ is the grid's largest, the grid is extended by ``extension``.
    """
    runs = merge.parallel(merger, [(m, lam) for m in methods for lam in (grid if m.searched else (None,))], workers)
    edge = [m for m in methods if m.searched and _best([r for r in runs if r["method"] == m.key])["lambda"] == max(grid)]
    if edge and extension:
        log(f"  best λ at the grid's edge for {', '.join(m.label for m in edge)}: extending to {', '.join(map(str, extension))}")
        runs += merge.parallel(merger, [(m, lam) for m in edge for lam in extension], workers)
    return {m.key: {"runs": sorted((r for r in runs if r["method"] == m.key), key=lambda r: r["lambda"] or 0.0),
                    "best": _best([r for r in runs if r["method"] == m.key])} for m in methods}


def _best(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: (round(r["val_normalized"], 12), -(r["lambda"] or 0.0)))


def _tag(lam: float | None) -> str:
    """λ in file names and tables; methods without a λ run once, 'fixed'."""
    return "fixed" if lam is None else f"{lam:g}"


# -- TALL -----------------------------------------------------------------------------------------
def reference_tall(aggregate: str, suite: Suite, runs: Path, base: dict, finetuned: dict) -> tall.ReferenceTall:
    """The reference reconstruction, with τ_MTL from ``mergekit-lite run`` (task arithmetic or TIES at λ = 1)."""
    method, params = merge.AGGREGATES[aggregate]
    models = {t: suite.model_dir(t) for t in suite.tasks}
    recipe = merge.write_recipe(runs / "recipes" / f"mtl-{aggregate}.yml", merge.recipe(method, suite.base_dir, models, params),
                                f"theta_0 + tau_MTL ({aggregate}) for the TALL masks")
    out = merge.merge(recipe, runs / "merged" / f"mtl-{aggregate}")
    return tall.ReferenceTall(base, finetuned, read_state(out), aggregate)


def tall_search(mode: str, aggregate: str, suite: Suite, runs: Path, base: dict, finetuned: dict, workers: int) -> tall.TallResult:
    """λ_t per task on validation; with the CLI, every reconstruction is checked against the reference code."""
    reference = reference_tall(aggregate, suite, runs, base, finetuned)
    if mode == "reference":
        return tall.search(reference, suite, suite.profile.tall_lambdas)
    return tall.search(tall.CliTall(suite, aggregate, runs / "tall", workers), suite, suite.profile.tall_lambdas, check=reference)


def check_evaluator_hook(suite: Suite, aggregate: str, ours: tall.TallResult, work: Path) -> str:
    """Run the tool's own λ_t search with our evaluator hook and compare it with this benchmark's search."""
    try:
        tool = tall.evaluator_search(suite, aggregate, work)
    except (merge.CliError, KeyError, OSError) as exc:
        return f"evaluator hook not checked ({str(exc)[:200]})"
    same = [t for t in suite.tasks if tool[t]["lambda"] == ours.lambdas[t]]
    gap = max(abs(tool[t]["scores"][lam] - ours.val[t][lam]) for t in suite.tasks for lam in ours.val[t])
    return (f"with `evaluator: {tall.EVALUATOR}` and the λ grid in a tall_masks recipe, the tool itself chose the same λ_t "
            f"for {len(same)} of {len(suite.tasks)} tasks (validation scores differ by at most {gap:.2g})")


def resolve_tall_mode(requested: str) -> str:
    available = merge.has_command("extract")
    if requested == "cli" and not available:
        raise SystemExit("--tall cli: this mergekit-lite has no 'extract' command yet; use --tall reference")
    return requested if requested != "auto" else ("cli" if available else "reference")


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)
    start = time.perf_counter()
    times: dict[str, float] = {}
    profile = PROFILES["quick" if args.quick else "full"]
    suite = Suite(args.work / profile.name, profile)
    if args.rebuild and suite.root.exists():
        shutil.rmtree(suite.root)
    trained = not suite.is_built()
    info = train.build(suite, log)
    times["training"] = time.perf_counter() - start
    tasks = suite.tasks
    runs = suite.root / "runs"
    merge.remove(runs)

    base = read_state(suite.base_dir)
    finetuned = {t: read_state(suite.model_dir(t)) for t in tasks}
    zero_val, zero_test = suite.accuracies(base, "val"), suite.accuracies(base, "test")
    ft_val = {t: suite.accuracy(finetuned[t], t, "val") for t in tasks}
    ft_test = {t: suite.accuracy(finetuned[t], t, "test") for t in tasks}

    # TALL masks: λ_t per task on validation, for τ_MTL from task arithmetic and from TIES
    t0 = time.perf_counter()
    mode = resolve_tall_mode(args.tall)
    log(f"TALL reconstruction via {'mergekit-lite extract' if mode == 'cli' else 'the reference code in benchmarks/quality/tall.py'}")
    tall_results = {agg: tall_search(mode, agg, suite, runs, base, finetuned, args.workers) for agg in ("task_arithmetic", "ties")}
    hook_check: dict[str, str] = {}
    for agg, result in tall_results.items():
        if result.max_abs_diff is not None:
            log(f"  {agg}: `extract` vs reference code: max |Δθ| = {result.max_abs_diff:.3g} ({result.entries_differing} entries differ over all tasks and λ)")
        if mode == "cli":
            hook_check[agg] = check_evaluator_hook(suite, agg, result, runs / "tall")
            log(f"  {agg}: {hook_check[agg]}")
    times["tall"] = time.perf_counter() - t0

    # merges: every method over the λ grid, through the CLI
    t0 = time.perf_counter()
    per_model = {m.key: {t: {"tall_lambda": tall_results[m.tall_from].lambdas[t]} for t in tasks} for m in METHODS if m.tall_from}
    merger = Merger(suite, runs, ft_val, per_model)
    log(f"merging: {len(METHODS)} methods x {len(profile.lambdas)} values of λ with `mergekit-lite run` ({args.workers} at a time)")
    searched = search_lambda(merger, METHODS, profile.lambdas, profile.lambda_extension, args.workers)
    for m in METHODS:
        searched[m.key]["best"]["test"] = merger.test(m, searched[m.key]["best"]["lambda"])
    merge.remove(runs / "merged")
    times["merges"] = time.perf_counter() - t0

    # mask statistics of the Consensus-TA recipe (its per-task λ_t), with the tool's own command
    t0 = time.perf_counter()
    consensus = next(m for m in METHODS if m.key == "consensus_ta")
    mask_recipe = merger.recipe_path(consensus, searched[consensus.key]["best"]["lambda"])
    mask_png = suite.root / "mask_stats.png"
    mask_stats = json.loads(merge.cli("masks", mask_recipe.relative_to(REPO), "--json", "--plot", mask_png, "-q", threads=2))
    times["masks"] = time.perf_counter() - t0

    # results
    rows = [report.Row("Zero-shot", zero_test, "linear-probe head on the base", "reference"),
            report.Row("Fine-tuned (individual)", ft_test, "one backbone per task", "reference")]
    for m in METHODS:
        best = searched[m.key]["best"]
        rows.append(report.Row(m.label, best["test"], f"λ = {best['lambda']:g}" if m.searched else "no λ: nothing tuned"))
    for agg, label in (("task_arithmetic", "TALL mask + TA"), ("ties", "TALL mask + TIES")):
        lams = tall_results[agg].lambdas
        rows.append(report.Row(f"{label} (reconstruction)", tall_results[agg].test, "λ_t per task: " + ", ".join(f"{lams[t]:g}" for t in tasks), "tall"))
    results = report.Results(tasks, rows, ft_test, profile.n_test)
    times["total"] = time.perf_counter() - start

    plot_png = report.plot(results, suite.root / "normalized_accuracy.png")
    payload = {
        "profile": asdict(profile), "build": info, "trained_this_run": trained, "tall_mode": mode, "seconds": times,
        "zero_shot": {"val": zero_val, "test": zero_test}, "finetuned": {"val": ft_val, "test": ft_test},
        "tall": {agg: asdict(r) for agg, r in tall_results.items()},
        "merges": {k: v for k, v in searched.items()}, "mask_stats": mask_stats.get("overall", mask_stats),
        "rows": [asdict(r) for r in rows],
    }
    (suite.root / "results.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")

    body = section(results, tall_results, hook_check, searched, mask_stats, info, times, trained, mode, profile, args.workers)
    log("\n" + body)
    if args.write:
        shutil.copyfile(plot_png, HERE / "normalized_accuracy.png")
        shutil.copyfile(mask_png, HERE / "mask_stats.png")
        report.update_section(REPO / "BENCHMARKS.md", body)
        log(f"\nwrote {REPO / 'BENCHMARKS.md'} ({report.SECTION}), {HERE / 'normalized_accuracy.png'}, {HERE / 'mask_stats.png'}")
    else:
        log(f"\nplots: {plot_png}, {mask_png}; results: {suite.root / 'results.json'} (add --write to update BENCHMARKS.md)")
    return 0


def _curve_table(searched: dict[str, dict]) -> str:
    """Average normalized validation accuracy per method and λ; the chosen λ in bold."""
    lambdas = sorted({r["lambda"] for m in METHODS if m.searched for r in searched[m.key]["runs"]})
    lines = ["| method | " + " | ".join(f"λ={lam:g}" for lam in lambdas) + " |", "|---|" + "---:|" * len(lambdas)]
    for m in (m for m in METHODS if m.searched):
        scores = {r["lambda"]: 100 * r["val_normalized"] for r in searched[m.key]["runs"]}
        best = searched[m.key]["best"]["lambda"]
        cells = ["" if lam not in scores else f"**{scores[lam]:.1f}**" if lam == best else f"{scores[lam]:.1f}" for lam in lambdas]
        lines.append(f"| {m.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _task_table(tasks: Sequence[str]) -> str:
    lines = ["| task | images and labels | classes |", "|---|---|---:|"]
    lines += [f"| {t} | {get_task(t).description} | {get_task(t).num_classes} |" for t in tasks]
    return "\n".join(lines)


def _tall_notes(tall_results: dict[str, tall.TallResult], hook_check: dict[str, str], mode: str) -> list[str]:
    if mode != "cli":
        return ["TALL rows: the reference code in `benchmarks/quality/tall.py` (θ̂_t = θ_0 + m_t ⊙ τ_MTL, τ_MTL written by "
                "`mergekit-lite run`): asked for with `--tall reference`, or this mergekit-lite has no `extract` command."]
    notes = ["TALL rows: `mergekit-lite run` with `merge_method: tall_masks` (one collection per λ_t of the grid), then "
             "`mergekit-lite extract COLLECTION --all OUT`."]
    for agg, result in tall_results.items():
        notes.append(f"{agg}: every extracted reconstruction equals the reference code's in `benchmarks/quality/tall.py` "
                     f"(max |Δθ| = {result.max_abs_diff:.2g}, {result.entries_differing} entries differ); {hook_check.get(agg, '')}.")
    return notes


def section(results: report.Results, tall_results: dict[str, tall.TallResult], hook_check: dict[str, str], searched: dict[str, dict],
            mask_stats: dict, info: dict, times: dict[str, float], trained: bool, mode: str, profile: Profile, workers: int) -> str:
    """The markdown of the ``## Merge quality`` section of BENCHMARKS.md."""
    tasks = results.tasks
    masks = mask_stats.get("overall", mask_stats)
    grid = ", ".join(f"{x:g}" for x in profile.lambdas)
    extension = f"; extended up to {profile.lambda_extension[-1]:g} when the best λ is the largest" if profile.lambda_extension else ""
    training = (f"training {times['training']:.0f} s (data, pretraining, probes, fine-tunes)" if trained else
                f"training cached (it took {sum(info['seconds'].values()):.0f} s when built)")
    notes = _tall_notes(tall_results, hook_check, mode)
    return f"""Merge quality with the TALL-masks protocol (Wang et al., ICML 2024) on a small vision suite that runs offline:
an MLP backbone ({info['parameters']:,} parameters) pretrained on rendered letters, fine-tuned on {len(tasks)} tasks (digits under transforms,
shapes, math symbols, textures). Each task keeps its own head: a linear probe on the frozen pretrained features, then frozen.
Only the backbone is merged, by `mergekit-lite run RECIPE OUT --force -q` on Hugging Face style folders. λ is chosen per method
on the **validation** split (average normalized accuracy; grid {grid}{extension}); TALL's λ_t per task from
{{{', '.join(f'{x:g}' for x in profile.tall_lambdas)}}} by that task's validation accuracy. The tables show **test** accuracy ({profile.n_test:,} images per task).
Protocol, tasks and caveats: [benchmarks/quality/README.md](benchmarks/quality/README.md).

Command: `{COMMAND}` (`make bench-quality` runs it without `--write`). Run time {times['total'] / 60:.1f} min: {training},
TALL search {times['tall']:.0f} s, merges {times['merges']:.0f} s ({sum(len(searched[m.key]['runs']) for m in METHODS)} CLI merges, {workers} at a time), mask statistics {times['masks']:.0f} s.
Machine: {os.cpu_count()} CPU cores (shared with other work), no GPU; Python {platform.python_version()}, torch {torch.__version__}.

**Absolute test accuracy (%)**

{report.table(results, normalized=False)}

**Normalized test accuracy (% of each task's individual fine-tune)**

{report.table(results, normalized=True)}

![normalized accuracy per method](benchmarks/quality/normalized_accuracy.png)

**Against the paper's qualitative findings**

""" + "\n".join(f"- {line}" for line in report.findings(results)) + f"""

**TALL masks.** `mergekit-lite masks` on the chosen Consensus-TA recipe (τ_MTL = Σ τ_t, each task's λ_t):
{100 * masks['catastrophic_fraction']:.1f}% of the weights are catastrophic (no task uses them) and {100 * masks['selfish_fraction']:.1f}% are selfish (exactly one task uses them).
Mask density per task: {", ".join(f"{t} {100 * masks['density'][t]:.0f}%" for t in tasks)}.

![TALL mask statistics](benchmarks/quality/mask_stats.png)

""" + "\n".join(f"- {note}" for note in notes) + f"""

Validation curves: average normalized validation accuracy (%) per λ; the chosen λ is in bold.

{_curve_table(searched)}

Tasks: glyphs drawn from stroke templates with random affine maps, elastic warps, stroke widths, contrast, noise and
distractor strokes, or procedural textures, at 16x16 pixels. Each task has {profile.n_train:,} training, {profile.n_val:,} validation and {profile.n_test:,} test images.

{_task_table(tasks)}

Fixed method parameters (not tuned): TIES density 0.2 (model-wide thresholds, disjoint mean; the mergekit row: per-tensor
trim); DARE keep probability 0.5 with the paper's 1/density rescale, seed 0; Breadcrumbs β = 0.15, γ = 0.006 per row; DELLA
density 0.5, ε = 0.1; SCE select_topk 0.2; RAM defaults; RAM+ the authors' r = 0.2, α = 1, model-wide counts; Consensus k = 2, with each task's λ_t from the TALL search of the same aggregate.
Linear, Model Stock, Multi-SLERP, the Karcher mean, SCE, RAM and RAM+ have no λ: one run each (linear, Multi-SLERP and Karcher over the
fine-tunes only, with equal weights). Not in the table: {", ".join(merge.TWO_MODEL_METHODS)}, which take exactly two models.
"""


if __name__ == "__main__":
    sys.exit(main())
