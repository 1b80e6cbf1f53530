#!/usr/bin/env python3
"""The compression frontier on the MiniLM suite: bytes on disk of each way to keep 8 fine-tunes, against the accuracy they keep.

    .venv/bin/python benchmarks/quality_text/frontier.py            # after run.py (it reads the TALL λ_t and the best merge)
    .venv/bin/python benchmarks/quality_text/frontier.py --write    # ... and writes the '## Compression frontier' section + PNG

Rows: the plain fine-tunes; one merged model (the best merge of run.py's table); collections written by
``mergekit-lite run`` (TALL masks with τ_MTL in float32 and in bfloat16, EMR, TSV-C at rank 1/T and 1/(4T) of each
2-D tensor); for each collection, every task is extracted by ``mergekit-lite extract COLLECTION --all OUT`` and scored
on its own test split with its frozen head. Accuracy is normalized by each task's own fine-tune.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.quality import merge, report  # noqa: E402
from benchmarks.quality.model import read_state  # noqa: E402
from benchmarks.quality.tall import _task_folder  # noqa: E402
from benchmarks.quality_text.suite import PROFILES, WORK, TextSuite  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTION = "## Compression frontier"
COMMAND = ".venv/bin/python benchmarks/quality_text/frontier.py --write"


@dataclass
class Point:
    """One way of storing the T fine-tunes."""

    label: str
    bytes: int  #: on disk, without the base model (a collection refers to it)
    with_base: int  #: what a user keeps: the base model too, where it is needed
    normalized: float  #: average normalized test accuracy of the models it gives back
    per_task: dict[str, float]
    compress_s: float | None = None
    extract_s: float | None = None
    note: str = ""


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def collection_point(label: str, method: str, params: dict, per_model: dict | None, suite: TextSuite, ft_test: dict[str, float],
                     work: Path, base_bytes: int, note: str) -> Point:
    """Compress with ``mergekit-lite run``, extract every task with ``extract --all``, score each on its test split."""
    models = {t: suite.model_dir(t) for t in suite.tasks}
    recipe = merge.write_recipe(work / "recipes" / f"{label}.yml", merge.recipe(method, suite.base_dir, models, params, per_model),
                                f"{label} (written by benchmarks/quality_text/frontier.py)")
    out = work / "collections" / label
    started = time.perf_counter()
    merge.merge(recipe, out, threads=2)
    compress_s = time.perf_counter() - started
    size = folder_bytes(out)
    extracted = work / "extracted" / label
    merge.remove(extracted)
    started = time.perf_counter()
    merge.cli("extract", merge._portable(out), "--all", merge._portable(extracted), "--force", "-q", threads=2)
    extract_s = time.perf_counter() - started
    acc = {t: suite.accuracy(read_state(_task_folder(extracted, t)), t, "test") for t in suite.tasks}
    merge.remove(extracted)
    merge.remove(out)
    norm = {t: acc[t] / ft_test[t] for t in suite.tasks}
    return Point(label, size, size + base_bytes, sum(norm.values()) / len(norm), acc, compress_s, extract_s, note)


def plot(points: list[Point], path: Path, tasks: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for p in points:
        ax.scatter(p.with_base / 1e6, 100 * p.normalized, s=25)
        ax.annotate(p.label, (p.with_base / 1e6, 100 * p.normalized), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"MB on disk for {tasks} tasks (base model included where needed; log scale)", fontsize=8)
    ax.set_ylabel("avg normalized test accuracy (%)", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.set_title(f"Compression frontier, all-MiniLM-L6-v2, {tasks} tasks", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def table(points: list[Point], tasks: tuple[str, ...]) -> str:
    lines = ["| scheme | MB on disk | MB with the base | avg normalized test acc. (%) | worst task (%) | compress (s) | extract all (s) | note |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for p in points:
        worst = min(tasks, key=lambda t: p.per_task[t])
        c = "" if p.compress_s is None else f"{p.compress_s:.1f}"
        e = "" if p.extract_s is None else f"{p.extract_s:.1f}"
        lines.append(f"| {p.label} | {p.bytes / 1e6:.1f} | {p.with_base / 1e6:.1f} | **{100 * p.normalized:.1f}** | {worst} {100 * p.per_task[worst] / 1:.1f} | {c} | {e} | {p.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick profile (smoke run); never written")
    parser.add_argument("--write", action="store_true", help=f"update the '{SECTION}' section of BENCHMARKS.md and the PNG here")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    profile = PROFILES["quick" if args.quick else "full"]
    suite = TextSuite.open(WORK / profile.name)
    results_path = suite.root / "results.json"
    if not results_path.is_file():
        raise SystemExit(f"{results_path}: run benchmarks/quality_text/run.py first")
    results = json.loads(results_path.read_text())
    tasks, T = suite.tasks, len(suite.tasks)
    ft_test = results["finetuned"]["test"]
    work = suite.root / "frontier"
    merge.remove(work)
    base_bytes = folder_bytes(suite.base_dir)
    points = [Point("plain fine-tunes", sum(folder_bytes(suite.model_dir(t)) for t in tasks), sum(folder_bytes(suite.model_dir(t)) for t in tasks),
                    1.0, dict(ft_test), note=f"{T} checkpoints; no base needed")]
    # the merge a user would pick: the best by validation (its test accuracy is what it keeps)
    best_label = max(results["merges"].values(), key=lambda m: m["chosen"]["val_normalized"])["label"]
    best = next(r for r in results["rows"] if r["label"] == best_label)
    points.append(Point(f"one merged model ({best['label']})", base_bytes, base_bytes, sum(best["test"][t] / ft_test[t] for t in tasks) / T,
                        dict(best["test"]), note=f"the quality table's best merge on validation ({best['chosen']}); no base needed"))
    lam_t = results["tall"]["task_arithmetic"]["lambdas"]
    per_task = {t: {"tall_lambda": lam_t[t]} for t in tasks}
    specs = [
        ("TALL, τ_MTL float32", "tall_masks", {"aggregate": "task_arithmetic", "mtl_dtype": "float32"}, per_task, "λ_t per task from run.py"),
        ("TALL, τ_MTL bfloat16", "tall_masks", {"aggregate": "task_arithmetic", "mtl_dtype": "bfloat16"}, per_task, "same masks, τ_MTL rounded"),
        ("EMR", "emr", {}, None, "tuning-free"),
        (f"TSV-C, rank 1/{T}", "tsv_compress", {}, None, "default budget; 1-D tensors as TALL (λ 0.4)"),
        (f"TSV-C, rank 1/{4 * T}", "tsv_compress", {"rank_fraction": round(1 / (4 * T), 6)}, None, "a quarter of the default"),
    ]
    for label, method, params, pm, note in specs:
        print(f"{label} ...", flush=True)
        points.append(collection_point(label.replace(", ", "-").replace(" ", "_").replace("/", "_"), method, params, pm, suite, ft_test, work, base_bytes, note))
        points[-1].label = label
        print(f"  {points[-1].bytes / 1e6:.1f} MB, {100 * points[-1].normalized:.1f}%, compress {points[-1].compress_s:.1f} s, extract {points[-1].extract_s:.1f} s", flush=True)
    png = plot(points, work / "frontier.png", T)
    (suite.root / "frontier.json").write_text(json.dumps([asdict(p) for p in points], indent=1) + "\n")
    body = f"""Bytes on disk of each way to keep the {T} MiniLM fine-tunes of the suite above, against the average normalized **test** accuracy of
the models they give back (100 = the fine-tunes themselves). Collections are written by `mergekit-lite run` with `merge_method:
tall_masks` / `emr` / `tsv_compress` and read back with `mergekit-lite extract COLLECTION --all OUT`; every extracted task is scored with
its frozen head. A collection refers to the base model rather than storing it (`embed_base: false`), so "MB with the base" adds the
base's {base_bytes / 1e6:.1f} MB: that is what a user keeps. Times are wall-clock on {T} tasks, 2 shared CPU cores. The suite has
{T} tasks, so there is no 16-task row. Command: `{COMMAND}` (after `run.py`).

Word embeddings are frozen in these fine-tunes, so their τ is zero, yet every scheme stores that 30,522 × 384 table: τ_MTL / τ_uni
keep it as 46.9 MB of float32 zeros (half in bfloat16), and TSV-C keeps each task's rank-r factors of a zero matrix (47.5 MB at
rank 1/8, 11.9 MB at 1/32). Skipping all-zero task-vector tensors would take about that much off every collection here.

{table(points, tasks)}

![compression frontier](benchmarks/quality_text/frontier.png)
"""
    print("\n" + body)
    if args.write:
        import shutil

        shutil.copyfile(png, HERE / "frontier.png")
        report.update_section(REPO / "BENCHMARKS.md", body, SECTION)
        print(f"wrote {REPO / 'BENCHMARKS.md'} ({SECTION}) and {HERE / 'frontier.png'}")
    merge.remove(work / "collections")
    return 0


if __name__ == "__main__":
    sys.exit(main())
