#!/usr/bin/env python3
"""Merge-quality benchmark (TALL-masks protocol) of the mergekit-lite CLI.

    .venv/bin/python benchmarks/quality/run.py            # full run (about 10 minutes on 2 idle cores; under 1 once cached)
    .venv/bin/python benchmarks/quality/run.py --write    # ... and update BENCHMARKS.md and the plots
    .venv/bin/python benchmarks/quality/run.py --quick    # smoke run: small suite, one value per grid, two pairs

Steps (see benchmarks/quality/README.md):
  1. build the suite, once (cached in benchmarks/quality/work/<profile>/): pretrain a small
     backbone on letters, fit a head per task on its frozen features, fine-tune the backbone per
     task; save every backbone as a Hugging Face style folder;
  2. TALL masks: choose λ_t per task on validation and reconstruct each fine-tune;
  3. merge with ``mergekit-lite run RECIPE OUT --force -q`` for every method at every point of its
     grid (and λ), choose the point on validation (average normalized accuracy), report test accuracy;
  4. the same for pairs of tasks, with the two-model methods (slerp, nuslerp, nearswap, arcee_fusion)
     beside linear, task arithmetic and TIES;
  5. mask statistics with ``mergekit-lite masks``; tables, plots, and the comparison with the paper.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.quality import merge, report, tall, train, tuning  # noqa: E402
from benchmarks.quality.data import get_task  # noqa: E402
from benchmarks.quality.merge import METHODS, PAIR_METHODS, MethodSpec  # noqa: E402
from benchmarks.quality.model import read_state  # noqa: E402
from benchmarks.quality.suite import PROFILES, WORK, Profile, Suite  # noqa: E402

HERE = Path(__file__).resolve().parent
COMMAND = ".venv/bin/python benchmarks/quality/run.py --write"


def log(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: small data, short training, one value per grid, two pairs")
    parser.add_argument("--write", action="store_true", help="update the '## Merge quality' section of BENCHMARKS.md and the PNGs next to this file")
    parser.add_argument("--tall", choices=("auto", "reference", "cli"), default="auto",
                        help="TALL reconstruction: the tool's 'extract' (cli), this benchmark's reference code, or cli when available (auto)")
    parser.add_argument("--workers", type=int, default=2, help="CLI processes at a time (default 2)")
    parser.add_argument("--rebuild", action="store_true", help="retrain even if cached checkpoints match")
    parser.add_argument("--work", type=Path, default=WORK, help=f"cache folder (default {WORK.relative_to(REPO)})")
    parser.add_argument("--pairs", choices=("cycle", "all"), default="cycle",
                        help="task pairs of the pairwise table: the 8 of a cycle over the tasks (default) or all 28")
    parser.add_argument("--no-cache", action="store_true", help="merge and score everything again (the cache is rewritten)")
    args = parser.parse_args(argv)
    if args.write and args.quick:
        parser.error("--write records full runs only; drop --quick")
    return args


# -- merges ---------------------------------------------------------------------------------------
def recipe_builder(suite: Suite, per_model: dict[str, dict[str, dict]]) -> tuning.RecipeBuilder:
    """Recipes over a group of tasks' checkpoints; consensus gets each task's λ_t from the TALL search."""

    def build(spec: MethodSpec, group: tuple[str, ...], point: dict, lam: float | None) -> dict:
        return merge.method_recipe(spec, suite.base_dir, {t: suite.model_dir(t) for t in group}, point, lam, per_model.get(spec.key))

    return build


def searches(methods: Sequence[MethodSpec], groups: tuple[tuple[str, ...], ...], build: tuning.RecipeBuilder, profile: Profile,
             keep: int | None, ft_val: dict[str, float], ft_test: dict[str, float], confirm: bool) -> list[tuning.MethodSearch]:
    return [tuning.MethodSearch(m, groups, build, tuning.grid_points(m, keep), profile.lambdas, profile.lambda_extension, ft_val, ft_test, confirm)
            for m in methods]


def pair_geometry(base: dict, finetuned: dict, pairs: Sequence[tuple[str, ...]]) -> report.PairGeometry:
    """Angles between each pair's task vectors (whole backbone) and fine-tuned weights (largest per tensor), in degrees."""

    def angle(x: torch.Tensor, y: torch.Tensor) -> float:
        x, y = x.double().flatten(), y.double().flatten()
        return math.degrees(math.acos(max(-1.0, min(1.0, float(x @ y / (x.norm() * y.norm()))))))

    def tau(t: str) -> torch.Tensor:
        return torch.cat([(finetuned[t][k] - base[k]).flatten() for k in sorted(base)])

    return report.PairGeometry([angle(tau(a), tau(b)) for a, b in pairs],
                               [max(angle(finetuned[a][k], finetuned[b][k]) for k in base) for a, b in pairs])


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


def cached_tall(mode: str, aggregate: str, suite: Suite, runs: Path, base: dict, finetuned: dict, workers: int,
                use_cache: bool) -> tuple[tall.TallResult, str]:
    """The λ_t search (and the evaluator-hook check) of one aggregate, from the cache when the suite, the grid and
    the mergekit_lite sources are unchanged."""
    path = suite.root / "cache" / f"tall-{aggregate}-{mode}.json"
    key = f"{suite.key()}:{tuning.library_fingerprint()}:{list(suite.profile.tall_lambdas)}"
    if use_cache and path.is_file():
        data = json.loads(path.read_text())
        if data.get("key") == key:
            result = data["result"]
            result["val"] = {t: {float(lam): v for lam, v in scores.items()} for t, scores in result["val"].items()}
            return tall.TallResult(**result), data["hook"]
    result = tall_search(mode, aggregate, suite, runs, base, finetuned, workers)
    hook = check_evaluator_hook(suite, aggregate, result, runs / "tall") if mode == "cli" else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "result": asdict(result), "hook": hook}, indent=1) + "\n")
    return result, hook


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # the CLI children take the cores; scoring here runs one thread per worker
    torch.set_num_threads(1)
    torch.manual_seed(0)
    start = time.perf_counter()
    times: dict[str, float] = {}
    profile = PROFILES["quick" if args.quick else "full"]
    keep = 1 if args.quick else None  # quick: the middle value of each grid
    suite = Suite(args.work / profile.name, profile)
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

    # TALL masks: λ_t per task on validation, for τ_MTL from task arithmetic and from TIES
    t0 = time.perf_counter()
    mode = resolve_tall_mode(args.tall)
    log(f"TALL reconstruction via {'mergekit-lite extract' if mode == 'cli' else 'the reference code in benchmarks/quality/tall.py'}")
    tall_results: dict[str, tall.TallResult] = {}
    hook_check: dict[str, str] = {}
    for agg in ("task_arithmetic", "ties"):
        tall_results[agg], hook_check[agg] = cached_tall(mode, agg, suite, runs, base, finetuned, args.workers, use_cache)
        result = tall_results[agg]
        if result.max_abs_diff is not None:
            log(f"  {agg}: `extract` vs reference code: max |Δθ| = {result.max_abs_diff:.3g} ({result.entries_differing} entries differ over all tasks and λ)")
        if hook_check[agg]:
            log(f"  {agg}: {hook_check[agg]}")
    times["tall"] = time.perf_counter() - t0

    # merges: every method over its grid (and λ), through the CLI; 8 tasks at once, then pairs of tasks
    t0 = time.perf_counter()
    runner = tuning.Runner(suite, runs, base, args.workers, use_cache)
    per_model = {m.key: {t: {"tall_lambda": tall_results[m.tall_from].lambdas[t]} for t in tasks} for m in METHODS if m.tall_from}
    pairs = tuning.all_pairs(tasks) if args.pairs == "all" else tuning.cycle_pairs(tasks)[: 2 if args.quick else None]
    multi = searches(METHODS, (tasks,), recipe_builder(suite, per_model), profile, keep, ft_val, ft_test, confirm=True)
    pairwise = searches(PAIR_METHODS, pairs, recipe_builder(suite, {}), profile, keep, ft_val, ft_test, confirm=False)
    log(f"merging with `mergekit-lite run` ({args.workers} at a time): {len(METHODS)} methods on all {len(tasks)} tasks, "
        f"{len(PAIR_METHODS)} on {len(pairs)} pairs of tasks")
    tuning.search_all(multi + pairwise, runner, log)
    runner.forget()
    merge.remove(runs / "merged")
    times["merges"] = time.perf_counter() - t0
    log(f"  {runner.merged} CLI merges, {runner.reused} answered from the cache ({times['merges']:.0f} s)")

    # mask statistics of the chosen Consensus-TA recipe (its per-task λ_t), with the tool's own command
    t0 = time.perf_counter()
    consensus = next(s for s in multi if s.spec.key == "consensus_ta")
    mask_recipe = merge.write_recipe(runs / "recipes" / "masks-consensus_ta.yml",
                                     recipe_builder(suite, per_model)(consensus.spec, tasks, consensus.params, consensus.lam))
    mask_png = suite.root / "mask_stats.png"
    mask_stats = json.loads(merge.cli("masks", mask_recipe.relative_to(REPO), "--json", "--plot", mask_png, "-q", threads=2))
    times["masks"] = time.perf_counter() - t0

    # results
    rows = [report.Row("Zero-shot", zero_test, "linear-probe head on the base", "reference"),
            report.Row("Fine-tuned (individual)", ft_test, "one backbone per task", "reference")]
    rows += [report.Row(s.spec.label, s.test_by_task(), s.chosen_text()) for s in multi]
    for agg, label in (("task_arithmetic", "TALL mask + TA"), ("ties", "TALL mask + TIES")):
        lams = tall_results[agg].lambdas
        rows.append(report.Row(f"{label} (reconstruction)", tall_results[agg].test, "λ_t per task: " + ", ".join(f"{lams[t]:g}" for t in tasks), "tall"))
    results = report.Results(tasks, rows, ft_test, profile.n_test)
    pair_results = report.PairResults(pairs, [(s.spec.label, s.test, s.chosen_text()) for s in pairwise], zero_test, ft_test, profile.n_test)
    geometry = pair_geometry(base, finetuned, pairs)
    times["total"] = time.perf_counter() - start
    times["cpu"] = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))

    plot_png = report.plot(results, suite.root / "normalized_accuracy.png")
    payload = {
        "profile": asdict(profile), "build": info, "trained_this_run": trained, "tall_mode": mode, "seconds": times,
        "cli_merges": runner.merged, "cached_scores": runner.reused,
        "zero_shot": {"val": zero_val, "test": zero_test}, "finetuned": {"val": ft_val, "test": ft_test},
        "tall": {agg: asdict(r) for agg, r in tall_results.items()}, "evaluator_hook": hook_check,
        "merges": {s.spec.key: s.to_json() for s in multi}, "pairwise": {s.spec.key: s.to_json() for s in pairwise},
        "mask_stats": mask_stats.get("overall", mask_stats), "rows": [asdict(r) for r in rows], "pair_geometry": asdict(geometry),
    }
    (suite.root / "results.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")

    body = section(Outcome(results, pair_results, geometry, multi, pairwise, tall_results, hook_check, mask_stats, info, times, trained, mode,
                           profile, args.workers, runner, args.pairs))
    log("\n" + body)
    if args.write:
        shutil.copyfile(plot_png, HERE / "normalized_accuracy.png")
        shutil.copyfile(mask_png, HERE / "mask_stats.png")
        report.update_section(REPO / "BENCHMARKS.md", body)
        log(f"\nwrote {REPO / 'BENCHMARKS.md'} ({report.SECTION}), {HERE / 'normalized_accuracy.png'}, {HERE / 'mask_stats.png'}")
    else:
        log(f"\nplots: {plot_png}, {mask_png}; results: {suite.root / 'results.json'} (add --write to update BENCHMARKS.md)")
    return 0


@dataclass
class Outcome:
    """Everything the BENCHMARKS.md section reports."""

    results: report.Results
    pairs: report.PairResults
    geometry: report.PairGeometry
    multi: list[tuning.MethodSearch]
    pairwise: list[tuning.MethodSearch]
    tall: dict[str, tall.TallResult]
    hook_check: dict[str, str]
    mask_stats: dict
    info: dict
    times: dict[str, float]
    trained: bool
    mode: str
    profile: Profile
    workers: int
    runner: tuning.Runner
    pair_mode: str


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


def section(o: Outcome) -> str:
    """The markdown of the ``## Merge quality`` section of BENCHMARKS.md."""
    results, profile, times, info = o.results, o.profile, o.times, o.info
    tasks = results.tasks
    masks = o.mask_stats.get("overall", o.mask_stats)
    grid = ", ".join(f"{x:g}" for x in profile.lambdas)
    extension = f"; extended up to {profile.lambda_extension[-1]:g} when the best λ is the largest" if profile.lambda_extension else ""
    training = (f"training {times['training']:.0f} s (data, pretraining, probes, fine-tunes)" if o.trained else
                f"training cached (it took {sum(info['seconds'].values()):.0f} s when built)")
    merges = f"{o.runner.merged} CLI merges, {o.workers} at a time"
    if o.runner.reused:
        merges += (f"; {o.runner.reused} more were answered from the cache of an earlier run, where they took about "
                   f"{o.runner.reused_seconds / o.workers:.0f} s")
    checks = [s.val_check for s in o.multi + o.pairwise if s.val_check is not None]
    best_multi = max(results.avg_norm(r.label) for r in results.rows if r.kind == "merge")
    pairs_text = ("all 28 pairs of tasks" if o.pair_mode == "all" else
                  f"{len(o.pairs.pairs)} pairs, a cycle over the tasks (each task in two pairs, once first and once second)")
    return f"""Merge quality with the TALL-masks protocol (Wang et al., ICML 2024) on a small vision suite that runs offline:
an MLP backbone ({info['parameters']:,} parameters) pretrained on rendered letters, fine-tuned on {len(tasks)} tasks (digits under transforms,
shapes, math symbols, textures). Each task keeps its own head: a linear probe on the frozen pretrained features, then frozen.
Only the backbone is merged, by `mergekit-lite run RECIPE OUT --force -q` on Hugging Face style folders. **Every method's parameters
are chosen on the validation split**: every combination of a small grid over its tuning parameters (the "chosen" column; the grids
are listed under "Parameter search" below) and, for the methods whose output is θ_0 + λ·merged, λ from {grid}{extension}. The
criterion is the average normalized validation accuracy. TALL's λ_t per task comes from {{{', '.join(f'{x:g}' for x in profile.tall_lambdas)}}},
by that task's validation accuracy. The tables show **test** accuracy ({profile.n_test:,} images per task) of the chosen point only.
Protocol, tasks and caveats: [benchmarks/quality/README.md](benchmarks/quality/README.md).

Command: `{COMMAND}` (`make bench-quality` runs it without `--write`). Run time {times['total'] / 60:.1f} min: {training},
TALL search {times['tall']:.0f} s, merges {times['merges']:.0f} s ({merges}), mask statistics {times['masks']:.0f} s.
CPU time (this process and every CLI child): {times['cpu'] / 60:.1f} min, so about {times['cpu'] / 120:.1f} min of wall time on 2 idle cores.
Machine: {os.cpu_count()} CPU cores (shared with other work), no GPU; Python {platform.python_version()}, torch {torch.__version__}.

**Absolute test accuracy (%)**

{report.table(results, normalized=False)}

**Normalized test accuracy (% of each task's individual fine-tune)**

{report.table(results, normalized=True)}

![normalized accuracy per method](benchmarks/quality/normalized_accuracy.png)

**Findings**

""" + "\n".join(f"- {line}" for line in report.ranking_findings(results) + report.search_findings(o.multi + o.pairwise, profile.n_val)) + """

**Against the paper's qualitative findings**

""" + "\n".join(f"- {line}" for line in report.findings(results)) + f"""

### Pairwise merges

The two-model methods (slerp, nuslerp, nearswap, arcee_fusion) cannot merge 8 tasks, so every method here merges two fine-tunes
at a time, over {pairs_text}. Where a method's base is one of its two inputs (SLERP, NearSwap, Arcee Fusion), the pair's first
task is the base; NuSLERP interpolates the two task vectors (base = the pretrained backbone); linear, task arithmetic and TIES are
the same methods as above. Each method's parameters are chosen on validation **once for all pairs** (the mean over pairs of the
average normalized validation accuracy on the pair's two tasks), as the 8-task table chooses one point per method. Cells: average
normalized **test** accuracy (%) on the pair's two tasks; zero-shot is the pretrained backbone, 100 is each task's own fine-tune.

{report.pair_table(o.pairs)}

""" + "\n".join(f"- {line}" for line in report.pair_findings(o.pairs, o.geometry, best_multi, results.avg_norm("Zero-shot"))) + f"""

### TALL masks

`mergekit-lite masks` on the chosen Consensus-TA recipe (τ_MTL = Σ τ_t, each task's λ_t):
{100 * masks['catastrophic_fraction']:.1f}% of the weights are catastrophic (no task uses them) and {100 * masks['selfish_fraction']:.1f}% are selfish (exactly one task uses them).
Mask density per task: {", ".join(f"{t} {100 * masks['density'][t]:.0f}%" for t in tasks)}.

![TALL mask statistics](benchmarks/quality/mask_stats.png)

""" + "\n".join(f"- {note}" for note in _tall_notes(o.tall, o.hook_check, o.mode)) + f"""

### Parameter search

Grids are coarse on purpose, to keep the run near a quarter of an hour on 2 cores. λ costs no extra merge: the CLI merges at
λ = 1 and the benchmark scores θ_0 + λ·(θ_1 − θ_0) for every λ. In the 8-task table the chosen point is then merged again by the CLI
at its own λ, and that output is what the test split scores; its validation accuracy equals the derived one (largest difference
over {len(checks)} methods: {max(checks, default=0.0):.2g}). In the pairwise table, task arithmetic and TIES are scored on the derived
θ_0 + λ·(θ_1 − θ_0). "Range" is the lowest and highest validation score over a method's grid points (each at its best λ): where it
is narrower than two standard errors of a difference ({report.val_noise_text(o.multi, profile.n_val)} for an 8-task average;
twice that, times √2, for a difference), this suite cannot measure the parameter's effect, and the chosen value is one of equals
(see Findings above).

{report.search_table(o.multi, "8 tasks")}

{report.search_table(o.pairwise, "pairs")}

Validation curves at the chosen grid point: average normalized validation accuracy (%) per λ; the chosen λ in bold.

{report.curve_table(o.multi)}

Fixed (not searched): TIES keeps model-wide thresholds and the disjoint mean (the "mergekit" row trims per tensor); DARE and
DELLA rescale by 1/keep-probability (the papers' rule), seed 0; Breadcrumbs ranks per row; RAM+ counts shared/unique entries over
the whole model (the authors' code); Consensus takes each task's λ_t from the TALL search of the same aggregate. Linear, Multi-SLERP
and the Karcher mean average with equal weights (Multi-SLERP over the fine-tunes' weights, or over their task vectors when the
grid picks "with base"). The per-model weights of every method stay equal: searching 8 weights is a different benchmark.

### Tasks

Glyphs drawn from stroke templates with random affine maps, elastic warps, stroke widths, contrast, noise and distractor strokes,
or procedural textures, at 16x16 pixels. Each task has {profile.n_train:,} training, {profile.n_val:,} validation and {profile.n_test:,} test images.

{_task_table(tasks)}
"""


if __name__ == "__main__":
    sys.exit(main())
