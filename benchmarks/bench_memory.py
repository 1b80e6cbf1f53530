#!/usr/bin/env python3
"""Memory model check: each method's declared working copies of the largest tensor against its measured peak RSS.

    .venv/bin/python benchmarks/bench_memory.py                 # every method, K = 2, 4, 8 (where it runs)
    .venv/bin/python benchmarks/bench_memory.py --methods ties slerp --k 1 4
    .venv/bin/python benchmarks/bench_memory.py --write         # ... and replace "## Memory model" in BENCHMARKS.md

Every method declares ``working_copies(K)``: how many float32 copies of the largest tensor it holds
at once with K input models (``mergekit-lite methods NAME`` prints it; ``run --dry-run`` turns it
into a peak-memory estimate, adding one stored copy of the output). This script measures it: two
one-layer Llama checkpoints (float32) that differ only in the size of their MLP matrices -- the
largest tensors, 16.8M entries in "big" and 1M in "small" -- are merged by ``mergekit-lite run``
with the same recipe, and the difference of the two peak RSS (``os.wait4`` of the child) divided
by the difference of the largest tensor's float32 bytes is the number of copies the run held::

    measured = (peak_big - peak_small) / (4 * (numel_big - numel_small))

Each peak is taken without the mapped row windows of the largest tensor's job (``execute.window_bytes``: at most
16 MiB of page cache per checkpoint read by row chunks, counted in RSS but not a copy of the tensor; the
estimate adds them apart).

Interpreter, imports and small tensors cancel out. The check passes when ``measured <=
declared + 2`` (the estimate's stored copy, and the previous tensor's output while it is written in the
background) + 0.25 (page-granularity and allocator slack); a method that holds less than declared is reported
too ("over-declared": more than 1.5 copies below declared + 1),
since the estimate should be near the truth, not only above it. Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_speed  # noqa: E402  (its checkpoint builder, launcher and recipes are reused as they are)
from bench_speed import CLI, MiB, RESULTS, build_model, run_child, runs_at, write_recipe  # noqa: E402

SECTION = "## Memory model"
COMMAND = ".venv/bin/python benchmarks/bench_memory.py --write"
SLACK = 0.25
#: output copies on top of the working copies: the one being made and the last one, written while the next is made
OUTPUTS = 2
OVER_DECLARED = 1.5

_ONE_LAYER = dict(
    vocab_size=512,
    hidden_size=512,
    num_hidden_layers=1,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
#: big: MLP matrices [32768, 512] = 16.8M entries (64 MiB in float32); small: [2048, 512] = 1M entries.
bench_speed.SIZES["mem-big"] = {"dtype": "float32", "shard_bytes": 512 * MiB, "config": {**_ONE_LAYER, "intermediate_size": 32768}}
bench_speed.SIZES["mem-small"] = {"dtype": "float32", "shard_bytes": 512 * MiB, "config": {**_ONE_LAYER, "intermediate_size": 2048}}


@dataclass
class Row:
    method: str
    k: int
    declared: float
    measured: float
    peak_big_mib: float
    peak_small_mib: float

    @property
    def verdict(self) -> str:
        if self.measured > self.declared + OUTPUTS + SLACK:
            return "FAIL: holds more than declared"
        if self.measured < self.declared + 1 - OVER_DECLARED:
            return "over-declared"
        return "ok"


def methods_to_run(requested: list[str] | None) -> list[str]:
    from mergekit_lite.methods import METHODS

    if requested:  # collections (tall_masks, emr, tsv_compress) too, when named
        return list(requested)
    return [n for n in sorted(METHODS) if METHODS[n].output == "model"]


def measure(method: str, k: int, work: Path, log) -> Row:
    from mergekit_lite.methods import METHODS

    peaks = {}
    numel = {}
    for size in ("mem-small", "mem-big"):
        model = build_model(size, k, work, log)
        recipe = work / "recipes" / f"{size}-{method}-k{k}.yml"
        write_recipe(recipe, method, model, k)
        out = work / "out" / f"{size}-{method}-k{k}"
        result = run_child([str(CLI), "run", str(recipe), str(out), "--force", "-q"])
        if result.rc != 0:
            raise RuntimeError(f"{method} K={k} ({size}) failed: {result.stderr.strip()[-500:]}")
        peaks[size] = result.maxrss_kib * 1024 - _windows(recipe)
        numel[size] = model.largest[1]
    measured = (peaks["mem-big"] - peaks["mem-small"]) / (4 * (numel["mem-big"] - numel["mem-small"]))
    declared = METHODS[method].working_copies(_inputs(recipe))
    return Row(method, k, declared, measured, peaks["mem-big"] / MiB, peaks["mem-small"] / MiB)


def _windows(recipe: Path) -> int:
    """The mapped row windows the largest merged tensor's job holds (``execute.window_bytes``): page cache counted in
    the RSS, a fixed size per checkpoint (not a copy of the tensor), so taken out of the peak before comparing."""
    from mergekit_lite.api import plan
    from mergekit_lite.execute import window_bytes
    from mergekit_lite.recipe import Recipe

    the_plan = plan(Recipe.from_yaml(recipe))
    try:
        job = max((job for job in the_plan.jobs if job.merge), key=lambda job: job.out.numel)
        return window_bytes(the_plan, job)
    finally:
        the_plan.close()


def _inputs(recipe: Path) -> int:
    """The input count the plan gives working_copies (fine-tunes, plus the base where the method reads it as a model)."""
    from mergekit_lite.api import plan
    from mergekit_lite.recipe import Recipe

    the_plan = plan(Recipe.from_yaml(recipe))
    try:
        return max(len(job.inputs) for job in the_plan.jobs if job.merge)
    finally:
        the_plan.close()


def table(rows: list[Row]) -> str:
    lines = [
        "| method | K | declared copies (+1 stored, +1 being written) | measured copies | peak RSS big / small (MiB) | check |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r.method} | {r.k} | {r.declared:.3g} + 2 | {r.measured:.2f} | {r.peak_big_mib:.0f} / {r.peak_small_mib:.0f} | {r.verdict} |")
    return "\n".join(lines)


def write_section(body: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else bench_speed.INTRO
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + (text[end + 1:] if end >= 0 else "")
    RESULTS.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", help="methods to check (default: every method that writes a merged model; collection methods when named)")
    parser.add_argument("--k", nargs="+", type=int, default=[2, 4, 8], help="numbers of fine-tunes (default 2 4 8; two-model methods also run at the one K they take)")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "memory")
    parser.add_argument("--write", action="store_true", help=f"replace the '{SECTION}' section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    bench_speed.ensure_venv()

    rows: list[Row] = []
    skipped: list[str] = []
    for method in methods_to_run(args.methods):
        ks = [k for k in args.k if not runs_at(method, k)]
        if not ks:  # slerp & co.: the one K they take
            ks = [k for k in (1, 2) if not runs_at(method, k)][:1]
        if not ks:
            skipped.append(method)
            continue
        for k in ks:
            row = measure(method, k, args.work, log)
            log(f"{method} K={k}: declared {row.declared:.3g}+1, measured {row.measured:.2f} -> {row.verdict}")
            rows.append(row)
    body = table(rows)
    print(body)
    failed = [r for r in rows if r.verdict.startswith("FAIL")]
    if args.write:
        section = (
            f"{SECTION}\n\n"
            f"Command: `{COMMAND}` ({platform.machine()}, {platform.python_version()}). Each method's declared\n"
            "working copies of the largest tensor (`mergekit-lite methods NAME`; `run --dry-run` adds one stored\n"
            "copy and the previous output, written while the next is made) against the copies measured from two runs\n"
            "that differ only in the size of the largest tensor (see the script's docstring). `ok`: measured within\n"
            "declared + 2 + 0.25; `over-declared`: more than 1.5 copies below declared + 1.\n\n"
            f"{body}\n"
        )
        if skipped:
            section += f"\nNot run (take no K of {args.k}): {', '.join(skipped)}.\n"
        write_section(section)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
